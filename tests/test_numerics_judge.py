"""The one comparison policy: accuse only against every usable truth, clear only with a truth
accurate enough to have caught a wrong value, everything else is not judged."""

from __future__ import annotations

import math

import torch

from gradverify.numerics import judge
from gradverify.numerics.judge import Verdict
from gradverify.numerics.tolerance import default_tolerance, tolerance_for

T = default_tolerance("float64")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_tolerances_come_from_the_dtype_epsilon() -> None:
    for dtype, eps in (("float64", 2.0**-52), ("float32", 2.0**-23), ("bfloat16", 2.0**-7)):
        tol = default_tolerance(dtype)
        assert math.isclose(tol.rtol, math.sqrt(eps)) and math.isclose(tol.atol, math.sqrt(eps))
    assert tolerance_for("float32", atol=0.5).atol == 0.5


def test_row_scale_has_no_floor_at_one() -> None:
    rows = torch.tensor([[1e-9, -3e-9], [0.0, 0.0]], dtype=torch.float64)
    assert judge.row_scales(rows, fallback=7.0).tolist() == [3e-9, 7.0]


def test_with_reference_accuses_excuses_and_withholds() -> None:
    a, r = t(1.0, 1.0, 1.0, 1.0), t(0.0, 0.0, 0.0, 0.0)
    f, bar = t(0.0, 1.0, 0.5, 0.0), t(1e-12, 1e-12, 1.0, 1e-12)
    kink = torch.tensor([False, False, False, True])
    verdict = judge.with_reference(a, r, f, bar, kink, torch.ones(4, dtype=torch.float64), T).tolist()
    assert verdict == [Verdict.MISMATCH, Verdict.EXCUSED, Verdict.UNVERIFIABLE, Verdict.KINK]


def test_a_non_finite_second_truth_never_excuses() -> None:
    verdict = judge.with_reference(t(1.0), t(0.0), t(math.nan), t(1.0), torch.tensor([False]),
                                   t(1.0), T)
    assert verdict.tolist() == [Verdict.UNVERIFIABLE]


def test_finite_differences_alone_clear_only_with_a_small_bar() -> None:
    a, f = t(1.0, 1.0, 2.0), t(1.0, 1.0, 1.0)
    bar = t(1e-12, 0.1, 1e-12)
    verdict = judge.finite_differences_only(a, f, bar, torch.tensor([False] * 3), t(1.0, 1.0, 1.0), T).tolist()
    assert verdict == [Verdict.AGREE, Verdict.UNVERIFIABLE, Verdict.MISMATCH]


def test_an_accusation_by_finite_differences_needs_a_second_step_sequence() -> None:
    verdict = torch.tensor([int(Verdict.MISMATCH)] * 2, dtype=torch.int8)
    kept = judge.confirm(verdict, t(2.0, 2.0), t(1.0, 2.0), t(1e-12, 1e-12), torch.tensor([False, False]),
                         t(1.0, 1.0), T)
    assert kept.tolist() == [Verdict.MISMATCH, Verdict.UNVERIFIABLE]


def test_a_rejected_reference_equal_to_the_backward_is_never_accused() -> None:
    verdict = torch.tensor([int(Verdict.MISMATCH)] * 2, dtype=torch.int8)
    spared = judge.spare_reference_matches(verdict, t(1.0, 1.0), t(1.0, 3.0), t(1.0, 1.0), T)
    assert spared.tolist() == [Verdict.UNVERIFIABLE, Verdict.MISMATCH]
