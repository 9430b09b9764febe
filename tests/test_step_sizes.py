"""Finite differences on ops that vary faster than the default step: the reference must not be
thrown away (false failures), and wrong backwards must still be caught (missed bugs)."""

from __future__ import annotations

import torch

import gradverify

Fn = torch.autograd.Function


class Reciprocal(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 1 / x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g / x**2


class HighFrequency(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(2000 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2000 * torch.cos(2000 * x)


class HighFrequencyOnePercentOff(HighFrequency):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2000 * torch.cos(2000 * x) * 1.01


def jacobian(report):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == "jacobian")


def test_reciprocal_of_small_values_passes_with_the_reference_trusted() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, dtype=torch.float64, generator=gen) * 1e-3 + 1e-4  # the default step is ~1e-3
    report = gradverify.verify(Reciprocal, x)
    assert report.ok, gradverify.explain(report)
    assert dict(jacobian(report).details)["truth"].startswith("autograd through the forward body")


def test_fast_varying_op_right_passes_and_one_percent_off_fails_in_both_dtypes() -> None:
    for dtype in (torch.float64, torch.float32):
        for seed in range(3):
            x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
            good = gradverify.verify(HighFrequency, x)
            assert good.ok, gradverify.explain(good)
            bad = gradverify.verify(HighFrequencyOnePercentOff, x)
            assert not bad.ok and jacobian(bad).mismatch_count > 0, (dtype, seed)
