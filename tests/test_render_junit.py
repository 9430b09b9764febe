"""JUnit renderer on hand-built reports, validated by parsing the XML back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gradverify.render.junit import render_junit
from gradverify.report import CaseResult, CheckResult, Diagnosis, Mismatch, Report, Status


def failing_case(file: str = "ops/normalize.py") -> CaseResult:
    mismatches = tuple(Mismatch("out", "x", (0, j), (1, j), expected=-0.09, got=0.0, tolerance=1e-7) for j in range(3))
    jacobian = CheckResult(
        name="jacobian", status=Status.FAILED, message="3 / 9 Jacobian entries mismatched", max_abs_err=0.09,
        mismatch_count=3, total_entries=9, mismatches=mismatches,
        diagnoses=(Diagnosis("missing_offdiag", "missing off-diagonal terms", hint="add the reduction term"),),
    )
    return CaseResult(op="Normalize", file=file, shapes=((3, 3),), dtype="float64", device="cpu", seed=0,
                      status=Status.FAILED, checks=(CheckResult("inplace", Status.PASSED), jacobian),
                      message=jacobian.message, repro="gradverify check ops/normalize.py --op Normalize",
                      line=5, backward_line=12, input_names=("x",))


def sample_report() -> Report:
    """One of each outcome a renderer must draw: failed, passed, skipped device, user-code error, xfail."""
    passed = CaseResult(op="Linear", file="specs/linear.py", shapes=((4, 3), (5, 3)), dtype="float32", device="cpu",
                        seed=0, status=Status.PASSED, input_names=("input", "weight"), line=14, backward_line=22,
                        checks=(CheckResult("jacobian", Status.PASSED, total_entries=240),
                                CheckResult("gradcheck", Status.PASSED)))
    skipped = CaseResult(op="Normalize", file="ops/normalize.py", shapes=((3, 3),), dtype="float64",
                         device="cuda:1", seed=0, status=Status.SKIPPED, message="skipped: cuda not available",
                         input_names=("x",), line=5, backward_line=12)
    error = CaseResult(op="Broken", file="specs/broken.py", shapes=((2,),), dtype="float64", device="cpu", seed=0,
                       status=Status.ERROR, input_names=("x",), line=8, backward_line=15,
                       checks=(CheckResult("forward", Status.ERROR,
                                           message="forward raised ValueError: bad\x1b[31m value\x00"),))
    xfail = CaseResult(op="Ste", file="specs/ste.py", shapes=((2,),), dtype="float64", device="cpu", seed=0,
                       status=Status.XFAIL, input_names=("x",),
                       checks=(CheckResult("jacobian", Status.XFAIL, message="surrogate gradient"),))
    return Report(cases=(failing_case(), passed, skipped, error, xfail), notes=("a report note",))


def _parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>')
    return ET.fromstring(text.encode("utf-8"))


def test_one_testcase_per_case_and_check_with_counts() -> None:
    root = _parse(render_junit(sample_report()))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    # failing: 2 checks, passed: 2, skipped: no checks -> 1, error: 1, xfail: 1
    assert len(cases) == 7
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("7", "1", "1", "2")
    assert root.get("tests") == "7" and root.get("failures") == "1"
    names = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(set(names)) == len(names)
    assert "Linear[input(4,3) weight(5,3) float32 cpu] jacobian" in [n for _, n in names]
    assert suite.find("system-out").text == "a report note"


def test_failure_body_holds_the_diff_summary_and_points_at_backward() -> None:
    root = _parse(render_junit(sample_report()))
    case = next(c for c in root.iter("testcase") if c.get("name") == "Normalize[x(3,3) float64 cpu] jacobian")
    assert case.get("classname") == "ops.normalize" and case.get("file") == "ops/normalize.py"
    assert case.get("line") == "12"  # backward, not the class
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "3 / 9 Jacobian entries mismatched"
    body = failure.text or ""
    assert "Mismatched elements: 3 / 9 (33.3%)" in body
    assert "∂out[0,2] / ∂x[1,2] | -0.09 | 0 | 0.09" in body
    assert "diagnosis [missing_offdiag]" in body and "hint: add the reduction term" in body
    assert "reproduce: gradverify check ops/normalize.py --op Normalize" in body
    passing = next(c for c in root.iter("testcase") if c.get("name") == "Normalize[x(3,3) float64 cpu] inplace")
    assert list(passing) == [] and passing.get("line") == "5"  # a forward contract points at the class


def test_skipped_error_and_xfail_outcomes() -> None:
    root = _parse(render_junit(sample_report()))
    by_name = {c.get("name"): c for c in root.iter("testcase")}
    skipped = by_name["Normalize[x(3,3) float64 cuda:1] case"].find("skipped")
    assert skipped is not None and "cuda not available" in skipped.get("message", "")
    error = by_name["Broken[x(2) float64 cpu] forward"].find("error")
    assert error is not None and error.get("message") == "forward raised ValueError: bad[31m value"  # control chars dropped
    assert by_name["Broken[x(2) float64 cpu] forward"].find("failure") is None
    xfail = by_name["Ste[x(2) float64 cpu] jacobian"].find("skipped")
    assert xfail is not None and xfail.get("type") == "xfail"
    assert [c.tag for c in by_name["Linear[input(4,3) weight(5,3) float32 cpu] gradcheck"]] == []


def test_identical_cases_get_distinct_names_and_files_keep_same_ops_apart() -> None:
    report = Report(cases=(failing_case(), failing_case(), failing_case("other/normalize.py")))
    names = [(c.get("classname"), c.get("name")) for c in _parse(render_junit(report)).iter("testcase")]
    assert len(set(names)) == len(names) == 6
    assert ("ops.normalize", "Normalize[x(3,3) float64 cpu] jacobian #2") in names
    assert ("other.normalize", "Normalize[x(3,3) float64 cpu] jacobian") in names


def test_max_entries_cuts_the_body_with_a_note_and_empty_report_is_valid() -> None:
    body = _parse(render_junit(Report(cases=(failing_case(),)), max_entries=1)).find(".//failure").text or ""
    assert body.count("| -0.09 |") == 1 and "... and 2 more" in body
    empty = _parse(render_junit(Report(cases=())))
    assert empty.get("tests") == "0" and empty.find("testsuite") is not None
