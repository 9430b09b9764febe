"""Numerical truths: error bars that cover the error, kinks flagged, and the streamed full check
giving the dense check's answer."""

from __future__ import annotations

import math

import torch

import gradverify
from gradverify.jacobian import make_evaluator, numerical_columns
from gradverify.projection import smallest_detectable


class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        raise NotImplementedError


class Abs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.abs()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        raise NotImplementedError


class ColumnNormalizeDiagonal(torch.autograd.Function):
    """Backward keeps the diagonal only: missing off-diagonal terms."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g * (1 / s - x / s**2)


def test_error_bars_cover_the_true_error() -> None:
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    cols = numerical_columns(make_evaluator(Exp, [0]), [x], 0, torch.arange(7), [0])
    err = (cols.estimates[0].diagonal() - torch.exp(x)).abs()
    assert bool((err <= cols.bars[0].diagonal()).all())
    assert float((err / torch.exp(x)).max()) < 1e-10  # Richardson: far better than sqrt(eps)


def test_kink_is_flagged() -> None:
    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    cols = numerical_columns(make_evaluator(Abs, [0]), [x], 0, torch.arange(3), [0])
    assert cols.kinks[0].tolist() == [[True, False, False], [False, False, False], [False, False, False]]


def test_streamed_check_equals_dense_check() -> None:
    x = torch.rand(12, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    dense = gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full")
    streamed = gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full",
                                 max_memory=256 * 1024)  # forces row chunks of the 120 x 120 Jacobian
    jd = next(c for c in dense.cases[0].checks if c.name == "jacobian")
    js = next(c for c in streamed.cases[0].checks if c.name == "jacobian")
    assert "streamed" in dict(js.details)["mode"] and "whole blocks" in dict(jd.details)["mode"]
    assert jd.mismatch_count == js.mismatch_count == 12 * 11 * 10
    assert {(m.out_index, m.in_index) for m in jd.mismatches} == {(m.out_index, m.in_index) for m in js.mismatches}
    assert math.isclose(jd.max_abs_err or 0, js.max_abs_err or 0, rel_tol=1e-12)
    assert any(d.kind == "missing_offdiag" for d in js.diagnoses)
    # Only the columns holding mismatches were differenced, and every one of them was.
    assert "at 120 input columns" in dict(js.details)["cross-check"]


def test_passing_case_differences_no_column() -> None:
    class Good(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            (x,) = ctx.saved_tensors
            return g * torch.cos(x)

    report = gradverify.verify(Good, torch.randn(5, 4, dtype=torch.float64), gradcheck="off")
    check = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert report.ok and "at 0 input columns" in dict(check.details)["cross-check"]


def test_smallest_detectable_scales_with_tolerance() -> None:
    small, large = smallest_detectable(1e-9), smallest_detectable(1e-6)
    assert math.isclose(large / small, 1000, rel_tol=1e-6)
    assert 1e-9 < small < 1e-6  # four probes: a few tens of tolerances
