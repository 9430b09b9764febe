"""GitHub workflow-command renderer and job summary on hand-built reports."""

from __future__ import annotations

from test_render_junit import failing_case, sample_report

from gradverify.render.github import escape_data, escape_property, render_github, render_github_summary
from gradverify.report import Report


def _unescape(text: str) -> str:
    """What the Actions runner does with a value (the inverse of GitHub's escaping rules)."""
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def test_escaping_follows_the_runner_rules() -> None:
    assert escape_data("50% off\r\nnext: a,b") == "50%25 off%0D%0Anext: a,b"
    assert escape_property("x(3,3): 50%\n") == "x(3%2C3)%3A 50%25%0A"
    # % first: an already-escaped-looking value must survive a round trip unchanged
    assert _unescape(escape_property("%0A:,")) == "%0A:,"


def test_failing_check_becomes_an_error_on_the_backward_line() -> None:
    lines = render_github(sample_report(), workspace="/repo").splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    assert len(errors) == 2  # the failing jacobian and the forward that raised; nothing for passes
    jac = next(line for line in errors if "jacobian" in line)
    props, _, message = jac[len("::error "):].partition("::")
    fields = dict(item.split("=", 1) for item in props.split(","))
    assert fields["file"] == "ops/normalize.py" and fields["line"] == "12"
    assert _unescape(fields["title"]) == "gradverify: Normalize[x(3,3) float64 cpu] jacobian failed"
    assert "\n" not in message and "%0A" in message
    text = _unescape(message)
    assert text.startswith("3 / 9 Jacobian entries mismatched\n")
    assert "at ∂out[0,0] / ∂x[1,0]" in text and "diagnosis [missing_offdiag]" in text
    forward = next(line for line in errors if "forward" in line)
    assert "file=specs/broken.py,line=8," in forward  # forward errors point at the class
    assert any(line.startswith("::notice file=ops/normalize.py,line=5,") for line in lines)  # skipped device
    assert lines[-1].startswith("5 cases:")


def test_absolute_paths_are_made_relative_to_the_workspace() -> None:
    report = Report(cases=(failing_case("/home/runner/work/proj/ops/normalize.py"),))
    out = render_github(report, workspace="/home/runner/work/proj")
    assert "::error file=ops/normalize.py,line=12," in out
    outside = render_github(report, workspace="/elsewhere")
    assert "file=/home/runner/work/proj/ops/normalize.py" in outside


def test_passing_report_has_no_annotations() -> None:
    report = Report(cases=(sample_report().cases[1],))
    assert render_github(report) == "1 case: 1 passed\n"


def test_job_summary_is_markdown_with_a_row_per_case_and_the_worst_entries() -> None:
    text = render_github_summary(sample_report(), max_entries=2)
    assert text.startswith("## gradverify: 5 cases:")
    assert "| `Normalize[x(3,3) float64 cpu]` | `ops/normalize.py:12` | ❌ failed | jacobian |" in text
    assert "### Normalize[x(3,3) float64 cpu] jacobian: failed" in text
    assert text.count("| ∂out[") == 2 and "… and 1 more mismatched entries" in text
    assert "**diagnosis `missing_offdiag`**" in text
    assert "```\ngradverify check ops/normalize.py --op Normalize\n```" in text
