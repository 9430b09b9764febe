"""Report -> one self-contained HTML page: a CI artifact someone opens from a failed job.

The summary table links to one collapsible section per case (failing ones open); a section
holds each finding's diagnosis with evidence and hint, the mismatched entries as a table, the
heatmap as a coloured table, notes and the repro line. Inline CSS only: no script, no link, no
external file. Every piece of user text is escaped. Draws; never computes.
"""

from __future__ import annotations

from html import escape

from gradverify.render.text import (case_variant, check_result_text, counted_label, entries_shown, footer,
                                    heatmap_glyphs, heatmap_title, is_detailed, message_is_redundant,
                                    more_entries_text, num, num_pair, ordered_diagnoses, shows_max_err,
                                    where_text)
from gradverify.report import CaseResult, CheckResult, Heatmap, Report, Status, entry_name

# Entries listed per check on the page; the JSON report has every kept one.
MAX_ENTRIES = 500

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: #f6f8fa; padding: .6em .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .15em .6em; text-align: left; vertical-align: top; }
table.summary th { border-bottom: 2px solid #d0d7de; }
table.summary tr.first td { border-top: 1px solid #d0d7de; }
table.entries td.num, table.summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.entries th { border-bottom: 1px solid #d0d7de; }
.verdict { font-weight: 600; }
.passed { color: #1a7f37; } .failed, .error, .spec_error { color: #cf222e; }
.warned, .skipped { color: #9a6700; } .xfailed, .xpassed { color: #8250df; }
.uncounted { color: #656d76; font-style: italic; }
details { border: 1px solid #d0d7de; border-radius: 6px; margin: .8em 0; padding: .3em .8em; }
summary { cursor: pointer; font-weight: 600; }
.where { color: #656d76; font-weight: normal; }
.diagnosis { margin: .6em 0; }
.kind { font-family: ui-monospace, monospace; background: #ffebe9; padding: 0 .3em; border-radius: 4px; }
.kind.warning, .kind.note { background: #fff8c5; }
.evidence, .hint, .note { margin-left: 1.5em; }
.hint { color: #0550ae; }
.note { color: #656d76; }
table.heatmap { border-collapse: separate; border-spacing: 1px; }
table.heatmap th { font-weight: normal; color: #656d76; font-family: ui-monospace, monospace; font-size: 12px;
                   padding: 0 .5em 0 0; text-align: right; }
table.heatmap td { width: 14px; height: 14px; padding: 0; text-align: center; font-size: 10px; color: transparent; }
table.heatmap td.sep { border-left: 3px solid #fff; }
td.hX { background: #cf222e; } td.ho { background: #8dd6a0; } td.hz { background: #eaeef2; }
td.hq { background: #e3b341; }
.legend span { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin: 0 .2em 0 .8em; }
"""

HEAT_CLASS = {"X": "hX", "o": "ho", ".": "hz", "?": "hq"}


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def render_html(report: Report, *, max_entries: int | None = MAX_ENTRIES, title: str = "gradverify report") -> str:
    """The page. `max_entries`: entries listed per failing check (None: every kept one)."""
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="verdict {_report_class(report)}">{_e(footer(report))}</p>']
    if report.cases:
        body.append(summary_table(report))
    for k, case in enumerate(report.cases, 1):
        body.append(case_section(case, f"case-{k}", max_entries))
    for note in report.notes:
        body.append(f'<p class="note">note: {_e(note)}</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def _report_class(report: Report) -> str:
    return "passed" if report.ok and report.checked_anything else "failed" if not report.ok else "skipped"


def summary_table(report: Report) -> str:
    rows = ['<table class="summary">',
            "<thead><tr><th>case</th><th>check</th><th>verdict</th><th>max |err|</th><th>result</th></tr></thead>",
            "<tbody>"]
    for k, case in enumerate(report.cases, 1):
        link = f'<a href="#case-{k}"><b>{_e(case.op)}</b> {_e(case_variant(case))}</a>'
        checks: list[CheckResult | None] = list(case.checks) or [None]
        for j, check in enumerate(checks):
            name = f'<td rowspan="{len(checks)}">{link}</td>' if j == 0 else ""
            first = ' class="first"' if j == 0 else ""
            if check is None:
                rows.append(f"<tr{first}>{name}<td></td>{_verdict(case.status, case.status.label)}<td></td>"
                            f"<td>{_e(case.message or '-')}</td></tr>")
                continue
            err = num(check.max_abs_err) if shows_max_err(check) else ""
            verdict = (_verdict(check.status, counted_label(check)) if check.counts
                       else f'<td class="uncounted" title="overruled: does not count">{_e(counted_label(check))}</td>')
            rows.append(f"<tr{first}>{name}<td>{_e(check.name)}</td>{verdict}<td class=\"num\">{_e(err)}</td>"
                        f"<td>{_e(check_result_text(check))}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _verdict(status: Status, label: str) -> str:
    return f'<td class="verdict {status.value}">{_e(label)}</td>'


def case_section(case: CaseResult, anchor: str, max_entries: int | None) -> str:
    """One collapsible section per case; open when it has something to read."""
    where = where_text(case)
    opened = " open" if is_detailed(case) else ""
    parts = [f'<section id="{anchor}"><details{opened}>',
             f'<summary><span class="verdict {case.status.value}">{_e(case.status.label)}</span> '
             f'{_e(case.op)} {_e(case_variant(case))} <span class="where">{_e(where)}</span></summary>']
    if case.message and not case.checks:
        parts.append(f"<p>{_e(case.message)}</p>")
    for check in case.checks:
        parts.append(check_section(check, max_entries))
    for note in case.notes:
        parts.append(f'<p class="note">note: {_e(note)}</p>')
    if case.output.strip():
        parts.append(f"<p>your code printed:</p><pre>{_e(case.output)}</pre>")
    if case.repro:
        parts.append(f"<p>reproduce:</p><pre><code>{_e(case.repro)}</code></pre>")
    parts.append("</details></section>")
    return "\n".join(parts)


def check_section(check: CheckResult, max_entries: int | None) -> str:
    """Every check of the case: a one-line verdict, then the findings of a check that has any."""
    css = check.status.value if check.counts else "uncounted"
    parts = [f'<h3 class="{css}">{_e(check.name)}: {_e(counted_label(check))} '
             f'<span class="where">{_e(check_result_text(check))}</span></h3>']
    if check.message and (not message_is_redundant(check) or check.status is Status.PASSED):
        parts.append(f"<p>{_e(check.message)}</p>")
    for d in ordered_diagnoses(check):
        parts.append(f'<div class="diagnosis"><span class="kind {d.severity.value}">{_e(d.kind)}</span> '
                     f"{_e(d.message)}")
        if d.evidence:
            parts.append(f'<div class="evidence">evidence: {_e(d.evidence)}</div>')
        if d.hint:
            parts.append(f'<div class="hint">hint: {_e(d.hint)}</div>')
        parts.append("</div>")
    if check.guarantee and check.guarantee not in check.message:
        parts.append(f"<p>{_e(check.guarantee)}</p>")
    for note in check.notes:
        parts.append(f'<p class="note">note: {_e(note)}</p>')
    parts.append(entries_table(check, max_entries))
    for h in check.heatmaps:
        parts.append(heatmap_table(h))
    if check.details:
        items = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in check.details if k != "note")
        if items:
            parts.append(f"<details><summary>method</summary><ul>{items}</ul></details>")
    return "\n".join(p for p in parts if p)


def entries_table(check: CheckResult, max_entries: int | None) -> str:
    shown = entries_shown(check, max_entries)
    if not shown:
        return ""
    rows = ['<table class="entries"><thead><tr><th>entry</th><th>expected</th><th>got</th><th>|err|</th>'
            "<th>allowed</th><th>2nd truth</th></tr></thead><tbody>"]
    for m in check.mismatches[:shown]:
        expected, got = num_pair(m.expected, m.got)
        second = num(m.second) if m.second is not None else "-"
        rows.append(f'<tr><td class="mono">{_e(entry_name(m))}</td><td class="num">{_e(expected)}</td>'
                    f'<td class="num">{_e(got)}</td><td class="num">{_e(num(m.abs_err))}</td>'
                    f'<td class="num">{_e(num(m.tolerance))}</td><td class="num">{_e(second)}</td></tr>')
    rows.append("</tbody></table>")
    more = more_entries_text(check, shown, ci=True)
    if more:
        rows.append(f"<p>{_e(more)}</p>")
    return "\n".join(rows)


def heatmap_table(h: Heatmap) -> str:
    """The heatmap as a table of coloured cells; `|` group separators become a wider gap."""
    legend = "".join(f'<span class="{HEAT_CLASS[g]}" style="background: {_COLOUR[g]}"></span>{_e(word)}'
                     for g, word in heatmap_glyphs(h))
    rows = [f'<table class="heatmap"><caption><b>{_e(heatmap_title(h))}</b> <span class="legend">{legend}</span>'
            f'<br><span class="where">{_e(h.col_header)}</span></caption><tbody>']
    for label, row in zip(h.row_labels, h.rows):
        cells = []
        separated = False
        for glyph in row:
            if glyph == "|":
                separated = True
                continue
            css = HEAT_CLASS.get(glyph, "")
            cells.append(f'<td class="{css}{" sep" if separated else ""}" title="{_e(glyph)}">{_e(glyph)}</td>')
            separated = False
        rows.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


_COLOUR = {"X": "#cf222e", "o": "#8dd6a0", ".": "#eaeef2", "?": "#e3b341"}

__all__ = ["render_html"]
