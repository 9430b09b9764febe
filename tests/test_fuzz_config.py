"""Property tests of the settings schema: any value gets a verdict (never a crash), and the
same value gets the same verdict and the same words from every source that takes it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradverify import schema
from gradverify.config import load_pyproject_config, validate_options
from gradverify.errors import OptionError, UsageError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values as TOML, YAML and Python callers give them, and near misses of real ones.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["fast", "FAST", " slow ", "off", "auto", "full", "512M", "1.5G", "2g", "1M", "10", "float32",
                     "f32", "cpu", "cuda:1", "cuda:99999", "2,3", "2x3", "()", "", ";", "4,3;5", "-1", "1e-5",
                     "nan", "inf", "1", "2", "3", "true", "no", "jacobian", "second_order", "positive", "x=1"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=8), scalars, max_size=3))


@FUZZ
@given(name=st.sampled_from(sorted(schema.BY_NAME)), raw=values)
def test_every_value_gets_a_verdict_never_a_crash(name: str, raw: Any) -> None:
    try:
        value = schema.parse(name, raw)
    except schema.Invalid as exc:
        message = exc.message("--flag")
        assert message.startswith("--flag") and "expected" in message and "\n" not in message
        return
    if isinstance(value, float):
        assert math.isfinite(value)  # nothing accepted may switch a check off
    if name == "seed":
        assert 0 <= value < schema.SEED_LIMIT
    if name == "max_memory":
        assert value >= 2**20


def _toml(value: Any) -> str | None:
    """`value` as a TOML value, or None if TOML cannot say it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        if any(ord(c) < 32 or c in '"\\\x7f' for c in value):
            return None
        return f'"{value}"'
    if isinstance(value, list):
        items = [_toml(v) for v in value]
        return None if any(i is None for i in items) else f"[{', '.join(items)}]"  # type: ignore[arg-type]
    return None


SHARED = sorted(set(schema.keys_for(schema.PYPROJECT)) & set(schema.keys_for(schema.VERIFY)) - {"checks"})


@FUZZ
@given(key=st.sampled_from(SHARED), raw=st.one_of(scalars, st.lists(scalars, max_size=3)))
def test_pyproject_and_verify_agree(tmp_path_factory: pytest.TempPathFactory, key: str, raw: Any) -> None:
    text = _toml(raw)
    if text is None or raw is None:
        return
    path = Path(tmp_path_factory.mktemp("p")) / "pyproject.toml"
    path.write_text(f"[tool.gradverify]\n{key} = {text}\n")
    try:
        from_file: Any = load_pyproject_config(path)
        file_error = None
    except UsageError as exc:
        from_file, file_error = None, exc.message
    try:
        from_call: Any = validate_options({key: raw}, "verify()")
        call_error = None
    except OptionError as exc:
        from_call, call_error = None, exc.message
    assert (file_error is None) == (call_error is None), (file_error, call_error)
    if file_error is None:
        name = schema.keys_for(schema.VERIFY)[key].name
        assert from_file[name] == getattr(from_call, name)
    else:
        assert file_error.split(": ", 1)[1].removeprefix(f"{key}: ") == call_error.removeprefix(f"verify(): {key}: ")
