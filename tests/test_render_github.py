"""GitHub workflow-command renderer on hand-built reports."""

from __future__ import annotations

from dataclasses import replace

from test_render_terminal import error_case, failing_case, jacobian_failure, passing_case, sample_report

from gradverify.render.github import escape_data, escape_property, render_github
from gradverify.report import CheckResult, Diagnosis, Report, Severity, Status


def _unescape(text: str) -> str:
    """What the Actions runner does with a value (the inverse of GitHub's escaping rules)."""
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def _fields(line: str) -> tuple[dict[str, str], str]:
    props, _, message = line.split(" ", 1)[1].partition("::")
    return dict(item.split("=", 1) for item in props.split(",")), message


def test_escaping_follows_the_runner_rules() -> None:
    assert escape_data("50% off\r\nnext: a,b") == "50%25 off%0D%0Anext: a,b"
    assert escape_property("x(3,3): 50%\n") == "x(3%2C3)%3A 50%25%0A"
    # % first: an already-escaped-looking value must survive a round trip unchanged
    assert _unescape(escape_property("%0A:,")) == "%0A:,"


def test_failing_check_becomes_an_error_on_the_backward_line() -> None:
    lines = render_github(sample_report(), workspace="/repo").splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    # the failing jacobian and the backward that raised; the confirming gradcheck adds no second annotation
    assert len(errors) == 2
    fields, message = _fields(next(line for line in errors if "jacobian" in line))
    assert fields["file"] == "specs/column_normalize_buggy.py" and fields["line"] == "24"
    assert _unescape(fields["title"]) == "gradverify: ColumnNormalize[x(3,3) float64 cpu] jacobian failed"
    assert "\n" not in message and "%0A" in message
    text = _unescape(message)
    assert text.startswith("18 / 81 Jacobian entries mismatched\n")
    assert "at ∂out[0,0] / ∂x[1,0] (expected -0.09, got 0)" in text and "diagnosis [missing_offdiag]" in text
    assert "reproduce: gradverify check specs/column_normalize_buggy.py" in text
    broken = _fields(next(line for line in errors if "Broken" in line))[0]
    assert (broken["file"], broken["line"]) == ("specs/broken.py", "15")
    assert any(line.startswith("::notice file=specs/column_normalize.py,line=5,") for line in lines)  # skipped device
    assert lines[-1].startswith("4 cases:")


def test_forward_findings_point_at_the_op_and_yaml_ops_name_their_spec() -> None:
    inplace = CheckResult("contracts", Status.FAILED, message="forward modified x in place",
                          diagnoses=(Diagnosis("inplace_forward", "forward modified x in place"),))
    case = failing_case(checks=(inplace,), file="/repo/specs/ops/ln.py", spec_file="/repo/specs/ln.yaml", spec_line=7)
    fields, message = _fields(render_github(Report(cases=(case,)), workspace="/repo").splitlines()[0])
    assert (fields["file"], fields["line"]) == ("specs/ops/ln.py", "16")  # the op's own line, not backward's
    assert "declared in specs/ln.yaml:7" in _unescape(message)
    jac = failing_case(checks=(jacobian_failure(),), file="/repo/specs/ops/ln.py", spec_file="/repo/specs/ln.yaml",
                       spec_line=7)
    fields, message = _fields(render_github(Report(cases=(jac,)), workspace="/repo").splitlines()[0])
    assert (fields["file"], fields["line"]) == ("specs/ops/ln.py", "24")  # the fix goes in backward
    assert "declared in specs/ln.yaml:7" in _unescape(message)
    spec = failing_case(status=Status.SPEC, file="/repo/specs/ops/ln.py", spec_file="/repo/specs/ln.yaml", spec_line=7,
                        checks=(CheckResult("spec", Status.SPEC, message="guessed dim"),))
    fields, _ = _fields(render_github(Report(cases=(spec,)), workspace="/repo").splitlines()[0])
    assert (fields["file"], fields["line"]) == ("specs/ln.yaml", "7")  # a spec problem is fixed in the spec


def test_absolute_paths_are_made_relative_to_the_workspace() -> None:
    report = Report(cases=(failing_case(file="/home/runner/work/proj/ops/normalize.py"),))
    out = render_github(report, workspace="/home/runner/work/proj")
    assert "::error file=ops/normalize.py,line=24," in out
    outside = render_github(report, workspace="/elsewhere")
    assert "file=/home/runner/work/proj/ops/normalize.py" in outside


def test_warnings_overruled_and_passing() -> None:
    warned = passing_case(status=Status.WARNED, checks=(
        CheckResult("jacobian", Status.WARNED, summary="0 / 81, 12 not judged", diagnoses=(
            Diagnosis("unverifiable", "12 entries not judged", severity=Severity.WARNING),)),
        CheckResult("gradcheck", Status.FAILED, counts=False, summary="(fast) failed (overruled)")))
    out = render_github(Report(cases=(warned,))).splitlines()
    assert out[0].startswith("::warning file=specs/linear.py,line=22,")
    assert out[1].startswith("::notice ") and "not counted" in _unescape(out[1])
    assert render_github(Report(cases=(passing_case(),))) == "1 case: 1 passed\n"
    assert "::error" in render_github(Report(cases=(replace(error_case()),)))
