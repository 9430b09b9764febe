"""Report -> GitHub-flavoured Markdown: the summary table and every finding, for `--output md:FILE`
and the GitHub job summary (`$GITHUB_STEP_SUMMARY`). Draws; never computes.

All user text is escaped: GitHub renders inline HTML and Markdown in a summary, so an op named
`Norm[<b>]` or a message with `*` or `|` must not turn into markup or break a table.
"""

from __future__ import annotations

import re

from gradverify.render.text import (CaseGroup, case_variant, check_result_text, counted_label, detail_groups,
                                    detailed_checks, entries_shown, footer, heatmap_glyphs, heatmap_title,
                                    message_is_redundant, more_entries_text, num, num_pair, ordered_diagnoses,
                                    passing_notes, same_finding_text, shows_max_err, where_text)
from gradverify.report import CheckResult, Report, Severity, Status, entry_name

ICON = {Status.PASSED: "✅", Status.WARNED: "⚠️", Status.FAILED: "❌", Status.ERROR: "💥", Status.SPEC: "📝",
        Status.SKIPPED: "⏭️", Status.XFAIL: "➖", Status.XPASS: "❗"}

# Characters that are markup anywhere in a line (emphasis, code, links, tables, strikethrough),
# and the ones that are markup only where a block starts (headings, lists, quotes).
_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_LINE_START = re.compile(r"^(\s*)([#+\-=>])")
_ORDERED = re.compile(r"^(\s*\d+)([.)])")


def md(text: str) -> str:
    """Markdown-escaped prose: no markup, no HTML, one line (safe inside a table cell)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _SPECIAL.sub(r"\\\1", text.replace("\r", " ").replace("\n", " "))
    text = _LINE_START.sub(r"\1\\\2", text)
    return _ORDERED.sub(r"\1\\\2", text)


def code(text: str, *, cell: bool = False) -> str:
    """An inline code span that survives backticks in the text (and `|` inside a table cell)."""
    text = text.replace("\n", " ")
    fence = "`"
    while fence in text:
        fence += "`"
    body = f" {text} " if text.startswith("`") or text.endswith("`") or fence != "`" else text
    body = body.replace("|", "\\|") if cell else body
    return f"{fence}{body}{fence}"


def _block(text: str, lang: str = "text") -> list[str]:
    """A fenced block longer than any backtick run inside it."""
    fence = "```"
    while fence in text:
        fence += "`"
    return [f"{fence}{lang}", text, fence]


def render_markdown(report: Report, *, max_entries: int | None = 20) -> str:
    """The summary table, then one section per finding (a sweep's repeated finding once)."""
    out = [f"## gradverify: {md(footer(report))}", ""]
    if report.cases:
        out += summary_table(report) + [""]
    for group in detail_groups(report):
        out += case_section(group, max_entries) + [""]
    notes = passing_notes(report)
    for note in notes:
        out.append(f"- _note_ ({md(note.who)}): {md(note.text)}")
    for text in report.notes:
        out.append(f"- _note_: {md(text)}")
    if notes or report.notes:
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def render_github_summary(report: Report, *, max_entries: int | None = 20) -> str:
    """The Markdown for `$GITHUB_STEP_SUMMARY` (the same document as `--output md:FILE`)."""
    return render_markdown(report, max_entries=max_entries)


def summary_table(report: Report) -> list[str]:
    lines = ["| case | check | verdict | max \\|err\\| | result |", "|---|---|---|---:|---|"]
    for case in report.cases:
        name = f"**{md(case.op)}** {md(case_variant(case))}"
        if not case.checks:
            lines.append(f"| {name} | | {ICON[case.status]} {case.status.label} | | {md(case.message or '-')} |")
            continue
        for k, check in enumerate(case.checks):
            err = num(check.max_abs_err) if shows_max_err(check) else ""
            verdict = f"{ICON[check.status]} {counted_label(check)}" if check.counts else f"_{counted_label(check)}_"
            result = md(check_result_text(check))
            lines.append(f"| {name if k == 0 else ''} | {md(check.name)} | {verdict} | {err} | {result} |")
    return lines


def case_section(group: CaseGroup, max_entries: int | None) -> list[str]:
    case = group.first
    lines = [f"### {ICON[case.status]} {case.status.label} {md(case.op)} {md(case_variant(case))}", ""]
    where = where_text(case)
    if where:
        lines += [code(where), ""]
    if group.others:
        lines += [md(same_finding_text(group)), ""]
    checks = detailed_checks(case)
    if not checks and case.message:
        lines += [md(case.message), ""]
    for check in checks:
        lines += check_section(check, max_entries)
    for note in case.notes:
        lines += [f"_note_: {md(note)}", ""]
    if case.repro:
        lines += _block(case.repro, "sh")
    return lines


def check_section(check: CheckResult, max_entries: int | None) -> list[str]:
    lines: list[str] = []
    if not message_is_redundant(check):
        lines += [f"**{md(check.name)}**: {md(check.message)}", ""]
    for d in ordered_diagnoses(check):
        severity = "" if d.severity is Severity.ERROR else f" ({d.severity.value})"
        text = [f"**{md(check.name)}** {code(d.kind)}{severity}: {md(d.message)}"]
        if d.evidence:
            text.append(f"_evidence_: {md(d.evidence)}")
        if d.hint:
            text.append(f"_hint_: {md(d.hint)}")
        lines += ["  \n".join(text), ""]
    if check.guarantee and check.guarantee not in check.message:
        lines += [f"**{md(check.name)}**: {md(check.guarantee)}", ""]
    for note in check.notes:
        lines += [f"_note_: {md(note)}", ""]
    shown = entries_shown(check, max_entries)
    if shown:
        lines += ["| entry | expected | got | \\|err\\| |", "|---|---:|---:|---:|"]
        for m in check.mismatches[:shown]:
            expected, got = num_pair(m.expected, m.got)
            lines.append(f"| {code(entry_name(m), cell=True)} | {expected} | {got} | {num(m.abs_err)} |")
        lines.append("")
    more = more_entries_text(check, shown, ci=True) if max_entries != 0 else ""
    if more:
        lines += [md(more), ""]
    for h in check.heatmaps:
        body = "\n".join(f"{label.rjust(max(map(len, h.row_labels)))}  {row}" for label, row in zip(h.row_labels, h.rows))
        legend = "  ".join(f"{glyph} {word}" for glyph, word in heatmap_glyphs(h))
        lines += [f"<details><summary>heatmap {md(heatmap_title(h))}</summary>", ""]
        lines += [f"{md(legend)}; {md(h.col_header)}", ""] + _block(body) + ["", "</details>", ""]
    return lines


__all__ = ["code", "md", "render_github_summary", "render_markdown"]
