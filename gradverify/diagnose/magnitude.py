"""Rules that read the *size and shape of the errors*: rounding of a lower-precision intermediate,
an eps dropped in one term, a surrogate (straight-through or a nearby function's derivative), an
element-wise formula off by a factor that varies from entry to entry."""

from __future__ import annotations

import math

import torch

from gradverify.diagnose.view import BlockView
from gradverify.numerics.tolerance import EPS
from gradverify.report import Diagnosis

# The dtype a backward "secretly" computes in, below the case's dtype.
LOWER: dict[str, tuple[str, ...]] = {
    "float64": ("float32",), "complex128": ("float32",),
    "float32": ("bfloat16", "float16"), "complex64": ("bfloat16", "float16"),
}
# Rounding of a lower-precision intermediate: each operation rounds to ~eps_L relative to the
# numbers it combines, which are at most the block's scale times the amplification of a short
# formula or sum; 64 eps_L (7.6e-6 for float32) covers that, and stays below what a dropped eps
# of 1e-5 or a wrong term (order 1) leaves.
PRECISION_BAND = 64
# Rounding touches (nearly) every entry: at least this share of the relevant entries must
# differ from the truth by more than float64 noise (16 eps of the case dtype x scale).
PRECISION_TOUCHED = 0.5
# Rounding errors have no preferred direction: the mean of sign(a - t) sign(t) over the touched
# entries stays within this of 0 (a dropped eps, a proxy or a factor lean one way).
NOISE_SIGN_BIAS = 0.5


def _errors(v: BlockView) -> tuple[torch.Tensor, torch.Tensor]:
    """|a - t| / block scale at the relevant entries (non-finite entries excluded), and the
    per-entry sign of the error relative to the truth."""
    mask = v.relevant & torch.isfinite(v.a) & torch.isfinite(v.t)
    err = (v.a - v.t)[mask].abs() / v.scale
    lean = (torch.sign(v.a - v.t) * torch.sign(v.t))[mask]
    return err, lean


def _touched(v: BlockView, err: torch.Tensor) -> torch.Tensor:
    return err > 16 * EPS.get(v.block.dtype, EPS["float64"])


def precision(v: BlockView) -> Diagnosis | None:
    """Errors at the rounding level of a lower dtype, on nearly every entry, without direction."""
    lower = LOWER.get(v.block.dtype, ())
    err, lean = _errors(v)
    if not err.numel():
        return None
    touched = _touched(v, err)
    if int(touched.sum()) < PRECISION_TOUCHED * err.numel():
        return None
    finite_a = v.a[v.relevant & torch.isfinite(v.a)]
    largest = float(err.max())
    for dtype in lower:
        eps_low = EPS[dtype]
        if largest > PRECISION_BAND * eps_low:
            continue
        exact = bool((finite_a.to(getattr(torch, dtype)).double() == finite_a).all())
        # Below float32 the band is wide (0.06 relative for float16): only values that are
        # exactly numbers of that dtype prove it.
        if dtype != "float32" and not exact:
            continue
        bias = float(lean[touched].mean()) if bool(touched.any()) else 0.0
        if abs(bias) > NOISE_SIGN_BIAS and not exact:
            continue
        proof = (f"; every entry of the backward is exactly a {dtype} number" if exact else
                 "; the errors have no preferred direction, as rounding does")
        return Diagnosis(
            "precision",
            f"{v.deriv}: {v.n_bad} entries are off by up to {largest:.2g} of the block's scale, about "
            f"{largest / eps_low:.0f} x {dtype}'s rounding (eps {eps_low:.2g}), and {int(touched.sum())} of "
            f"{err.numel()} entries carry errors of that size{proof}: a {dtype} intermediate inside a "
            f"{v.block.dtype} backward",
            output=v.out_name, input=v.in_name,
            evidence=f"largest error {largest:.2g} x scale <= {PRECISION_BAND} x eps({dtype})",
            hint=f"find the .float() / .to({dtype}) (a {dtype} buffer or constant, a kernel that loads tiles in "
                 f"{dtype}) in backward and compute in the input's dtype; if the lower precision is intended, "
                 "check at its tolerance (--rtol)")
    return None


# A dropped eps changes a right formula by about eps relative (eps / denominator): errors of at
# most this share of the block's scale are far below a wrong formula (order 1) and above
# float32 rounding (7.6e-6, see PRECISION_BAND).
TINY = 1e-4
# A scalar argument is "an eps" when it is positive and at most this (1e-2 is a large eps).
EPS_ARGUMENT_MAX = 1e-2
# The errors "have the size of eps" within this factor either way (eps / w for w from 1/30 to 30).
EPS_MATCH = 30.0


def _eps_arguments(v: BlockView) -> list[tuple[str, float]]:
    found = []
    for name, value in (v.block.inputs or {}).items():
        if isinstance(value, float) and 0 < value <= EPS_ARGUMENT_MAX:
            found.append((name, value))
    return sorted(found, key=lambda nv: "eps" not in nv[0].lower())


def dropped_eps(v: BlockView) -> Diagnosis | None:
    """Tiny errors with a direction or a place: of the size of the case's eps argument, or
    below 1e-4 of the block's scale and structured (not rounding noise)."""
    err, lean = _errors(v)
    if not err.numel():
        return None
    largest = float(err.max())
    touched = _touched(v, err)
    matched = next(((name, eps) for name, eps in _eps_arguments(v)
                    if eps / EPS_MATCH <= largest <= eps * EPS_MATCH), None)
    if matched is None:
        if largest > TINY:
            return None
        bias = float(lean[touched].mean()) if bool(touched.any()) else 0.0
        if abs(bias) <= NOISE_SIGN_BIAS:
            return None  # no direction: rounding noise or nothing nameable
        size = f"at most {largest:.2g} of the block's scale, leaning one way ({bias:+.2f})"
    else:
        size = f"up to {largest:.2g} of the block's scale: the size of {matched[0]} = {matched[1]:g}"
    rel = (v.a - v.t).abs()[v.bad] / v.t.abs()[v.bad].clamp_min(1e-300)
    spread = f"; relative errors from {float(rel.min()):.2g} to {float(rel.max()):.2g}" if rel.numel() else ""
    return Diagnosis(
        "dropped_eps",
        f"{v.deriv}: tiny, structured errors at {v.n_bad} entries, {size}{spread} (largest where the eps matters "
        "most, next to small denominators): an eps dropped or added in one term",
        output=v.out_name, input=v.in_name,
        evidence=f"{int(touched.sum())} of {err.numel()} entries differ, none by more than {largest:.2g} x scale",
        hint="use the same eps as forward in every term of backward (x + eps, sqrt(var + eps), (w + eps)^p and its "
             "derivative p (w + eps)^(p-1)); look for a term that recomputes a value without it")


def surrogate_hint(why: str) -> str:
    """How to declare a deliberate surrogate (it then reports as expected, XFAIL, never a pass)."""
    return (f"if it is deliberate, declare it: gv.check(surrogate=\"{why}\") on the op in a Python spec, or "
            f"`surrogate: {why}` in YAML (reported as an expected failure, XFAIL; an undeclared surrogate is never a "
            "pass); if not, differentiate exactly the function forward computes")


def straight_through(v: BlockView) -> Diagnosis | None:
    """The truth is 0 everywhere (forward is flat: round, sign, step, quantise) but backward
    passes a gradient: a straight-through estimator."""
    if bool(v.nz_t.any()) or not bool(v.nz_a.any()):
        return None
    what = "a non-zero gradient"
    if v.out_shape == v.in_shape and v.out_shape:
        diag = torch.eye(v.rows, dtype=torch.bool).reshape(v.a.shape)
        on = v.a[diag]
        if not bool((v.nz_a & ~diag).any()):
            kept = on[on.abs() > v.allowed[diag]]
            if kept.numel() and float((kept - kept[0]).abs().max()) <= 1e-12 * max(1.0, abs(float(kept[0]))):
                what = ("the identity" if abs(float(kept[0]) - 1) <= 1e-12 else f"{float(kept[0]):g} x the identity")
                if kept.numel() < on.numel():
                    what += f" on {kept.numel()} of {on.numel()} entries (clipped)"
    return Diagnosis(
        "surrogate",
        f"{v.deriv}: the truth is 0 at every entry (forward is flat here, as round/sign/step/quantise are) but "
        f"backward passes {what}: it looks like a deliberate straight-through estimator that is not declared",
        output=v.out_name, input=v.in_name,
        evidence=f"{int(v.nz_a.sum())} non-zero backward entries where every finite-difference and reference entry "
                 "is 0", hint=surrogate_hint("straight-through estimator"))


# The derivative of a nearby function stays within this share of the block's scale of the truth
# at every entry (the exact-erf GELU derivative vs the tanh approximation: 8e-4), and is off by
# more than TINY somewhere. Measured against the scale, not entry by entry: where a derivative
# crosses zero any two nearby functions differ by a large ratio. A wrong formula (a missing term,
# a wrong constant like unbiased vs biased variance at n = 6) is off by more.
PROXY_MAX = 0.1


def smooth_proxy(v: BlockView) -> Diagnosis | None:
    """The backward is the derivative of a nearby function: close to the truth everywhere, or
    smooth where the truth is piecewise constant (a step's derivative)."""
    rel = v.relevant
    n = int(rel.sum())
    if n < 4:
        return None
    t, a = v.t[rel], v.a[rel]
    levels = torch.unique(torch.round(t / (1e-6 * v.scale)))
    a_levels = torch.unique(torch.round(a / (1e-6 * v.scale)))
    tol = float(v.allowed[rel].max())
    if levels.numel() <= 2 and a_levels.numel() >= 3 and bool((a >= t.min() - tol).all()) \
            and bool((a <= t.max() + tol).all()):
        shown = ", ".join(f"{float(x) * 1e-6 * v.scale:.3g}" for x in levels)
        return Diagnosis(
            "surrogate",
            f"{v.deriv}: the truth takes only the values {{{shown}}} (a piecewise-linear forward) while the backward "
            f"varies smoothly between them ({a_levels.numel()} distinct values): it looks like a deliberate smooth "
            "proxy (a sigmoid or softplus derivative for a step or ReLU) that is not declared",
            output=v.out_name, input=v.in_name,
            evidence=f"{v.n_bad} of {n} entries differ; every backward entry lies within the truth's range",
            hint=surrogate_hint("smooth proxy gradient"))
    if bool((v.nz_t != v.nz_a).any()):
        return None
    err = (v.a - v.t).abs()[rel] / v.scale
    largest = float(err.max())
    if not TINY < largest <= PROXY_MAX or v.n_bad < 0.5 * n:
        return None
    ratio = v.a[v.nz_t] / v.t[v.nz_t]
    return Diagnosis(
        "surrogate",
        f"{v.deriv}: the backward is close to the truth at every entry (off by at most {largest:.2g} of the block's "
        f"scale) but not equal at {v.n_bad} of {n}: the derivative of a nearby function, as a deliberate "
        "approximation (another formula for the same activation, a smooth stand-in) would be; it is not declared",
        output=v.out_name, input=v.in_name,
        evidence=f"same sparsity; median backward/truth {float(ratio.median()):.4g}; every error <= {PROXY_MAX:g} x "
                 "the block's scale",
        hint=surrogate_hint("derivative of an approximation"))


def nonconstant_factor(v: BlockView) -> Diagnosis | None:
    """An element-wise (one entry per output or per input) block with the truth's sparsity, off by
    a factor that changes from entry to entry."""
    nz = v.matrix(v.nz_t)
    if not (bool((nz.sum(1) <= 1).all()) or bool((nz.sum(0) <= 1).all())):
        return None
    if bool((v.nz_t != v.nz_a).any()) or not bool((v.bad <= v.nz_t).all()):
        return None
    ratio = v.a[v.bad] / v.t[v.bad]
    if ratio.numel() < 2:
        return None
    lo, hi = float(ratio.min()), float(ratio.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi), abs(lo)):
        return None  # one factor on a subset: a region rule's pattern, not a varying factor
    good = int((v.nz_t & ~v.bad).sum())
    message = (f"{v.deriv} has the truth's sparsity (one entry per {v.out_name if nz.sum(1).max() <= 1 else v.in_name}"
               f" entry) but backward/truth varies from {lo:.3g} to {hi:.3g} across its {v.n_bad} wrong entries")
    if good:
        message += f" (it is 1 at the {good} right ones)"
    relation = _power_of_input(v)
    if relation:
        message += f"; {relation}"
    message += ": an element-wise formula off by a factor that varies from entry to entry"
    flips = int((ratio < 0).sum())
    return Diagnosis("nonconstant_factor", message, output=v.out_name, input=v.in_name,
                     evidence=f"{v.n_bad} wrong entries, ratio not constant"
                              + (f"; the sign differs at {flips} of them" if flips else ""),
                     hint="the derivative's formula is wrong, not just a constant: a term with the wrong sign, a "
                          "missing or extra term, a wrong power (check the product and chain rules term by term "
                          "against forward)")


def _power_of_input(v: BlockView) -> str:
    """'backward/truth = 2 x ** 1 at every entry' when the ratio is a power of the block's input."""
    x = v.in_value
    if x is None or not x.is_floating_point() or tuple(x.shape) != v.in_shape:
        return ""
    cols = v.matrix(v.nz_t)
    col_of = torch.nonzero(cols)[:, 1]
    if col_of.numel() < 3:
        return ""
    xs = x.double().reshape(-1)[col_of]
    ratio = v.matrix(v.a)[cols] / v.matrix(v.t)[cols]
    for power in (1, -1, 2):
        if power < 0 and bool((xs == 0).any()):
            continue
        basis = xs ** power
        denom = float((basis * basis).sum())
        if denom == 0:
            continue
        c = float((ratio * basis).sum()) / denom
        if bool(((ratio - c * basis).abs() <= 1e-6 * ratio.abs().clamp_min(1e-12)).all()) and math.isfinite(c):
            return (f"backward/truth = {c:.4g} x {v.in_name}**{power} at every entry (a factor of {v.in_name} too "
                    "many or too few)")
    return ""
