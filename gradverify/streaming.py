"""The full (every entry) Jacobian comparison, dense when it fits in memory, streamed when not.

Two truths, and the rule that no entry is accused on one of them alone:

* With a trusted reference (autograd through the forward body, validated against finite
  differences along random directions), the analytic Jacobian is compared with it everywhere.
  Finite differences are then computed only for the input columns that hold disagreements,
  and an entry is reported only if it disagrees with the finite differences too. Columns
  where analytic and reference agree need no third opinion: two independent computations
  (the user's backward, autograd through the forward) agreeing to ~1e-6 relative is the
  evidence, and computing every finite-difference column there cost more than everything else
  together (4 forward calls per input entry).
* Without a trusted reference, finite differences are the only truth (with their error bars).

Streaming: rows of both Jacobians are produced in chunks (batched VJPs) and compared at once;
only statistics and the disagreeing entries are kept, so memory does not grow with n*m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from gradverify.compare import BlockComparison, Tolerance, compare_block, unravel
from gradverify.jacobian import FiniteDifferences, VjpSource
from gradverify.report import Diagnosis, Heatmap, Mismatch, format_index

# The comparison of one dense block holds analytic, truth, secondary, bars, allowed, error
# and masks at once: about 8 float64 copies of the block. Beyond --max-memory / 8 entries,
# stream.
DENSE_COPIES = 8


def fits_dense(entries: int, itemsize: int, max_bytes: int) -> bool:
    """Whether whole blocks (and their comparison temporaries) fit the memory budget."""
    return entries * max(8, itemsize) * DENSE_COPIES <= max_bytes


def cross_check_columns(blocks: list[BlockComparison], analytic: Mapping[tuple[int, int], torch.Tensor],
                        truth_blocks: Mapping[tuple[int, int], torch.Tensor], fd: FiniteDifferences,
                        tolerance: Tolerance, out_ndims: dict[int, int]) -> tuple[list[BlockComparison], int]:
    """Dense path: recompare with finite differences as the second truth, computed only at the
    input columns that hold a disagreement with the reference. Returns the new comparisons and
    the number of columns differenced."""
    columns: dict[int, torch.Tensor] = {}
    for b in blocks:
        m = max(1, math.prod(b.out_shape))
        n = max(1, math.prod(b.in_shape))
        if b.mismatch.any():
            hit = b.mismatch.reshape(m, n).any(dim=0) | b.excused.reshape(m, n).any(dim=0)
            columns[b.in_pos] = hit if b.in_pos not in columns else (columns[b.in_pos] | hit)
    if not columns:
        return blocks, 0
    numeric: dict[int, Any] = {}
    counted = 0
    for p, hit in columns.items():
        cols = torch.nonzero(hit).reshape(-1)
        counted += int(cols.numel())
        numeric[p] = (cols, fd.columns(p, cols))
    result: list[BlockComparison] = []
    for b in blocks:
        key = (b.out_pos, b.in_pos)
        if b.in_pos not in numeric:
            result.append(b)
            continue
        cols, nc = numeric[b.in_pos]
        t = truth_blocks[key].detach().to(torch.float64)
        m = max(1, math.prod(b.out_shape))
        n = max(1, math.prod(b.in_shape))
        # Outside the differenced columns the secondary is the reference itself: no entry there
        # disagrees with the reference, so the secondary cannot change its verdict.
        secondary = t.reshape(m, n).clone()
        s_bars = torch.zeros_like(secondary)
        kinks = torch.zeros((m, n), dtype=torch.bool)
        secondary[:, cols] = nc.estimates[b.out_pos].reshape(m, -1).to(secondary.dtype)
        s_bars[:, cols] = nc.bars[b.out_pos].reshape(m, -1).to(secondary.dtype)
        kinks[:, cols] = nc.kinks[b.out_pos].reshape(m, -1)
        shape = t.shape
        result.append(compare_block(b.out_pos, b.in_pos, b.out_name, b.in_name, out_ndims[b.out_pos],
                                    analytic[key], t, None, tolerance, secondary=secondary.reshape(shape),
                                    secondary_bars=s_bars.reshape(shape), kinks=kinks.reshape(shape)))
    return result, counted


@dataclass
class _BlockStats:
    out_pos: int
    in_pos: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    max_truth: float = 0.0
    max_err: float = 0.0
    analytic_nonzero: bool = False
    candidates: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    cols: list[torch.Tensor] = field(default_factory=list)
    a: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)

    @property
    def entries(self) -> int:
        return max(1, math.prod(self.out_shape)) * max(1, math.prod(self.in_shape))


@dataclass
class StreamOutcome:
    """What a streamed comparison keeps: counts, extremes and the judged entries."""

    mismatches: list[Mismatch]
    mismatch_count: int
    total: int
    max_abs_err: float
    excused: int
    kinks_excused: int
    columns_differenced: int
    chunks: int
    passes: int
    heatmaps: tuple[Heatmap, ...]
    diagnoses: list[Diagnosis]
    notes: list[str]


def stream_compare(analytic: VjpSource, reference: VjpSource, fd: FiniteDifferences | None,
                   out_names: dict[int, str], in_names: Sequence[str], tolerance: Tolerance,
                   *, max_bytes: int, mismatch_cap: int) -> StreamOutcome:
    """Compare analytic and reference row chunk by row chunk, keeping only what is needed.

    The tolerance's atol is relative to the block's scale max(1, max|truth|), which is only
    known after the last chunk; the screen during the pass uses scale 1 (the smallest it can be,
    so the screen keeps a superset of the mismatches) and the kept entries are judged exactly at
    the end. If more entries pass the screen than the store holds (a backward wrong nearly
    everywhere), a second pass judges exactly with the final scale and keeps the worst.
    """
    keys = [(o, p) for o in reference.outputs for p, _ in reference.leaves]
    leaf_shapes = {p: tuple(leaf.shape) for p, leaf in reference.leaves}
    stats = {k: _BlockStats(k[0], k[1], reference.out_shape(k[0]), leaf_shapes[k[1]]) for k in keys}
    # Each kept entry costs ~4 numbers (row, col, analytic, truth) plus the temporaries of
    # judging them: 64 bytes is a safe size per entry.
    store_cap = max(10_000, max_bytes // 64)
    stored = 0
    overflow = False
    chunks = 0
    for o in reference.outputs:
        m = max(1, math.prod(reference.out_shape(o)))
        step = min(analytic.rows_per_chunk(o), reference.rows_per_chunk(o))
        for start in range(0, m, step):
            stop = min(m, start + step)
            a_rows = analytic.rows(o, start, stop)
            t_rows = reference.rows(o, start, stop)
            chunks += 1
            for p, _ in reference.leaves:
                st = stats[(o, p)]
                a = a_rows[p].to(torch.float64)
                t = t_rows[p].to(torch.float64)
                if not t.numel():
                    continue
                # Hot path: a few fused kernels per chunk, no elementwise isfinite (slow on CPU):
                # NaN/Inf make isclose false and the norms NaN/Inf, which the kept entries sort out.
                t_abs = t.abs()
                st.max_truth = max(st.max_truth, _finite_or(float(t_abs.max()), 0.0))
                err = (a - t).abs_()
                worst = float(err.max())  # max propagates NaN
                st.max_err = max(st.max_err, math.inf if math.isnan(worst) else worst)
                # Screen with scale 1: a superset of the entries outside atol*scale + rtol*|t|.
                cand = err > t_abs.mul_(tolerance.rtol).add_(tolerance.atol)
                if not math.isfinite(worst):  # NaN compares false: add the non-finite entries
                    cand |= ~torch.isfinite(a)
                count = int(cand.sum())
                if not count:
                    continue
                r, c = torch.nonzero(cand, as_tuple=True)
                keep = torch.isfinite(t[r, c])  # a non-finite truth judges nothing
                r, c = r[keep], c[keep]
                count = int(r.numel())
                st.candidates += count
                if overflow or stored + count > store_cap:
                    overflow = True
                    continue
                st.rows.append(r + start)
                st.cols.append(c)
                st.a.append(a[r, c])
                st.t.append(t[r, c])
                stored += count
    passes = 1
    if overflow:
        passes = 2
        _second_pass(analytic, reference, stats, tolerance, store_cap)
    return _judge(stats, analytic, fd, out_names, in_names, tolerance, max_bytes=max_bytes,
                  mismatch_cap=mismatch_cap, chunks=chunks, passes=passes, overflow=overflow)


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _second_pass(analytic: VjpSource, reference: VjpSource, stats: dict[tuple[int, int], _BlockStats],
                 tolerance: Tolerance, store_cap: int) -> None:
    """Exact judgement with the final scale; keeps the worst `store_cap` entries over all blocks."""
    per_block = max(1, store_cap // max(1, len(stats)))
    for st in stats.values():
        st.rows, st.cols, st.a, st.t = [], [], [], []
        st.candidates = 0
    for o in reference.outputs:
        m = max(1, math.prod(reference.out_shape(o)))
        step = min(analytic.rows_per_chunk(o), reference.rows_per_chunk(o))
        for start in range(0, m, step):
            stop = min(m, start + step)
            a_rows = analytic.rows(o, start, stop)
            t_rows = reference.rows(o, start, stop)
            for p, _ in reference.leaves:
                st = stats[(o, p)]
                a = a_rows[p].to(torch.float64)
                t = t_rows[p].to(torch.float64)
                scale = max(1.0, st.max_truth)
                err = (a - t).abs_()
                nonfinite_a = ~torch.isfinite(a)
                bad = ((err > tolerance.atol * scale + tolerance.rtol * t.abs()) | nonfinite_a) & torch.isfinite(t)
                count = int(bad.sum())
                if not count:
                    continue
                st.candidates += count
                r, c = torch.nonzero(bad, as_tuple=True)
                e = torch.where(nonfinite_a[r, c], torch.full_like(err[r, c], math.inf), err[r, c])
                rows = torch.cat(st.rows + [r + start])
                cols = torch.cat(st.cols + [c])
                av = torch.cat(st.a + [a[r, c]])
                tv = torch.cat(st.t + [t[r, c]])
                ev = torch.where(~torch.isfinite(av), torch.full_like(av, math.inf), (av - tv).abs())
                _ = e
                if ev.numel() > per_block:
                    keep = torch.topk(ev.nan_to_num(math.inf), per_block).indices
                    rows, cols, av, tv = rows[keep], cols[keep], av[keep], tv[keep]
                st.rows, st.cols, st.a, st.t = [rows], [cols], [av], [tv]


def _judge(stats: dict[tuple[int, int], _BlockStats], analytic: VjpSource, fd: FiniteDifferences | None, out_names: dict[int, str],
           in_names: Sequence[str], tolerance: Tolerance, *, max_bytes: int, mismatch_cap: int,
           chunks: int, passes: int, overflow: bool) -> StreamOutcome:
    mismatches: list[Mismatch] = []
    total_bad = 0
    excused_total = 0
    kinks_total = 0
    columns_differenced = 0
    heatmaps: list[Heatmap] = []
    diagnoses: list[Diagnosis] = []
    notes: list[str] = []
    unchecked = 0
    for (o, p), st in stats.items():
        scale = max(1.0, st.max_truth)
        if not st.rows:
            if st.candidates:
                unchecked += st.candidates
            continue
        rows = torch.cat(st.rows)
        cols = torch.cat(st.cols)
        a = torch.cat(st.a)
        t = torch.cat(st.t)
        allowed = tolerance.atol * scale + tolerance.rtol * t.abs()
        bad = ((a - t).abs() > allowed) | ~torch.isfinite(a)
        rows, cols, a, t, allowed = rows[bad], cols[bad], a[bad], t[bad], allowed[bad]
        if overflow and st.candidates > rows.numel():
            unchecked += st.candidates - int(rows.numel())
        if not rows.numel():
            continue
        confirmed = torch.ones_like(rows, dtype=torch.bool)
        kink = torch.zeros_like(confirmed)
        if fd is not None:
            unique_cols, inverse = torch.unique(cols, return_inverse=True)
            columns_differenced += int(unique_cols.numel())
            m = max(1, math.prod(st.out_shape))
            # Finite-difference columns in groups that fit the budget (3 m-vectors per column).
            group = max(1, max_bytes // (3 * 8 * m * 4))
            s_val = torch.empty_like(a)
            s_bar = torch.empty_like(a)
            for g0 in range(0, unique_cols.numel(), group):
                chunk_cols = unique_cols[g0:g0 + group]
                nc = fd.columns(p, chunk_cols)
                est, bars, kinks = (nc.estimates[o].reshape(m, -1), nc.bars[o].reshape(m, -1),
                                    nc.kinks[o].reshape(m, -1))
                sel = (inverse >= g0) & (inverse < g0 + chunk_cols.numel())
                local = inverse[sel] - g0
                s_val[sel] = est[rows[sel], local].to(a.dtype)
                s_bar[sel] = bars[rows[sel], local].to(a.dtype)
                kink[sel] = kinks[rows[sel], local]
            s_allowed = tolerance.atol * scale + tolerance.rtol * s_val.abs() + s_bar
            secondary_bad = ((a - s_val).abs() > s_allowed) | ~torch.isfinite(a)
            confirmed = secondary_bad & ~kink
            excused = int((~secondary_bad).sum()) + int((secondary_bad & kink).sum())
            excused_total += excused
            kinks_total += int((secondary_bad & kink).sum())
        n_bad = int(confirmed.sum())
        total_bad += n_bad
        out_shape, in_shape = st.out_shape, st.in_shape
        err = torch.where(torch.isfinite(a), (a - t).abs(), torch.full_like(a, math.inf))
        idx = torch.nonzero(confirmed).reshape(-1)
        order = idx[torch.argsort(err[idx], descending=True, stable=True)][:mismatch_cap]
        for k in order.tolist():
            mismatches.append(Mismatch(output=out_names[o], input=in_names[p],
                                       out_index=unravel(int(rows[k]), out_shape),
                                       in_index=unravel(int(cols[k]), in_shape),
                                       expected=float(t[k]), got=float(a[k]), tolerance=float(allowed[k])))
        if n_bad or excused_total:
            heatmaps.append(_sparse_heatmap(out_names[o], in_names[p], out_shape, in_shape,
                                            rows[confirmed], cols[confirmed], rows[~confirmed], cols[~confirmed]))
        if n_bad:
            diagnoses.append(_stream_diagnosis(out_names[o], in_names[p], a[confirmed], allowed[confirmed],
                                               _analytic_nonzero(analytic, o, p), n_bad, st.entries))
    if unchecked:
        notes.append(f"{unchecked} further entr{'y' if unchecked == 1 else 'ies'} disagree with the reference but "
                     "were not kept for the finite-difference cross-check (over the memory budget), so they are "
                     "not counted as mismatches: never accused on one truth alone")
    total = sum(st.entries for st in stats.values())
    max_err = max((st.max_err for st in stats.values()), default=0.0)
    mismatches.sort(key=lambda mm: -mm.abs_err if mm.abs_err == mm.abs_err else float("-inf"))
    return StreamOutcome(mismatches=mismatches[:mismatch_cap], mismatch_count=total_bad, total=total,
                         max_abs_err=max_err, excused=excused_total, kinks_excused=kinks_total,
                         columns_differenced=columns_differenced, chunks=chunks, passes=passes,
                         heatmaps=tuple(heatmaps), diagnoses=diagnoses, notes=notes)


def _analytic_nonzero(analytic: VjpSource, o: int, p: int) -> bool:
    """Whether block (o, p) of the analytic Jacobian has any non-zero entry: A^T u for one random
    Gaussian u is zero for a non-zero A with probability 0 (one backward instead of a pass)."""
    out = analytic.outputs[o]
    u = torch.randn((1, *out.shape), generator=torch.Generator().manual_seed(991), dtype=torch.float64)
    try:
        return bool((analytic.vjp({o: u})[p] != 0).any())
    except Exception:
        return True


def _stream_diagnosis(out_name: str, in_name: str, a: torch.Tensor, allowed: torch.Tensor,
                      analytic_nonzero: bool, n_bad: int, entries: int) -> Diagnosis:
    """The patterns a streamed comparison can establish from the wrong entries alone."""
    deriv = f"∂{out_name}/∂{in_name}"
    zero_at_bad = bool((a.abs() <= allowed).all())
    if zero_at_bad and not analytic_nonzero:
        return Diagnosis("zero_grad", f"{deriv} is all zero in the backward, but {n_bad} entries of the truth are not",
                         output=out_name, input=in_name,
                         hint=f"the gradient for {in_name} is never computed (zeros_like, a detach, or a wrong "
                              "return slot)")
    if zero_at_bad:
        return Diagnosis("missing_offdiag",
                         f"missing cross terms: {deriv} is 0 in the backward at all {n_bad} wrong entries, where "
                         "the truth couples the output to them, and right at every non-zero backward entry",
                         output=out_name, input=in_name,
                         evidence=f"{n_bad}/{n_bad} wrong entries are 0 in the backward (streamed comparison)",
                         hint="a term of the chain rule is missing (a reduction or broadcast in forward?)")
    if n_bad <= 3:
        return Diagnosis("partial", f"{n_bad} of {entries} entries of {deriv} are wrong", output=out_name,
                         input=in_name, hint="a boundary case or one index of the formula is wrong")
    return Diagnosis("other", f"{deriv}: {n_bad} of {entries} entries differ (streamed comparison: pattern "
                              "rules that need the whole block run only below --max-memory)",
                     output=out_name, input=in_name, hint="see the diff table and heatmap for where they sit")


HEAT_ROWS = 36
HEAT_COLS = 72


def _sparse_heatmap(out_name: str, in_name: str, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
                    bad_rows: torch.Tensor, bad_cols: torch.Tensor, ex_rows: torch.Tensor,
                    ex_cols: torch.Tensor) -> Heatmap:
    """Binned map of where the wrong (X) and excused (?) entries sit; the agreeing entries are
    not kept by a streamed comparison, so every other cell is '.'."""
    rows_n = max(1, math.prod(out_shape))
    cols_n = max(1, math.prod(in_shape))
    n_rows, n_cols = min(rows_n, HEAT_ROWS), min(cols_n, HEAT_COLS)
    grid = torch.zeros((n_rows, n_cols), dtype=torch.int8)
    for rows, cols, code in ((ex_rows, ex_cols, 2), (bad_rows, bad_cols, 3)):
        if rows.numel():
            r = (rows * n_rows) // rows_n
            c = (cols * n_cols) // cols_n
            grid[r, c] = torch.maximum(grid[r, c], torch.tensor(code, dtype=torch.int8))
    glyph = {0: ".", 2: "?", 3: "X"}
    lines = tuple("".join(glyph[int(v)] for v in row) for row in grid)
    labels = []
    for i in range(n_rows):
        first = (i * rows_n + n_rows - 1) // n_rows
        labels.append(format_index(out_name, unravel(min(first, rows_n - 1), out_shape)))
    header = (f"binned: each cell covers ~{math.ceil(rows_n / n_rows)} x {math.ceil(cols_n / n_cols)} entries of the "
              f"{rows_n} x {cols_n} block (row-major); streamed comparison: only X and ? are kept")
    return Heatmap(output=out_name, input=in_name, out_shape=out_shape, in_shape=in_shape, rows=lines,
                   row_labels=tuple(labels), col_header=header, binned=True)
