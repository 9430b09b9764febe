"""Report -> terminal text (rich, with or without colour). Draws; never computes."""

from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradverify.report import CaseResult, CheckResult, Heatmap, Mismatch, Report, Status, format_index

CONTRACT_CHECKS = ("inplace", "grad_count", "grad_meta", "grad_output_inplace", "finite", "determinism",
                   "linearity")

STATUS_STYLE = {
    Status.PASSED: ("PASS", "bold green"),
    Status.FAILED: ("FAIL", "bold red"),
    Status.ERROR: ("ERROR", "bold red"),
    Status.SKIPPED: ("SKIP", "yellow"),
    Status.XFAIL: ("XFAIL", "magenta"),
    Status.XPASS: ("XPASS", "magenta"),
    Status.WARNED: ("WARN", "yellow"),
    Status.SPEC: ("SPEC", "bold red"),
}

HEAT_STYLE = {"X": "bold white on red", "o": "green", ".": "dim", "?": "black on yellow", "|": "dim"}


def _shapes(case: CaseResult) -> str:
    if not case.shapes:
        return "-"
    parts = []
    for name, shape in zip(case.input_names or ("",) * len(case.shapes), case.shapes):
        text = "(" + ",".join(map(str, shape)) + ")"
        parts.append(f"{name}{text}" if name else text)
    return " ".join(parts)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:
        return "nan"
    return f"{value:.3g}"


def _verdict(status: Status, plain: bool) -> Text:
    label, style = STATUS_STYLE[status]
    return Text(label, style="" if plain else style)


def _summary_rows(case: CaseResult) -> list[tuple[str, Status, str, str]]:
    """(check, status, max err, mismatched) rows for one case: contracts collapsed into one row."""
    if not case.checks:
        return [("-", case.status, "-", case.message or "-")]
    rows: list[tuple[str, Status, str, str]] = []
    contracts = [c for c in case.checks if c.name in CONTRACT_CHECKS]
    if contracts:
        bad = [c for c in contracts if not c.ok]
        status = Status.FAILED if bad else Status.PASSED
        detail = ("failed: " + ", ".join(c.name for c in bad)) if bad else f"{len(contracts)}/{len(contracts)} ok"
        rows.append(("contracts", status, "-", detail))
    for check in case.checks:
        if check.name in CONTRACT_CHECKS:
            continue
        if check.name == "jacobian" and check.total_entries:
            count = f"{check.mismatch_count} / {check.total_entries}"
        elif check.status is Status.SKIPPED:
            count = check.message.split(":")[0] if check.message else "skipped"
        else:
            # One short line: the full message is in the case's details below the table.
            text = check.message.split(":")[0].removeprefix(f"torch {check.name} ") if check.message else "-"
            count = "-" if check.ok else (text if len(text) <= 32 else text[:31] + "…")
        rows.append((check.name, check.status, _fmt(check.max_abs_err), count))
    return rows


def summary_table(report: Report, plain: bool) -> Table:
    table = Table(title="gradverify", box=box.ASCII if plain else box.SIMPLE_HEAVY, title_justify="left",
                  show_lines=False)
    longest_op = max((len(case.op) for case in report.cases), default=2)
    table.add_column("op", overflow="fold", min_width=min(longest_op, 32))
    table.add_column("shapes", overflow="fold")
    for column in ("dtype", "device", "check", "verdict", "max |err|"):
        table.add_column(column, no_wrap=True)
    table.add_column("mismatched", overflow="fold")
    for case in report.cases:
        for k, (check, status, err, count) in enumerate(_summary_rows(case)):
            first = k == 0
            table.add_row(case.op if first else "", _shapes(case) if first else "", case.dtype if first else "",
                          case.device if first else "", check, _verdict(status, plain), err, count)
    return table


def _entry_name(m: Mismatch) -> str:
    return f"∂{format_index(m.output, m.out_index)} / ∂{format_index(m.input, m.in_index)}"


def diff_table(check: CheckResult, max_entries: int | None, plain: bool) -> RenderableType:
    shown = check.mismatches if max_entries is None else check.mismatches[:max_entries]
    table = Table(box=box.ASCII if plain else box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("entry")
    table.add_column("expected", justify="right")
    table.add_column("got", justify="right")
    table.add_column("|err|", justify="right")
    for m in shown:
        table.add_row(_entry_name(m), f"{m.expected:.4f}", f"{m.got:.4f}",
                      Text(f"{m.abs_err:.4g}", style="" if plain else "red"))
    parts: list[RenderableType] = [table]
    rest = check.mismatch_count - len(shown)
    if rest > 0:
        parts.append(Text(f"... and {rest} more mismatched entr{'y' if rest == 1 else 'ies'} "
                          "(--max-entries N to show more, --format json for every one)"))
    return Group(*parts)


def torch_style_summary(check: CheckResult) -> str:
    """In the words of torch.testing.assert_close, which users already know how to read."""
    share = 100.0 * check.mismatch_count / check.total_entries if check.total_entries else 0.0
    text = f"Mismatched elements: {check.mismatch_count} / {check.total_entries} ({share:.1f}%)"
    if check.mismatches:
        worst = check.mismatches[0]
        text += (f"\nGreatest absolute difference: {worst.abs_err:.4g} at {_entry_name(worst)}"
                 f" (up to {worst.tolerance:.3g} allowed)")
    return text


def heatmap(h: Heatmap, plain: bool) -> RenderableType:
    title = Text(f"where: ∂{h.output}{list(h.out_shape)} / ∂{h.input}{list(h.in_shape)}   "
                 "X mismatch  o agrees  . zero  ? not judged", style="" if plain else "bold")
    width = max((len(label) for label in h.row_labels), default=0)
    lines: list[RenderableType] = [title, Text(" " * (width + 2) + h.col_header, style="" if plain else "dim")]
    for label, row in zip(h.row_labels, h.rows):
        line = Text(label.rjust(width) + "  ")
        for char in row:
            line.append(char, style="" if plain else HEAT_STYLE.get(char, ""))
        lines.append(line)
    return Group(*lines)


def case_details(case: CaseResult, max_entries: int | None, plain: bool) -> RenderableType:
    label, style = STATUS_STYLE[case.status]
    head = Text()
    head.append(f"{label} ", style="" if plain else style)
    head.append(f"{case.op}", style="" if plain else "bold")
    head.append(f"  {_shapes(case)}  {case.dtype}  {case.device}  seed {case.seed}  ({case.file}"
                f"{':' + str(case.line) if case.line else ''})")
    parts: list[RenderableType] = [Text(""), head]
    if case.message and not case.checks:
        parts.append(Text(f"  {case.message}"))
    for check in case.checks:
        if check.ok and check.status is not Status.XFAIL:
            continue
        verdict, vstyle = STATUS_STYLE[check.status]
        line = Text("  ")
        line.append(f"{check.name}: ", style="" if plain else "bold")
        line.append(check.message or verdict, style="" if plain else vstyle)
        parts.append(line)
        if check.mismatches:
            parts.append(Text(_indent(torch_style_summary(check))))
            parts.append(diff_table(check, max_entries, plain))
            for h in check.heatmaps:
                parts.append(heatmap(h, plain))
        for d in check.diagnoses:
            diag = Text("  diagnosis ")
            diag.append(f"[{d.kind}]", style="" if plain else "bold yellow")
            diag.append(f" {d.message}")
            parts.append(diag)
            if d.evidence:
                parts.append(Text(f"    evidence: {d.evidence}", style="" if plain else "dim"))
            if d.hint:
                parts.append(Text(f"    hint: {d.hint}", style="" if plain else "cyan"))
        for key, value in check.details:
            if check.mismatches or key == "note":
                parts.append(Text(f"    {key}: {value}", style="" if plain else "dim"))
    for note in case.notes:
        parts.append(Text(f"  note: {note}", style="" if plain else "dim"))
    if case.repro:
        parts.append(Text(f"  reproduce: {case.repro}", style="" if plain else "bold"))
    return Group(*parts)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def footer(report: Report) -> str:
    counts: dict[Status, int] = {}
    for case in report.cases:
        counts[case.status] = counts.get(case.status, 0) + 1
    order = (Status.PASSED, Status.FAILED, Status.ERROR, Status.SKIPPED, Status.XFAIL, Status.XPASS)
    words = {Status.PASSED: ("passed", "passed"), Status.FAILED: ("failed", "failed"),
             Status.ERROR: ("error", "errors"), Status.SKIPPED: ("skipped", "skipped"),
             Status.XFAIL: ("expected failure", "expected failures"),
             Status.XPASS: ("unexpectedly passed", "unexpectedly passed")}
    parts = [f"{counts[s]} {words[s][0] if counts[s] == 1 else words[s][1]}" for s in order if counts.get(s)]
    n = len(report.cases)
    return f"{n} case{'s' if n != 1 else ''}: " + (", ".join(parts) if parts else "nothing ran")


def _render(report: Report, *, plain: bool, color: bool, width: int, max_entries: int | None) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, no_color=not color,
                      color_system="standard" if color else None, highlight=False, emoji=False,
                      legacy_windows=False)
    console.print(summary_table(report, plain))
    for case in report.cases:
        if not case.ok or case.status is Status.XFAIL:
            console.print(case_details(case, max_entries, plain))
        elif case.notes and any("default shape" in n for n in case.notes):
            console.print(Text(f"note ({case.op}): {case.notes[0]}", style="" if plain else "dim"))
    for note in report.notes:
        console.print(Text(f"note: {note}"))
    console.print(Text(""))
    console.print(Text(footer(report), style="" if plain else ("bold green" if report.ok else "bold red")))
    return buffer.getvalue()


def render_rich(report: Report, *, color: bool = True, width: int = 120, max_entries: int | None = 20) -> str:
    """The default terminal report; `color=False` keeps the layout but no escape codes (NO_COLOR)."""
    return _render(report, plain=False, color=color, width=width, max_entries=max_entries)


def render_plain(report: Report, *, width: int = 120, max_entries: int | None = 20) -> str:
    """Stable ASCII-boxed text without colour, for logs."""
    return _render(report, plain=True, color=False, width=width, max_entries=max_entries)
