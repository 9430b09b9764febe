"""The pytest plugin, loaded through its pytest11 entry point, on a failing and a passing Function."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch  # noqa: F401  pytester's in-process runs drop modules they imported; torch cannot load twice

pytest_plugins = ["pytester"]

TEST_FILE = '''
import torch


class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output / s - (grad_output * x).sum(0) / s**2


class DiagonalOnly(ColumnNormalize):
    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output * (1 / s - x / s**2)


def _x():
    return torch.rand(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5


def test_right_backward(gradverify_check):
    report = gradverify_check(ColumnNormalize, _x())
    assert report.ok


def test_wrong_backward(gradverify_check):
    gradverify_check(DiagonalOnly, _x())
'''


def test_fixture_fails_a_wrong_backward_with_the_report_and_passes_a_right_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ops=TEST_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "test_wrong_backward" in out
    assert "18 / 81" in out and "[missing_offdiag]" in out
    assert "gradverify/api.py" not in out  # the report, not a traceback into gradverify
    result.stdout.fnmatch_lines(["*FAILED test_ops.py::test_wrong_backward*"])


def test_bad_call_is_a_one_line_test_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="def test_not_a_function(gradverify_check):\n    gradverify_check(len, 1)\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    # len is a callable like any other: its forward raises, which is a failing case, said in one line.
    result.stdout.fnmatch_lines(["*forward raised TypeError: object of type 'int' has*"])


def test_loading_the_plugin_does_not_import_torch() -> None:
    # pytest loads the plugin in every session of an environment with gradverify installed.
    code = "import sys, gradverify.pytest_plugin; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
