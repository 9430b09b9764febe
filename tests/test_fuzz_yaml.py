"""Property tests of the YAML loader: any file gets ops or one SpecError line, quickly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradverify.errors import SpecError
from gradverify.spec.yaml_spec import OP_KEYS, TENSOR_KEYS, load_yaml_spec

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

OPS = '''
import torch


class MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g @ b.T, a.T @ g
'''

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["ops.py:MatMul", "M", "K", "positive", "float32", "cpu", "fast"]))
keys = st.one_of(st.sampled_from([*OP_KEYS, *TENSOR_KEYS, "a", "b", "M", "K", "value", "ops"]), st.text(max_size=6))
data = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
specs = st.fixed_dictionaries({"function": st.just("ops.py:MatMul")},
                              optional={key: data for key in OP_KEYS if key != "function"})


def _verdict(path: Path) -> None:
    start = time.monotonic()
    try:
        load_yaml_spec(path)
    except SpecError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message, message
    assert time.monotonic() - start < 10


@FUZZ
@given(spec=specs)
def test_structured_specs_load_or_fail_with_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                     spec: dict[str, Any]) -> None:
    folder = Path(tmp_path_factory.mktemp("y"))
    (folder / "ops.py").write_text(OPS)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    _verdict(path)
    assert sorted(p.name for p in folder.iterdir()) == ["ops.py", "spec.yaml"]  # nothing written, no __pycache__


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300),
                     st.text(alphabet=st.sampled_from(list("[]{}&*!|>-:,'\"#%@` \n\tab01?<=") + ["\x00", "\x1b"]),
                             max_size=200)))
def test_arbitrary_bytes_load_or_fail_with_one_line(tmp_path_factory: pytest.TempPathFactory, raw: Any) -> None:
    folder = Path(tmp_path_factory.mktemp("b"))
    path = folder / "spec.yaml"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    _verdict(path)
