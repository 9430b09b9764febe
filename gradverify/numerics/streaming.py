"""The full (every entry) comparison for Jacobians too large to hold: row chunks, bounded memory.

Rows of the analytic Jacobian and of the reference are produced in chunks (batched VJPs) and
compared at once; only per-block statistics, a binned map of where non-zero entries sit, and
the entries that disagree with the reference are kept. Finite differences are then computed at
the input columns holding those entries -- as many as the memory budget allows; beyond that
the count of confirmed mismatches is a lower bound and the report says so -- and an entry is
accused only if it disagrees with them too (numerics.judge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from gradverify.numerics import judge
from gradverify.numerics.blocks import HEATMAP_MAX_COLS, HEATMAP_MAX_ROWS, heatmap_from_codes, unravel
from gradverify.numerics.judge import Verdict
from gradverify.numerics.vjp import VjpSource
from gradverify.report import CheckResult, Diagnosis, Mismatch

if TYPE_CHECKING:
    from gradverify.checks.base import CaseContext, Truth

LETTERS = "ijklmnpqrstuvw"


@dataclass
class _Block:
    out_pos: int
    in_pos: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    max_truth: float = 0.0
    max_err: float = 0.0
    candidates: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    cols: list[torch.Tensor] = field(default_factory=list)
    a: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    scale: list[torch.Tensor] = field(default_factory=list)
    zero_row: list[torch.Tensor] = field(default_factory=list)
    nonzero: torch.Tensor | None = None

    @property
    def m(self) -> int:
        return max(1, math.prod(self.out_shape))

    @property
    def n(self) -> int:
        return max(1, math.prod(self.in_shape))

    @property
    def entries(self) -> int:
        return self.m * self.n


def _bins(size: int, limit: int) -> int:
    return min(size, limit)


def streamed_check(ctx: CaseContext, analytic: VjpSource, truth: Truth, entries: int) -> CheckResult:
    from gradverify.checks.jacobian import assemble, norm_test

    reference = truth.reference.source
    assert reference is not None
    tolerance = ctx.tolerance
    leaves = dict(analytic.leaves)
    blocks = {(o, p): _Block(o, p, tuple(out.shape), tuple(leaves[p].shape))
              for o, out in analytic.outputs.items() for p in leaves}
    # Each kept entry costs ~5 numbers plus the temporaries of judging it: 96 bytes per entry.
    store_cap = max(10_000, ctx.settings.max_memory // 96)
    stored = 0
    overflow = 0
    chunks = 0
    for o, out in analytic.outputs.items():
        m = max(1, out.numel())
        step = min(analytic.rows_per_chunk(o), reference.rows_per_chunk(o))
        for start in range(0, m, step):
            stop = min(m, start + step)
            a_rows = analytic.rows(o, start, stop)
            t_rows = reference.rows(o, start, stop)
            chunks += 1
            for p in leaves:
                st = blocks[(o, p)]
                a = a_rows[p].double()
                t = t_rows[p].double()
                if not t.numel():
                    continue
                _mark_nonzero(st, t, a, start)
                finite_t = torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))
                row_max = finite_t.amax(dim=1)
                st.max_truth = max(st.max_truth, float(row_max.max()))
                # Rows whose truth is all zero take the block's largest entry seen so far; the
                # entries kept from them are judged again with the final one at the end.
                zero_rows = row_max == 0
                scale = torch.where(zero_rows, torch.full_like(row_max, st.max_truth or 1.0), row_max)
                scale = scale.unsqueeze(1).expand_as(t)
                err = torch.where(torch.isfinite(a), (a - t).abs(), torch.full_like(a, math.inf))
                st.max_err = max(st.max_err, float(torch.where(torch.isfinite(t), err, torch.zeros_like(err)).max()))
                cand = judge.disagrees(a, t, scale, tolerance)
                count = int(cand.sum())
                if not count:
                    continue
                st.candidates += count
                if stored + count > store_cap:
                    overflow += count
                    continue
                r, c = torch.nonzero(cand, as_tuple=True)
                st.rows.append(r + start)
                st.cols.append(c)
                st.a.append(a[r, c])
                st.t.append(t[r, c])
                st.scale.append(scale[r, c])
                st.zero_row.append(zero_rows[r])
                stored += count
    return _judge(ctx, analytic, truth, blocks, entries, chunks, overflow, assemble, norm_test)


def _mark_nonzero(st: _Block, t: torch.Tensor, a: torch.Tensor, start: int) -> None:
    """Keep a binned map of where the truth or the backward is non-zero (for the heatmap)."""
    rb, cb = _bins(st.m, HEATMAP_MAX_ROWS), _bins(st.n, HEATMAP_MAX_COLS)
    if st.nonzero is None:
        st.nonzero = torch.zeros((rb, cb), dtype=torch.int8)
    k = t.shape[0]
    nz = ((t.abs() > 0) | (a.abs() > 0)).to(torch.int8)
    col_bin = (torch.arange(st.n) * cb // st.n).unsqueeze(0).expand(k, st.n)
    per_row = torch.zeros((k, cb), dtype=torch.int8).scatter_reduce_(1, col_bin, nz, reduce="amax")
    row_bin = (torch.arange(start, start + k) * rb // st.m)
    st.nonzero.index_reduce_(0, row_bin, per_row, reduce="amax")


# Finite-difference columns the cross-check computes at most per input (one column is one
# directional derivative per step level over every output): beyond this, a sample of the
# disagreeing columns is checked and the count of mismatches is a lower bound.
MAX_CONFIRM_COLUMNS = 4096


def _judge(ctx: CaseContext, analytic: VjpSource, truth: Truth, blocks: dict[tuple[int, int], _Block],
           entries: int, chunks: int, overflow: int, assemble, norm_test) -> CheckResult:  # type: ignore[no-untyped-def]
    tolerance = ctx.tolerance
    fd = truth.fd
    names = ctx.output_names
    mismatches: list[Mismatch] = []
    total_bad = 0
    unverifiable = 0
    kinks = 0
    excused = 0
    columns_done = 0
    lower_bound = overflow > 0
    heatmaps = []
    diagnoses: list[Diagnosis] = []
    cap = ctx.settings.mismatch_cap
    gen = torch.Generator().manual_seed(ctx.case.seed + 71)
    for (o, p), st in blocks.items():
        if not st.rows:
            continue
        rows, cols = torch.cat(st.rows), torch.cat(st.cols)
        a, t, scale = torch.cat(st.a), torch.cat(st.t), torch.cat(st.scale)
        # Entries kept from all-zero truth rows were screened with the block's largest entry so
        # far: judge them again with the block's final one (every other entry keeps its row's).
        zero_row = torch.cat(st.zero_row)
        final = torch.where(zero_row, torch.full_like(scale, st.max_truth or 1.0), scale)
        keep = judge.disagrees(a, t, final, tolerance)
        rows, cols, a, t, scale = rows[keep], cols[keep], a[keep], t[keep], final[keep]
        if not rows.numel():
            continue
        unique_cols, inverse = torch.unique(cols, return_inverse=True)
        if unique_cols.numel() > MAX_CONFIRM_COLUMNS:
            lower_bound = True
            pick = torch.randperm(unique_cols.numel(), generator=gen)[:MAX_CONFIRM_COLUMNS]
            chosen = torch.zeros(unique_cols.numel(), dtype=torch.bool)
            chosen[pick] = True
            sel = chosen[inverse]
            rows, cols, a, t, scale = rows[sel], cols[sel], a[sel], t[sel], scale[sel]
            unique_cols, inverse = torch.unique(cols, return_inverse=True)
        columns_done += int(unique_cols.numel())
        m = st.m
        group = max(1, ctx.settings.max_memory // (3 * 8 * max(1, m) * 4))
        f_val = torch.empty_like(a)
        f_bar = torch.empty_like(a)
        kink = torch.zeros_like(a, dtype=torch.bool)
        for g0 in range(0, int(unique_cols.numel()), group):
            chunk_cols = unique_cols[g0:g0 + group]
            nc = fd.columns(p, chunk_cols)
            est, bars, kk = (nc.estimates[o].reshape(m, -1), nc.bars[o].reshape(m, -1), nc.kinks[o].reshape(m, -1))
            sel = (inverse >= g0) & (inverse < g0 + chunk_cols.numel())
            local = inverse[sel] - g0
            f_val[sel] = est[rows[sel], local].double()
            f_bar[sel] = bars[rows[sel], local].double()
            kink[sel] = kk[rows[sel], local]
        verdict = judge.with_reference(a, t, f_val, f_bar, kink, scale, tolerance)
        bad = verdict == int(Verdict.MISMATCH)
        n_bad = int(bad.sum())
        total_bad += n_bad
        unverifiable += int(((verdict == int(Verdict.UNVERIFIABLE)) | (verdict == int(Verdict.KINK))).sum())
        kinks += int((verdict == int(Verdict.KINK)).sum())
        excused += int((verdict == int(Verdict.EXCUSED)).sum())
        allowed = judge.allowed(t, scale, tolerance)
        err = torch.where(torch.isfinite(a), (a - t).abs(), torch.full_like(a, math.inf))
        idx = torch.nonzero(bad).reshape(-1)
        order = idx[torch.argsort(err[idx], descending=True, stable=True)][:cap]
        for k in order.tolist():
            mismatches.append(Mismatch(output=names[o], input=ctx.input_names[p],
                                       out_index=unravel(int(rows[k]), st.out_shape),
                                       in_index=unravel(int(cols[k]), st.in_shape), expected=float(t[k]),
                                       got=float(a[k]), tolerance=float(allowed[k]), second=float(f_val[k])))
        if n_bad or bool((verdict != int(Verdict.AGREE)).any()):
            heatmaps.append(_heatmap(st, names[o], ctx.input_names[p], rows, cols, verdict))
        if n_bad:
            diagnoses.append(sparse_diagnosis(names[o], ctx.input_names[p], st, rows[bad], cols[bad], a[bad],
                                              allowed[bad], _analytic_nonzero(analytic, o, p)))
    mismatches.sort(key=lambda mm: -mm.abs_err if mm.abs_err == mm.abs_err else float("-inf"))
    details = [("mode", f"full: every entry, streamed in {chunks} row chunks within --max-memory "
                        f"{ctx.settings.max_memory / 2**20:.0f} MiB; only disagreeing entries kept"),
               ("analytic", analytic.path + (f" (vmap fallback: {analytic.fallback_reason})"
                                             if analytic.fallback_reason else "")),
               ("truth", truth.description),
               ("tolerance", tolerance.describe()),
               ("finite differences", f"{columns_done} columns holding a disagreement ({fd.path}); "
                                      f"{fd.evaluations} forward evaluations")]
    notes: list[str] = []
    if lower_bound:
        notes.append("more entries disagree with the reference than the memory budget lets gradverify cross-check "
                     "with finite differences: the count of mismatched entries is a lower bound (raise --max-memory "
                     "for an exact count)")
    if not total_bad:
        diagnoses.extend(norm_test(ctx, analytic, truth))
    return assemble(ctx, truth, details=details, entries=entries, compared=entries, count=total_bad,
                    mismatches=mismatches[:cap], diagnoses=diagnoses, unverifiable=unverifiable, kinks=kinks,
                    excused=excused, heatmaps=tuple(heatmaps),
                    max_err=max((st.max_err for st in blocks.values()), default=0.0),
                    lower_bound=lower_bound and total_bad > 0, notes=tuple(notes))


def _heatmap(st: _Block, out_name: str, in_name: str, rows: torch.Tensor, cols: torch.Tensor,
             verdict: torch.Tensor):  # type: ignore[no-untyped-def]
    rb, cb = _bins(st.m, HEATMAP_MAX_ROWS), _bins(st.n, HEATMAP_MAX_COLS)
    codes = st.nonzero.clone() if st.nonzero is not None else torch.zeros((rb, cb), dtype=torch.int8)
    for mask, code in (((verdict != int(Verdict.AGREE)) & (verdict != int(Verdict.MISMATCH)), 2),
                       (verdict == int(Verdict.MISMATCH), 3)):
        if bool(mask.any()):
            r = rows[mask] * rb // st.m
            c = cols[mask] * cb // st.n
            codes[r, c] = torch.maximum(codes[r, c], torch.tensor(code, dtype=torch.int8))
    return heatmap_from_codes(out_name, in_name, st.out_shape, st.in_shape, codes)


def _analytic_nonzero(analytic: VjpSource, o: int, p: int) -> bool:
    """Whether block (o, p) of the analytic Jacobian has any non-zero entry: A^T u for one random
    Gaussian u is zero for a non-zero A with probability 0 (one backward instead of a pass)."""
    out = analytic.outputs[o]
    u = torch.randn((1, *out.shape), generator=torch.Generator().manual_seed(991), dtype=torch.float64)
    return bool((analytic.vjp({o: u})[p] != 0).any())


def sparse_diagnosis(out_name: str, in_name: str, st: _Block, rows: torch.Tensor, cols: torch.Tensor,
                     a: torch.Tensor, allowed: torch.Tensor, analytic_nonzero: bool) -> Diagnosis:
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
            dims: set[int] = set()
            sample = min(n_bad, 20000)
            for r, c in zip(rows[:sample].tolist(), cols[:sample].tolist()):
                o_idx, i_idx = unravel(r, st.out_shape), unravel(c, st.in_shape)
                dims |= {d for d in range(len(st.out_shape)) if o_idx[d] != i_idx[d]}
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
    if n_bad <= 3:
        return Diagnosis("partial", f"{n_bad} of {st.entries} entries of {deriv} are wrong", output=out_name,
                         input=in_name, hint="a boundary case or one index of the formula is wrong")
    return Diagnosis("other", f"{deriv}: {n_bad} of {st.entries} entries differ (too large for the whole-block "
                              "pattern rules: re-run at a smaller shape for a full diagnosis)",
                     output=out_name, input=in_name, hint="the entries are listed; a smaller --shape names the pattern")


__all__ = ["streamed_check", "sparse_diagnosis", "Sequence"]
