"""Finite differences: the truth that needs nothing but the op's forward.

Every estimate is a central difference D(h) = (f(x + h d) - f(x - h d)) / 2h along a direction
d (a unit vector e_j for a Jacobian column; its tangent-space projection for a constrained
input; a random vector for a probe; a weighted sum of columns for a compressed group), refined
in a Richardson (Neville) tableau over the steps h, h/2, h/4, ...:

    T[0][l] = D(h / 2^l),   T[m][l] = (4^m T[m-1][l] - T[m-1][l-1]) / (4^m - 1)

Each T[m][l] (m >= 1) carries an error estimate, the larger of its differences to the two
entries it was built from plus the rounding of f at that step (4 eps |f| / h_l); per entry the
estimate with the smallest error wins, and that error is its bar. Levels are added only where
an entry's bar is still above the target the caller asks for (MAX_LEVELS at most): the usual
function converges at three levels, one that varies faster than the first step takes more,
and one that never settles (a kink, a function the steps cannot resolve) keeps a large bar,
which the comparison then reads as "not judged" instead of inventing a verdict. A caller that
knows which entries it will judge, and how close their verdicts are, passes those entries and
an absolute bar per entry (`entries`): only they are post-processed, and a direction is
refined only while one of *its* judged entries is undecided.

Steps come from the tensor's own magnitude, so a verdict never depends on units: the first
step for entry j is eps**(1/5) * max(|x_j|, 1e-3 * rms(x)) (Richardson's O(h^4) truncation and
O(eps/h) rounding balance at eps**(1/5), ~7e-4 relative in float64), rounded to a power of two
so that x +- h is as exact as possible. Where x +- h leaves the domain (any output turns
non-finite while f(x) is finite: log of a negative number) the step is divided by 8, up to six
times, for that direction only.

At a kink the one-sided slopes differ by the same amount at every step (at a smooth point their
gap halves with h): such entries are flagged, and their bar is widened to the gap.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradverify.numerics.forward import BatchedEvaluator, Evaluator
from gradverify.numerics.vjp import (
    CHUNK_TARGET_BYTES,
    WORKSPACE_FACTOR,
    BatchedDisagrees,
)
from gradverify.usercode import UserCodeError

Tangent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

START_LEVELS = 3
MAX_LEVELS = 8
SHRINK = 8.0
MAX_SHRINKS = 6
# Floor of the first step, relative to the tensor's rms, for entries at or near zero.
RELATIVE_FLOOR = 1e-3
# Whole columns are remembered (the same column asked again by another output's block, or by a
# later check) within this share of the budget. The judging paths ask for each column once
# (numerics.colouring: all outputs at once), so this only saves repeated whole-column requests,
# and it must not hold memory the comparison needs.
MEMO_SHARE = 16
# Working bytes per judged entry while its tableau is alive: a difference and a rounding bound
# per level, the last three differences and two gaps, and the tableau's temporaries (float64),
# plus its direction and row indices.
ENTRY_BYTES = 8 * (2 * MAX_LEVELS + 14)


@dataclass
class Columns:
    """Derivatives along k directions of one input: per output o, (out.numel(), k) tensors."""

    estimates: dict[int, torch.Tensor]
    bars: dict[int, torch.Tensor]
    kinks: dict[int, torch.Tensor]
    evaluations: int = 0


@dataclass
class Estimates:
    """Derivatives at chosen entries (a direction, an output row): one value per entry."""

    values: torch.Tensor
    bars: torch.Tensor
    kinks: torch.Tensor
    evaluations: int = 0


@dataclass
class _Table:
    """The tableau of one chunk of directions, one column per judged entry (flat).

    owner: each entry's direction (local to the chunk); col_scale: per direction, the largest
    finite |central difference| over *every* output row at its latest level (the scale the
    convergence and kink tests compare with, whichever entries are judged); per level the
    entries' central differences (NaN where the direction was not refined at that level) and
    their rounding; per entry its last three central differences and last two one-sided gaps."""

    owner: torch.Tensor
    col_scale: torch.Tensor
    d: list[torch.Tensor] = field(default_factory=list)
    floor: list[torch.Tensor] = field(default_factory=list)
    recent: list[torch.Tensor] = field(default_factory=list)  # [D_L, D_L-1, D_L-2] per entry
    last_gap: torch.Tensor | None = None
    prev_gap: torch.Tensor | None = None
    last_floor: torch.Tensor | None = None


def first_steps(x: torch.Tensor, directions: torch.Tensor, sequence: int = 0) -> torch.Tensor:
    """The first step for each direction (rows of `directions`, flattened like x).

    sequence 1 starts at 3/4 of sequence 0's step: its sample points are none of the first
    sequence's, so an estimate that only looks converged by aliasing (steps resonating with an
    oscillation, sin(1e5 x)) does not survive both."""
    eps = _eps(x)
    flat = x.detach().reshape(-1).abs().to(torch.float64)
    typical = _typical(flat)
    d = directions.abs().to(torch.float64)
    support = d > 0
    # The magnitude of x over each direction's support.
    mag = torch.where(support, flat.unsqueeze(0).expand_as(d), torch.zeros_like(d)).amax(dim=1)
    mag = torch.clamp(mag, min=RELATIVE_FLOOR * typical)
    d_norm = d.amax(dim=1).clamp_min(1e-300)
    raw = eps ** 0.2 * mag / d_norm
    return torch.exp2(torch.round(torch.log2(raw))) * (0.75 if sequence else 1.0)


def unit_steps(x: torch.Tensor, cols: torch.Tensor, sequence: int = 0) -> torch.Tensor:
    """first_steps for the unit directions e_j, j in `cols`, without forming them."""
    eps = _eps(x)
    flat = x.detach().reshape(-1).abs().to(torch.float64)
    mag = torch.clamp(flat[cols.to(torch.long)], min=RELATIVE_FLOOR * _typical(flat))
    return torch.exp2(torch.round(torch.log2(eps ** 0.2 * mag))) * (0.75 if sequence else 1.0)


def release_memory(allowance: int = 0) -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere) once the
    resident set has grown by more than `allowance` bytes since the last time (0: now).

    torch's CPU tensors come from malloc. Once a large block has been freed, glibc serves blocks
    of that size from its heap, and a small allocation that lands between them keeps the heap
    from shrinking: a loop that allocates a few output-sized temporaries per step while keeping
    small results grows the resident set by the temporaries' size every step (measured: 200
    steps of two 8 MiB temporaries and a small kept tensor, 1.77 GiB; 0.21 GiB after trimming).
    Trimming is not free -- the pages come back zero-filled on the next touch (measured +40% CPU
    when trimming after every 16 MiB step) -- hence the allowance: callers pass a share of
    --max-memory."""
    trim = _malloc_trim()
    if trim is None:
        return
    if allowance:
        now = _resident_bytes()
        if now - _TRIMMED[0] <= allowance:
            return
    trim(0)
    _TRIMMED[0] = _resident_bytes()


_TRIMMED = [0]


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = 4096


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        import os

        globals()["_PAGE"] = os.sysconf("SC_PAGE_SIZE")
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError, ValueError):
        return None


# Freed memory the comparisons let accumulate before handing it back: this share of --max-memory
# (a quarter: the peak stays within 1.25 x the budget above the process's baseline, and a check
# of 10^6 outputs at 256M trims ~45 times, +35% CPU, against ~+40% when trimming at an eighth).
RELEASE_SHARE = 4


def _eps(x: torch.Tensor) -> float:
    return torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps


def _typical(flat_abs: torch.Tensor) -> float:
    rms = float(flat_abs.pow(2).mean().sqrt()) if flat_abs.numel() else 0.0
    return rms if rms > 0 else 1.0


def _tableau(table: _Table) -> tuple[torch.Tensor, torch.Tensor]:
    """(best estimate, its error) per entry from the levels computed so far.

    T[m][l] is built from T[m-1][l] and T[m-1][l-1]; its error is the larger distance to them
    plus twice the rounding of the finer level. Entries of levels a direction skipped are NaN
    and never win.
    """
    levels = len(table.d)
    prev = dict(enumerate(table.d))
    best = table.d[0].clone()
    best_err = torch.full_like(best, math.inf)
    for m in range(1, levels):
        factor = 4.0 ** m
        current = {}
        for level in range(m, levels):
            value = (factor * prev[level] - prev[level - 1]) / (factor - 1)
            err = torch.maximum((value - prev[level]).abs(), (value - prev[level - 1]).abs())
            err = err + 2 * table.floor[level]
            err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
            better = err < best_err
            best = torch.where(better, value, best)
            best_err = torch.where(better, err, best_err)
            current[level] = value
        prev = current
    return best, best_err


def add_level(table: _Table, d: torch.Tensor, gap: torch.Tensor, floor: torch.Tensor,
              active: torch.Tensor | None) -> None:
    """Append one level: each entry's central difference, one-sided gap |f+ + f- - 2 f0| / h and
    rounding bound (NaN for entries whose direction was not refined; `active` marks the others)."""
    table.d.append(d)
    table.floor.append(floor)
    if table.last_gap is None:
        table.last_gap, table.last_floor, table.recent = gap, floor, [d]
        return
    m = torch.ones_like(d, dtype=torch.bool) if active is None else active
    assert table.last_floor is not None
    previous = table.prev_gap if table.prev_gap is not None else table.last_gap
    table.prev_gap = torch.where(m, table.last_gap, previous)
    table.last_gap = torch.where(m, gap, table.last_gap)
    table.last_floor = torch.where(m, floor, table.last_floor)
    candidate = ([d] + table.recent)[:3]
    kept = table.recent + [torch.full_like(d, math.nan)] * (len(candidate) - len(table.recent))
    table.recent = [torch.where(m, c, k) for c, k in zip(candidate, kept)]


def asymptotic(table: _Table, eps: float) -> torch.Tensor:
    """Whether each entry's central differences behave like D + c h^2 at the finest levels:
    successive differences shrink by about 4 when h halves, or the estimates have settled (they
    differ by less than sqrt(eps)/16 of the direction's scale -- rounding, including the rounding
    of a forward that cancels, which the 4 eps |f| / h floor does not see). Before that regime
    Richardson's error estimate means nothing: a step larger than the scale the function varies
    on (|x| at 1e-9) gives estimates that agree with each other and not with the derivative.
    Such entries get no error bar (inf): not judged."""
    if len(table.recent) < 3 or table.last_floor is None:
        return torch.zeros_like(table.d[-1], dtype=torch.bool)
    d_last, d_prev, d_prev2 = table.recent
    newer = (d_last - d_prev).abs()
    older = (d_prev - d_prev2).abs()
    finite = torch.where(torch.isfinite(d_last), d_last.abs(), torch.zeros_like(d_last))
    column = table.col_scale[table.owner]
    settled = newer <= (eps ** 0.5 / 16) * torch.maximum(finite, column)
    return (newer <= 0.5 * older) | (newer <= 4 * table.last_floor) | settled


def kinks_of(table: _Table, best: torch.Tensor) -> torch.Tensor:
    """A kink: the one-sided gap does not shrink when h halves (0.75 allows for a curvature term),
    is not a 1e-6 relative wobble, and stands well above rounding."""
    if table.prev_gap is None or table.last_gap is None or table.last_floor is None:
        return torch.zeros_like(best, dtype=torch.bool)
    scale = table.col_scale[table.owner]
    return (table.last_gap > 0.75 * table.prev_gap) & \
        (table.last_gap > 1e-6 * torch.maximum(best.abs(), scale)) & (table.last_gap > 16 * table.last_floor)


def finish(table: _Table, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best estimate, error bar and kink flag per entry once refinement stopped."""
    best, err = _tableau(table)
    kink = kinks_of(table, best)
    if table.last_gap is not None and table.prev_gap is not None:
        # At a kink the derivative is any value between the one-sided slopes.
        err = torch.where(kink, torch.maximum(err, table.last_gap + table.prev_gap), err)
    err = torch.where(asymptotic(table, eps) | kink, err, torch.full_like(err, math.inf))
    return best, err, kink


def _finite_abs_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    finite = torch.where(torch.isfinite(values), values.abs(), torch.zeros_like(values))
    return finite.amax(dim=dim) if finite.shape[dim] else torch.zeros(finite.shape[:dim], dtype=finite.dtype)


# Evaluates one level for the given directions (local indices) at steps h: (f(x + h d), f(x - h d)).
LevelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# From one level's outputs: the entries' (d, gap, floor), which entries those were, and the
# per-direction scale of the refined directions.
ExtractFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def refine(level: LevelFn, extract: ExtractFn, owner: torch.Tensor, k: int, steps: torch.Tensor,
           f0: torch.Tensor, eps: float, *, limits: torch.Tensor | None, target: float,
           allowance: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adaptive tableau for k directions and the entries they own: first level (with steps
    shrunk where they leave the domain), then finer levels for the directions whose entries are
    not settled yet. `limits`: each entry's absolute bar target (else `target` relative)."""
    everyone = torch.arange(k)
    plus, minus = level(everyone, steps)
    for _ in range(MAX_SHRINKS):
        bad = ~(torch.isfinite(plus) & torch.isfinite(minus)) & torch.isfinite(f0).unsqueeze(0)
        rows = bad.any(dim=1)
        if not bool(rows.any()):
            break
        steps = torch.where(rows, steps / SHRINK, steps)
        idx = torch.nonzero(rows).reshape(-1)
        p2, m2 = level(idx, steps[idx])
        plus[idx], minus[idx] = p2, m2
    table = _Table(owner=owner, col_scale=torch.zeros(k, dtype=torch.float64))
    d, gap, floor, _, scale = extract(plus, minus, everyone, steps)
    table.col_scale = scale
    add_level(table, d, gap, floor, None)
    del plus, minus
    for depth in range(1, MAX_LEVELS):
        h = steps / (2.0 ** depth)
        todo = everyone
        if depth >= START_LEVELS:
            best, err = _tableau(table)
            if limits is None:
                limit = target * torch.maximum(best.abs(), 1e-2 * table.col_scale[owner])
            else:
                limit = limits
            unsettled = (err > limit) | ~asymptotic(table, eps)
            wanted = torch.zeros(k, dtype=torch.bool)
            wanted[owner[unsettled]] = True
            if not bool(wanted.any()):
                break
            todo = torch.nonzero(wanted).reshape(-1)
        plus, minus = level(todo, h[todo])
        d, gap, floor, active, scale = extract(plus, minus, todo, h[todo])
        table.col_scale[todo] = scale
        add_level(table, d, gap, floor, None if todo.numel() == k else active)
        del plus, minus
        release_memory(allowance)
    return finish(table, eps)


class FiniteDifferences:
    """Directional derivatives of the op's outputs at fixed (float64 where possible) inputs.

    columns(p, cols): the Jacobian columns of input p (projected onto its tangent space for a
    constrained input), memoised, batched over perturbations where the forward body allows
    (vmap, checked against plain calls once), else plain calls.
    directions(p, D): the same along arbitrary directions (rows of D), e.g. compressed groups.
    entries(p, D, owner, rows): only the entries (direction owner[e], output row rows[e]) the
    caller judges, with a bar target per entry: the cheap way to a second truth.
    directional({p: v}) / contracted({p: v}, u): J v along a joint direction over every input,
    whole or contracted with cotangents u (memory of a few outputs, whatever their size).
    """

    def __init__(self, evaluate: Evaluator, args: Sequence[Any], diff_positions: Sequence[int],
                 out_positions: Sequence[int], *, batched: BatchedEvaluator | None = None,
                 tangents: dict[int, Tangent] | None = None, max_bytes: int = 512 * 2**20, seed: int = 0,
                 target: float = 1e-9) -> None:
        self.evaluate = evaluate
        self.args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.diff_positions = list(diff_positions)
        self.out_positions = list(out_positions)
        self.batched = batched
        self.tangents = tangents or {}
        self.max_bytes = max_bytes
        self.seed = seed
        self.target = target
        self.f0 = evaluate(self.args)
        self.evaluations = 1
        self.fallback_reason = ""
        self._verified = False
        self._memo: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._memo_bytes = 0
        self.out_sizes = [int(f.numel()) for f in self.f0]
        self._f0_flat: torch.Tensor | None = None

    @property
    def path(self) -> str:
        return "batched" if self.batched is not None else "loop"

    @property
    def dtype(self) -> torch.dtype:
        return next((a.dtype for a in self.args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                    torch.float64)

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    @property
    def f0_flat(self) -> torch.Tensor:
        """Every output at x, flattened and stacked (float64): row r of the stacked Jacobian."""
        if self._f0_flat is None:
            self._f0_flat = torch.cat([f.reshape(-1).to(torch.float64) for f in self.f0]) if self.f0 else \
                torch.zeros(0, dtype=torch.float64)
        return self._f0_flat

    def row_offsets(self) -> dict[int, int]:
        """Where each output's rows start in the stacked rows."""
        offsets, start = {}, 0
        for o, size in zip(self.out_positions, self.out_sizes):
            offsets[o] = start
            start += size
        return offsets

    # --- column access ----------------------------------------------------------------------

    def unit_directions(self, p: int, cols: torch.Tensor) -> torch.Tensor:
        """(k, n) directions for columns `cols` of input p: e_j, or its tangent projection."""
        x = self.args[p]
        n = x.numel()
        d = torch.zeros((int(cols.numel()), n), dtype=torch.float64)
        if cols.numel():
            d[torch.arange(int(cols.numel())), cols.to(torch.long)] = 1.0
        tangent = self.tangents.get(p)
        if tangent is not None and cols.numel():
            k = int(cols.numel())
            base = x.detach().to(torch.float64).expand(k, *x.shape)
            d = tangent(base, d.reshape(k, *x.shape)).reshape(k, n)
        return d

    def columns(self, p: int, cols: torch.Tensor, sequence: int = 0) -> Columns:
        """Finite-difference Jacobian columns `cols` (flat indices) of input p, memoised.
        sequence 1 is an independent second estimate (other steps) to confirm an accusation."""
        cols = cols.reshape(-1).to(torch.long)
        todo = [int(c) for c in cols.tolist() if (p, int(c), sequence) not in self._memo]
        before = self.evaluations
        fresh_index: dict[int, int] = {}
        stacked_e: torch.Tensor = torch.zeros(0)
        stacked_b: torch.Tensor = torch.zeros(0)
        stacked_k: torch.Tensor = torch.zeros(0)
        if todo:
            todo_t = torch.tensor(sorted(set(todo)), dtype=torch.long)
            fresh = self.directions(p, self.unit_directions(p, todo_t), sequence=sequence)
            stacked_e = torch.cat([fresh.estimates[o] for o in self.out_positions], dim=0)
            stacked_b = torch.cat([fresh.bars[o] for o in self.out_positions], dim=0)
            stacked_k = torch.cat([fresh.kinks[o] for o in self.out_positions], dim=0)
            per_column = 2 * 8 * stacked_e.shape[0] + stacked_e.shape[0]
            for k, c in enumerate(todo_t.tolist()):
                if self._memo_bytes + per_column > self.max_bytes // MEMO_SHARE:
                    break  # beyond its share of the budget, columns are recomputed when asked again
                self._memo[(p, c, sequence)] = (stacked_e[:, k].clone(), stacked_b[:, k].clone(),
                                                stacked_k[:, k].clone())
                self._memo_bytes += per_column
            fresh_index = {c: k for k, c in enumerate(todo_t.tolist())}
        est_cols: list[torch.Tensor] = []
        bar_cols: list[torch.Tensor] = []
        kink_cols: list[torch.Tensor] = []
        for c in cols.tolist():
            if (p, c, sequence) in self._memo:
                e, b, kk = self._memo[(p, c, sequence)]
            else:
                idx = fresh_index[c]
                e, b, kk = stacked_e[:, idx], stacked_b[:, idx], stacked_k[:, idx]
            est_cols.append(e)
            bar_cols.append(b)
            kink_cols.append(kk)
        return self._split(est_cols, bar_cols, kink_cols, self.evaluations - before)

    def memoised(self, p: int, col: int, sequence: int = 0) -> bool:
        return (p, col, sequence) in self._memo

    def _split(self, est_cols: list[torch.Tensor], bar_cols: list[torch.Tensor], kink_cols: list[torch.Tensor],
               evaluations: int) -> Columns:
        m_total = sum(self.out_sizes)
        e = torch.stack(est_cols, dim=1) if est_cols else torch.zeros((m_total, 0), dtype=torch.float64)
        b = torch.stack(bar_cols, dim=1) if bar_cols else torch.zeros((m_total, 0), dtype=torch.float64)
        k = torch.stack(kink_cols, dim=1) if kink_cols else torch.zeros((m_total, 0), dtype=torch.bool)
        return self._by_output(e, b, k, evaluations)

    def _by_output(self, e: torch.Tensor, b: torch.Tensor, k: torch.Tensor, evaluations: int) -> Columns:
        estimates, bars, kinks = {}, {}, {}
        offset = 0
        for o, size in zip(self.out_positions, self.out_sizes):
            estimates[o] = e[offset:offset + size]
            bars[o] = b[offset:offset + size]
            kinks[o] = k[offset:offset + size]
            offset += size
        return Columns(estimates, bars, kinks, evaluations)

    def directions(self, p: int, directions: torch.Tensor, target: float | None = None,
                   sequence: int = 0, *, steps: torch.Tensor | None = None) -> Columns:
        """Derivatives of every output along each row of `directions` ((k, n), flattened like x)."""
        k = int(directions.shape[0])
        m_total = sum(self.out_sizes)
        got = self.entries(p, directions, None, None, target=target, sequence=sequence, steps=steps)
        return self._by_output(got.values.reshape(k, m_total).T, got.bars.reshape(k, m_total).T,
                               got.kinks.reshape(k, m_total).T, got.evaluations)

    def entries(self, p: int, directions: torch.Tensor, owner: torch.Tensor | None, rows: torch.Tensor | None, *,
                steps: torch.Tensor | None = None, limits: torch.Tensor | None = None, target: float | None = None,
                sequence: int = 0) -> Estimates:
        """Derivatives along the rows of `directions` at entries (owner[e], rows[e]) only, rows
        indexing the stacked outputs (row_offsets). owner/rows None: every row of every direction,
        direction-major. steps: each direction's first step (else from x's magnitude over its
        support). limits: each entry's absolute bar target (else the relative target)."""
        x = self.args[p]
        k_total = int(directions.shape[0])
        m_total = sum(self.out_sizes)
        target = self.target if target is None else target
        before = self.evaluations
        everything = owner is None
        if everything:
            e_total = k_total * m_total
            per_dir = m_total
        else:
            assert owner is not None and rows is not None
            owner = owner.reshape(-1).to(torch.long)
            rows = rows.reshape(-1).to(torch.long)
            e_total = int(owner.numel())
            per_dir = max(1, e_total // max(1, k_total))
        values = torch.empty(e_total, dtype=torch.float64)
        bars = torch.empty(e_total, dtype=torch.float64)
        kinks = torch.zeros(e_total, dtype=torch.bool)
        if not e_total:
            return Estimates(values, bars, kinks, 0)
        chunk = self._chunk(x.numel(), m_total, x.element_size(), per_dir)
        if everything:
            for start in range(0, k_total, chunk):
                stop = min(k_total, start + chunk)
                kk = stop - start
                local_owner = torch.arange(kk).repeat_interleave(m_total)
                est, bar, kink = self._chunk_entries(
                    p, directions[start:stop], local_owner, None,
                    steps[start:stop] if steps is not None else None,
                    limits[start * m_total:stop * m_total] if limits is not None else None, target, sequence)
                values[start * m_total:stop * m_total] = est
                bars[start * m_total:stop * m_total] = bar
                kinks[start * m_total:stop * m_total] = kink
            return Estimates(values, bars, kinks, self.evaluations - before)
        assert owner is not None and rows is not None
        order = torch.argsort(owner, stable=True)
        sorted_owner = owner[order]
        bounds = torch.searchsorted(sorted_owner, torch.arange(0, k_total + 1, dtype=torch.long))
        for start in range(0, k_total, chunk):
            stop = min(k_total, start + chunk)
            lo, hi = int(bounds[start]), int(bounds[stop])
            if lo == hi:
                continue  # no entry judged along these directions: nothing to evaluate
            pick = order[lo:hi]
            used = torch.unique(sorted_owner[lo:hi])  # only directions that own entries
            remap = torch.full((stop - start,), -1, dtype=torch.long)
            remap[used - start] = torch.arange(int(used.numel()))
            local_owner = remap[sorted_owner[lo:hi] - start]
            est, bar, kink = self._chunk_entries(
                p, directions[used], local_owner, rows[pick], steps[used] if steps is not None else None,
                limits[pick] if limits is not None else None, target, sequence)
            values[pick], bars[pick], kinks[pick] = est, bar, kink
        return Estimates(values, bars, kinks, self.evaluations - before)

    def _chunk(self, n: int, m_total: int, itemsize: int, entries_per_dir: int) -> int:
        # Per direction and level: 2 perturbed copies of the input and 2 outputs (float64), plus
        # the tableau of the entries it owns; bounded by the chunk target and by the budget.
        per_dir = 2 * max(1, n + m_total) * max(8, itemsize) + 8 * max(1, m_total) + ENTRY_BYTES * entries_per_dir
        cols = max(8, CHUNK_TARGET_BYTES // per_dir)
        cols = min(cols, max(1, self.max_bytes // (per_dir * WORKSPACE_FACTOR)))
        return max(1, cols)

    # --- the adaptive tableau for one chunk of directions ------------------------------------

    def _chunk_entries(self, p: int, d: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor | None,
                       steps: torch.Tensor | None, limits: torch.Tensor | None, target: float,
                       sequence: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.args[p]
        k = int(d.shape[0])
        if steps is None:
            steps = first_steps(x, d, sequence)
        f0 = self.f0_flat
        eps = self.eps
        m_total = int(f0.numel())
        f0_rows = f0 if rows is None else f0[rows]

        def level(which: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._evaluate_level(p, d[which], h)

        def extract(plus: torch.Tensor, minus: torch.Tensor, which: torch.Tensor,
                    h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            hh = h.reshape(-1, 1)
            scale = _finite_abs_max((plus - minus) / (2 * hh), 1)
            if rows is None:
                # Every row of every direction: entries are the (k, M) grid, direction-major.
                if int(which.numel()) == k:
                    pe, me, he, fe = plus, minus, hh, f0.unsqueeze(0)
                    active = torch.ones(k * m_total, dtype=torch.bool)
                else:
                    pe = torch.full((k, m_total), math.nan, dtype=torch.float64)
                    me = torch.full_like(pe, math.nan)
                    pe[which], me[which] = plus, minus
                    he = torch.ones((k, 1), dtype=torch.float64)
                    he[which] = hh
                    fe = f0.unsqueeze(0)
                    active = torch.zeros((k, m_total), dtype=torch.bool)
                    active[which] = True
                    active = active.reshape(-1)
                dd, gap, floor = _differences(pe, me, fe, he, eps)
                return dd.reshape(-1), gap.reshape(-1), floor.reshape(-1), active, scale
            position = torch.full((k,), -1, dtype=torch.long)
            position[which] = torch.arange(int(which.numel()))
            slot = position[owner]
            active = slot >= 0
            pe = torch.full(owner.shape, math.nan, dtype=torch.float64)
            me = torch.full_like(pe, math.nan)
            he = torch.ones(owner.shape, dtype=torch.float64)
            pe[active] = plus[slot[active], rows[active]]
            me[active] = minus[slot[active], rows[active]]
            he[active] = h[slot[active]]
            dd, gap, floor = _differences(pe, me, f0_rows, he, eps)
            return dd, gap, floor, active, scale

        return refine(level, extract, owner, k, steps, f0, eps, limits=limits, target=target,
                      allowance=self.max_bytes // RELEASE_SHARE)

    def _evaluate_level(self, p: int, d: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x + h d) and f(x - h d) for each row of d: two (k, M) tensors (outputs flattened)."""
        x = self.args[p]
        k = int(d.shape[0])
        flat = x.detach().reshape(-1)
        delta = (h.reshape(-1, 1) * d).to(flat.dtype)
        X = torch.cat([flat.unsqueeze(0) + delta, flat.unsqueeze(0) - delta]).reshape(2 * k, *x.shape)
        del delta
        if self.batched is not None:
            try:
                outs = self.batched(self.args, p, X)
                F = torch.cat([o.reshape(2 * k, -1).to(torch.float64) for o in outs], dim=1)
                del outs
                if not self._verified:
                    self._verify(p, X, F)
                self.evaluations += 2 * k
                return F[:k], F[k:]
            except BatchedDisagrees as exc:
                self.batched = None
                self.fallback_reason = str(exc)
            except UserCodeError as exc:  # vmap cannot run this forward: plain calls from now on
                self.batched = None
                text = str(exc.original).strip().splitlines()[0] if str(exc.original).strip() else ""
                self.fallback_reason = f"{type(exc.original).__name__}: {text.split('. ')[0][:160]}"
        F = torch.empty((2 * k, sum(self.out_sizes)), dtype=torch.float64)
        for b in range(2 * k):
            call = list(self.args)
            call[p] = X[b]
            outs = self.evaluate(call)
            F[b] = torch.cat([o.reshape(-1).to(torch.float64) for o in outs]) if outs else F[b]
        self.evaluations += 2 * k
        return F[:k], F[k:]

    def _verify(self, p: int, X: torch.Tensor, F: torch.Tensor) -> None:
        """One perturbed input of the batch against a plain call: a vmap that runs is not proof
        that it ran the same maths (a body that mixes batch entries, or writes into a shared
        buffer, runs fine and is wrong). The two must agree to rounding of f."""
        pick = int(torch.randint(0, X.shape[0], (1,), generator=torch.Generator().manual_seed(self.seed + 29)))
        call = list(self.args)
        call[p] = X[pick]
        plain = torch.cat([o.reshape(-1).to(torch.float64) for o in self.evaluate(call)])
        self.evaluations += 1
        batched = F[pick]
        eps = self.eps
        scale = torch.maximum(plain.abs(), batched.abs())
        both_finite = torch.isfinite(plain) & torch.isfinite(batched)
        if bool((torch.isfinite(plain) != torch.isfinite(batched)).any()) or \
                bool(((plain - batched).abs() > 64 * eps * (scale + 1e-300) * max(1, X[0].numel()) ** 0.5)
                     [both_finite].any()):
            raise BatchedDisagrees("the vmapped forward disagreed with a plain forward call")
        self._verified = True

    # --- joint directions over every input ---------------------------------------------------

    def _joint(self, directions: dict[int, torch.Tensor], sequence: int) -> tuple[dict[int, torch.Tensor], float]:
        """The direction projected onto each input's tangent space, and its first step."""
        eps = self.eps
        projected = {}
        for p, v in directions.items():
            v = v.to(torch.float64)
            tangent = self.tangents.get(p)
            projected[p] = tangent(self.args[p].detach().to(torch.float64), v) if tangent is not None else v
        mags, norms = [], []
        for p, v in projected.items():
            x = self.args[p].detach().to(torch.float64)
            rms = float(x.pow(2).mean().sqrt()) if x.numel() else 0.0
            mags.append(max(float(x.abs().max()) if x.numel() else 0.0, RELATIVE_FLOOR * rms) or 1.0)
            norms.append(float(v.abs().max()) if v.numel() else 0.0)
        v_norm = max(norms) or 1.0
        h = 2.0 ** round(math.log2(eps ** 0.2 * max(mags) / v_norm)) * (0.75 if sequence else 1.0)
        return projected, h

    def _joint_level(self, projected: dict[int, torch.Tensor]) -> LevelFn:
        def at(t: float) -> torch.Tensor:
            call = list(self.args)
            for p, v in projected.items():
                call[p] = (self.args[p].to(torch.float64) + t * v).to(self.args[p].dtype)
            self.evaluations += 1
            return torch.cat([o.reshape(-1).to(torch.float64) for o in self.evaluate(call)])

        def level(which: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            step = float(h.reshape(-1)[0])
            return at(step).unsqueeze(0), at(-step).unsqueeze(0)

        return level

    def directional(self, directions: dict[int, torch.Tensor], target: float | None = None,
                    sequence: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """d/dt f(x + t v) at t = 0 for a direction over every input, with error bars per output
        entry (plain calls). Holds a tableau per output entry: for large outputs use contracted."""
        target = self.target if target is None else target
        projected, h = self._joint(directions, sequence)
        f0 = self.f0_flat
        eps = self.eps

        def extract(plus: torch.Tensor, minus: torch.Tensor, which: torch.Tensor,
                    hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            dd, gap, floor = _differences(plus[0], minus[0], f0, hs.reshape(1)[0].reshape(1), eps)
            return dd, gap, floor, torch.ones_like(dd, dtype=torch.bool), _finite_abs_max(dd.unsqueeze(0), 1)

        owner = torch.zeros(int(f0.numel()), dtype=torch.long)
        best, err, _ = refine(self._joint_level(projected), extract, owner, 1, torch.tensor([h], dtype=torch.float64),
                              f0, eps, limits=None, target=target,
                              allowance=self.max_bytes // RELEASE_SHARE)
        estimates, bars = [], []
        offset = 0
        for f in self.f0:
            size = int(f.numel())
            estimates.append(best[offset:offset + size].reshape(f.shape))
            bars.append(err[offset:offset + size].reshape(f.shape))
            offset += size
        return tuple(estimates), tuple(bars)

    def contracted(self, directions: dict[int, torch.Tensor], cotangents: dict[int, torch.Tensor],
                   target: float | None = None, sequence: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """u_b . (J v) for a direction v over every input and cotangents u_b ({o: (B, *out.shape)}),
        with error bars: the tableau runs on the B scalars u_b . D(h), so memory stays a few
        outputs whatever their size. Each scalar's rounding bound is sum_i |u_bi| 4 eps |f_i| / h
        (the rounding of every output entry it sums), its scale for the convergence and kink
        tests sum_i |u_bi D_i| (the size of the terms, not of their possibly cancelled sum)."""
        target = self.target if target is None else target
        projected, h = self._joint(directions, sequence)
        f0 = self.f0_flat
        eps = self.eps
        batch = next(iter(cotangents.values())).shape[0]
        u = torch.zeros((batch, int(f0.numel())), dtype=torch.float64)
        for o, offset in self.row_offsets().items():
            if o in cotangents:
                size = self.out_sizes[self.out_positions.index(o)]
                u[:, offset:offset + size] = cotangents[o].reshape(batch, -1).to(torch.float64)
        u_abs = u.abs()
        f0_abs = f0.abs()

        def extract(plus: torch.Tensor, minus: torch.Tensor, which: torch.Tensor,
                    hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            # A few output-sized temporaries at a time (the outputs may be the size of the budget).
            step = float(hs.reshape(-1)[0])
            plus, minus = plus[0], minus[0]
            central = torch.sub(plus, minus).div_(2 * step)
            finite = bool(torch.isfinite(central).all())
            dd = u @ central if finite else torch.full((batch,), math.nan, dtype=torch.float64)
            if not finite:
                central.nan_to_num_(0.0, 0.0, 0.0)
            second = torch.add(plus, minus).sub_(f0, alpha=2)
            gap = (u @ second).abs_() / step
            del second
            bound = torch.maximum(plus.abs(), minus.abs())
            torch.maximum(bound, f0_abs, out=bound)
            floor = (u_abs @ bound) * (4 * eps / step)
            del bound
            size = (u_abs @ central.abs_()).amax().reshape(1)
            return dd, gap, floor, torch.ones_like(dd, dtype=torch.bool), size

        owner = torch.zeros(batch, dtype=torch.long)
        best, err, _ = refine(self._joint_level(projected), extract, owner, 1, torch.tensor([h], dtype=torch.float64),
                              f0, eps, limits=None, target=target,
                              allowance=self.max_bytes // RELEASE_SHARE)
        return best, err


def _differences(plus: torch.Tensor, minus: torch.Tensor, f0: torch.Tensor, h: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Central difference, one-sided gap |f+ + f- - 2 f0| / h and rounding 4 eps max|f| / h."""
    d = (plus - minus) / (2 * h)
    gap = (plus + minus - 2 * f0).abs() / h
    floor = 4 * eps * torch.maximum(torch.maximum(plus.abs(), minus.abs()), f0.abs()) / h
    return d, gap, floor
