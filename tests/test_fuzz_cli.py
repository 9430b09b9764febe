"""Property tests of the command line: any mix of flags and values exits with a documented code
(never 3), prints no traceback, and writes nothing but the report files it was asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli

SQUARE = '''
import torch


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 2 * x * g
'''

# Flags with values near real ones and far from them. -j is left out: worker processes take
# seconds each to start, and the worker pool has its own tests.
noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
FLAGS: dict[str, st.SearchStrategy[str]] = {
    "--shape": st.one_of(st.sampled_from(["3", "2,3", "0,3", "()", "", "3;3", "2x2", "-1", "100000,100000",
                                          "99999999999,1", "1," * 70]), noise),
    "--dtype": st.one_of(st.sampled_from(["float64", "float32", "f32", "flaot32", "int8"]), noise),
    "--device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:3", "mps", "tpu"]), noise),
    "--seed": st.one_of(st.integers(min_value=-5, max_value=2**70).map(str), noise),
    "--domain": st.one_of(st.sampled_from(["positive", "postive", "x=positive", "spd", "nope:fn", "x=bad"]), noise),
    "--arg": st.one_of(st.sampled_from(["dim=1", "x=[1", "1=2", "=", "x=" + "[" * 200]), noise),
    "--atol": st.one_of(st.sampled_from(["1e-6", "nan", "inf", "-1", "1e999"]), noise),
    "--rtol": st.one_of(st.sampled_from(["1e-6", "0", "-0.0"]), noise),
    "--gradcheck": st.one_of(st.sampled_from(["fast", "slow", "off", "bogus"]), noise),
    "--order": st.sampled_from(["1", "2", "3", "x"]),
    "--mode": st.one_of(st.sampled_from(["auto", "full", "fast", "FAST", "fsat"]), noise),
    "--check": st.sampled_from(["second_order", "device", "hessian"]),
    "--skip-check": st.sampled_from(["gradcheck", "jacobian", "nope"]),
    "--max-memory": st.sampled_from(["1M", "512M", "10", "1P", "2P", "x"]),
    "--nondet-tol": st.sampled_from(["0", "1e-9", "nan"]),
    "--retries": st.sampled_from(["0", "1", "101", "-1"]),
    "--timeout": st.sampled_from(["1", "0", "nan", "1e9"]),
    "--max-entries": st.sampled_from(["0", "3", "-1", "99999999999999"]),
    "--format": st.sampled_from(["rich", "plain", "json", "junit", "github", "md", "html", "xml"]),
    "--output": st.sampled_from(["json:out.json", "junit:reports/r.xml", "out.md", "md:", "foo:bar", "x.bin",
                                 "json:/dev/null", "-", "plain:-", "json:sub/dir/"]),
    "--op": st.sampled_from(["Square", "Nope", ""]),
}
SWITCHES = ["--strict", "--no-strict", "-q", "-v", "--exit-zero", "--require-device", "--debug", "--no-such"]

argv = st.lists(st.one_of(st.sampled_from(sorted(FLAGS)).flatmap(lambda f: FLAGS[f].map(lambda v: [f, v])),
                          st.sampled_from(SWITCHES).map(lambda s: [s])), max_size=5)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flags=argv)
def test_any_flags_exit_as_documented(tmp_path_factory: pytest.TempPathFactory, flags: list[list[str]]) -> None:
    folder = Path(tmp_path_factory.mktemp("cli"))
    (folder / "square.py").write_text(SQUARE)
    before = _files(folder)
    args = [part for flag in flags for part in flag]
    result = run_cli("check", "square.py", *args, cwd=folder)
    assert result.code in (0, 1, 2, 5), (args, result.code, result.stderr)
    if "--debug" not in args:
        assert "Traceback" not in result.stderr, (args, result.stderr)
    if result.code == 2:
        assert result.stderr.splitlines()[-1].startswith("gradverify: error: "), result.stderr
    assert "\x1b" not in result.stderr
    asked = {value.partition(":")[2] if ":" in value else value
             for flag, value in (f for f in flags if len(f) == 2) if flag == "--output"}
    written = _files(folder) - before
    allowed = set(asked) | {str(Path(p).parent) for p in asked if "/" in p}
    assert written <= allowed, (args, written)
    assert not any(name.startswith((".gradverify-", "gradverify-crash")) for name in os.listdir(folder))
