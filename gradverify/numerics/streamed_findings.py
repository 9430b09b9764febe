"""What the streamed comparison reports from the entries it kept: the capped list of mismatches
(worst first, exact count kept by the caller), the binned heatmap from its running statistics,
and the mismatch patterns it can name from the wrong entries alone -- without ever forming a block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from gradverify.numerics import judge
from gradverify.numerics.blocks import (
    HEATMAP_MAX_COLS,
    HEATMAP_MAX_ROWS,
    BlockComparison,
    heatmap_from_codes,
    named_values,
)
from gradverify.numerics.judge import Verdict
from gradverify.numerics.vjp import VjpSource
from gradverify.report import Diagnosis, Heatmap, Mismatch

if TYPE_CHECKING:
    from gradverify.checks.base import CaseContext, Truth
    from gradverify.numerics.streaming import _Block


def listed(ctx: CaseContext, o: int, p: int, st: _Block, bad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
            a: torch.Tensor, t: torch.Tensor, allowed: torch.Tensor, f: torch.Tensor, cap: int) -> list[Mismatch]:
    """The block's worst mismatches (at most `cap`): the count stays exact, the list is capped."""
    idx = torch.nonzero(bad).reshape(-1)
    if not idx.numel():
        return []
    err = torch.where(torch.isfinite(a[idx]), (a[idx] - t[idx]).abs(), torch.full_like(a[idx], math.inf))
    if idx.numel() > cap:  # the worst `cap` first (a partial selection, not a sort of them all)
        keep = torch.topk(err, cap).indices
        idx, err = idx[keep], err[keep]
    order = idx[torch.argsort(err, descending=True, stable=True)]
    out_index = unravel_all(rows[order], st.out_shape)
    in_index = unravel_all(cols[order], st.in_shape)
    fields = [t[order].tolist(), a[order].tolist(), allowed[order].tolist(), f[order].tolist()]
    return [Mismatch(output=ctx.output_names[o], input=ctx.input_names[p], out_index=oi, in_index=ii, expected=tv,
                     got=av, tolerance=al, second=fv)
            for oi, ii, tv, av, al, fv in zip(out_index, in_index, *fields)]


def unravel_all(flat: torch.Tensor, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """numerics.blocks.unravel for many flat indices at once."""
    if not shape:
        return [() for _ in range(int(flat.numel()))]
    parts = []
    rest = flat.to(torch.long)
    for size in reversed(shape):
        parts.append(rest % max(1, size))
        rest = rest // max(1, size)
    return [tuple(index) for index in torch.stack(parts[::-1], dim=1).tolist()]


def heatmap(st: _Block, out_name: str, in_name: str, rows: torch.Tensor, cols: torch.Tensor,
             verdict: torch.Tensor) -> Heatmap:
    rb, cb = min(st.m, HEATMAP_MAX_ROWS), min(st.n, HEATMAP_MAX_COLS)
    codes = st.nonzero.clone() if st.nonzero is not None else torch.zeros((rb, cb), dtype=torch.int8)
    for mask, code in (((verdict != int(Verdict.AGREE)) & (verdict != int(Verdict.MISMATCH)), 2),
                       (verdict == int(Verdict.MISMATCH), 3)):
        if bool(mask.any()):
            r = rows[mask] * rb // st.m
            c = cols[mask] * cb // st.n
            codes[r, c] = torch.maximum(codes[r, c], torch.tensor(code, dtype=torch.int8))
    return heatmap_from_codes(out_name, in_name, st.out_shape, st.in_shape, codes)


def analytic_nonzero(analytic: VjpSource, o: int, p: int) -> bool:
    """Whether block (o, p) of the analytic Jacobian has any non-zero entry: A^T u for one random
    Gaussian u is zero for a non-zero A with probability 0 (one backward instead of a pass)."""
    out = analytic.outputs[o]
    u = torch.randn((1, *out.shape), generator=torch.Generator().manual_seed(991), dtype=torch.float64)
    return bool((analytic.vjp({o: u})[p] != 0).any())


# A failing block is named by the whole-block pattern rules (gradverify.diagnose) when its two
# blocks fit: the streamed path keeps only the disagreeing entries, but rules such as
# wrong_branch need the agreeing ones too ("the x < 0 entries are wrong, the others right").
# Only a failing block pays for it, once: the analytic and reference blocks and the rules'
# temporaries, about WHOLE_BLOCK_COPIES float64 copies, within --max-memory; and at most
# WHOLE_BLOCK_MAX_ENTRIES entries so that the rules (a few passes each) stay well under a second
# or two. Larger blocks get what the kept entries alone establish (sparse_diagnosis).
WHOLE_BLOCK_COPIES = 12
WHOLE_BLOCK_MAX_ENTRIES = 2 ** 22


def whole_block_diagnosis(ctx: CaseContext, analytic: VjpSource, truth: Truth, o: int, p: int, st: _Block,
                          rows: torch.Tensor, cols: torch.Tensor, verdict: torch.Tensor, allowed: torch.Tensor,
                          second: torch.Tensor) -> list[Diagnosis] | None:
    """The dense path's diagnosis for one failing block, rebuilt from the streamed verdicts: every
    entry not kept agreed with the reference. None when the block is too large to hold."""
    from gradverify.diagnose import diagnose

    reference = truth.reference.source
    # VjpSource.blocks(o) reads output o's rows once for every input: all of its blocks are held
    # (twice, analytic and reference) while this one is taken.
    row_entries = st.m * sum(leaf.numel() for _, leaf in analytic.leaves)
    if (reference is None or st.entries > WHOLE_BLOCK_MAX_ENTRIES
            or (st.entries * WHOLE_BLOCK_COPIES + 2 * row_entries) * 8 > ctx.settings.max_memory):
        return None
    a = analytic.blocks(o)[p].reshape(st.m, st.n).double()
    t = reference.blocks(o)[p].reshape(st.m, st.n).double()
    scale = judge.row_scales(t, st.max_truth or 1.0).unsqueeze(1).expand_as(t)
    full_allowed = judge.allowed(t, scale, ctx.tolerance)
    full_verdict = torch.full(t.shape, int(Verdict.AGREE), dtype=torch.int8)
    full_second = torch.full(t.shape, math.nan, dtype=torch.float64)
    r, c = rows.to(torch.long), cols.to(torch.long)
    full_verdict[r, c] = verdict.to(torch.int8)
    full_allowed[r, c] = allowed
    full_second[r, c] = second
    shape = (*st.out_shape, *st.in_shape)
    in_names = ctx.input_names
    comparison = BlockComparison(
        out_pos=o, in_pos=p, out_name=ctx.output_names[o], in_name=in_names[p],
        analytic=a.reshape(shape), truth=t.reshape(shape), allowed=full_allowed.reshape(shape),
        verdict=full_verdict.reshape(shape), out_shape=st.out_shape, in_shape=st.in_shape,
        second=full_second.reshape(shape),
        tangent=truth.fd.tangents.get(p), dtype=ctx.tolerance.dtype,
        **named_values(truth.args, in_names, analytic.outputs, ctx.output_names))
    return list(diagnose([comparison]))


def sparse_diagnosis(out_name: str, in_name: str, st: _Block, rows: torch.Tensor, cols: torch.Tensor,
                     a: torch.Tensor, allowed: torch.Tensor, analytic_nonzero: bool,
                     t: torch.Tensor | None = None, complete: bool = True) -> Diagnosis:
    """The patterns a streamed comparison can establish from the wrong entries alone."""
    deriv = f"∂{out_name}/∂{in_name}"
    n_bad = int(rows.numel())
    zero_at_bad = bool((a.abs() <= allowed).all())
    if zero_at_bad and not analytic_nonzero:
        return Diagnosis("zero_grad", f"{deriv} is all zero in the backward, but {n_bad} entries of the truth are not",
                         output=out_name, input=in_name,
                         hint=f"the gradient for {in_name} is never computed (zeros_like, a detach, or a wrong return "
                              "slot)")
    if zero_at_bad:
        coupling = ""
        if st.out_shape == st.in_shape and st.out_shape:
            differs = torch.zeros(len(st.out_shape), dtype=torch.bool)
            rest_r, rest_c = rows.to(torch.long), cols.to(torch.long)
            for d in reversed(range(len(st.out_shape))):
                size = max(1, st.out_shape[d])
                differs[d] = bool(((rest_r % size) != (rest_c % size)).any())
                rest_r, rest_c = rest_r // size, rest_c // size
            dims = {d for d in range(len(st.out_shape)) if bool(differs[d])}
            if dims:
                text = ", ".join(map(str, sorted(dims)))
                coupling = f"; coupling along dim {text}, as through a sum over dim {text}"
        return Diagnosis("missing_offdiag",
                         f"missing off-diagonal terms: {deriv} is 0 in the backward at all {n_bad} wrong entries, where "
                         f"the truth couples the output to them{coupling}",
                         output=out_name, input=in_name,
                         evidence=f"{n_bad}/{n_bad} wrong entries are 0 in the backward (streamed comparison)",
                         hint="the backward treats the op as element-wise: add the term that flows back through the "
                              "reduction in forward")
    # Otherwise: where the wrong entries sit and how the backward relates to the truth there.
    from gradverify.diagnose import describe_located

    return describe_located(out_name, in_name, st.out_shape, st.in_shape, rows, cols, a, t, total=st.entries,
                            complete=complete)
