"""Tolerances: per dtype from its machine epsilon, and the one scale every comparison uses.

An entry of the analytic Jacobian A agrees with the truth T when

    |A_ij - T_ij| <= atol * s_i + rtol * |T_ij| + bar_ij

* rtol = atol = sqrt(eps) of the analytic's dtype: half the digits. A backward evaluated in
  that dtype rounds every intermediate (a few eps relative per operation, times the length of
  its sums), so sqrt(eps) -- 1.5e-8 in float64, 3.5e-4 in float32, 3.1e-2 in float16, 8.8e-2
  in bfloat16 -- stays orders of magnitude above rounding for any reasonable formula, while a
  wrong formula (an error of order 1, a missing term, a factor) is orders of magnitude above
  it. In float64 this also catches a float32 intermediate (errors ~1e-7 relative).
* s_i is the scale of the entry's row: the largest |T_i:| of that output entry's gradient.
  Rounding errors are relative to the size of the numbers the backward combines, not to the
  (maybe cancelled) result, and those are the entries of the same row. No floor at 1: a
  Jacobian of entries around 1e-9 (a loss scaled down) is judged exactly as one around 1,
  so the verdict never depends on units. Only where a whole row of the truth is zero does
  the scale fall back to the block's largest entry, then the case's, then the units of the
  block (rms(out) / rms(in)) -- an absolute floor only where the truth is identically zero.
* bar_ij is the truth's own error bar (finite differences; zero for the exact reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Machine epsilon of each dtype's real part (torch.finfo, written out so that renderers and
# configuration can use this module without torch).
EPS: dict[str, float] = {
    "float64": 2.0 ** -52,
    "complex128": 2.0 ** -52,
    "float32": 2.0 ** -23,
    "complex64": 2.0 ** -23,
    "float16": 2.0 ** -10,
    "bfloat16": 2.0 ** -7,
}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    dtype: str = "float64"

    @property
    def eps(self) -> float:
        return EPS.get(self.dtype, EPS["float64"])

    def describe(self) -> str:
        return f"atol {self.atol:.2g} x row scale + rtol {self.rtol:.2g} x |truth| + the truth's error bar"


def default_tolerance(dtype: str) -> Tolerance:
    eps = EPS.get(dtype, EPS["float64"])
    return Tolerance(atol=math.sqrt(eps), rtol=math.sqrt(eps), dtype=dtype)


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    base = default_tolerance(dtype)
    return Tolerance(atol=base.atol if atol is None else atol, rtol=base.rtol if rtol is None else rtol,
                     dtype=dtype)


# A finite-difference error bar "vouches" for an entry (clears the backward on finite
# differences alone) only when it is at most this share of the allowed error: otherwise a
# wrong backward could hide inside the truth's own uncertainty, and the entry is unverifiable.
VOUCH_SHARE = 1.0
