"""Renderers: Report -> text, one module per format. No torch, no computation."""

from __future__ import annotations

from gradverify.render.github import render_github, render_github_summary
from gradverify.render.html import render_html
from gradverify.render.json_format import render_json
from gradverify.render.junit import render_junit
from gradverify.render.markdown import render_markdown
from gradverify.render.terminal import render_plain, render_rich, render_terminal
from gradverify.render.text import footer, one_line

__all__ = ["footer", "one_line", "render_github", "render_github_summary", "render_html", "render_json",
           "render_junit", "render_markdown", "render_plain", "render_rich", "render_terminal"]
