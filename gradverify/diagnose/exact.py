"""Rules that claim a block only when a transformation of the truth fits *every* entry: NaNs, an
all-zero gradient, a flipped sign, a constant factor, a transpose (of an input's layout, of an
operand, of the whole Jacobian), a broadcast along the wrong dim, and two inputs' gradients in
each other's slot."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Iterator, Sequence

import torch

from gradverify.diagnose.view import LETTERS, BlockView, fits
from gradverify.numerics.blocks import BlockComparison
from gradverify.report import Diagnosis

Transform = Callable[[torch.Tensor], torch.Tensor]


def nonfinite(v: BlockView) -> Diagnosis | None:
    bad = ~torch.isfinite(v.a) & v.bad
    if not bool(bad.any()):
        return None
    return Diagnosis("nonfinite", f"{v.deriv}: {int(bad.sum())} entries are NaN/Inf in the backward where the truth is "
                                  "finite", output=v.out_name, input=v.in_name,
                     hint="look for a division by zero or log/sqrt of 0 in backward")


def all_zero(v: BlockView) -> Diagnosis | None:
    if not bool(v.nz_t.any()) or bool(v.nz_a.any()):
        return None
    return Diagnosis("zero_grad", f"{v.deriv} is all zero in the backward, but {int(v.nz_t.sum())} entries of the "
                                  "truth are not", output=v.out_name, input=v.in_name,
                     evidence=f"max |truth| {float(v.t.abs().max()):.4g}",
                     hint=f"the gradient for {v.in_name} is never computed (zeros_like, a detach, or a wrong return "
                          "slot)")


def negated(v: BlockView) -> Diagnosis | None:
    if not bool(v.nz_t.any()) or not bool(fits(v.a, -v.t, v.allowed).all()):
        return None
    return Diagnosis("sign", f"{v.deriv} has the wrong sign: backward = -truth at every entry",
                     output=v.out_name, input=v.in_name, evidence=f"{int(v.nz_t.sum())} non-zero entries fit",
                     hint="flip the sign of this gradient (a subtraction the wrong way round?)")


# A least-squares factor this close to 1 is not "scaled" (it is rounding or another pattern).
SCALED_MIN_DEPARTURE = 1e-3


def scaled(v: BlockView) -> Diagnosis | None:
    """a = c * t at every entry, with the least-squares factor c."""
    denom = float((v.t * v.t).sum())
    if denom <= 0:
        return None
    c = float((v.a * v.t).sum()) / denom
    if abs(c - 1) <= SCALED_MIN_DEPARTURE or abs(c) <= 1e-6:
        return None
    if not bool(fits(v.a, c * v.t, v.allowed * max(1.0, abs(c))).all()):
        return None
    return Diagnosis("scaled", f"{v.deriv} is off by a factor {c:.3f}{_nice_factor(c)}: backward = {c:.4g} x truth",
                     output=v.out_name, input=v.in_name, evidence=f"all {v.t.numel()} entries fit a single factor",
                     hint="a constant factor is missing or extra (a 2 from x**2, a 1/n from a mean?)")


def _nice_factor(c: float) -> str:
    for value, text in ((2.0, "2"), (0.5, "1/2"), (-2.0, "-2"), (-0.5, "-1/2"), (3.0, "3"), (1 / 3, "1/3")):
        if abs(c - value) < 1e-6 * max(1.0, abs(value)):
            return f" (= {text})"
    return ""


# --- transposes -------------------------------------------------------------------------------

OPERAND_HINT = ("the backward multiplies by a transposed operand (A @ g where A.t() @ g belongs) or applies an "
                "index map the wrong way round (gather where scatter belongs, the inverse permutation)")


def transposed(v: BlockView) -> Diagnosis | None:
    """The backward equals the truth after a transpose: of the input's or the output's layout
    (equal-sized dims swapped, or a transposed layout reshaped instead of transposed), of one
    output dim with one input dim (a transposed operand), or of the whole Jacobian."""
    if not bool(v.nz_t.any()):
        return None
    # A pairing moved to another dim first: where the truth is an indicator (a broadcast of
    # ones) a swap of two output dims can fit too, but the moved pairing is the specific story.
    moved_pairing = misbroadcast(v)
    if moved_pairing is not None:
        return moved_pairing
    for what, transform, hint in _transposes(v):
        moved = transform(v.t)
        tolerance = torch.maximum(v.allowed, transform(v.allowed))
        if bool(fits(moved, v.t, tolerance).all()):
            continue  # a symmetry of the truth: no evidence either way
        if bool(fits(v.a, moved, tolerance).all()):
            return Diagnosis("transposed", f"{v.deriv} matches the truth after {what}", output=v.out_name,
                             input=v.in_name, evidence=f"all {v.t.numel()} entries fit the transposed truth", hint=hint)
    return None


def _transposes(v: BlockView) -> Iterator[tuple[str, Transform, str]]:
    out_shape, in_shape = v.out_shape, v.in_shape
    no, ni = len(out_shape), len(in_shape)
    m, n = v.rows, v.cols
    full = (*out_shape, *in_shape)
    grad_hint = f"a .t() / .transpose() too many or too few in the gradient for {v.in_name}"
    for e1, e2 in combinations(range(ni), 2):
        if in_shape[e1] == in_shape[e2]:
            what = (f"transposing the layout of {v.in_name}" if ni == 2 else
                    f"swapping dims {e1} and {e2} of {v.in_name}")
            yield what, _swap(no + e1, no + e2), grad_hint
    for d1, d2 in combinations(range(no), 2):
        if out_shape[d1] == out_shape[d2]:
            what = (f"transposing the layout of {v.out_name}" if no == 2 else
                    f"swapping dims {d1} and {d2} of {v.out_name}")
            yield what, _swap(d1, d2), "grad_output is read transposed (a .t() too many or too few on grad_output)"
    for d in range(no):
        for e in range(ni):
            if out_shape[d] == in_shape[e]:
                yield (f"exchanging {v.out_name}'s dim {d} with {v.in_name}'s dim {e} ({_exchange_formula(v, d, e)})",
                       _swap(d, no + e), OPERAND_HINT)
    if out_shape == in_shape and no >= 2:
        whole = [*range(no, no + ni), *range(no)]
        yield "transposing the whole Jacobian (the backward applies J where Jᵀ belongs)", \
            lambda x: x.permute(whole), OPERAND_HINT
    for side_shape, side_name, rows_first in ((in_shape, v.in_name, True), (out_shape, v.out_name, False)):
        for perm in _layout_perms(len(side_shape)):
            sizes = [side_shape[p] for p in perm]
            if sizes == list(side_shape):
                continue  # equal sizes: already tried as a swap
            for inverse in (False, True):
                shown = "x".join(map(str, sizes))
                what = (f"reading {side_name}'s entries in a {shown} layout (dims {tuple(perm)} of {side_name}) "
                        "reshaped instead of transposed")
                hint = (f"the gradient for {v.in_name} is computed in a transposed layout and then .reshape()d / "
                        ".view()ed: use .t() / .permute()" if rows_first else
                        "grad_output is reshaped where it needs a transpose (.reshape/.view instead of .t()/.permute)")
                yield what, _relayout(side_shape, perm, inverse, rows_first, m, n, full), hint


def _exchange_formula(v: BlockView, d: int, e: int) -> str:
    """backward ∂out[i,j]/∂b[k,j] = truth ∂out[k,j]/∂b[i,j] for out dim d exchanged with in dim e."""
    no, ni = len(v.out_shape), len(v.in_shape)
    out_l = list(LETTERS[:no])
    in_l = list(LETTERS[no:no + ni])
    swapped_out, swapped_in = list(out_l), list(in_l)
    swapped_out[d], swapped_in[e] = in_l[e], out_l[d]
    return (f"backward ∂{v.out_name}[{','.join(out_l)}]/∂{v.in_name}[{','.join(in_l)}] = truth "
            f"∂{v.out_name}[{','.join(swapped_out)}]/∂{v.in_name}[{','.join(swapped_in)}]")


def _swap(d1: int, d2: int) -> Transform:
    return lambda x: x.transpose(d1, d2)


def _layout_perms(nd: int) -> list[tuple[int, ...]]:
    if nd < 2:
        return []
    perms = {tuple(reversed(range(nd)))}
    for e1, e2 in combinations(range(nd), 2):
        p = list(range(nd))
        p[e1], p[e2] = p[e2], p[e1]
        perms.add(tuple(p))
    return sorted(perms)


def _relayout(shape: Sequence[int], perm: Sequence[int], inverse: bool, on_inputs: bool, m: int, n: int,
              full: tuple[int, ...]) -> Transform:
    """Each row (on_inputs) or column of the block re-read with `shape` permuted and flattened."""
    inv = [perm.index(k) for k in range(len(perm))]

    def move(x: torch.Tensor) -> torch.Tensor:
        lead = m if on_inputs else n
        rows = x.reshape(m, n) if on_inputs else x.reshape(m, n).t()
        if inverse:
            moved = rows.reshape(lead, *[shape[p] for p in perm]).permute(0, *[1 + k for k in inv])
        else:
            moved = rows.reshape(lead, *shape).permute(0, *[1 + p for p in perm])
        flat = moved.reshape(lead, -1)
        return (flat if on_inputs else flat.t()).reshape(full)

    return move


def _coupled(mask: torch.Tensor, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> set[tuple[int, int]]:
    """(out dim d, in dim e) such that every masked entry has out index d == in index e."""
    pairs: set[tuple[int, int]] = set()
    if not bool(mask.any()):
        return pairs
    no = len(out_shape)
    for d in range(no):
        for e in range(len(in_shape)):
            if out_shape[d] != in_shape[e] or out_shape[d] <= 1:
                continue
            if not bool((mask & ~_diagonal(d, no + e, mask.shape)).any()):
                pairs.add((d, e))
    return pairs


def _diagonal(d1: int, d2: int, shape: torch.Size) -> torch.Tensor:
    nd = len(shape)
    first = torch.arange(shape[d1]).reshape([shape[d1] if k == d1 else 1 for k in range(nd)])
    second = torch.arange(shape[d2]).reshape([shape[d2] if k == d2 else 1 for k in range(nd)])
    return first == second


def misbroadcast(v: BlockView) -> Diagnosis | None:
    """The truth pairs an output dim with an input dim (each output entry depends on the input
    entry with the same index there); the backward keeps every value but pairs the dim with
    another one of the same size: grad_output broadcast along the wrong dim, or a reduction
    over the wrong dims."""
    no = len(v.out_shape)
    truth_pairs = _coupled(v.nz_t, v.out_shape, v.in_shape)
    analytic_pairs = _coupled(v.nz_a, v.out_shape, v.in_shape)
    tolerance = float(v.allowed.max()) if v.allowed.numel() else 0.0
    for d, e in sorted(truth_pairs - analytic_pairs):
        for d2, e2 in sorted(analytic_pairs - truth_pairs):
            if d2 == d and e2 != e:
                moved = v.t.sum(dim=d, keepdim=True) * _diagonal(d, no + e2, v.t.shape)
                pairing = (f"{v.out_name}'s dim {d} with {v.in_name}'s dim {e2} where the truth pairs it with "
                           f"{v.in_name}'s dim {e}")
            elif e2 == e and d2 != d:
                moved = v.t.sum(dim=no + e, keepdim=True) * _diagonal(d2, no + e, v.t.shape)
                pairing = (f"{v.in_name}'s dim {e} with {v.out_name}'s dim {d2} where the truth pairs it with "
                           f"{v.out_name}'s dim {d}")
            else:
                continue
            if not bool(((v.a - moved).abs() <= tolerance).all()):
                continue
            if e2 == e and d2 == no - len(v.in_shape) + e:
                return Diagnosis(
                    "shape_mismatch",
                    f"the gradient for {v.in_name} is reduced over the wrong dims: {v.deriv} pairs {pairing} "
                    f"(aligned to {v.out_name}'s trailing dims, as broadcasting does)",
                    output=v.out_name, input=v.in_name,
                    evidence="every entry fits the truth with the pairing of the two dims moved",
                    hint=f"a gradient of another shape (keeping dim {d2}) that the engine sum-reduced like a "
                         f"broadcast, or a .sum() over the wrong dims: reduce every dim of {v.out_name} but {d} and "
                         f"return {v.in_name}'s shape {tuple(v.in_shape)}")
            return Diagnosis(
                "transposed",
                f"{v.deriv} pairs {pairing}: the values are right, broadcast along the wrong dim",
                output=v.out_name, input=v.in_name,
                evidence="every entry fits the truth with the pairing of the two dims moved",
                hint="grad_output (or a reduction in backward) is broadcast along the wrong dim: a missing "
                     "unsqueeze(dim) or keepdim=True, or a transposed operand")
    return None


# --- complex conj and swapped inputs -----------------------------------------------------------

def conj_error(v: BlockView) -> Diagnosis | None:
    """On a complex tensor's real view, wrong entries that are exactly the negated truth and all
    real/imaginary cross terms: a missing or extra conj()."""
    if not (v.out_shape and v.in_shape and v.out_shape[-1] == 2 and v.in_shape[-1] == 2):
        return None
    if not bool(fits(v.a, -v.t, v.allowed)[v.bad].all()):
        return None
    entries = v.bad_entries()
    if not all(o[-1] != i[-1] for o, i in entries):
        return None
    n_bad = len(entries)
    return Diagnosis("sign", f"{v.deriv}: {n_bad} entries have the wrong sign (backward = -truth there); they are the "
                             "real/imaginary cross terms of a complex tensor's real view: a conj() is missing or extra",
                     output=v.out_name, input=v.in_name,
                     evidence=f"{n_bad}/{n_bad} wrong entries are the negated truth",
                     hint="torch's convention: for y = f(z) holomorphic, grad_z = grad_output * f'(z).conj(); check "
                          "every conj() in backward")


def _projected(block: BlockComparison, rows: torch.Tensor) -> torch.Tensor:
    """Every output's gradient row projected onto block's input tangent space (constrained
    inputs compare along it), unchanged for an unconstrained input."""
    x = (block.inputs or {}).get(block.in_name)
    if block.tangent is None or not isinstance(x, torch.Tensor):
        return rows
    m = max(1, math.prod(block.out_shape))
    flat = rows.reshape(m, *block.in_shape)
    try:
        return block.tangent(x.detach().double().cpu().expand(m, *block.in_shape), flat).reshape(rows.shape)
    except RuntimeError:
        return rows


def swapped_inputs(blocks: Sequence[BlockComparison]) -> list[Diagnosis]:
    """The gradient for input i matches the truth of input j and vice versa: returned in the wrong
    order (for constrained inputs, along each input's tangent space)."""
    found: list[Diagnosis] = []
    seen: set[tuple[int, int]] = set()
    for b in blocks:
        for c in blocks:
            if b.out_pos != c.out_pos or b.in_pos >= c.in_pos or (b.in_pos, c.in_pos) in seen:
                continue
            if b.mismatch_count == 0 and c.mismatch_count == 0:
                continue
            if b.analytic.shape != c.truth.shape or c.analytic.shape != b.truth.shape:
                continue
            tol_b = torch.maximum(b.allowed, c.allowed)
            if not bool(fits(b.analytic, _projected(b, c.truth.double()), tol_b).all()):
                continue
            if not bool(fits(c.analytic, _projected(c, b.truth.double()), tol_b).all()):
                continue
            seen.add((b.in_pos, c.in_pos))
            along = " (compared along each input's constraint set)" if b.tangent or c.tangent else ""
            found.append(Diagnosis(
                "swapped_inputs",
                f"the gradients for {b.in_name} and {c.in_name} are swapped: backward's gradient for {b.in_name} is "
                f"the true gradient for {c.in_name} and vice versa{along}",
                output=b.out_name, input=f"{b.in_name},{c.in_name}",
                evidence="both blocks fit the other input's truth at every entry",
                hint=f"return the gradients in forward's argument order ({b.in_name}, {c.in_name})"))
    return found
