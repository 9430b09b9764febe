"""The one comparison policy: how an entry of the analytic Jacobian is judged.

Two truths may be available: the reference R (autograd through the forward body, or a
declared reference: exact to rounding) and finite differences F (with an error bar per entry).
An entry is *accused* only when the analytic value A disagrees with every usable truth
conclusively; it is *cleared* only by a truth accurate enough to have caught a wrong value;
anything else is *not judged* (unverifiable), which is never folded into a pass.

With a reference that finite differences did not reject:
    |A - R| <= allowed(R)                      AGREE     (two independent computations agree)
    otherwise finite differences at the entry's column:
    |A - F| > allowed(F) + bar                 MISMATCH  (both truths exclude A)
    |A - F| <= allowed(F) + bar, bar below the disagreement |A - R| - allowed(R)
                                               EXCUSED   (F sides with A: R is wrong there)
    at a kink                                  KINK      (not judged: non-differentiable point)
    else                                       UNVERIFIABLE
With a rejected reference, A equal to R to rounding is never accused (the two computations of
the derivative agree); such entries are UNVERIFIABLE where F disagrees with both.
Without a reference, F alone:
    |A - F| <= allowed(F) + bar and bar <= allowed(F)      AGREE
    |A - F| > allowed(F) + bar, confirmed by a second, independent step sequence
                                               MISMATCH
    at a kink                                  KINK
    else                                       UNVERIFIABLE

allowed(T) = atol * s + rtol * |T| with s the row scale (numerics.tolerance).
"""

from __future__ import annotations

import enum

import torch

from gradverify.numerics.tolerance import VOUCH_SHARE, Tolerance


class Verdict(enum.IntEnum):
    AGREE = 0
    MISMATCH = 1
    EXCUSED = 2
    UNVERIFIABLE = 3
    KINK = 4


def allowed(truth: torch.Tensor, scale: torch.Tensor, tolerance: Tolerance,
            slack: torch.Tensor | None = None) -> torch.Tensor:
    """atol * s + rtol * |T|, plus the slack the case's dtype needs (checks/jacobian.SLACK_FACTOR)."""
    base = tolerance.atol * scale + tolerance.rtol * truth.abs()
    return base if slack is None else base + slack


def row_scales(truth_rows: torch.Tensor, fallback: float) -> torch.Tensor:
    """Per row (last dim = the row's entries): the largest |truth|; `fallback` for zero rows."""
    if truth_rows.numel() == 0:
        return torch.zeros(truth_rows.shape[:-1], dtype=torch.float64)
    finite = torch.where(torch.isfinite(truth_rows), truth_rows.abs(), torch.zeros_like(truth_rows.abs()))
    scale = finite.amax(dim=-1)
    return torch.where(scale > 0, scale, torch.full_like(scale, fallback))


def disagrees(a: torch.Tensor, truth: torch.Tensor, scale: torch.Tensor, tolerance: Tolerance,
              slack: torch.Tensor | None = None) -> torch.Tensor:
    """|A - T| > allowed(T), or A non-finite where T is finite (NaN compares false, so say it)."""
    bad = (a - truth).abs() > allowed(truth, scale, tolerance, slack)
    return (bad | ~torch.isfinite(a)) & torch.isfinite(truth)


def with_reference(a: torch.Tensor, r: torch.Tensor, f: torch.Tensor, bar: torch.Tensor, kink: torch.Tensor,
                   scale: torch.Tensor, tolerance: Tolerance, slack: torch.Tensor | None = None) -> torch.Tensor:
    """Verdicts for entries where A disagrees with a reference that finite differences did not
    reject (the caller has already cleared the entries where A agrees with R)."""
    a_finite = torch.isfinite(a)
    f_usable = torch.isfinite(f) & torch.isfinite(bar)
    gap_f = torch.where(a_finite, (a - f).abs(), torch.full_like(a, float("inf")))
    gap_r = torch.where(a_finite, (a - r).abs(), torch.full_like(a, float("inf")))
    allow_f = allowed(f, scale, tolerance, slack)
    allow_r = allowed(r, scale, tolerance, slack)
    verdict = torch.full(a.shape, int(Verdict.UNVERIFIABLE), dtype=torch.int8)
    verdict[f_usable & (gap_f > allow_f + bar) & ~kink] = int(Verdict.MISMATCH)
    verdict[f_usable & (gap_f <= allow_f + bar) & (bar < gap_r - allow_r) & ~kink] = int(Verdict.EXCUSED)
    verdict[kink & (gap_f > allow_f)] = int(Verdict.KINK)
    return verdict


def spare_reference_matches(verdict: torch.Tensor, a: torch.Tensor, r: torch.Tensor, scale: torch.Tensor,
                            tolerance: Tolerance) -> torch.Tensor:
    """With a rejected reference: never accuse an entry where A equals R to rounding (two
    computations of the derivative agree; finite differences alone disagree with both)."""
    same = ~disagrees(a, r, scale, tolerance)
    out = verdict.clone()
    out[(verdict == int(Verdict.MISMATCH)) & same] = int(Verdict.UNVERIFIABLE)
    return out


def finite_differences_only(a: torch.Tensor, f: torch.Tensor, bar: torch.Tensor, kink: torch.Tensor,
                            scale: torch.Tensor, tolerance: Tolerance,
                            slack: torch.Tensor | None = None) -> torch.Tensor:
    """Verdicts with finite differences as the only truth (MISMATCH still to be confirmed)."""
    a_finite = torch.isfinite(a)
    f_usable = torch.isfinite(f) & torch.isfinite(bar)
    gap = torch.where(a_finite, (a - f).abs(), torch.full_like(a, float("inf")))
    allow = allowed(f, scale, tolerance, slack)
    verdict = torch.full(a.shape, int(Verdict.UNVERIFIABLE), dtype=torch.int8)
    verdict[f_usable & (gap <= allow + bar) & (bar <= VOUCH_SHARE * allow + _tiny(allow))] = int(Verdict.AGREE)
    verdict[f_usable & (gap > allow + bar) & ~kink] = int(Verdict.MISMATCH)
    verdict[kink & (verdict != int(Verdict.AGREE))] = int(Verdict.KINK)
    return verdict


def consistent(f1: torch.Tensor, bar1: torch.Tensor, f2: torch.Tensor, bar2: torch.Tensor) -> torch.Tensor:
    """Two finite-difference estimates from disjoint step sequences agree within their bars. An
    estimate that only looks converged by aliasing (steps resonating with an oscillation) does
    not reproduce from other sample points, so agreement is what makes F a truth to accuse with."""
    return torch.isfinite(f1) & torch.isfinite(f2) & ((f1 - f2).abs() <= bar1 + bar2)


def confirm(verdict: torch.Tensor, a: torch.Tensor, f2: torch.Tensor, bar2: torch.Tensor, kink2: torch.Tensor,
            scale: torch.Tensor, tolerance: Tolerance, slack: torch.Tensor | None = None,
            f1: torch.Tensor | None = None, bar1: torch.Tensor | None = None) -> torch.Tensor:
    """Keep a MISMATCH only where a second, independent finite-difference estimate agrees with
    the first (`f1`, `bar1`) and also excludes A."""
    a_finite = torch.isfinite(a)
    usable = torch.isfinite(f2) & torch.isfinite(bar2) & ~kink2
    if f1 is not None and bar1 is not None:
        usable &= consistent(f1, bar1, f2, bar2)
    gap = torch.where(a_finite, (a - f2).abs(), torch.full_like(a, float("inf")))
    still = usable & (gap > allowed(f2, scale, tolerance, slack) + bar2)
    out = verdict.clone()
    out[(verdict == int(Verdict.MISMATCH)) & ~still] = int(Verdict.UNVERIFIABLE)
    return out


def _tiny(allow: torch.Tensor) -> torch.Tensor:
    # Exact zeros on both sides (a bar of 0 against an allowance of 0) still agree.
    return torch.zeros_like(allow)
