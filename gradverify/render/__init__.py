"""Renderers: Report -> text, one module per format. No torch, no computation."""

from __future__ import annotations

from gradverify.render.json_format import render_json
from gradverify.render.terminal import render_plain, render_rich

__all__ = ["render_json", "render_plain", "render_rich"]
