"""Verdicts you can trust (issue 11): the same bug gets the same verdict at any scale, dtype and mode;
a truth that cannot resolve the op never accuses (nor excuses); gradcheck does not veto a
conclusive verdict; fast mode fails what its projections prove."""

from __future__ import annotations

import torch

import gradverify
from gradverify.report import Report, Status


def jacobian(report: Report):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == "jacobian")


def check(report: Report, name: str):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == name)


def kinds(report: Report) -> set[str]:
    return {d.kind for c in report.cases[0].checks if c.counts for d in c.diagnoses}


def scaled(function: type, factor: float) -> type:
    """The same op in other output units: forward * factor, backward the same maths."""

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return function.forward(ctx, x) * factor

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            return function.backward(ctx, g * factor)

    return Scaled


class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g / s - (g * x).sum(0) / s**2


class ColumnNormalizeDiagonal(ColumnNormalize):
    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g * (1 / s - x / s**2)


class GlobalNormalizeDiagonal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum()
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g * (1 / s - x / s**2)


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


class SoftmaxDiagonal(Softmax):
    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


class SoftmaxScaled(Softmax):
    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return 1.5 * y * (g - (g * y).sum(-1, keepdim=True))


def positive(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5


def normal(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- units, dtypes and modes

def test_same_bug_same_verdict_at_every_scale_and_dtype() -> None:
    """Property: the diagonal-only column normalisation is 48 wrong entries (the off-diagonal
    ones within each column of a 4x4 input), named missing_offdiag, whatever the units of the
    output (1e-9 ... 1e6), of the input, and the dtype; the right backward always passes."""
    x = positive(4, 4)
    for factor in (1e-9, 1e-3, 1.0, 1e6):
        for x_scale in (1e-6, 1.0, 1e4):
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                inputs = (x * x_scale).to(dtype)
                wrong = gradverify.verify(scaled(ColumnNormalizeDiagonal, factor), inputs, gradcheck="off")
                assert jacobian(wrong).mismatch_count == 48, (factor, x_scale, dtype)
                assert kinds(wrong) == {"missing_offdiag"}, (factor, x_scale, dtype)
                right = gradverify.verify(scaled(ColumnNormalize, factor), inputs, gradcheck="off")
                assert right.cases[0].status is Status.PASSED, (factor, x_scale, dtype, gradverify.explain(right))


def test_missing_coupling_of_a_global_normalisation_fails_in_float32() -> None:
    # Every off-diagonal entry is ~1/256 of its row's diagonal: an absolute tolerance floor of 1
    # hid all 65,280 of them; relative to the row they stand far out of float32 rounding.
    report = gradverify.verify(GlobalNormalizeDiagonal, positive(16, 16).float(), gradcheck="off")
    assert jacobian(report).mismatch_count == 16 * 16 * 16 * 16 - 256
    assert kinds(report) == {"missing_offdiag"}


def test_softmax_without_off_diagonal_terms_in_float32_counts_them_streamed_as_dense() -> None:
    x = normal(8, 32).float()
    dense = jacobian(gradverify.verify(SoftmaxDiagonal, x, gradcheck="off"))
    streamed = jacobian(gradverify.verify(SoftmaxDiagonal, x, gradcheck="off", max_memory=2**20))
    assert "whole blocks" in dict(dense.details)["mode"] and "streamed" in dict(streamed.details)["mode"]
    # Off-diagonal entries y_i y_j within each row; those below float32's resolution relative to
    # their row (y_j < rtol) are not accused: here none are.
    assert dense.mismatch_count == streamed.mismatch_count == 8 * 32 * 31


def test_bfloat16_can_fail_a_softmax_sized_jacobian() -> None:
    report = gradverify.verify(SoftmaxScaled, normal(16, 64).to(torch.bfloat16), gradcheck="off")
    assert not report.ok and jacobian(report).mismatch_count > 0
    right = gradverify.verify(Softmax, normal(16, 64).to(torch.bfloat16), gradcheck="off")
    assert right.ok, gradverify.explain(right)


# ---------------------------------------------------------------- truths that earn their vote

class LogWithEps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g / (x + 1e-7)


class Log(LogWithEps):
    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g / x


def test_an_eps_that_matters_at_small_x_is_caught_with_both_truths() -> None:
    # At x ~ 1e-5 the eps changes the derivative by 1%: relative steps resolve log there, where a
    # step floored at 1e-3 made finite differences NaN and excused every entry.
    x = 1e-5 * (1 + positive(16) - 0.5)
    report = gradverify.verify(LogWithEps, x)
    assert jacobian(report).mismatch_count == 16 and jacobian(report).unverifiable_count == 0
    assert gradverify.verify(Log, x).ok


def test_gradcheck_stepping_out_of_the_domain_does_not_veto_a_conclusive_pass() -> None:
    x = 5e-7 * (1 + positive(8) - 0.5)  # gradcheck's eps 1e-6 takes log below zero
    report = gradverify.verify(Log, x)
    gc = check(report, "gradcheck")
    assert report.ok and gc.status is Status.FAILED and not gc.counts and "not counted" in gc.message


class Sin1e5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.sin(1e5 * x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * 1e5 * torch.cos(1e5 * x)


class Sin1e5Opaque(Sin1e5):
    """The same op with a forward autograd cannot see into: finite differences are the only truth."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.sin(1e5 * x)


class Sin1e5OpaqueWrong(Sin1e5Opaque):
    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * 1.5e5 * torch.cos(1e5 * x)


def test_exact_reference_equal_to_the_backward_is_not_thrown_away_for_unresolved_differences() -> None:
    # Finite differences cannot resolve sin(1e5 x) at steps ~1e-3 (70 periods per step): the
    # reference is kept (unvalidated) and the backward, equal to it, passes.
    report = gradverify.verify(Sin1e5, normal(16, seed=1))
    assert report.ok, gradverify.explain(report)


def test_finite_differences_alone_never_accuse_what_they_cannot_resolve() -> None:
    right = gradverify.verify(Sin1e5Opaque, normal(16, seed=1))
    jac = jacobian(right)
    assert right.ok and jac.mismatch_count == 0  # not judged where unresolved: a warning, not a failure
    assert jac.status in (Status.PASSED, Status.WARNED)
    if jac.status is Status.WARNED:
        assert jac.unverifiable_count > 0 and "unverifiable" in kinds(right)
    wrong = gradverify.verify(Sin1e5OpaqueWrong, normal(16, seed=1))
    assert not wrong.ok and jacobian(wrong).mismatch_count > 0  # resolved entries still convict


# ---------------------------------------------------------------- fast mode

def test_fast_mode_fails_what_its_projections_prove() -> None:
    report = gradverify.verify(GlobalNormalizeDiagonal, positive(128, 128), mode="fast", gradcheck="off")
    jac = jacobian(report)
    assert not report.ok and "distributed_error" in kinds(report) and jac.mismatch_count_is_lower_bound


def test_fast_mode_passes_a_right_float32_op() -> None:
    report = gradverify.verify(Softmax, normal(64, 64).float(), mode="fast")
    jac = jacobian(report)
    assert report.ok and "4 random projections agree" in jac.message and jac.compared_entries == 0


def test_fast_and_full_mode_judge_an_entry_alike() -> None:
    class OneEntryOff(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x * 3

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            out = g * 3
            out[5] = out[5] * (1 + 1e-6)  # 1e-6 relative: beyond float64's 1.5e-8 in both modes
            return out

    x = normal(64, seed=3)
    full = jacobian(gradverify.verify(OneEntryOff, x, mode="full", gradcheck="off"))
    fast = jacobian(gradverify.verify(OneEntryOff, x, mode="fast", gradcheck="off"))
    assert [(m.out_index, m.in_index) for m in full.mismatches] == [((5,), (5,))]
    assert [(m.out_index, m.in_index) for m in fast.mismatches] == [((5,), (5,))]
