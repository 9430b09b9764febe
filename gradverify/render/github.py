"""Report -> GitHub Actions workflow commands (annotations). Draws; never computes.

`::error file=ops/normalize.py,line=22,title=...::message` makes GitHub draw the failure on the
line of the op's `backward` in the pull request's diff. For an op declared in a YAML spec the
annotation still points at the op's own file and backward (that is where the fix goes) and
names the YAML's file:line in its message. Values are escaped by the runner's rules (data: %
CR LF; properties also : and ,), otherwise a message with a newline or a colon silently
truncates the annotation. The job summary is Markdown (render/markdown.py).
"""

from __future__ import annotations

import posixpath

from gradverify.render.markdown import render_github_summary
from gradverify.render.text import SECOND_OPINIONS, case_label, footer, num, ordered_diagnoses, spec_location
from gradverify.report import CaseResult, CheckResult, Report, Status, format_index

# Checks about forward itself (and findings of forward, whatever check found them): the
# annotation points at the op's definition, not at backward.
FORWARD_CHECKS = ("forward", "inplace", "case", "spec")
FORWARD_KINDS = ("inplace_forward", "undeclared_mutation", "output_alias", "fake_kernel_mismatch", "missing_fake",
                 "spec_guess")

_LEVEL = {Status.FAILED: "error", Status.ERROR: "error", Status.SPEC: "error", Status.WARNED: "warning",
          Status.XPASS: "warning"}


def escape_data(text: str) -> str:
    """The message part of a workflow command (after `::`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A `key=value` property (file, line, title) of a workflow command."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def relative(file: str, workspace: str | None) -> str:
    """GitHub matches annotations to repository-relative paths; spec paths may be absolute."""
    path = file.replace("\\", "/")
    if workspace:
        root = workspace.replace("\\", "/").rstrip("/") + "/"
        if path.startswith(root):
            return path[len(root):]
    return posixpath.normpath(path) if not path.startswith("/") else path


def finding_place(case: CaseResult, check: CheckResult | None) -> tuple[str, int | None]:
    """(file, line) a finding belongs on: backward's line in the op's file; the op's own line for a
    finding about forward; the YAML spec's line for a spec problem of an op declared in YAML."""
    status = check.status if check is not None else case.status
    if status is Status.SPEC and case.spec_file:
        return case.spec_file, case.spec_line
    if check is None or check.name in FORWARD_CHECKS or (
            check.diagnoses and all(d.kind in FORWARD_KINDS for d in check.diagnoses)):
        return case.file, case.line or case.backward_line
    return case.file, case.backward_line or case.line


def _command(level: str, file: str, line: int | None, title: str, message: str, workspace: str | None) -> str:
    props = [f"file={escape_property(relative(file, workspace))}"]
    if line:
        props.append(f"line={line}")
    props.append(f"title={escape_property(title)}")
    return f"::{level} {','.join(props)}::{escape_data(message)}"


def _message(case: CaseResult, check: CheckResult, workspace: str | None) -> str:
    lines = [check.message or check.summary or check.status.value]
    if check.mismatches:
        worst = check.mismatches[0]
        lines.append(f"Greatest absolute difference: {num(worst.abs_err)} at "
                     f"∂{format_index(worst.output, worst.out_index)} / ∂{format_index(worst.input, worst.in_index)} "
                     f"(expected {num(worst.expected)}, got {num(worst.got)})")
    for d in ordered_diagnoses(check):
        lines.append(f"diagnosis [{d.kind}] {d.message}")
        if d.hint:
            lines.append(f"hint: {d.hint}")
    if check.guarantee and check.guarantee not in check.message:
        lines.append(check.guarantee)
    if case.spec_file:
        lines.append(f"declared in {relative(spec_location(case), workspace)}")
    if case.repro:
        lines.append(f"reproduce: {case.repro}")
    return "\n".join(lines)


def render_github(report: Report, *, workspace: str | None = None) -> str:
    """One workflow command per finding (plus notices for skipped and overruled results).

    workspace: the repository root (`$GITHUB_WORKSPACE`) to make absolute spec paths relative.
    """
    lines: list[str] = []
    for case in report.cases:
        label = case_label(case)
        if not case.checks:
            if case.status is not Status.PASSED:
                level = _LEVEL.get(case.status, "notice")
                message = case.message or case.status.value
                if case.spec_file:
                    message += f"\ndeclared in {relative(spec_location(case), workspace)}"
                file, line = finding_place(case, None)
                lines.append(_command(level, file, line, f"gradverify: {label}", message, workspace))
            continue
        failed = {c.name for c in case.checks if c.counts and c.status in (Status.FAILED, Status.ERROR)}
        for check in case.checks:
            if check.status in (Status.PASSED, Status.XFAIL, Status.SKIPPED):
                continue  # a check not run in a case that ran is in the report, not worth a notice
            if SECOND_OPINIONS.get(check.name) in failed and not check.diagnoses:
                continue  # torch's check confirming ours: one annotation per finding
            level = _LEVEL.get(check.status, "notice") if check.counts else "notice"
            status = check.status.value if check.counts else f"{check.status.value} (not counted)"
            file, line = finding_place(case, check)
            lines.append(_command(level, file, line, f"gradverify: {label} {check.name} {status}",
                                  _message(case, check, workspace), workspace))
    lines.append(footer(report))
    return "\n".join(lines) + "\n"


__all__ = ["escape_data", "escape_property", "finding_place", "relative", "render_github", "render_github_summary"]
