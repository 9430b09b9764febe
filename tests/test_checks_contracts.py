"""The contracts check on hand-written Functions: what it calls a failure, what a warning."""

from __future__ import annotations

import torch

import gradverify
from gradverify.report import Severity, Status


class Float32InsideScale(torch.autograd.Function):
    """y = 3 x in float64; the backward computes in float32 (a float32 buffer in a kernel)."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        return (3 * g.float()).double()


class IgnoresGradOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        return 3 * torch.ones_like(g)


class BiasReducedOverWrongDims(torch.autograd.Function):
    """x + b over the channels of (N, C, H, W); backward returns a (C, H, W) bias gradient, which
    the engine sums over dims 0, 1 when W == C: a wrong gradient, not a repaired one."""

    @staticmethod
    def forward(ctx, x, b):
        return x + b.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, g):
        return g, g.sum(0)


def _contracts(report: gradverify.Report) -> gradverify.CheckResult:
    return next(c for c in report.cases[0].checks if c.name == "contracts")


def test_float32_rounding_in_a_float64_backward_is_precision_not_ignoring_grad_output() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    report = gradverify.verify(Float32InsideScale, x, gradcheck="off")
    kinds = {(d.kind, d.severity) for d in _contracts(report).diagnoses}
    assert ("precision", Severity.WARNING) in kinds and not any(k == "ignores_grad_output" for k, _ in kinds)
    jacobian = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert all(d.kind != "ignores_grad_output" for d in jacobian.diagnoses)  # not linked as the cause


def test_ignoring_grad_output_is_still_a_failure() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    report = gradverify.verify(IgnoresGradOutput, x, gradcheck="off")
    assert any(d.kind == "ignores_grad_output" and d.severity is Severity.ERROR for d in _contracts(report).diagnoses)
    assert report.cases[0].status is Status.FAILED


def test_an_engine_reduced_gradient_is_not_said_to_train_when_it_is_wrong() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    report = gradverify.verify(BiasReducedOverWrongDims, x, b, gradcheck="off")
    reduced = next(d for d in _contracts(report).diagnoses if d.kind == "engine_reduced")
    assert "training works" not in reduced.message and "judges the summed gradient" in reduced.message
    assert report.cases[0].status is Status.FAILED  # the Jacobian judges what the engine made of it
