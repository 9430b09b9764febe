"""HTML renderer: the rich report, heatmaps and colours included, as one self-contained page."""

from __future__ import annotations

import re
from dataclasses import replace

from test_render_junit import failing_case

from gradverify.render.html import render_html
from gradverify.report import CheckResult, Heatmap, Report


def _report() -> Report:
    case = failing_case()
    jacobian = case.checks[1]
    heat = Heatmap(output="out", input="x", out_shape=(3, 3), in_shape=(3, 3),
                   rows=("oX.|X..|...",), row_labels=("out[0,0]",), col_header="columns")
    checks: tuple[CheckResult, ...] = (case.checks[0], replace(jacobian, heatmaps=(heat,)))
    return Report(cases=(replace(case, checks=checks),))


def test_page_is_self_contained_and_holds_the_full_report() -> None:
    page = render_html(_report(), title="run <42>")
    assert page.lstrip().startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>run &lt;42&gt;</title>" in page
    assert not re.search(r"<script|<link|src=|https?://", page)  # nothing fetched when opened as an artifact
    text = re.sub(r"<[^>]+>", "", page)
    assert "Mismatched elements: 3 / 9" in text
    assert "out[0,0]  oX.|X..|..." in text  # the heatmap row
    assert "[missing_offdiag]" in text
    assert "∂out[0,2] / ∂x[1,2]" in text  # every entry: not cut by default
    assert "more mismatched" not in text


def test_colours_survive_as_inline_styles() -> None:
    page = render_html(_report())
    assert re.search(r'<span style="[^"]*color: #[0-9a-f]{6}', page)  # the FAIL verdict / heatmap X
    assert "\x1b[" not in page


def test_max_entries_cuts_with_the_terminal_note() -> None:
    text = re.sub(r"<[^>]+>", "", render_html(_report(), max_entries=1))
    assert "and 2 more mismatched entries" in text
