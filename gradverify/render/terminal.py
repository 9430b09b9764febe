"""Report -> terminal text: a summary table, then one short block per finding. Draws; never computes.

Layout rules (issue 13): everything fits the given width (80 columns and up): prose is wrapped
between words with an indented continuation, tables are indented inside their block, and only
the `reproduce:` line is left whole for the terminal to wrap, so it can be copied in one piece.
Every piece of user text goes in as `rich.text.Text`, never as markup, so an op named
`LayerNorm[affine]` or a message holding `[bold]` prints as written.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradverify.render.text import (CaseGroup, case_variant, check_result_text, counted_label, detail_groups,
                                    detailed_checks, entries_shown, footer, heatmap_glyphs, heatmap_title,
                                    inputs_text, message_is_redundant, more_entries_text, num, num_pair,
                                    ordered_diagnoses, passing_notes, same_finding_text, shows_max_err,
                                    where_text)
from gradverify.report import CaseResult, CheckResult, Diagnosis, Heatmap, Report, Severity, Status, entry_name

STATUS_STYLE = {
    Status.PASSED: "green",
    Status.WARNED: "yellow",
    Status.FAILED: "bold red",
    Status.ERROR: "bold red",
    Status.SPEC: "bold red",
    Status.SKIPPED: "dim",
    Status.XFAIL: "magenta",
    Status.XPASS: "magenta",
}
HEAT_STYLE = {"X": "bold red", "o": "green", ".": "dim", "?": "bold yellow", "|": "dim"}
SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "bold yellow", Severity.NOTE: "bold cyan"}

# How many of a failing check's worst entries the default report lists (fewer if max_entries
# says so). Five show the pattern's scale; the heatmap shows where the rest are, and JSON has all.
TOP_ENTRIES = 5
INDENT = 2  # a check's lines inside a case block
DETAIL = 4  # evidence, hints, tables inside a check
GAP = 4  # between a heatmap and the entries table beside it
MIN_BESIDE = 30  # narrower than this, the entries go above the heatmap rather than beside it
OUTPUT_LINES = 20  # lines of the user's own printed output shown with --verbose


def render_terminal(report: Report, *, width: int = 80, color: bool = False, verbosity: int = 0,
                    max_entries: int | None = 20, ci: bool = False, top_entries: int = TOP_ENTRIES) -> str:
    """The terminal report.

    verbosity: -1 (--quiet) the summary table and the footer only; 0 the table and one block per
    finding; 1 (--verbose) also the method internals (each check's details), every check's notes
    and up to `max_entries` entries. `max_entries` caps the entries listed per failing check in
    every mode (None: no cap, 0: none); by default the `top_entries` worst are listed. ci: a CI
    log, kept bounded (the top entries, pointing at a JSON file for every entry).
    """
    width = max(40, width)  # below 40 columns not even the summary table's headers fit
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, no_color=not color,
                      color_system="standard" if color else None, highlight=False, emoji=False, markup=False,
                      legacy_windows=False, soft_wrap=False)
    if report.cases:
        console.print(summary_table(report, fold=verbosity < 1))
    if verbosity >= 0:
        opts = Options(width=width, verbosity=verbosity, ci=ci,
                       limit=_entry_limit(max_entries, verbosity, ci, top_entries), verbose_limit=max_entries)
        for group in detail_groups(report, verbosity):
            console.print()
            for line in case_block(group, opts):
                console.print(line, soft_wrap=True)  # fitted already; the repro line is left whole
        notes = passing_notes(report, verbosity)
        if notes:
            console.print()
            for note in notes:
                for line in wrap(Text.assemble(("note", "dim"), f" ({note.who}): {note.text}"), width, 0, 2):
                    console.print(line, soft_wrap=True)
        for text in report.notes:
            for line in wrap(Text.assemble(("note: ", "dim"), text), width, 0, 2):
                console.print(line, soft_wrap=True)
    if report.cases or report.notes:
        console.print()
    style = "bold green" if report.ok and report.checked_anything else "bold red" if not report.ok else "bold yellow"
    for line in wrap(Text(footer(report), style=style), width, 0, 2):
        console.print(line, soft_wrap=True)
    text = out.getvalue()
    if not color:  # table cells are padded to their column: no trailing blanks in logs and files
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text


def render_rich(report: Report, *, color: bool = True, width: int = 80, max_entries: int | None = 20,
                verbosity: int = 0, ci: bool = False) -> str:
    """The terminal report with colour (NO_COLOR: `color=False`)."""
    return render_terminal(report, width=width, color=color, verbosity=verbosity, max_entries=max_entries, ci=ci)


def render_plain(report: Report, *, width: int = 80, max_entries: int | None = 20, verbosity: int = 0) -> str:
    """The report without escape codes for logs, files and `gradverify.explain()`: read after the
    fact, so it lists up to `max_entries` entries, and points at a JSON file for the rest."""
    top = max_entries if max_entries is not None else TOP_ENTRIES
    return render_terminal(report, width=width, color=False, verbosity=verbosity, max_entries=max_entries, ci=True,
                           top_entries=top)


@dataclass(frozen=True)
class Options:
    """How much to show: the width, -q/-v, CI, and how many entries to list per failing check."""

    width: int
    verbosity: int
    ci: bool
    limit: int | None
    verbose_limit: int | None


def _entry_limit(max_entries: int | None, verbosity: int, ci: bool, top_entries: int) -> int | None:
    """Entries listed per failing check: the top few by default, up to max_entries with -v; a CI log
    never lists an unbounded number."""
    if verbosity >= 1:
        return max_entries if max_entries is not None or not ci else top_entries
    return top_entries if max_entries is None else min(top_entries, max_entries)


# -- the summary table -----------------------------------------------------------------------------

def summary_table(report: Report, *, fold: bool = False) -> Table:
    """One row per check; the case's name is spread over its rows (op / inputs / dtype device).
    fold: the passing and not-applicable checks beyond the core ones share one row each (a
    custom op runs ten checks; at 80 columns the table must not push the finding off screen)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold", expand=False)
    table.add_column(Text("case"), overflow="fold")
    table.add_column(Text("check"), no_wrap=True)
    table.add_column(Text("verdict"), no_wrap=True)
    table.add_column(Text("max |err|"), no_wrap=True, justify="right")
    table.add_column(Text("result"), overflow="fold")
    for case in report.cases:
        rows = _case_rows(case, fold)
        names = _name_parts(case, len(rows))
        for k, (check, verdict, err, result) in enumerate(rows):
            name = Text(names[k] if k < len(names) else "", style="bold" if k == 0 else "")
            table.add_row(name, Text(check), verdict, Text(err), result)
    return table


def _name_parts(case: CaseResult, rows: int) -> list[str]:
    parts = [case.op, inputs_text(case), f"{case.dtype} {case.device}".strip()]
    parts = [p for p in parts if p]
    if rows >= len(parts):
        return parts
    return parts[:rows - 1] + [" ".join(parts[rows - 1:])]


# Always a row of their own: the contracts and the Jacobian are the verdict on the backward.
ALWAYS_SHOWN = ("contracts", "jacobian")


def _case_rows(case: CaseResult, fold: bool = False) -> list[tuple[str, Text, str, Text]]:
    if not case.checks:
        message = case.message.removeprefix("skipped: ") if case.status is Status.SKIPPED else case.message
        return [("", Text(case.status.label, style=STATUS_STYLE[case.status]), "", Text(message or "-"))]
    rows = []
    folded: dict[Status, list[str]] = {Status.PASSED: [], Status.SKIPPED: []}
    for check in case.checks:
        if fold and check.name not in ALWAYS_SHOWN and check.counts and check.status in folded:
            folded[check.status].append(check.name)
            continue
        style = STATUS_STYLE[check.status] if check.counts else "dim"
        err = num(check.max_abs_err) if shows_max_err(check) else ""
        result = Text(check_result_text(check), style="" if check.counts else "dim")
        rows.append((check.name, Text(counted_label(check), style=style), err, result))
    passed, skipped = folded[Status.PASSED], folded[Status.SKIPPED]
    if len(passed) + len(skipped) == 1:  # one row either way: show it as itself
        check = next(c for c in case.checks if c.name in passed + skipped)
        rows.append((check.name, Text(check.status.label, style=STATUS_STYLE[check.status]), "",
                     Text(check_result_text(check))))
    elif passed or skipped:
        status = Status.PASSED if passed else Status.SKIPPED
        parts = (["ok"] if passed else []) + ([f"{len(skipped)} n/a"] if skipped else [])
        rows.append((f"{len(passed) + len(skipped)} more", Text(status.label, style=STATUS_STYLE[status]), "",
                     Text(f"{', '.join(parts)} (-v)")))
    return rows


# -- one block per finding -------------------------------------------------------------------------

def case_block(group: CaseGroup, opts: Options) -> list[Text]:
    """The lines of one case's (or one sweep's repeated) finding."""
    case = group.first
    width, verbosity = opts.width, opts.verbosity
    lines: list[Text] = []
    head = Text.assemble((case.status.label, STATUS_STYLE[case.status]), " ", (case.op, "bold"), " ",
                         case_variant(case))
    where = where_text(case)
    if where:
        head.append(f"  {where}", style="dim")
    lines += wrap(head, width, 0, DETAIL)
    if group.others:
        lines += wrap(Text(same_finding_text(group), style="dim"), width, INDENT, DETAIL)
    checks = detailed_checks(case, verbosity)
    if not checks and case.message:
        lines += wrap(Text(case.message), width, INDENT, DETAIL)
    for check in checks:
        lines += check_lines(check, opts)
    for check in case.checks:
        if check.guarantee and check.status is Status.PASSED:  # what a projected pass does and does not say
            lines += wrap(Text.assemble((f"{check.name}: ", "bold"), check.guarantee), width, INDENT, DETAIL)
    for note in case.notes:
        lines += wrap(Text.assemble(("note: ", "dim"), note), width, INDENT, DETAIL)
    lines += _output_lines(case, width, verbosity)
    if case.repro:
        lines.append(Text.assemble(("  reproduce: ", "bold"), case.repro))
    if verbosity >= 1:  # the other cases of a sweep's shared finding, each reproducible on its own
        lines += [Text.assemble(("  reproduce: ", "bold"), other.repro) for other in group.others if other.repro]
    return lines


def check_lines(check: CheckResult, opts: Options) -> list[Text]:
    """A check's findings: message (when it says more than the table), diagnoses with evidence and
    hint, the guarantee of a projected check, its notes, then the entries and heatmaps."""
    width = opts.width
    lines: list[Text] = []
    name = (f"{check.name}: ", "bold")
    if not message_is_redundant(check):
        style = "" if check.counts else "dim"
        lines += wrap(Text.assemble(name, (check.message, style)), width, INDENT, DETAIL)
    for diagnosis in ordered_diagnoses(check):
        lines += diagnosis_lines(check.name, diagnosis, width)
    if check.guarantee and check.guarantee not in check.message:
        lines += wrap(Text.assemble(name, check.guarantee), width, INDENT, DETAIL)
    for note in check.notes:
        lines += wrap(Text.assemble(("note: ", "dim"), note), width, DETAIL, DETAIL + 2)
    lines += evidence_tables(check, opts)
    if opts.verbosity >= 1:
        for key, value in check.details:
            if key != "note":  # the notes are printed above already
                lines += wrap(Text(f"{key}: {value}", style="dim"), width, DETAIL, DETAIL + 2)
    return lines


def diagnosis_lines(check_name: str, d: Diagnosis, width: int) -> list[Text]:
    head = Text.assemble((f"{check_name}: ", "bold"))
    if d.severity is not Severity.ERROR:
        head.append(f"{d.severity.value} ", style=SEVERITY_STYLE[d.severity])
    head.append(f"[{d.kind}]", style=SEVERITY_STYLE[d.severity])
    head.append(f" {d.message}")
    lines = wrap(head, width, INDENT, DETAIL)
    if d.evidence:
        lines += wrap(Text.assemble(("evidence: ", "dim"), d.evidence), width, DETAIL, DETAIL + 2)
    if d.hint:
        lines += wrap(Text.assemble(("hint: ", "cyan"), d.hint), width, DETAIL, DETAIL + 2)
    return lines


def evidence_tables(check: CheckResult, opts: Options) -> list[Text]:
    """The top entries and the heatmaps; the first heatmap and the entries side by side when both
    fit the width (they are read together: where, and by how much)."""
    width = opts.width
    shown = entries_shown(check, opts.limit)
    entries = entry_lines(check, shown, opts.verbosity, width - DETAIL)
    more = ""
    if opts.limit != 0:
        more = more_entries_text(check, shown, ci=opts.ci,
                                 verbose_limit=opts.verbose_limit if opts.verbosity < 1 else shown)
    maps = list(check.heatmaps)
    title: list[Text] = []
    rows: list[Text] = []
    if maps:
        title, rows = heatmap_lines(maps.pop(0), width - DETAIL)
    rows_width = max((cell_len(r.plain) for r in rows), default=0)
    beside = width - DETAIL - rows_width - GAP  # room for the entries to the right of the heatmap
    table_width = max((cell_len(e.plain) for e in entries), default=0)
    if rows and entries and beside >= max(table_width, MIN_BESIDE):
        right = entries + (wrap(Text(more, style="dim"), beside, 0, 2) if more else [])
        lines = [_indent(line, DETAIL) for line in title]
        for k in range(max(len(rows), len(right))):
            left = rows[k].copy() if k < len(rows) else Text("")
            if k < len(right):
                left.append(" " * (rows_width + GAP - cell_len(left.plain)))
                left.append_text(right[k])
            lines.append(_indent(left, DETAIL))
    else:
        lines = [_indent(line, DETAIL) for line in entries]
        if more:
            lines += wrap(Text(more, style="dim"), width, DETAIL, DETAIL + 2)
        lines += [_indent(line, DETAIL) for line in title + rows]
    for h in maps:
        title, rows = heatmap_lines(h, width - DETAIL)
        lines += [_indent(line, DETAIL) for line in title + rows]
    return lines


def entry_lines(check: CheckResult, shown: int, verbosity: int, width: int | None = None) -> list[Text]:
    """The worst entries as an aligned table: entry, expected, got, |err| (and with -v the allowed
    error and the second truth's value), at most `width` wide."""
    if shown <= 0:
        return []
    header = ["entry", "expected", "got", "|err|"] + (["allowed", "2nd truth"] if verbosity >= 1 else [])
    rows = []
    for m in check.mismatches[:shown]:
        expected, got = num_pair(m.expected, m.got)
        row = [entry_name(m), expected, got, num(m.abs_err)]
        if verbosity >= 1:
            row += [num(m.tolerance), num(m.second) if m.second is not None else "-"]
        rows.append(row)
    widths = [max(cell_len(r[k]) for r in [header] + rows) for k in range(len(header))]

    def line(cells: list[str], style: str = "", err_style: str = "") -> Text:
        text = Text(style=style)
        for k, cell in enumerate(cells):
            pad = widths[k] - cell_len(cell)
            text.append(("" if k == 0 else "  ") + (cell + " " * pad if k == 0 else " " * pad + cell),
                        style=err_style if k == 3 else "")
        return text

    table = [line(header, style="dim")] + [line(r, err_style="red") for r in rows]
    if width is None or max(cell_len(t.plain) for t in table) <= width:
        return table
    # Too wide for one line each (long names, deep indices): the entry, then its numbers below it.
    stacked: list[Text] = []
    for row in rows:
        stacked += wrap(Text(row[0]), width, 0, 2)
        numbers = Text.assemble(*[(f"{name} {value}  ", "red" if name == "|err|" else "")
                                  for name, value in zip(header[1:], row[1:])])
        stacked += wrap(numbers, width, 2, 2)
    return stacked


def heatmap_lines(h: Heatmap, width: int) -> tuple[list[Text], list[Text]]:
    """(title lines, row lines) of a heatmap: `∂out (3,3) / ∂x (3,3)  X mismatch  o agrees ...`,
    the column header, then one row per output entry (or bin)."""
    title = Text.assemble((heatmap_title(h), "bold"))
    legend = Text()
    for glyph, word in heatmap_glyphs(h):
        legend.append("  ")
        legend.append(glyph, style=HEAT_STYLE[glyph])
        legend.append(f" {word}")
    if cell_len(title.plain + legend.plain) <= width:
        head = [Text.assemble(title, legend)]
    else:  # the legend on a line of its own rather than a glyph parted from its meaning
        head = wrap(title, width, 0, 2) + wrap(legend, width, 0, 2)
    head += wrap(Text(h.col_header, style="dim"), width, 0, 2)
    label_width = max((cell_len(label) for label in h.row_labels), default=0)
    rows = list(h.rows)
    if rows and label_width + 2 + max(cell_len(r) for r in rows) > width:
        rows = [r.replace("|", "") for r in rows]  # the group separators are the first thing to give up
    lines = []
    for label, row in zip(h.row_labels, rows):
        text = Text(" " * (label_width - cell_len(label)) + label + "  ")
        for char in row:
            text.append(char, style=HEAT_STYLE.get(char, ""))
        lines.append(text)
    return head, lines


def _output_lines(case: CaseResult, width: int, verbosity: int) -> list[Text]:
    """What the user's code printed while the case ran: counted by default, shown with -v."""
    if not case.output.strip():
        return []
    printed = case.output.rstrip("\n").splitlines()
    if verbosity < 1:
        n = len(printed)
        return wrap(Text(f"your code printed {n} line{'s' if n != 1 else ''} (-v shows them)", style="dim"),
                    width, INDENT, DETAIL)
    lines = wrap(Text("your code printed:", style="dim"), width, INDENT, DETAIL)
    for text in printed[:OUTPUT_LINES]:
        lines += wrap(Text(text), width, DETAIL, DETAIL)
    if len(printed) > OUTPUT_LINES:
        lines.append(Text(" " * DETAIL + f"… {len(printed) - OUTPUT_LINES} more lines", style="dim"))
    return lines


# -- wrapping --------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")


def wrap(text: Text, width: int, indent: int, hang: int) -> list[Text]:
    """Lines of at most `width` cells: the first indented by `indent`, the rest by `hang`; breaks
    between words (a word longer than a line is cut), styles kept. A newline starts a new line."""
    lines: list[Text] = []
    plain = text.plain
    offset = 0
    for paragraph in plain.split("\n"):
        spans = _break(paragraph, width - indent if not lines else width - hang, width - hang)
        for start, end in spans:
            pad = indent if not lines else hang
            lines.append(_indent(text[offset + start:offset + end], pad))
        if not spans:
            lines.append(Text(""))
        offset += len(paragraph) + 1
    return lines


def _break(plain: str, first: int, rest: int) -> list[tuple[int, int]]:
    """(start, end) of each line of `plain`, greedy by words."""
    spans: list[tuple[int, int]] = []
    start = end = -1
    for match in _WORD.finditer(plain):
        ws, we = match.span()
        avail = max(1, first if not spans else rest)
        if start >= 0 and cell_len(plain[start:we]) <= avail:
            end = we
            continue
        if start >= 0:
            spans.append((start, end))
            avail = max(1, rest)
        while cell_len(plain[ws:we]) > avail:  # a word wider than a line: cut it
            cut = ws + _fit(plain[ws:we], avail)
            spans.append((ws, cut))
            ws = cut
            avail = max(1, rest)
        start, end = ws, we
    if start >= 0:
        spans.append((start, end))
    return spans


def _fit(word: str, cells: int) -> int:
    """How many characters of `word` fit in `cells` (at least one)."""
    used = 0
    for k, char in enumerate(word):
        used += cell_len(char)
        if used > cells:
            return max(1, k)
    return len(word)


def _indent(text: Text, n: int) -> Text:
    if n <= 0:
        return text
    return Text.assemble(" " * n, text)


__all__ = ["footer", "render_plain", "render_rich", "render_terminal", "summary_table", "wrap"]
