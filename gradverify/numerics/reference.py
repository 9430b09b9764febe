"""The reference truth: autograd through the op's forward maths (or a declared reference).

It is exact to rounding where it exists, so it is the first truth every entry is compared
with; but a forward body can detach, run under no_grad, go through integer ops or call code
autograd cannot see into, and then autograd through it computes something else than the
derivative. So it is validated against finite differences along random directions, with a
verdict in three values:

* trusted: finite differences agree with it along every probe that they resolve;
* rejected: finite differences, confirmed by a second independent step sequence, disagree;
* unvalidated: finite differences resolved no probe (a function too rough or too fast for
  them): the reference is still used -- an exact computation is not discarded because the
  approximate one cannot keep up -- and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from gradverify.numerics import judge
from gradverify.numerics.finite_diff import FiniteDifferences
from gradverify.numerics.forward import CallSignature, clone_args, is_differentiable_output
from gradverify.numerics.vjp import Tangent, VjpSource
from gradverify.ops.base import Op, as_tuple
from gradverify.usercode import UserCodeError, user_code

# Directions used to decide whether the reference can be trusted: three random Gaussian
# directions, each read with two random cotangents. A reference that is wrong anywhere (a
# detach, an integer op) is caught by any of them with probability 1; more would only cost
# forward calls.
REFERENCE_PROBES = 3
COTANGENTS_PER_PROBE = 2
# Agreement of u.(R v) and u.(F v) within 1e-6 of ||R^T u|| ||v|| (Cauchy-Schwarz: the largest
# the product can be) plus the finite differences' own bar: ~1e6 times the rounding of the
# exact side, and far below any real disagreement (a zero reference, a missing term).
VALIDATION_RTOL = 1e-6


@dataclass
class Reference:
    source: VjpSource | None
    description: str
    status: str  # "trusted" | "unvalidated" | "rejected" | "unavailable"
    reason: str = ""

    @property
    def usable(self) -> bool:
        """Whether it can clear entries (it agrees with A there) and accuse with F."""
        return self.source is not None and self.status in ("trusted", "unvalidated")


def build_reference(op: Op, signature: CallSignature, args: Sequence[Any], diff_positions: Sequence[int],
                    out_positions: Sequence[int], *, declared: Callable[..., Any] | None,
                    tangents: dict[int, Tangent], max_bytes: int, device: str) -> Reference:
    """Autograd through the op's forward body (or the declared reference) at `args`."""
    body = declared if declared is not None else op.body(device)
    description = "declared reference" if declared is not None else op.body_description
    if body is None:
        return Reference(None, description, "unavailable", "the op has no differentiable Python body")
    call_args = clone_args(args)
    leaves: list[tuple[int, torch.Tensor]] = []
    for pos in diff_positions:
        leaf = call_args[pos].requires_grad_(True)
        leaves.append((pos, leaf))
        # The body may write into its input in place; give it a non-leaf copy of the leaf.
        with torch.enable_grad():
            call_args[pos] = leaf.clone()
    positional, kwargs = signature.split(call_args)
    try:
        with user_code("reference"), torch.enable_grad():
            outputs = as_tuple(body(*positional, **kwargs))
    except UserCodeError as exc:
        what = "the declared reference" if declared is not None else "the forward body"
        text = str(exc.original).splitlines()[0][:120] if str(exc.original) else ""
        return Reference(None, description, "unavailable",
                         f"{what} cannot run outside the op ({type(exc.original).__name__}: {text})")
    selected: list[tuple[int, torch.Tensor]] = []
    for o in out_positions:
        if o >= len(outputs) or not isinstance(outputs[o], torch.Tensor):
            return Reference(None, description, "unavailable", "the forward body returns other outputs than the op")
        out = outputs[o]
        if not is_differentiable_output(out):
            return Reference(None, description, "unavailable",
                             "the forward body has no autograd history (it detaches, runs under no_grad, "
                             "or leaves torch)")
        selected.append((o, out))
    source = VjpSource(selected, leaves, phase="reference", max_bytes=max_bytes, tangents=tangents)
    return Reference(source, description, "unvalidated")


def validate(reference: Reference, fd: FiniteDifferences, seed: int) -> Reference:
    """Trusted, rejected or unvalidated, from random projections against finite differences."""
    if reference.source is None:
        return reference
    source = reference.source
    gen = torch.Generator().manual_seed(seed + 7)
    agreed = 0
    worst = 0.0
    zero_reference = True
    for _ in range(REFERENCE_PROBES):
        v = {p: torch.randn(leaf.shape, generator=gen, dtype=torch.float64) for p, leaf in source.leaves}
        u = {o: torch.randn((COTANGENTS_PER_PROBE, *out.shape), generator=gen, dtype=torch.float64)
             for o, out in source.outputs.items()}
        try:
            rows = source.vjp(u)
        except UserCodeError as exc:
            return replace(reference, source=None, status="unavailable",
                           reason=f"autograd through the forward body failed ({type(exc.original).__name__})")
        verdicts = []
        readings = []
        for sequence in (0, 1):
            # u . (F v) for both cotangents at once, contracted inside the tableau (memory of a
            # few outputs whatever their size; numerics.finite_diff.contracted).
            values, bars = fd.contracted(v, u, sequence=sequence)
            readings.append((values, bars))
            verdicts.append(_compare(rows, u, v, values, bars, source))
            if verdicts[-1][0] != "disagree":
                break
        status, diff, r_zero = verdicts[-1]
        zero_reference &= r_zero
        if status == "disagree" and len(readings) == 2 and not _sequences_agree(readings):
            status = "inconclusive"  # the two step sequences disagree with each other: aliasing
        if status == "disagree" and verdicts[0][0] == "disagree":
            worst = max(worst, diff)
            if zero_reference:
                reason = ("autograd through the forward body gives zero where finite differences do not (it "
                          "detaches, runs under no_grad, or goes through integer ops)")
            else:
                reason = (f"autograd through the forward body disagrees with finite differences along a random "
                          f"direction (difference {worst:.3g}, confirmed with two step sequences)")
            return replace(reference, status="rejected", reason=reason)
        if status == "agree":
            agreed += 1
    if agreed:
        return replace(reference, status="trusted")
    return replace(reference, status="unvalidated",
                   reason="finite differences did not resolve the op along any random direction, so the reference "
                          "could not be validated; it is used as it is exact where the op is differentiable")


def _sequences_agree(readings: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Two disjoint step sequences give the same contracted directional derivatives within their bars."""
    (e1, b1), (e2, b2) = readings
    return bool(judge.consistent(e1.double(), b1.double(), e2.double(), b2.double()).all())


def _compare(rows: dict[int, torch.Tensor], u: dict[int, torch.Tensor], v: dict[int, torch.Tensor],
             values: torch.Tensor, bars: torch.Tensor, source: VjpSource) -> tuple[str, float, bool]:
    """('agree' | 'disagree' | 'inconclusive', |difference|, reference side is zero); values and
    bars: u_b . (F v) and its error bar per cotangent b."""
    worst_status = "agree"
    worst_diff = 0.0
    r_zero = True
    for b in range(COTANGENTS_PER_PROBE):
        rv = sum(float((rows[p][b].double() * v[p].reshape(-1)).sum()) for p, _ in source.leaves)
        norm = math.sqrt(sum(float(rows[p][b].double().pow(2).sum()) for p, _ in source.leaves)) * \
            math.sqrt(sum(float(v[p].pow(2).sum()) for p, _ in source.leaves))
        fv = float(values[b])
        bar = float(bars[b])
        if not (math.isfinite(fv) and math.isfinite(bar)):
            worst_status = "inconclusive" if worst_status == "agree" else worst_status
            continue
        diff = abs(rv - fv)
        r_zero &= norm == 0.0 and abs(fv) > bar
        if diff <= VALIDATION_RTOL * norm + bar:
            continue
        # Disagreement only counts when finite differences resolved this projection.
        if bar < diff / 2:
            worst_status = "disagree"
            worst_diff = max(worst_diff, diff)
        elif worst_status == "agree":
            worst_status = "inconclusive"
    return worst_status, worst_diff, r_zero
