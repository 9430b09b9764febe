"""The streamed full check gives the dense check's answer; projections state what they guarantee."""

from __future__ import annotations

import math

import torch

import gradverify
from gradverify.numerics.projection import smallest_detectable


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


class Good(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)


def _jacobian(report: gradverify.Report):  # type: ignore[no-untyped-def]
    return next(c for c in report.cases[0].checks if c.name == "jacobian")


def test_streamed_check_equals_dense_check() -> None:
    x = torch.rand(20, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    dense = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full"))
    streamed = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", mode="full",
                                           max_memory=2**20))  # forces row chunks of the 240 x 240 Jacobian
    assert "streamed" in dict(streamed.details)["mode"] and "whole blocks" in dict(dense.details)["mode"]
    assert dense.mismatch_count == streamed.mismatch_count == 20 * 19 * 12
    assert {(m.out_index, m.in_index) for m in dense.mismatches} == \
        {(m.out_index, m.in_index) for m in streamed.mismatches}
    assert math.isclose(dense.max_abs_err or 0, streamed.max_abs_err or 0, rel_tol=1e-12)
    assert any(d.kind == "missing_offdiag" and "dim 0" in d.message for d in streamed.diagnoses)
    # Only the columns holding mismatches were differenced, and every one of them was.
    assert dict(streamed.details)["finite differences"].startswith("240 columns")


def test_passing_case_differences_no_column() -> None:
    report = gradverify.verify(Good, torch.randn(5, 4, dtype=torch.float64), gradcheck="off")
    check = _jacobian(report)
    assert report.ok and dict(check.details)["finite differences"].startswith("0 columns")


def test_smallest_detectable_scales_with_tolerance() -> None:
    small, large = smallest_detectable(1e-9), smallest_detectable(1e-6)
    assert math.isclose(large / small, 1000, rel_tol=1e-6)
    assert 1e-9 < small < 1e-6  # four probes: a few tens of tolerances


def test_smallest_detectable_misses_with_the_stated_probability_by_monte_carlo() -> None:
    # A wrong entry delta moves u^T A v by delta * u_i * v_j; one probe misses it when
    # |u_i v_j| < tol / delta. At the threshold each of the 4 probes must miss with probability
    # 1e-6 ** (1/4) (= 0.0316), so that all four miss with 1e-6: counted on 400,000 draws
    # (standard error ~0.00028), and a 10% larger or smaller threshold is told apart.
    from gradverify.numerics.projection import MISS_PROBABILITY, PROBES

    tol = 1e-6
    gen = torch.Generator().manual_seed(5)
    uv = (torch.randn(400_000, generator=gen, dtype=torch.float64)
          * torch.randn(400_000, generator=gen, dtype=torch.float64)).abs()
    per_probe = MISS_PROBABILITY ** (1 / PROBES)

    def miss_rate(delta: float) -> float:
        return float((uv < tol / delta).double().mean())

    delta = smallest_detectable(tol)
    assert abs(miss_rate(delta) - per_probe) < 0.0015
    assert miss_rate(1.1 * delta) < per_probe - 0.002 < per_probe + 0.002 < miss_rate(delta / 1.1)


def test_auto_measures_the_pass_and_switches_to_projections_when_it_would_take_too_long(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gradverify.checks import jacobian
    from gradverify.numerics import streaming

    x = torch.rand(40, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    fast_enough = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", max_memory=2**20))
    assert "streamed" in dict(fast_enough.details)["mode"] and dict(fast_enough.details)["auto"].startswith("full")
    assert fast_enough.guarantee.startswith("every entry compared")
    monkeypatch.setattr(jacobian, "AUTO_FULL_SECONDS", 1e-6)  # any measured rate is too slow now
    monkeypatch.setattr(jacobian, "AUTO_NS_PER_ENTRY", 0.0)  # (and the size alone does not decide)
    monkeypatch.setattr(streaming._Plan, "MEASURE_SECONDS", 0.0)  # decide after 3 chunks, however short
    projected = _jacobian(gradverify.verify(ColumnNormalizeDiagonal, x, gradcheck="off", max_memory=2**20))
    auto = dict(projected.details)["auto"]
    assert dict(projected.details)["mode"].startswith("fast") and "was estimated at" in auto
    assert "rows after the first chunk" in auto and not projected.status.ok


def test_kept_pattern_holds_one_row_per_distinct_column_set() -> None:
    from gradverify.numerics.streaming import _Store

    store = _Store(entry_cap=10**6, pattern_cap=10**6)
    # Rows 0..5 of a column normalisation on (3, 2): row (i, j) holds columns (k, j) for every k.
    rows = torch.arange(6).repeat_interleave(3)
    cols = torch.tensor([[k * 2 + (i % 2) for k in range(3)] for i in range(6)]).reshape(-1)
    store.keep_pattern(0, 6, rows, cols)
    kept_rows, kept_cols = store.pattern(0)  # type: ignore[misc]
    assert torch.unique(kept_rows).tolist() == [0, 1] and kept_cols.numel() == 6


class ReluLeakyBelowZero(torch.autograd.Function):
    """A leaky ReLU whose backward uses slope 1 below zero too: a wrong branch, right elsewhere."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, 0.1 * x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * torch.ones_like(x)


def test_a_streamed_failure_is_named_by_the_whole_block_rules_when_its_blocks_fit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The streamed pass keeps only the wrong entries; the name "wrong branch (x < 0)" needs the
    # right ones too, so a failing block that fits is rebuilt for the diagnosis.
    from gradverify.numerics import streamed_findings

    # 360 x 360 entries: streamed (past the 8 MiB dense working set), and the failing block's
    # 12 copies fit the default --max-memory.
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    negative = int((x < 0).sum())
    streamed = _jacobian(gradverify.verify(ReluLeakyBelowZero, x, gradcheck="off", mode="full"))
    assert "streamed" in dict(streamed.details)["mode"] and streamed.mismatch_count == negative
    assert [d.kind for d in streamed.diagnoses] == ["wrong_branch"]
    assert "x < 0" in streamed.diagnoses[0].message
    # Too large to hold: what the wrong entries alone establish, never a wrong name.
    monkeypatch.setattr(streamed_findings, "WHOLE_BLOCK_MAX_ENTRIES", 100)
    alone = _jacobian(gradverify.verify(ReluLeakyBelowZero, x, gradcheck="off", mode="full"))
    assert alone.mismatch_count == negative and [d.kind for d in alone.diagnoses] == ["other"]
    # ... where they sit and how the backward relates to the truth there (1/0.1 = 10 at each).
    message = alone.diagnoses[0].message
    assert f"{negative} of 129,600 entries located (streamed comparison)" in message, message
    assert "backward/truth from 10 to 10" in message, message
