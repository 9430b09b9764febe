"""Name the bug: mismatch patterns of a Jacobian block -> diagnoses with their evidence.

Every rule claims its pattern only when the evidence fits it (and says how well); rules are
tried from the most specific to the least and the first that fits a block wins, so a block
never gets two contradictory names.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gradverify.numerics.blocks import BlockComparison, unravel
from gradverify.report import Diagnosis

LETTERS = "ijklmnpqrstuvw"


def _fits(values: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return (values - target).abs() <= allowed


def _index_template(letters: Sequence[str]) -> str:
    return ",".join(letters)


def _near_zero(block: BlockComparison) -> torch.Tensor:
    return block.analytic.abs() <= block.allowed


def diagnose_block(block: BlockComparison) -> Diagnosis | None:
    """The single pattern that best explains this block's mismatches, or None if it has none."""
    if block.mismatch_count == 0:
        return None
    a, t, allowed, bad = block.analytic, block.truth, block.allowed, block.mismatch
    out_name, in_name = block.out_name, block.in_name
    deriv = f"∂{out_name}/∂{in_name}"
    n_bad = int(bad.sum())

    if (~torch.isfinite(a) & bad).any():
        count = int((~torch.isfinite(a) & bad).sum())
        return Diagnosis("nonfinite", f"{deriv}: {count} entries are NaN/Inf in the backward where the truth is finite",
                         output=out_name, input=in_name,
                         hint="look for a division by zero or log/sqrt of 0 in backward")

    truth_nonzero = t.abs() > allowed
    if truth_nonzero.any() and bool(_near_zero(block).all()):
        return Diagnosis(
            "zero_grad",
            f"{deriv} is all zero in the backward, but {int(truth_nonzero.sum())} entries of the truth are not",
            output=out_name, input=in_name,
            evidence=f"max |truth| {float(t.abs().max()):.4g}",
            hint=f"the gradient for {in_name} is never computed (zeros_like, a detach, or a wrong return slot)",
        )

    if truth_nonzero.any() and bool(_fits(a, -t, allowed).all()):
        return Diagnosis("sign", f"{deriv} has the wrong sign: backward = -truth at every entry",
                         output=out_name, input=in_name, evidence=f"{int(truth_nonzero.sum())} non-zero entries fit",
                         hint="flip the sign of this gradient (a subtraction the wrong way round?)")

    # Scaled: least-squares factor c with a = c * t, accepted only if it fits every entry.
    denom = float((t * t).sum())
    if denom > 0:
        c = float((a * t).sum()) / denom
        if abs(c - 1) > 1e-3 and abs(c) > 1e-6 and bool(_fits(a, c * t, allowed * max(1.0, abs(c))).all()):
            nice = _nice_factor(c)
            return Diagnosis("scaled", f"{deriv} is off by a factor {c:.3f}{nice}: backward = {c:.4g} x truth",
                             output=out_name, input=in_name,
                             evidence=f"all {t.numel()} entries fit a single factor",
                             hint="a constant factor is missing or extra (a 2 from x**2, a 1/n from a mean?)")

    transposed = _transposed(block)
    if transposed is not None:
        return transposed

    offdiag = _missing_offdiag(block)
    if offdiag is not None:
        return offdiag

    flipped = _sign_flipped_subset(block)
    if flipped is not None:
        return flipped

    partial = _partial(block)
    if partial is not None:
        return partial

    return Diagnosis("other",
                     f"{deriv}: {n_bad} of {bad.numel()} entries differ and no known bug pattern fits",
                     output=out_name, input=in_name,
                     evidence=f"largest error {block.max_abs_err:.4g}",
                     hint="see the diff table and heatmap for where they sit")


def _nice_factor(c: float) -> str:
    for value, text in ((2.0, "2"), (0.5, "1/2"), (-2.0, "-2"), (-0.5, "-1/2"), (3.0, "3"), (1 / 3, "1/3")):
        if abs(c - value) < 1e-6 * max(1.0, abs(value)):
            return f" (= {text})"
    return ""


def _transposed(block: BlockComparison) -> Diagnosis | None:
    """Backward matches the truth once the input's (or output's) two dims are swapped."""
    a, t, allowed = block.analytic, block.truth, block.allowed
    out_nd, in_nd = len(block.out_shape), len(block.in_shape)
    candidates: list[tuple[str, torch.Tensor]] = []
    if in_nd == 2 and block.in_shape[0] == block.in_shape[1]:
        candidates.append((f"the layout of {block.in_name}", t.transpose(out_nd, out_nd + 1)))
    if out_nd == 2 and block.out_shape[0] == block.out_shape[1]:
        candidates.append((f"the layout of {block.out_name}", t.transpose(0, 1)))
    for what, swapped in candidates:
        if torch.equal(swapped, t):
            continue
        if bool(_fits(a, swapped, allowed).all()):
            return Diagnosis("transposed",
                             f"∂{block.out_name}/∂{block.in_name} matches the truth after transposing {what}",
                             output=block.out_name, input=block.in_name,
                             evidence=f"all {t.numel()} entries fit the transposed truth",
                             hint=f"a .t() / .transpose() too many or too few in the gradient for {block.in_name}")
    return None


def _missing_offdiag(block: BlockComparison) -> Diagnosis | None:
    """Backward is right wherever it is non-zero, and zero where the truth couples an output to
    other input entries: it treats a coupled op as element-wise."""
    a, t, allowed, bad = block.analytic, block.truth, block.allowed, block.mismatch
    zero_a = _near_zero(block)
    if not bool(zero_a[bad].all()):
        return None  # some wrong entries are non-zero: not (only) missing terms
    nonzero_a = ~zero_a
    if not nonzero_a.any():
        return None
    if bool(bad[nonzero_a].any()):
        return None
    out_shape, in_shape = block.out_shape, block.in_shape
    in_numel = max(1, math.prod(in_shape))
    positions = torch.nonzero(bad.reshape(-1)).reshape(-1).tolist()
    n_bad = len(positions)
    n_kept = int(nonzero_a.sum())
    evidence = (f"{n_bad}/{n_bad} wrong entries are 0 in the backward; "
                f"{n_kept}/{n_kept} non-zero backward entries match the truth")
    deriv_generic = f"∂{block.out_name}/∂{block.in_name}"
    if out_shape == in_shape and out_shape:
        coupled_dims: set[int] = set()
        on_diagonal = 0
        for flat in positions:
            o_flat, i_flat = divmod(flat, in_numel)
            o_idx, i_idx = unravel(o_flat, out_shape), unravel(i_flat, in_shape)
            differing = {d for d in range(len(out_shape)) if o_idx[d] != i_idx[d]}
            on_diagonal += not differing
            coupled_dims |= differing
        if on_diagonal == n_bad:
            # Not a missing coupling at all: the backward is 0 at some of its own diagonal entries.
            return Diagnosis(
                "zero_grad",
                f"∂{block.out_name}/∂{block.in_name} is 0 in the backward at {n_bad} diagonal entries where the "
                "truth is not; every other entry matches",
                output=block.out_name, input=block.in_name, evidence=evidence,
                hint="a branch of a piecewise derivative returns 0 (a dropped slope such as leaky_relu's, "
                     "a mask that is too strict)")
        if on_diagonal:
            return None  # zeros both on and off the diagonal: not one clean pattern
        diag = torch.stack([a.reshape(max(1, math.prod(out_shape)), in_numel).diagonal(),
                            t.reshape(max(1, math.prod(out_shape)), in_numel).diagonal()])
        diagonal_kept = bool(((diag[0] - diag[1]).abs() <= 1e-12 + allowed.reshape(diag.shape[1], -1).diagonal()).all())
        dims = sorted(coupled_dims)
        out_letters = list(LETTERS[: len(out_shape)])
        in_letters = list(out_letters)
        fresh = iter(LETTERS[len(out_shape):])
        for d in dims:
            in_letters[d] = next(fresh)
        conditions = " or ".join(f"{in_letters[d]}≠{out_letters[d]}" for d in dims)
        pattern = (f"∂{block.out_name}[{_index_template(out_letters)}]/∂{block.in_name}"
                   f"[{_index_template(in_letters)}] for {conditions}")
        dim_text = ", ".join(map(str, dims))
        message = (f"missing off-diagonal terms: {pattern} is non-zero in the truth but 0 in the backward "
                   f"({n_bad} entries); coupling along dim {dim_text}, as through a sum over dim {dim_text}")
        if diagonal_kept:
            message += "; the diagonal matches"
        hint = (f"the backward treats the op as element-wise; each output also depends on the other "
                f"entries along dim {dim_text}: add the term that flows back through that reduction, "
                f"e.g. a (grad_output * ...).sum(dim={dims[0]}, keepdim=True)")
        return Diagnosis("missing_offdiag", message, output=block.out_name, input=block.in_name,
                         evidence=evidence, hint=hint)
    message = (f"missing cross terms: {deriv_generic} is 0 in the backward at {n_bad} entries where the "
               "truth couples the output to them, and right everywhere else")
    return Diagnosis("missing_offdiag", message, output=block.out_name, input=block.in_name, evidence=evidence,
                     hint="a term of the chain rule is missing (a reduction or broadcast in forward?)")


def _sign_flipped_subset(block: BlockComparison) -> Diagnosis | None:
    """Every wrong entry is exactly the negated truth. On a complex tensor's real view, wrong
    real/imaginary cross terms are the signature of a missing or extra conj()."""
    a, t, allowed, bad = block.analytic, block.truth, block.allowed, block.mismatch
    if not bool(((a + t).abs() <= allowed)[bad].all()):
        return None
    n_bad = int(bad.sum())
    deriv = f"∂{block.out_name}/∂{block.in_name}"
    message = f"{deriv}: {n_bad} entries have the wrong sign (backward = -truth there); the others match"
    hint = "a subtraction the wrong way round in one branch of the formula?"
    out_shape, in_shape = block.out_shape, block.in_shape
    if out_shape and in_shape and out_shape[-1] == 2 and in_shape[-1] == 2:
        in_numel = max(1, math.prod(in_shape))
        cross = all(unravel(o, out_shape)[-1] != unravel(i, in_shape)[-1]
                    for o, i in (divmod(f, in_numel) for f in torch.nonzero(bad.reshape(-1)).reshape(-1).tolist()))
        if cross:
            message += ("; they are the real/imaginary cross terms of a complex tensor's real view: "
                        "a conj() is missing or extra")
            hint = ("torch's convention: for y = f(z) holomorphic, grad_z = grad_output * f'(z).conj(); "
                    "check every conj() in backward")
    return Diagnosis("sign", message, output=block.out_name, input=block.in_name,
                     evidence=f"{n_bad}/{n_bad} wrong entries are the negated truth", hint=hint)


# A block with at most this share of its non-zero truth entries wrong is "partly" wrong.
PARTIAL_SHARE = 0.25


def _partial(block: BlockComparison) -> Diagnosis | None:
    bad = block.mismatch
    n_bad = int(bad.sum())
    relevant = int(((block.truth.abs() > block.allowed) | bad).sum())
    if relevant == 0 or n_bad > max(3, PARTIAL_SHARE * relevant):
        return None
    out_shape, in_shape = block.out_shape, block.in_shape
    in_numel = max(1, math.prod(in_shape))
    entries = []
    for flat in torch.nonzero(bad.reshape(-1)).reshape(-1).tolist():
        o_flat, i_flat = divmod(flat, in_numel)
        entries.append((unravel(o_flat, out_shape), unravel(i_flat, in_shape)))
    where = _alignment(entries, out_shape, in_shape, block.out_name, block.in_name)
    listed = ", ".join(f"∂{block.out_name}{list(o)}/∂{block.in_name}{list(i)}" for o, i in entries[:5])
    more = f" and {n_bad - 5} more" if n_bad > 5 else ""
    message = f"{n_bad} of {relevant} entries of ∂{block.out_name}/∂{block.in_name} are wrong: {listed}{more}"
    if where:
        message += f"; {where}"
    return Diagnosis("partial", message, output=block.out_name, input=block.in_name,
                     evidence=f"{relevant - n_bad}/{relevant} non-zero entries match",
                     hint="a boundary case or one index of the formula is wrong" if not where else
                     f"look at the code path for {where.removeprefix('all in ').removeprefix('all at ')}")


def _alignment(entries: list[tuple[tuple[int, ...], tuple[int, ...]]], out_shape: tuple[int, ...],
               in_shape: tuple[int, ...], out_name: str, in_name: str) -> str:
    """'all in x[..., 0]' / 'all in the last row of out' when the wrong entries line up."""
    if len(entries) < 2:
        return ""
    for d in range(len(in_shape)):
        values = {i[d] for _, i in entries}
        if len(values) == 1:
            v = values.pop()
            return f"all in {in_name}[{_pin(len(in_shape), d, v, in_shape[d])}]"
    for d in range(len(out_shape)):
        values = {o[d] for o, _ in entries}
        if len(values) == 1:
            v = values.pop()
            return f"all in {out_name}[{_pin(len(out_shape), d, v, out_shape[d])}]"
    return ""


def _pin(ndim: int, dim: int, value: int, size: int) -> str:
    text = str(value) if value != size - 1 or size == 1 else f"{value} (the last)"
    parts = [":"] * ndim
    parts[dim] = text
    if dim == ndim - 1 and ndim > 1:
        return "..., " + text
    return ", ".join(parts)


def swapped_inputs(blocks: Sequence[BlockComparison]) -> list[Diagnosis]:
    """The gradient for input i matches the truth of input j and vice versa: returned in the wrong order."""
    found: list[Diagnosis] = []
    seen: set[tuple[int, int]] = set()
    for b in blocks:
        for c in blocks:
            if b.out_pos != c.out_pos or b.in_pos >= c.in_pos:
                continue
            if b.mismatch_count == 0 and c.mismatch_count == 0:
                continue
            if b.analytic.shape != c.truth.shape or c.analytic.shape != b.truth.shape:
                continue
            if bool(_fits(b.analytic, c.truth, b.allowed).all()) and bool(_fits(c.analytic, b.truth, c.allowed).all()):
                key = (b.in_pos, c.in_pos)
                if key in seen:
                    continue
                seen.add(key)
                found.append(Diagnosis(
                    "swapped_inputs",
                    f"the gradients for {b.in_name} and {c.in_name} are swapped: backward's gradient for "
                    f"{b.in_name} is the true gradient for {c.in_name} and vice versa",
                    output=b.out_name, input=f"{b.in_name},{c.in_name}",
                    evidence="both blocks fit the other input's truth at every entry",
                    hint=f"return the gradients in forward's argument order ({b.in_name}, {c.in_name})"))
    return found


def diagnose(blocks: Sequence[BlockComparison]) -> list[Diagnosis]:
    """Diagnoses for all blocks of one case; a swap explains both blocks it covers."""
    diagnoses = swapped_inputs(blocks)
    covered = set()
    for d in diagnoses:
        if d.input:
            covered.update(d.input.split(","))
    for block in blocks:
        if block.in_name in covered:
            continue
        try:
            found = diagnose_block(block)
        except Exception as exc:  # a naming rule must never cost the user the report itself
            found = Diagnosis("other", f"∂{block.out_name}/∂{block.in_name}: {block.mismatch_count} entries differ",
                              output=block.out_name, input=block.in_name,
                              evidence=f"pattern analysis failed ({type(exc).__name__}); see the diff table")
        if found is not None:
            diagnoses.append(found)
    return diagnoses
