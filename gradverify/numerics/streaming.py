"""The full (every entry) comparison for Jacobians too large to hold: row chunks, bounded memory.

Rows of the analytic Jacobian and of the reference are produced in chunks (batched VJPs) and
compared at once; only per-block statistics, a binned map of where non-zero entries sit (the
heatmap), the entries that disagree with the reference and the sparsity pattern of the rows
holding them are kept -- each within a share of --max-memory. Finite differences then judge
those entries (numerics.colouring: compressed groups, one column at a time where a group cannot
decide), and an entry is accused only if it disagrees with them too (numerics.judge).

When the budget allows no more -- more disagreeing entries than it can keep, or more columns
than the cross-check may difference -- the check degrades instead of growing: the count of
mismatches becomes a lower bound ("at least N"), the entries listed are a sample, and the report
says so.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradverify.numerics import judge
from gradverify.numerics.blocks import HEATMAP_MAX_COLS, HEATMAP_MAX_ROWS
from gradverify.numerics.colouring import MAX_CONFIRM_COLUMNS, Judged, second_truth
from gradverify.numerics.judge import Verdict
from gradverify.numerics.richardson import RELEASE_SHARE, release_memory
from gradverify.numerics.streamed_findings import (
    analytic_nonzero,
    heatmap,
    listed,
    sparse_diagnosis,
    whole_block_diagnosis,
)
from gradverify.numerics.vjp import VjpSource
from gradverify.report import CheckResult, Diagnosis, Heatmap, Mismatch

if TYPE_CHECKING:
    from gradverify.checks.base import CaseContext, Truth

LETTERS = "ijklmnpqrstuvw"

# One kept entry: row and column (int64), A, R, scale and slack (float64) = 48 bytes, plus its
# share of judging them all at once (second truth, bar, limits, verdict, allowed, error, the
# group reading's temporaries and the joined copies: measured ~210 bytes an entry in all).
STORE_BYTES_PER_ENTRY = 256
# The sparsity pattern of the rows holding kept entries (int32 row and column per non-zero) may
# take this share of the budget; beyond it compression is off for that input (it is only worth
# it for sparse rows anyway) and columns are differenced one by one.
PATTERN_SHARE = 8
PATTERN_BYTES_PER_PAIR = 8


class OverBudget(Exception):
    """The full check would take longer than `auto` allows (measured on the first rows)."""

    def __init__(self, estimate_s: float, measured: str) -> None:
        super().__init__(f"{estimate_s:.0f} s")
        self.estimate_s = estimate_s
        self.measured = measured


# The pass allocates each chunk's temporaries (a few MiB) between the small tensors it keeps
# (the disagreeing entries): glibc then serves later chunks from a heap it cannot shrink, and the
# resident set grows with the number of chunks. Freed pages are handed back whenever they exceed
# a share of the budget (numerics.finite_diff.release_memory, RELEASE_SHARE).


class _Plan:
    """--mode auto's cost model for the pass: the first chunk pays one-time costs (vmap setup,
    the batched-backward check, first-touch memory), so the rate is measured on the chunks after
    it, over at least MEASURE_CHUNKS of them and MEASURE_SECONDS (a few tens of milliseconds
    misjudged a pass by 7x once on a shared machine); the whole pass is estimated as
    first + rate x the rest, and the decision is taken once (a later stall does not throw away a
    check that was going to finish). Time is the CPU time of the thread running the check, not
    the wall clock: the decision then depends on the op and the machine, not on what else the
    machine is running (measured: 3-4x longer wall-clock rows on a shared 2-core machine at load
    8). Not the whole process's CPU time either: torch's worker threads spin while they wait for
    a core on a loaded machine, and that would count (measured 5-10x inflated)."""

    MEASURE_CHUNKS = 3
    MEASURE_SECONDS = 0.3

    def __init__(self, rows_total: int, limit: float) -> None:
        self.rows_total = rows_total
        self.limit = limit
        self.started = time.thread_time()
        self.first: tuple[int, float] | None = None
        self.chunks = 0
        self.decided = not math.isfinite(limit)

    def after_chunk(self, rows_done: int) -> None:
        if self.decided:
            return
        now = time.thread_time()
        self.chunks += 1
        if self.first is None:
            self.first = (rows_done, now - self.started)
            return
        first_rows, first_s = self.first
        spent = now - self.started - first_s
        if self.chunks - 1 < self.MEASURE_CHUNKS or spent < self.MEASURE_SECONDS:
            return
        self.decided = True
        rate = spent / max(1, rows_done - first_rows)
        estimate = first_s + rate * (self.rows_total - first_rows)
        if estimate > self.limit:
            raise OverBudget(estimate, f"{rows_done - first_rows} rows after the first chunk in {spent:.2f} s of CPU")


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
    slack: list[torch.Tensor] = field(default_factory=list)
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


@dataclass
class _Store:
    """What the pass keeps, with its budget: the disagreeing entries, and the sparsity pattern
    of the rows holding them -- one row per distinct column set (colouring only needs the
    distinct constraints; a structured Jacobian repeats a few sets over all its rows)."""

    entry_cap: int
    pattern_cap: int
    stored: int = 0
    overflow: int = 0
    patterns: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    pattern_pairs: dict[int, int] = field(default_factory=dict)
    pattern_ok: dict[int, bool] = field(default_factory=dict)
    seen: dict[int, set[tuple[int, int, int]]] = field(default_factory=dict)
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def keep_pattern(self, p: int, n: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Non-zero (row, column) pairs of some rows (sorted by row) of input p's columns."""
        if not self.pattern_ok.get(p, True) or not rows.numel():
            return
        if p not in self.weights:
            gen = torch.Generator().manual_seed(4243 + p)
            self.weights[p] = (torch.randint(0, 2**40, (n,), generator=gen), torch.randint(0, 2**40, (n,), generator=gen))
        w1, w2 = self.weights[p]
        ids, inverse, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        h1 = torch.zeros(ids.numel(), dtype=torch.long).index_add_(0, inverse, w1[cols])
        h2 = torch.zeros(ids.numel(), dtype=torch.long).index_add_(0, inverse, w2[cols])
        seen = self.seen.setdefault(p, set())
        fresh = torch.zeros(ids.numel(), dtype=torch.bool)
        for k, signature in enumerate(zip(counts.tolist(), h1.tolist(), h2.tolist())):
            if signature not in seen:
                seen.add(signature)
                fresh[k] = True
        if not bool(fresh.any()):
            return
        pick = fresh[inverse]
        rows, cols = rows[pick], cols[pick]
        used = self.pattern_pairs.get(p, 0) + int(rows.numel())
        if sum(self.pattern_pairs.values()) + int(rows.numel()) > self.pattern_cap:
            self.pattern_ok[p] = False
            self.patterns[p] = []
            self.pattern_pairs[p] = 0
            return
        self.patterns.setdefault(p, []).append((rows.to(torch.int32), cols.to(torch.int32)))
        self.pattern_pairs[p] = used

    def pattern(self, p: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.pattern_ok.get(p, True):
            return None
        parts = self.patterns.get(p, [])
        if not parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat([r for r, _ in parts]).to(torch.long), torch.cat([c for _, c in parts]).to(torch.long)


def streamed_check(ctx: CaseContext, analytic: VjpSource, truth: Truth, entries: int, *,
                   time_limit: float | None = None, mode_note: str = "") -> CheckResult:
    """Every entry, row chunk by row chunk. time_limit (auto mode): raise OverBudget as soon as
    the pass, extrapolated from the rows done, would take longer."""
    from gradverify.checks.jacobian import (
        SLACK_FACTOR,
        SLACK_MIN_EPS,
        assemble,
        norm_test,
    )

    reference = truth.reference.source
    assert reference is not None
    tolerance = ctx.tolerance
    budget = ctx.settings.max_memory
    leaves = dict(analytic.leaves)
    offsets = truth.fd.row_offsets()
    blocks = {(o, p): _Block(o, p, tuple(out.shape), tuple(leaves[p].shape))
              for o, out in analytic.outputs.items() for p in leaves}
    store = _Store(entry_cap=max(10_000, budget // STORE_BYTES_PER_ENTRY),
                   pattern_cap=max(100_000, budget // PATTERN_SHARE // PATTERN_BYTES_PER_PAIR))
    slack_wanted = tolerance.eps >= SLACK_MIN_EPS
    chunks = 0
    rows_total = sum(max(1, out.numel()) for out in analytic.outputs.values())
    rows_done = 0
    plan = _Plan(rows_total, time_limit or math.inf)
    for o, out in analytic.outputs.items():
        m = max(1, out.numel())
        step = min(analytic.rows_per_chunk(o), reference.rows_per_chunk(o))
        for start in range(0, m, step):
            stop = min(m, start + step)
            a_rows = analytic.rows(o, start, stop)
            t_rows = reference.rows(o, start, stop)
            moved: dict[int, torch.Tensor] | None = None
            chunks += 1
            for p in leaves:
                st = blocks[(o, p)]
                a = a_rows[p].double()
                t = t_rows[p].double()
                if not t.numel():
                    continue
                row_max, r, c, nonzeros = _scan(st, a, t, start, tolerance)
                st.max_truth = max(st.max_truth, float(row_max.max()))
                if not r.numel():
                    continue
                # Entries that may disagree: the policy itself (numerics.judge) decides each one.
                # Rows whose truth is all zero take the block's largest entry seen so far (0 before
                # any: every non-zero A there is kept); the entries kept from them are judged again
                # with the final fallback at the end (numerics.tolerance: block, case, units).
                a_e, t_e, row_e = a[r, c], t[r, c], row_max[r]
                scale_e = torch.where(row_e > 0, row_e, torch.full_like(row_e, st.max_truth))
                slack_e = None
                if slack_wanted:
                    if moved is None:
                        moved = _moved_rows(truth, o, start, stop)
                    if p in moved:
                        slack_e = SLACK_FACTOR * (moved[p][r, c].double() - t_e).abs().nan_to_num(0.0, 0.0, 0.0)
                keep = judge.disagrees(a_e, t_e, scale_e, tolerance, slack_e)
                count = int(keep.sum())
                if not count:
                    continue
                st.candidates += count
                if store.stored + count > store.entry_cap:
                    store.overflow += count
                    continue
                r, c = r[keep], c[keep]
                st.rows.append(r + start)
                st.cols.append(c)
                st.a.append(a_e[keep])
                st.t.append(t_e[keep])
                st.scale.append(row_e[keep])  # 0 for an all-zero truth row: fixed at the end
                if slack_e is not None:
                    st.slack.append(slack_e[keep])
                store.stored += count
                if nonzeros is None:
                    holding = torch.unique_consecutive(r)  # nonzero() lists rows in order
                    pr, pc = torch.nonzero((t[holding] != 0) | (a[holding] != 0), as_tuple=True)
                    nonzeros = (holding[pr], pc)
                store.keep_pattern(p, st.n, offsets[o] + start + nonzeros[0], nonzeros[1])
            del a_rows, t_rows, moved
            rows_done += stop - start
            release_memory(budget // RELEASE_SHARE)
            if time_limit is not None and rows_done < rows_total:
                plan.after_chunk(rows_done)
    return _judge(ctx, analytic, truth, blocks, store, entries, chunks, assemble, norm_test, mode_note)


def _moved_rows(truth: Truth, o: int, start: int, stop: int) -> dict[int, torch.Tensor]:
    """Rows start..stop of the reference at inputs moved by the dtype's rounding (the slack)."""
    moved = truth.perturbed()
    if moved is None or moved.reference.source is None:
        return {}
    return moved.reference.source.rows(o, start, stop)


def _scan(st: _Block, a: torch.Tensor, t: torch.Tensor, start: int, tolerance: Any
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One chunk in few passes: each row's largest finite |truth|, the block's statistics, the
    heatmap's non-zero map, and the (row, column) entries that may disagree -- a superset of
    numerics.judge.disagrees (scale 0 for an all-zero truth row, no slack), which the caller then
    applies to those entries alone: the policy decides every entry, this only skips the ones that
    cannot disagree. All-finite chunks take a fused path (measured ~6 ns an entry against ~60
    for the masked form); a chunk holding a non-finite value, the policy's own masks. Also
    returns the non-zero (row, column) pairs of the rows holding candidates when it found them
    on the way (None: the caller finds them)."""
    abs_t = t.abs()
    err = (a - t).abs_()
    row_max = abs_t.amax(dim=1)
    err_max = err.amax(dim=1)
    if not (bool(torch.isfinite(row_max).all()) and bool(torch.isfinite(err_max).all())):
        finite_t = torch.isfinite(t)
        _mark_nonzero(st, start, t.shape[0], lambda lo, hi: ((t[lo:hi] != 0) | (a[lo:hi] != 0)).any(dim=0))
        row_max = torch.where(finite_t, abs_t, torch.zeros_like(abs_t)).amax(dim=1)
        err = torch.where(torch.isfinite(a), err, torch.full_like(err, math.inf))
        st.max_err = max(st.max_err, float(torch.where(finite_t, err, torch.zeros_like(err)).max()))
        r, c = torch.nonzero(judge.disagrees(a, t, row_max.unsqueeze(1).expand_as(t), tolerance), as_tuple=True)
        return row_max, r, c, None
    # The heatmap's 'o' marks where the truth is non-zero; where only A is, the entry disagrees
    # (A != 0 = T beyond atol) or is 0 to the tolerance, and is drawn by its verdict or as zero.
    _mark_nonzero(st, start, t.shape[0], lambda lo, hi: abs_t[lo:hi].amax(dim=0) > 0)
    st.max_err = max(st.max_err, float(err_max.max()))
    # allowed - |A - T| with allowed = atol s + rtol |T| (numerics.judge.allowed), one pass each.
    margin = torch.add((tolerance.atol * row_max).unsqueeze(1), abs_t, alpha=tolerance.rtol).sub_(err)
    hot = torch.nonzero(margin.amin(dim=1) < 0).reshape(-1)
    if not hot.numel():
        return row_max, hot, hot, None
    # Only entries where A or T is non-zero can disagree: find those once (they are also the
    # sparsity pattern the compressed differences need), then test the margin there.
    # (|T| + |A - T| is non-zero exactly where A or T is, both terms being finite and >= 0.)
    if hot.numel() == t.shape[0]:
        pr, pc = torch.nonzero(torch.add(abs_t, err), as_tuple=True)
    else:
        pr, pc = torch.nonzero(torch.add(abs_t[hot], err[hot]), as_tuple=True)
        pr = hot[pr]
    negative = margin[pr, pc] < 0
    return row_max, pr[negative], pc[negative], (pr, pc)


def _mark_nonzero(st: _Block, start: int, k: int, columns_hit: Callable[[int, int], torch.Tensor]) -> None:
    """Keep a binned map of where the truth or the backward is non-zero (for the heatmap):
    columns_hit(lo, hi) says which columns are non-zero in the chunk's rows lo..hi-1 (one row bin)."""
    rb, cb = min(st.m, HEATMAP_MAX_ROWS), min(st.n, HEATMAP_MAX_COLS)
    if st.nonzero is None:
        st.nonzero = torch.zeros((rb, cb), dtype=torch.int8)
    col_bin = torch.arange(st.n) * cb // st.n
    for b in range(start * rb // st.m, (start + k - 1) * rb // st.m + 1):
        # Row r lies in bin r * rb // m: bin b holds rows ceil(b m / rb) .. ceil((b + 1) m / rb) - 1.
        lo = max(start, -(-b * st.m // rb)) - start
        hi = min(start + k, -(-(b + 1) * st.m // rb)) - start
        if hi <= lo:
            continue
        hit = columns_hit(lo, hi).to(torch.int8)
        per_bin = torch.zeros(cb, dtype=torch.int8).scatter_reduce_(0, col_bin, hit, reduce="amax")
        st.nonzero[b] = torch.maximum(st.nonzero[b], per_bin)


def _judge(ctx: CaseContext, analytic: VjpSource, truth: Truth, blocks: dict[tuple[int, int], _Block],
           store: _Store, entries: int, chunks: int, assemble: Callable[..., CheckResult],
           norm_test: Callable[..., list[Diagnosis]], mode_note: str) -> CheckResult:
    tolerance = ctx.tolerance
    fd = truth.fd
    names = ctx.output_names
    offsets = fd.row_offsets()
    mismatches: list[Mismatch] = []
    per_block: list[list[Mismatch]] = []
    total_bad = unverifiable = kinks = excused = 0
    lower_bound = store.overflow > 0
    sampled = False
    heatmaps: list[Heatmap] = []
    diagnoses: list[Diagnosis] = []
    cap = ctx.settings.mismatch_cap
    fd_text: list[str] = []
    case_max = max((st.max_truth for st in blocks.values()), default=0.0)
    for p in dict(analytic.leaves):
        kept = [(o, st) for (o, q), st in blocks.items() if q == p and st.rows]
        if not kept:
            continue
        judged = _gather(kept, offsets, tolerance, case_max, analytic)
        if not judged.count:
            continue
        second = second_truth(fd, p, judged, tolerance, pattern=store.pattern(p), max_columns=MAX_CONFIRM_COLUMNS,
                              seed=ctx.case.seed)
        fd_text.append(second.describe())
        if second.sampled:
            lower_bound = sampled = True
        if not bool(second.computed.all()):  # a sample of the columns: judge those entries only
            done = second.computed
            judged = Judged(rows=judged.rows[done], cols=judged.cols[done], a=judged.a[done], t=judged.t[done],
                            scale=judged.scale[done], slack=judged.slack[done] if judged.slack is not None else None)
            second.values, second.bars, second.kinks = second.values[done], second.bars[done], second.kinks[done]
        verdict = judge.with_reference(judged.a, judged.t, second.values, second.bars, second.kinks, judged.scale,
                                       tolerance, judged.slack)
        rows, cols, a, t, f = judged.rows, judged.cols, judged.a, judged.t, second.values
        allowed = judge.allowed(t, judged.scale, tolerance, judged.slack)
        del judged, second
        release_memory()
        for o, st in kept:
            lo, hi = offsets[o], offsets[o] + st.m
            mine = (rows >= lo) & (rows < hi)
            if not bool(mine.any()):
                continue
            if bool(mine.all()):
                mine = slice(None)  # type: ignore[assignment]
            v, r, c = verdict[mine], rows[mine] - lo, cols[mine]
            bad = v == int(Verdict.MISMATCH)
            n_bad = int(bad.sum())
            total_bad += n_bad
            unverifiable += int(((v == int(Verdict.UNVERIFIABLE)) | (v == int(Verdict.KINK))).sum())
            kinks += int((v == int(Verdict.KINK)).sum())
            excused += int((v == int(Verdict.EXCUSED)).sum())
            per_block.append(listed(ctx, o, p, st, bad, r, c, a[mine], t[mine], allowed[mine], f[mine], cap))
            if n_bad or bool((v != int(Verdict.AGREE)).any()):
                heatmaps.append(heatmap(st, names[o], ctx.input_names[p], r, c, v))
            if n_bad:
                whole = whole_block_diagnosis(ctx, analytic, truth, o, p, st, r, c, v, allowed[mine], f[mine])
                diagnoses.extend(whole if whole is not None else
                                 [sparse_diagnosis(names[o], ctx.input_names[p], st, r[bad], c[bad], a[mine][bad],
                                                   allowed[mine][bad], analytic_nonzero(analytic, o, p),
                                                   t[mine][bad], complete=not lower_bound)])
        del verdict, rows, cols, a, t, f, allowed
        release_memory()
    # Each block's list is sorted already (worst first): merge them, and keep the worst `cap`.
    if len(per_block) == 1:
        mismatches = per_block[0]
    elif per_block:
        # Non-finite analytic values count as infinitely wrong, as in streamed_findings.listed.
        merged = heapq.merge(*per_block, key=lambda mm: -mm.abs_err if mm.abs_err == mm.abs_err else -math.inf)
        mismatches = list(itertools.islice(merged, cap))
    mode = (f"full: every entry, streamed in {chunks} row chunks within --max-memory "
            f"{ctx.settings.max_memory / 2**20:.0f} MiB; only disagreeing entries kept")
    details = [("mode", mode + mode_note),
               ("analytic", analytic.path + (f" (vmap fallback: {analytic.fallback_reason})"
                                             if analytic.fallback_reason else "")),
               ("truth", truth.description),
               ("tolerance", tolerance.describe()),
               ("finite differences", ("; ".join(fd_text) if fd_text else "0 columns (no entry to cross-check)")
                + f" ({fd.path}); {fd.evaluations} forward evaluations in all")]
    notes: list[str] = []
    if store.overflow:
        notes.append(f"more entries disagree with the reference than --max-memory lets gradverify keep ({store.overflow} "
                     "not kept): the count of mismatched entries is a lower bound (raise --max-memory for an exact "
                     "count)")
    if sampled:
        notes.append(f"the entries to cross-check span more than {MAX_CONFIRM_COLUMNS} columns that finite differences "
                     "must take one by one: a sample of them was checked and the count is a lower bound")
    if not total_bad:
        diagnoses.extend(norm_test(ctx, analytic, truth))
    guarantee = ("every entry compared with the reference; entries that disagree judged against finite differences"
                 if not lower_bound else "every entry compared with the reference; as many of those that disagree "
                 "judged against finite differences as the budget allows (the count of wrong entries is a lower "
                 "bound)")
    return assemble(ctx, truth, details=details, entries=entries, compared=entries, count=total_bad,
                    mismatches=mismatches[:cap], diagnoses=diagnoses, unverifiable=unverifiable, kinks=kinks,
                    excused=excused, heatmaps=tuple(heatmaps),
                    max_err=max((st.max_err for st in blocks.values()), default=0.0),
                    lower_bound=lower_bound and total_bad > 0, notes=tuple(notes), guarantee=guarantee)


def _gather(kept: list[tuple[int, _Block]], offsets: dict[int, int], tolerance: Any, case_max: float,
            analytic: VjpSource) -> Judged:
    """One input's kept entries over every output (stacked rows), judged again with their final
    scale where it changed: for an all-zero truth row the block's largest entry, then the case's,
    then the block's units (as the dense path: checks/jacobian._fallback_scale). Each block's
    lists are released as they are joined."""
    with_slack = all(len(st.slack) == len(st.rows) for _, st in kept) and any(st.slack for _, st in kept)
    leaves = dict(analytic.leaves)
    fields: dict[str, list[torch.Tensor]] = {name: [] for name in ("rows", "cols", "a", "t", "scale", "slack")}
    for o, st in kept:
        part = {name: _take(st, name) for name in ("rows", "cols", "a", "t", "scale", "slack")}
        part["rows"] += offsets[o]
        zero_rows = part["scale"] <= 0
        if bool(zero_rows.any()):
            fallback = st.max_truth or case_max or units_scale(analytic.outputs[o], leaves[st.in_pos])
            part["scale"] = torch.where(zero_rows, torch.full_like(part["scale"], fallback), part["scale"])
            keep = judge.disagrees(part["a"], part["t"], part["scale"], tolerance, part["slack"] if with_slack else None)
            if not bool(keep.all()):
                part = {name: value[keep] if value.numel() else value for name, value in part.items()}
        for name, value in part.items():
            fields[name].append(value)
    joined = {name: torch.cat(values) if len(values) > 1 else values[0] for name, values in fields.items()}
    return Judged(rows=joined["rows"], cols=joined["cols"], a=joined["a"], t=joined["t"], scale=joined["scale"],
                  slack=joined["slack"] if with_slack else None)


def _take(st: _Block, name: str) -> torch.Tensor:
    """Join one of a block's kept lists into one tensor and drop the list."""
    values = getattr(st, name)
    setattr(st, name, [])
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(values) if len(values) > 1 else values[0]


def units_scale(out: torch.Tensor, leaf: torch.Tensor) -> float:
    """Scale of an all-zero truth row where the block and the case are all zero too: the block's
    units, rms(out) / rms(in)."""
    out_rms = float(out.detach().double().pow(2).mean().sqrt()) if out.numel() else 0.0
    in_rms = float(leaf.detach().double().pow(2).mean().sqrt()) if leaf.numel() else 0.0
    return out_rms / in_rms if out_rms > 0 and in_rms > 0 else 1.0


__all__ = ["OverBudget", "sparse_diagnosis", "streamed_check", "units_scale"]
