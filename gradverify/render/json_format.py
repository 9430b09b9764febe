"""Report -> one JSON document (the schema documented in README.md). No terminal markup."""

from __future__ import annotations

import json
import math
from typing import Any

from gradverify.report import Report, to_dict


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings so every parser reads the document."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def render_json(report: Report) -> str:
    return json.dumps(_finite(to_dict(report)), indent=2, ensure_ascii=False) + "\n"
