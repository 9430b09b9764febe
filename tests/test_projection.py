"""Projected mode: finds injected wrong entries, names them, and passes correct backwards."""

from __future__ import annotations

import torch

import gradverify


def _linear(n: int, row: int, col: int, error: float) -> type:
    weight = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wrong = weight.clone()
    wrong[row, col] += error

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x @ weight.T

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            return g @ wrong

    return Linear


class SoftmaxDiagonal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


def _jacobian(report: gradverify.Report):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == "jacobian")


def test_fast_mode_localises_one_wrong_entry() -> None:
    fn = _linear(64, 17, 41, 1.0)
    report = gradverify.verify(fn, torch.randn(64, dtype=torch.float64), mode="fast", gradcheck="off")
    check = _jacobian(report)
    assert not report.ok
    assert [(m.out_index, m.in_index) for m in check.mismatches] == [((17,), (41,))]
    assert abs(check.mismatches[0].got - check.mismatches[0].expected - 1.0) < 1e-9
    assert dict(check.details)["mode"].startswith("fast")
    assert check.mismatch_count_is_lower_bound and any(d.kind == "distributed_error" for d in check.diagnoses)


def test_fast_mode_finds_a_small_error_gradcheck_fast_tolerates() -> None:
    fn = _linear(64, 3, 60, 1e-4)  # well above the stated smallest detectable error
    check = _jacobian(gradverify.verify(fn, torch.randn(64, dtype=torch.float64), mode="fast", gradcheck="off"))
    assert [(m.out_index, m.in_index) for m in check.mismatches] == [((3,), (60,))]


def test_fast_mode_passes_a_correct_backward() -> None:
    fn = _linear(64, 0, 0, 0.0)
    report = gradverify.verify(fn, torch.randn(64, dtype=torch.float64), mode="fast", gradcheck="off")
    check = _jacobian(report)
    assert report.ok and "random projections agree" in check.message
    assert "detected with probability" in check.guarantee and check.compared_entries == 0


def test_fast_mode_catches_missing_softmax_offdiagonal() -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check = _jacobian(gradverify.verify(SoftmaxDiagonal, x, mode="fast", gradcheck="off"))
    assert check.mismatch_count > 0
    for m in check.mismatches:  # every named entry is an off-diagonal one within a row
        assert m.out_index[0] == m.in_index[0] and m.out_index[1] != m.in_index[1] and m.got == 0.0
    # What the located entries establish without the whole block: the backward is 0 at all of them.
    [located] = [d for d in check.diagnoses if d.kind in ("other", "partial")]
    assert "entries located (projected comparison)" in located.message, located.message
    assert "the backward is 0 at every one of them" in located.message, located.message
    full = _jacobian(gradverify.verify(SoftmaxDiagonal, x, mode="full", gradcheck="off"))
    named = {(m.out_index, m.in_index) for m in full.mismatches}
    assert {(m.out_index, m.in_index) for m in check.mismatches} <= named


def test_auto_mode_uses_projections_past_the_size_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gradverify.checks import jacobian

    # A full check of this size "would take" 1024 entries x 1 s > 20 s: auto takes projections.
    monkeypatch.setattr(jacobian, "AUTO_NS_PER_ENTRY", 1e9)
    fn = _linear(32, 5, 7, 0.5)
    check = _jacobian(gradverify.verify(fn, torch.randn(32, dtype=torch.float64), gradcheck="off"))
    assert dict(check.details)["mode"].startswith("fast")
    assert dict(check.details)["auto"].startswith("projections: a full check of 1,024 entries would take")
    assert [(m.out_index, m.in_index) for m in check.mismatches] == [((5,), (7,))]


def test_localisation_within_a_tiny_budget_still_names_the_entry() -> None:
    # 1 MiB: every batched backward carries a single cotangent.
    fn = _linear(64, 17, 41, 1.0)
    report = gradverify.verify(fn, torch.randn(64, dtype=torch.float64), mode="fast", gradcheck="off",
                               max_memory=2**20)
    check = _jacobian(report)
    assert [(m.out_index, m.in_index) for m in check.mismatches] == [((17,), (41,))]
    assert "batched backward calls" in dict(check.details)["localisation"]


def test_projection_batches_fit_the_budget() -> None:
    from gradverify.numerics.projection import _batch_size
    from gradverify.numerics.vjp import VjpSource

    leaf = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    source = VjpSource([(0, leaf * 2)], [(0, leaf)], phase="backward", max_bytes=2**20)
    # Each cotangent costs (1000 + 3 x 1000) float64 numbers times the workspace factor 4, within
    # half the budget.
    assert _batch_size(source, 2**20) == 2**20 // 2 // (4000 * 8 * 4)
    assert _batch_size(source, 1000) == 1


def test_a_backward_that_cannot_be_differentiated_is_localised_by_bisection() -> None:
    from torch.autograd.function import once_differentiable

    weight = torch.randn(48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wrong = weight.clone()
    wrong[9, 30] += 1.0

    class OnceLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x @ weight.T

        @staticmethod
        @once_differentiable
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            return g @ wrong

    check = _jacobian(gradverify.verify(OnceLinear, torch.randn(48, dtype=torch.float64), mode="fast",
                                        gradcheck="off"))
    assert [(m.out_index, m.in_index) for m in check.mismatches] == [((9,), (30,))]
    assert "bisection" in dict(check.details)["localisation"]
    differentiable = _jacobian(gradverify.verify(_linear(48, 9, 30, 1.0), torch.randn(48, dtype=torch.float64),
                                                 mode="fast", gradcheck="off"))
    assert "double backward" in dict(differentiable.details)["localisation"]
