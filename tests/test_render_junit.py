"""JUnit renderer on hand-built reports, validated by parsing the XML back with ElementTree."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

from test_render_terminal import error_case, failing_case, passing_case, sample_report, skipped_case

from gradverify.render.junit import render_junit
from gradverify.report import CheckResult, Diagnosis, Report, Severity, Status


def _parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>')
    return ET.fromstring(text.encode("utf-8"))


def _by_name(root: ET.Element) -> dict[str, ET.Element]:
    return {c.get("name", ""): c for c in root.iter("testcase")}


def _full_report() -> Report:
    warned = passing_case(op="Sqrt", status=Status.WARNED, checks=(
        CheckResult("contracts", Status.WARNED, summary="warning: engine_reduced", diagnoses=(
            Diagnosis("engine_reduced", "grad of shape (4,3) for b(3): the engine sums it", severity=Severity.WARNING),)),
        CheckResult("jacobian", Status.PASSED, summary="0 / 16")))
    xfail = passing_case(op="Ste", status=Status.XFAIL,
                         checks=(CheckResult("jacobian", Status.XFAIL, message="surrogate gradient"),))
    spec = passing_case(op="Guess", status=Status.SPEC, spec_file="specs/g.yaml", spec_line=3, checks=(
        CheckResult("spec", Status.SPEC, message="forward raised TypeError: dim must be int; gradverify guessed dim",
                    diagnoses=(Diagnosis("spec_guess", "forward raised TypeError: dim must be int; gradverify "
                                                       "guessed dim"),)),))
    return Report(cases=(*sample_report().cases, warned, xfail, spec), notes=("a report note",))


def test_one_testcase_per_case_with_counts() -> None:
    root = _parse(render_junit(_full_report()))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 7  # one per case (op x inputs x dtype x device), not per check
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("7", "1", "2", "2")
    assert root.get("tests") == "7" and root.get("failures") == "1"
    assert "ColumnNormalize[x(3,3) float64 cpu]" in _by_name(root)
    assert "Linear[input(4,3) weight(5,3) float32 cpu]" in _by_name(root)
    assert suite.find("system-out").text == "a report note"


def test_failure_has_the_one_line_summary_and_the_plain_report_and_points_at_backward() -> None:
    root = _parse(render_junit(_full_report()))
    case = _by_name(root)["ColumnNormalize[x(3,3) float64 cpu]"]
    assert case.get("classname") == "specs.column_normalize_buggy" and case.get("file") == "specs/column_normalize_buggy.py"
    assert case.get("line") == "24"  # backward, not the class
    failure = case.find("failure")
    assert failure is not None
    assert failure.get("message") == ("ColumnNormalize x(3,3) float64 cpu: jacobian 18 / 81 [missing_offdiag]; "
                                      "gradcheck (fast) failed")
    assert failure.get("type") == "missing_offdiag"
    body = failure.text or ""
    assert "[missing_offdiag] missing off-diagonal terms" in body and "hint: each output depends" in body
    assert "out[0,0]  o..|X..|X.." in body and "∂out[0,0]/∂x[1,0]" in body
    assert "reproduce: gradverify check specs/column_normalize_buggy.py" in body
    assert "\x1b[" not in body
    passing = _by_name(root)["Linear[input(4,3) weight(5,3) float32 cpu]"]
    assert list(passing) == [] and passing.get("line") == "22"


def test_skipped_error_spec_xfail_and_warnings() -> None:
    root = _parse(render_junit(_full_report()))
    by_name = _by_name(root)
    skipped = by_name["ColumnNormalize[x(3,3) float64 cuda]"].find("skipped")
    assert skipped is not None and skipped.get("message") == "cuda not available"
    error = by_name["Broken[x(2) float64 cpu]"].find("error")
    assert error is not None and "backward raised ValueError" in error.get("message", "")
    assert error.get("type") == "backward_error" and by_name["Broken[x(2) float64 cpu]"].find("failure") is None
    spec = by_name["Guess[input(4,3) weight(5,3) float32 cpu]"]
    assert spec.find("error").get("type") == "spec" and spec.get("file") == "specs/g.yaml" and spec.get("line") == "3"
    xfail = by_name["Ste[input(4,3) weight(5,3) float32 cpu]"].find("skipped")
    assert xfail is not None and xfail.get("type") == "xfail" and "surrogate gradient" in xfail.get("message", "")
    warned = by_name["Sqrt[input(4,3) weight(5,3) float32 cpu]"]
    assert warned.find("failure") is None and warned.find("error") is None
    (prop,) = warned.iter("property")
    assert prop.get("name") == "warning" and "[engine_reduced]" in prop.get("value", "")
    assert "the engine sums it" in (warned.find("system-out").text or "")


def test_control_characters_are_dropped_and_identical_cases_get_distinct_names() -> None:
    broken = error_case()
    message = "backward raised ValueError: bad\x1b[31m value\x00"
    broken = replace(broken, checks=(replace(broken.checks[0], message=message, diagnoses=()),), message=message)
    root = _parse(render_junit(Report(cases=(broken, failing_case(), failing_case(),
                                             failing_case(file="other/normalize.py")))))
    assert "bad[31m value" in root.find(".//error").get("message", "")
    names = [(c.get("classname"), c.get("name")) for c in root.iter("testcase")]
    assert len(set(names)) == len(names) == 4
    assert ("specs.column_normalize_buggy", "ColumnNormalize[x(3,3) float64 cpu] #2") in names
    assert ("other.normalize", "ColumnNormalize[x(3,3) float64 cpu]") in names


def test_max_entries_bounds_the_text_and_empty_report_is_valid() -> None:
    body = _parse(render_junit(Report(cases=(failing_case(),)), max_entries=2)).find(".//failure").text or ""
    assert body.count("/∂x[1,0]") + body.count("/∂x[2,1]") == 2 and "… 16 more" in body
    empty = _parse(render_junit(Report(cases=())))
    assert empty.get("tests") == "0" and empty.find("testsuite") is not None
    assert skipped_case().status is Status.SKIPPED
