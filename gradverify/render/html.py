"""Report -> one self-contained HTML page of the full terminal report (heatmaps, colours and all).

Meant as a CI artifact: someone opening it from a failed job sees exactly what a local run shows.
The page is the rich report recorded by a console and exported (no scripts, no external files).
Draws only; never computes.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.text import Text

from gradverify.render.terminal import render_rich
from gradverify.report import Report


def render_html(report: Report, *, width: int = 120, max_entries: int | None = None,
                title: str = "gradverify report") -> str:
    """The rich report as HTML; `max_entries=None` (the default) keeps every kept mismatch."""
    ansi = render_rich(report, color=True, width=width, max_entries=max_entries)
    console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True,
                      color_system="truecolor", highlight=False, emoji=False, legacy_windows=False)
    console.print(Text.from_ansi(ansi), soft_wrap=True)
    page = console.export_html(inline_styles=True)
    return page.replace("<head>", f"<head>\n<title>{_escape(title)}</title>", 1)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
