"""The honest fallback: no rule fits, so say in words what the wrong entries look like (how many,
where they sit, how the backward relates to the truth there), never "see the table"."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from gradverify.diagnose.magnitude import TINY
from gradverify.diagnose.view import BlockView, box_text, listing
from gradverify.numerics.blocks import unravel
from gradverify.report import Diagnosis, format_index

# Ratios backward/truth worth naming when several wrong entries share one exactly.
NICE_RATIOS = ((0.0, "0"), (2.0, "2"), (0.5, "1/2"), (-1.0, "-1"), (-2.0, "-2"), (-0.5, "-1/2"), (3.0, "3"))


def other(v: BlockView) -> Diagnosis:
    n_bad, n_rel = v.n_bad, v.n_relevant
    parts = [f"{n_bad} of the {n_rel} entries that matter are wrong" + (" (the whole block)" if n_bad >= 0.9 * n_rel
                                                                         else "")]
    where = _where(v)
    if where:
        parts.append(where)
    zeros = int((v.bad & ~v.nz_a).sum())
    extra = int((v.bad & ~v.nz_t & v.nz_a).sum())
    if zeros:
        parts.append(f"the backward is 0 at {zeros} of them")
    if extra:
        parts.append(f"non-zero at {extra} where the truth is 0")
    ratios = _ratios(v)
    if ratios:
        parts.append(ratios)
    largest = v.block.max_abs_err
    parts.append(f"largest error {largest:.3g} ({largest / v.scale:.2g} of the block's scale)")
    if largest <= TINY * v.scale:
        parts.append("errors this small come from a right formula off by a small term (an eps, a rounding step), "
                     "not a wrong one")
    return Diagnosis("other", f"{v.deriv}: no known bug pattern fits; " + "; ".join(parts),
                     output=v.out_name, input=v.in_name, evidence=f"largest error {largest:.4g}",
                     hint="compare backward term by term with the derivative of forward at the worst entries listed")


def _where(v: BlockView) -> str:
    idx = torch.nonzero(v.bad)
    if not idx.numel():
        return ""
    shape = (*v.out_shape, *v.in_shape)
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    no = len(v.out_shape)
    if all(lo[d] == 0 and hi[d] == shape[d] - 1 for d in range(len(shape))):
        rows = v.matrix(v.bad).any(1)
        cols = v.matrix(v.bad).any(0)
        return (f"they touch {int(rows.sum())} of {v.rows} {v.out_name} entries and {int(cols.sum())} of {v.cols} "
                f"{v.in_name} entries")
    ranges = list(zip(lo, hi))
    return (f"they sit in ∂{box_text(v.out_name, ranges[:no], v.out_shape)}/"
            f"∂{box_text(v.in_name, ranges[no:], v.in_shape)}")


def _ratios(v: BlockView) -> str:
    mask = v.bad & v.nz_t & torch.isfinite(v.a)
    if not bool(mask.any()):
        return ""
    ratio = v.a[mask] / v.t[mask]
    counts: Counter[str] = Counter()
    for value, text in NICE_RATIOS:
        counts[text] = int(((ratio - value).abs() <= 1e-6 * max(1.0, abs(value))).sum())
    named = [f"{c} are {text} x the truth" for text, c in counts.most_common() if c >= 2]
    lo, hi, mid = float(ratio.min()), float(ratio.max()), float(ratio.median())
    digits = 3 if hi - lo > 1e-2 * max(1.0, abs(mid)) else 7
    spread = f"backward/truth from {lo:.{digits}g} to {hi:.{digits}g} (median {mid:.{digits}g})"
    return "; ".join([spread] + named)


def describe_located(out_name: str, in_name: str, out_shape: Sequence[int], in_shape: Sequence[int],
                     out_flat: torch.Tensor, in_flat: torch.Tensor, analytic: torch.Tensor | None = None,
                     truth: torch.Tensor | None = None, *, total: int | None = None, how: str = "streamed",
                     complete: bool = True) -> Diagnosis:
    """What can be said of wrong entries located without their whole block (a streamed
    comparison keeps only the wrong entries; a projected one finds them by bisection): where
    they sit, and how the backward relates to the truth there. The pattern rules need whole
    blocks, so it asks for a re-run at a smaller shape for a full diagnosis.

    out_flat / in_flat: flat (row-major) indices of the wrong entries in the output and input;
    analytic / truth: their values (optional); complete: False when the entries are a sample.
    """
    out_shape, in_shape = tuple(out_shape), tuple(in_shape)
    n = int(out_flat.numel())
    deriv = f"∂{out_name}/∂{in_name}"
    outs = sorted(set(out_flat.tolist()))
    ins = sorted(set(in_flat.tolist()))
    parts = []
    count = f"{n}" + ("+" if not complete else "") + (f" of {total:,}" if total else "")
    parts.append(f"{count} entries located ({how} comparison)")
    if n <= 5:
        parts.append(listing([f"∂{format_index(out_name, unravel(o, out_shape))}/"
                              f"∂{format_index(in_name, unravel(i, in_shape))}"
                              for o, i in zip(out_flat.tolist(), in_flat.tolist())]))
    for name, shape, flat in ((in_name, in_shape, ins), (out_name, out_shape, outs)):
        if not shape:
            continue
        idx = [unravel(f, shape) for f in flat]
        ranges = [(min(i[d] for i in idx), max(i[d] for i in idx)) for d in range(len(shape))]
        if any(r != (0, s - 1) for r, s in zip(ranges, shape)):
            parts.append(f"all in {box_text(name, ranges, shape)} ({len(flat)} of its {math.prod(shape):,} entries)")
            break
    else:
        parts.append(f"spread over {len(outs)} {out_name} and {len(ins)} {in_name} entries")
    if analytic is not None and truth is not None and analytic.numel():
        a, t = analytic.double(), truth.double()
        zeros = int((a == 0).sum())
        if zeros == n:
            parts.append("the backward is 0 at every one of them")
        elif bool((a == -t).all()):
            parts.append("the backward is the negated truth at every one of them")
        else:
            nz = t != 0
            if bool(nz.any()):
                ratio = a[nz] / t[nz]
                parts.append(f"backward/truth from {float(ratio.min()):.3g} to {float(ratio.max()):.3g}")
    kind = "partial" if n <= 3 and complete else "other"
    return Diagnosis(kind, f"{deriv}: " + "; ".join(parts), output=out_name, input=in_name,
                     hint="re-run at a smaller shape for a full diagnosis: the pattern rules need whole Jacobian "
                          "blocks")
