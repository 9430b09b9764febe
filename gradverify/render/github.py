"""Report -> GitHub Actions workflow commands, and a markdown job summary.

`::error file=ops/normalize.py,line=22,title=...::message` makes GitHub draw the failure on the
line of the Function's `backward` in the pull request's diff. Values are escaped by the runner's
rules (data: % CR LF; properties also : and ,), otherwise a message with a newline or a colon
silently truncates the annotation. Draws only; never computes.
"""

from __future__ import annotations

import posixpath

from gradverify.render.junit import FORWARD_CHECKS, case_label
from gradverify.render.terminal import footer
from gradverify.report import CaseResult, CheckResult, Report, Status, format_index


def escape_data(text: str) -> str:
    """The message part of a workflow command (after `::`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A `key=value` property (file, line, title) of a workflow command."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _relative(file: str, workspace: str | None) -> str:
    """GitHub matches annotations to repository-relative paths; spec paths may be absolute."""
    path = file.replace("\\", "/")
    if workspace:
        root = workspace.replace("\\", "/").rstrip("/") + "/"
        if path.startswith(root):
            return path[len(root):]
    return posixpath.normpath(path) if not path.startswith("/") else path


def _command(level: str, case: CaseResult, line: int | None, title: str, message: str,
             workspace: str | None) -> str:
    props = [f"file={escape_property(_relative(case.file, workspace))}"]
    if line:
        props.append(f"line={line}")
    props.append(f"title={escape_property(title)}")
    return f"::{level} {','.join(props)}::{escape_data(message)}"


def _message(check: CheckResult) -> str:
    lines = [check.message or check.status.value]
    if check.mismatches:
        worst = check.mismatches[0]
        lines.append(f"Greatest absolute difference: {worst.abs_err:.4g} at "
                     f"∂{format_index(worst.output, worst.out_index)} / ∂{format_index(worst.input, worst.in_index)} "
                     f"(expected {worst.expected:.6g}, got {worst.got:.6g})")
    for d in check.diagnoses:
        lines.append(f"diagnosis [{d.kind}] {d.message}")
        if d.hint:
            lines.append(f"hint: {d.hint}")
    return "\n".join(lines)


def render_github(report: Report, *, workspace: str | None = None) -> str:
    """One workflow command per failing check (plus notices for skipped and unexpected results).

    workspace: the repository root (`$GITHUB_WORKSPACE`) to make absolute spec paths relative.
    """
    lines: list[str] = []
    for case in report.cases:
        label = case_label(case)
        if not case.checks:
            if case.status is not Status.PASSED:
                level = "error" if not case.ok else "notice"
                lines.append(_command(level, case, case.line, f"gradverify: {label}",
                                      case.message or case.status.value, workspace))
            continue
        for check in case.checks:
            if check.status in (Status.PASSED, Status.XFAIL):
                continue
            level = {Status.FAILED: "error", Status.ERROR: "error", Status.XPASS: "warning"}.get(check.status, "notice")
            line = case.line if check.name in FORWARD_CHECKS else (case.backward_line or case.line)
            lines.append(_command(level, case, line, f"gradverify: {label} {check.name} {check.status.value}",
                                  _message(check), workspace))
    lines.append(footer(report))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_github_summary(report: Report, *, max_entries: int | None = 20) -> str:
    """Markdown for `$GITHUB_STEP_SUMMARY`: a table of every case, then each failing check's worst entries."""
    icon = {Status.PASSED: "✅", Status.FAILED: "❌", Status.ERROR: "💥", Status.SKIPPED: "⏭️",
            Status.XFAIL: "➖", Status.XPASS: "⚠️"}
    out = [f"## gradverify: {footer(report)}", "",
           "| op | file | status | failing checks |", "|---|---|---|---|"]
    for case in report.cases:
        bad = ", ".join(c.name for c in case.checks if not c.ok) or "-"
        where = f"{case.file}:{case.backward_line or case.line}" if (case.backward_line or case.line) else case.file
        out.append(f"| `{_cell(case_label(case))}` | `{_cell(where)}` | {icon[case.status]} {case.status.value} "
                   f"| {_cell(bad)} |")
    for case in report.cases:
        for check in case.checks:
            if check.ok:
                continue
            out += ["", f"### {_cell(case_label(case))} {check.name}: {check.status.value}", "",
                    _cell(check.message or check.status.value)]
            shown = check.mismatches if max_entries is None else check.mismatches[:max_entries]
            if shown:
                out += ["", "| entry | expected | got | abs err |", "|---|---:|---:|---:|"]
                for m in shown:
                    out.append(f"| ∂{format_index(m.output, m.out_index)} / ∂{format_index(m.input, m.in_index)} "
                               f"| {m.expected:.4f} | {m.got:.4f} | {m.abs_err:.4g} |")
                rest = check.mismatch_count - len(shown)
                if rest > 0:
                    out.append(f"\n… and {rest} more mismatched entries")
            for d in check.diagnoses:
                out.append(f"\n**diagnosis `{d.kind}`**: {_cell(d.message)}" + (f"  \n_hint_: {_cell(d.hint)}" if d.hint else ""))
            if case.repro:
                out.append(f"\n```\n{case.repro}\n```")
    return "\n".join(out) + "\n"
