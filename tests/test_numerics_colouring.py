"""Compressed finite differences: valid colourings, the cheap failing path accusing exactly what the
exhaustive one does, bounded evaluation counts, and the fall-back to single columns wherever the
sparsity guess or the reference is wrong."""

from __future__ import annotations

import torch

import gradverify
from gradverify.checks import jacobian
from gradverify.numerics import colouring, judge, streaming
from gradverify.numerics.colouring import Judged, colour_columns, second_truth
from gradverify.numerics.finite_diff import MAX_LEVELS, START_LEVELS, FiniteDifferences
from gradverify.numerics.judge import Verdict
from gradverify.numerics.tolerance import default_tolerance

# --- ops with bugs of several kinds -------------------------------------------------------------

class ColumnNormalizeDiagonal(torch.autograd.Function):
    """Missing off-diagonal terms: keeps only d y_ij / d x_ij of x / x.sum(0)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g * (1 / s - x / s**2)


class ColumnNormalizeScaled(torch.autograd.Function):
    """Every entry scaled by 1.5."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return 1.5 * (g / s - (g * x).sum(0) / s**2)


class ColumnNormalizeOneWrong(torch.autograd.Function):
    """One entry off by 0.5: d out[1, 2] / d x[3, 2]."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        grad = g / s - (g * x).sum(0) / s**2
        extra = torch.zeros_like(grad)
        extra[3, 2] = 0.5 * g[1, 2]
        return grad + extra


class SoftmaxDiagonal(torch.autograd.Function):
    """Row softmax without its off-diagonal terms."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


WEIGHT = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


class LinearTransposed(torch.autograd.Function):
    """y = x W^T whose backward uses W^T instead of W (a transposed Jacobian)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x @ WEIGHT.T

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return g @ WEIGHT.T


def _positive(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5


CASES = [
    ("missing off-diagonal", ColumnNormalizeDiagonal, _positive(9, 7)),
    ("scaled", ColumnNormalizeScaled, _positive(9, 7)),
    ("one wrong entry", ColumnNormalizeOneWrong, _positive(9, 7)),
    ("softmax without off-diagonal", SoftmaxDiagonal,
     torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)),
    ("transposed", LinearTransposed, torch.randn(4, 6, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64)),
]


def _jacobian(report: gradverify.Report):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == "jacobian")


def _accused(fn: type, x: torch.Tensor, **options) -> tuple[set[tuple[tuple[int, ...], tuple[int, ...]]], int, str]:  # type: ignore[no-untyped-def]
    check = _jacobian(gradverify.verify(fn, x, gradcheck="off", mode="full", mismatch_cap=10**6, **options))
    assert not check.mismatch_count_is_lower_bound
    return ({(m.out_index, m.in_index) for m in check.mismatches}, check.mismatch_count,
            dict(check.details)["finite differences"])


# --- the colouring ------------------------------------------------------------------------------

def test_no_two_columns_of_one_colour_share_a_row() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 40, (300,), generator=gen)
    cols = torch.randint(0, 60, (300,), generator=gen)
    colours = colour_columns(rows, cols, 60)
    assert colours is not None
    for r in range(40):
        in_row = torch.unique(cols[rows == r])
        assert torch.unique(colours[in_row]).numel() == in_row.numel()
    assert int(colours.max()) + 1 < 60  # and it did compress


def test_a_structured_pattern_gets_as_few_colours_as_its_densest_row() -> None:
    # x / x.sum(0) on (n, n): input (k, j) reaches outputs (i, j) for every i; n colours are the
    # least possible (a row holds n columns) and greedy colouring finds them.
    n = 16
    cols = torch.arange(n * n).repeat_interleave(n)
    rows = (torch.arange(n).repeat(n * n) * n) + (cols % n)
    colours = colour_columns(rows, cols, n * n)
    assert colours is not None and int(colours.max()) + 1 == n


# --- the cheap failing path equals the exhaustive one ---------------------------------------------

def test_compressed_path_accuses_exactly_the_entries_the_exhaustive_path_accuses(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name, fn, x in CASES:
        for options in ({}, {"max_memory": 2**20}):  # whole blocks, then streamed row chunks
            cheap, cheap_count, text = _accused(fn, x, **options)
            monkeypatch.setattr(colouring, "ENABLED", False)
            full, full_count, full_text = _accused(fn, x, **options)
            monkeypatch.setattr(colouring, "ENABLED", True)
            assert cheap == full and cheap_count == full_count > 0, (name, options)
            assert "one by one" in full_text and "compressed" not in full_text
            if name in ("missing off-diagonal", "scaled", "softmax without off-diagonal"):
                assert "compressed into" in text, (name, options, text)


def test_streamed_and_dense_paths_agree_on_every_bug() -> None:
    for name, fn, x in CASES:
        dense, dense_count, _ = _accused(fn, x)
        streamed, streamed_count, _ = _accused(fn, x, max_memory=2**20)
        assert dense == streamed and dense_count == streamed_count, name


# --- what it costs --------------------------------------------------------------------------------

def _column_normalize_case(n: int) -> tuple[FiniteDifferences, Judged, tuple[torch.Tensor, torch.Tensor]]:
    """x / x.sum(0) on (n, n) with a diagonal-only analytic Jacobian: every off-diagonal entry of a
    column's block judged."""
    x = _positive(n, n)
    fd = FiniteDifferences(lambda args: (args[0] / args[0].sum(0),), [x], [0], [0], target=1e-9)
    r = torch.autograd.functional.jacobian(lambda v: v / v.sum(0), x).reshape(n * n, n * n)
    a = torch.diag(torch.diagonal(r))
    scale = r.abs().amax(dim=1, keepdim=True).expand_as(r)
    off = judge.disagrees(a, r, scale, default_tolerance("float64"))
    rows, cols = torch.nonzero(off, as_tuple=True)
    judged = Judged(rows=rows, cols=cols, a=a[rows, cols], t=r[rows, cols], scale=scale[rows, cols])
    hot = torch.unique(rows)
    pr, pc = torch.nonzero((a[hot] != 0) | (r[hot] != 0), as_tuple=True)
    return fd, judged, (hot[pr], pc)


def test_forward_calls_are_bounded_by_levels_times_colours() -> None:
    n = 8
    fd, judged, pattern = _column_normalize_case(n)
    got = second_truth(fd, 0, judged, default_tolerance("float64"), pattern=pattern, max_columns=10**6)
    assert got.groups == n and got.grouped_columns == n * n and got.direct_columns == 0
    assert bool(got.computed.all()) and got.settled_by_groups == judged.count
    # Two forward calls per group and step level, one batched call checked against a plain one.
    assert got.evaluations <= 2 * MAX_LEVELS * got.groups + 1
    assert got.evaluations < 2 * START_LEVELS * n * n  # what one column at a time needs at least
    exact = judged.t
    assert bool(((got.values - exact).abs() <= got.bars + 1e-12).all())


def test_exhaustive_path_differences_every_column() -> None:
    n = 6
    fd, judged, pattern = _column_normalize_case(n)
    old = colouring.ENABLED
    colouring.ENABLED = False
    try:
        got = second_truth(fd, 0, judged, default_tolerance("float64"), pattern=pattern, max_columns=10**6)
    finally:
        colouring.ENABLED = old
    assert got.groups == 0 and got.direct_columns == n * n
    assert got.evaluations >= 2 * START_LEVELS * n * n


# --- wrong guesses fall back to single columns ------------------------------------------------------

def test_a_wrong_sparsity_guess_falls_back_to_single_columns() -> None:
    # x / x.sum(): every output depends on every input, but the pattern claims a diagonal. One
    # group takes every column; its reading is the sum of every column, the guard against the
    # reference fails, and each column is differenced on its own.
    n = 6
    x = _positive(n)
    fd = FiniteDifferences(lambda args: (args[0] / args[0].sum(),), [x], [0], [0])
    r = torch.autograd.functional.jacobian(lambda v: v / v.sum(), x)
    a = 2 * r  # wrong everywhere
    rows, cols = torch.nonzero(torch.ones(n, n, dtype=torch.bool), as_tuple=True)
    scale = r.abs().amax(dim=1)[rows]
    judged = Judged(rows=rows, cols=cols, a=a[rows, cols], t=r[rows, cols], scale=scale)
    wrong_guess = (torch.arange(n), torch.arange(n))
    got = second_truth(fd, 0, judged, default_tolerance("float64"), pattern=wrong_guess, max_columns=10**6)
    assert got.groups == 1 and got.settled_by_groups == 0 and got.direct_columns == n
    assert torch.allclose(got.values, judged.t, rtol=1e-8, atol=1e-12)


def test_where_the_reference_is_wrong_the_entry_gets_its_own_column_and_is_excused() -> None:
    n = 8
    fd, judged, pattern = _column_normalize_case(n)
    # Make the analytic value right and the reference wrong at one judged entry.
    k = 5
    truth = judged.t[k].clone()
    judged.a[k] = truth
    judged.t[k] = truth + 0.25
    got = second_truth(fd, 0, judged, default_tolerance("float64"), pattern=pattern, max_columns=10**6)
    assert got.direct_columns == 1 and got.settled_by_groups == judged.count - 1
    verdict = judge.with_reference(judged.a, judged.t, got.values, got.bars, got.kinks, judged.scale,
                                   default_tolerance("float64"))
    assert int(verdict[k]) == int(Verdict.EXCUSED)
    assert int((verdict == int(Verdict.MISMATCH)).sum()) == judged.count - 1


# --- budgets: an exact count, or "at least" -------------------------------------------------------

def test_too_many_columns_for_the_budget_gives_a_lower_bound(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(colouring, "ENABLED", False)
    monkeypatch.setattr(colouring, "MAX_CONFIRM_COLUMNS", 5)
    # jacobian and streaming are imported at the top of this file: imported here, after the line
    # above, they would copy the patched 5 and monkeypatch would "restore" it for later tests.
    monkeypatch.setattr(jacobian, "MAX_CONFIRM_COLUMNS", 5)
    monkeypatch.setattr(streaming, "MAX_CONFIRM_COLUMNS", 5)
    for shape, path in (((9, 7), "whole blocks"), ((12, 10), "streamed")):
        x = _positive(*shape)
        check = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full",
                                            max_memory=2**20, mismatch_cap=10**6))
        assert path in dict(check.details)["mode"]
        assert check.mismatch_count_is_lower_bound and "at least" in check.message
        assert 0 < check.mismatch_count < shape[0] * (shape[0] - 1) * shape[1]
        assert any("a sample of them was checked" in note for note in check.notes)


def test_more_disagreeing_entries_than_the_budget_keeps_gives_a_lower_bound() -> None:
    x = _positive(24, 24)  # 24 * 23 * 24 = 13,248 wrong entries; 1 MiB keeps 10,000
    exact = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full"))
    assert exact.mismatch_count == 24 * 23 * 24 and not exact.mismatch_count_is_lower_bound
    bounded = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full",
                                          max_memory=2**20))
    assert bounded.mismatch_count_is_lower_bound and "at least" in bounded.message
    assert 0 < bounded.mismatch_count < exact.mismatch_count
    assert any("lower bound" in note for note in bounded.notes)
