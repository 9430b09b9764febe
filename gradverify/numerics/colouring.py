"""The second truth at the cost of a few directional differences: compressed finite differences.

An entry (i, j) of the analytic Jacobian A that disagrees with the reference R is judged only
with finite differences F at that entry (numerics.judge). One column of F costs 2 forward calls
per step level; a backward that is wrong everywhere (a missing term) puts a disagreement in
every column, and per-column differences then cost n times more than the check that passed.

Curtis, Powell and Reid (1974): columns that share no non-zero row can be perturbed together.
The pattern is the union of A's and R's non-zeros (R is the derivative where it is right, A
where R is not). Columns are coloured so that no two of one colour meet in a row holding an
entry under judgement (greedy, largest degree first, after merging rows with identical column
sets: structured Jacobians repeat a handful of them); one difference along

    d_g = sum_{j in g} c_j e_j,   c_j = w_j h_j / H_g

then reads entry (i, j) as F_g[i] / c_j. h_j is column j's own first step (from |x_j|), so each
column moves as far as it would alone (H_g = max h_j is the group's step; h_j / H_g is a power
of two); w_j is a random weight in [1/2, 1) with 7 significant bits, so x + h d stays exact and
no two columns can cancel each other by a structural coincidence (equal and opposite entries).

The pattern is a guess where A and R are both zero but the truth is not. Each group's estimate
is therefore guarded against the reference: F_g[i] must equal sum_{j in g} c_j R[i, j] = c_j
R[i, j] within the entry's tolerance and the bar. An entry is settled from its group only when
(1) the guard holds and (2) A is farther from F than its tolerance, its bar *and* everything the
guard lets through (so a contamination the guard cannot see cannot change the verdict); every
other entry -- F siding with A (R wrong there), a failed guard (the sparsity was wrong), a kink,
a bar too wide, a verdict too close -- gets its own column of finite differences, exactly as the
exhaustive path computes it. Compression can therefore only confirm accusations the per-column
path makes too; it never excuses, and it never accuses what the per-column path would not.

The differences refine only while a judged entry is undecided: each entry's bar target is a
quarter of its disagreement beyond the tolerance (numerics.finite_diff: `limits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradverify.numerics import judge
from gradverify.numerics.finite_diff import FiniteDifferences, unit_steps
from gradverify.numerics.tolerance import Tolerance

# Switch for the exhaustive path (every judged column differenced on its own). Tests compare the
# two; nothing else turns it off.
ENABLED = True
# Colouring is a Python loop over the pattern's (row, column) pairs after identical rows are
# merged (~0.5 us a pair): beyond this many, the pattern is too irregular for compression to
# pay for its colouring, and columns are differenced one by one.
MAX_COLOURING_PAIRS = 2_000_000
# Columns the cross-check differences one by one at most per input and comparison (each is a
# directional derivative per step level over every output): beyond this, a seeded sample of
# them is differenced and the count of mismatches is a lower bound. Groups do not count.
MAX_CONFIRM_COLUMNS = 4096
# Compress only where it saves at least half the directions.
MIN_SAVING = 2.0
# Weights w_j = s (64 + k) / 128, k uniform in 0..63, s a random sign: 7 significant bits, so
# w_j h x-steps stay exact in any float format with at least 8 bits of mantissa beyond h.
WEIGHT_BITS = 6
# Working bytes per judged entry while its group is read: the group estimate, bar, coefficient,
# both allowances, the gap and five masks, and the tableau's per-entry share in finite_diff.
ENTRY_WORK = 160
# The bar an entry's differences must reach: a quarter of its disagreement beyond the tolerance
# (|A - R| - allowed). Either verdict is then decided with room to spare: MISMATCH needs
# |A - F| > allowed + bar, EXCUSED needs bar < |A - R| - allowed.
DECISIVE_SHARE = 0.25


@dataclass
class Judged:
    """Entries of one input's columns under judgement. rows: stacked output rows
    (FiniteDifferences.row_offsets), cols: flat input indices; a, t: analytic and reference;
    scale: the row scale; slack: the dtype slack (checks/jacobian.SLACK_FACTOR) or None."""

    rows: torch.Tensor
    cols: torch.Tensor
    a: torch.Tensor
    t: torch.Tensor
    scale: torch.Tensor
    slack: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.rows.numel())


@dataclass
class SecondTruth:
    """Finite differences at each judged entry; `computed` is False where the budget stopped
    (a sample of columns was differenced: verdicts there are unknown, counts a lower bound)."""

    values: torch.Tensor
    bars: torch.Tensor
    kinks: torch.Tensor
    computed: torch.Tensor
    groups: int = 0
    grouped_columns: int = 0
    settled_by_groups: int = 0
    direct_columns: int = 0
    evaluations: int = 0
    sampled: bool = False

    @property
    def columns(self) -> int:
        """Directions differenced: one per group plus one per column done alone."""
        return self.groups + self.direct_columns

    def describe(self) -> str:
        parts = []
        if self.groups:
            parts.append(f"{self.grouped_columns} columns compressed into {self.groups} groups (settling "
                         f"{self.settled_by_groups} entries)")
        if self.direct_columns or not self.groups:
            parts.append(f"{self.direct_columns} column{'s' if self.direct_columns != 1 else ''} one by one")
        text = "; ".join(parts) + f"; {self.evaluations} forward evaluations"
        return text + ("; a sample of the columns (budget)" if self.sampled else "")


def colour_columns(rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor | None:
    """Colours for columns 0..n_cols-1 such that no two columns of one colour share a row of the
    pattern (pairs rows[k], cols[k]); None when the pattern is too irregular to colour cheaply."""
    colours = torch.zeros(n_cols, dtype=torch.long)
    if not rows.numel() or n_cols <= 1:
        return colours
    rows = rows.to(torch.long)
    cols = cols.to(torch.long)
    key = torch.unique(rows * n_cols + cols)  # sorted: row-major, duplicates gone
    rows, cols = key // n_cols, key % n_cols
    row_ids, row_of, degree = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
    # A row with a single column constrains nothing.
    keep = degree[row_of] >= 2
    rows, cols, row_of = rows[keep], cols[keep], row_of[keep]
    if not rows.numel():
        return colours
    # Rows with identical column sets constrain identically: keep one of each (two independent
    # 40-bit hashes of the set and its size; a collision could only drop a constraint, which
    # the guard against the reference then catches).
    gen = torch.Generator().manual_seed(12345)
    w1 = torch.randint(0, 2**40, (n_cols,), generator=gen, dtype=torch.long)
    w2 = torch.randint(0, 2**40, (n_cols,), generator=gen, dtype=torch.long)
    n_rows = int(row_ids.numel())
    h1 = torch.zeros(n_rows, dtype=torch.long).index_add_(0, row_of, w1[cols])
    h2 = torch.zeros(n_rows, dtype=torch.long).index_add_(0, row_of, w2[cols])
    size = torch.zeros(n_rows, dtype=torch.long).index_add_(0, row_of, torch.ones_like(cols))
    present = size > 0
    signature = torch.stack([size, h1, h2], dim=1)
    _, first_of = torch.unique(signature[present], dim=0, return_inverse=True)
    present_ids = torch.nonzero(present).reshape(-1)
    representative = torch.full((int(first_of.max()) + 1,), n_rows, dtype=torch.long)
    representative.scatter_reduce_(0, first_of, present_ids, reduce="amin")
    chosen = torch.zeros(n_rows, dtype=torch.bool)
    chosen[representative] = True
    pick = chosen[row_of]
    rows, cols, row_of = rows[pick], cols[pick], row_of[pick]
    if rows.numel() > MAX_COLOURING_PAIRS:
        return None
    # Greedy colouring, columns by decreasing degree: each takes the smallest colour none of its
    # rows has used yet (bit sets per row as Python ints).
    by_col = torch.argsort(cols, stable=True)
    col_sorted = cols[by_col]
    row_sorted = row_of[by_col].tolist()
    counts = torch.bincount(col_sorted, minlength=n_cols)
    starts = [0] + torch.cumsum(counts, 0).tolist()
    used = [0] * n_rows
    result = [0] * n_cols
    for c in torch.argsort(counts, descending=True, stable=True).tolist():
        lo, hi = starts[c], starts[c + 1]
        if lo == hi:
            continue
        segment = row_sorted[lo:hi]
        taken = 0
        for r in segment:
            taken |= used[r]
        colour = (~taken & (taken + 1)).bit_length() - 1
        bit = 1 << colour
        for r in segment:
            used[r] |= bit
        result[c] = colour
    return torch.tensor(result, dtype=torch.long)


def _weights(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 5381)
    magnitude = (2**WEIGHT_BITS + torch.randint(0, 2**WEIGHT_BITS, (count,), generator=gen)).to(torch.float64)
    sign = torch.randint(0, 2, (count,), generator=gen).to(torch.float64) * 2 - 1
    return sign * magnitude / 2 ** (WEIGHT_BITS + 1)


def _limits(judged: Judged, tolerance: Tolerance, target: float) -> torch.Tensor:
    """Each entry's bar target: a share of its disagreement beyond the tolerance, never finer
    than the differences' own relative target."""
    a, t = judged.a, judged.t
    gap = torch.where(torch.isfinite(a), (a - t).abs(), torch.full_like(a, math.inf))
    beyond = gap - judge.allowed(t, judged.scale, tolerance, judged.slack)
    return torch.maximum(DECISIVE_SHARE * beyond.clamp_min(0), target * t.abs())


def second_truth(fd: FiniteDifferences, p: int, judged: Judged, tolerance: Tolerance, *,
                 pattern: tuple[torch.Tensor, torch.Tensor] | None, max_columns: int,
                 seed: int = 0) -> SecondTruth:
    """Finite differences at every judged entry of input p: compressed groups where the pattern
    allows and the guard holds, one column at a time elsewhere (at most `max_columns` columns:
    beyond, a seeded sample, and `sampled`). pattern: (stacked rows, flat cols) of A's or R's
    non-zeros at the rows holding judged entries (None: no compression)."""
    count = judged.count
    values = torch.full((count,), math.nan, dtype=torch.float64)
    bars = torch.full((count,), math.inf, dtype=torch.float64)
    kinks = torch.zeros(count, dtype=torch.bool)
    computed = torch.zeros(count, dtype=torch.bool)
    result = SecondTruth(values, bars, kinks, computed)
    if not count:
        return result
    before = fd.evaluations
    limits = _limits(judged, tolerance, fd.target)
    unique_cols, inverse = torch.unique(judged.cols, return_inverse=True)
    pending = torch.ones(count, dtype=torch.bool)
    if ENABLED and pattern is not None and p not in fd.tangents and unique_cols.numel() >= 2:
        _grouped(fd, p, judged, tolerance, pattern, unique_cols, inverse, limits, seed, result, pending)
    direct = torch.unique(judged.cols[pending])
    if direct.numel() > max_columns:
        gen = torch.Generator().manual_seed(seed + 71)
        direct = torch.sort(direct[torch.randperm(int(direct.numel()), generator=gen)[:max_columns]]).values
        result.sampled = True
    if direct.numel():
        _direct(fd, p, judged, direct, pending, limits, result)
    result.direct_columns = int(direct.numel())
    result.evaluations = fd.evaluations - before
    return result


def _grouped(fd: FiniteDifferences, p: int, judged: Judged, tolerance: Tolerance,
             pattern: tuple[torch.Tensor, torch.Tensor], unique_cols: torch.Tensor, inverse: torch.Tensor,
             limits: torch.Tensor, seed: int, result: SecondTruth, pending: torch.Tensor) -> None:
    """Difference the columns in colour groups; settle the entries the group reading decides."""
    n_cols = int(unique_cols.numel())
    p_rows, p_cols = pattern
    # The pattern at the judged columns (it holds the judged entries themselves: A or R is
    # non-zero wherever they disagree; a caller may give one row per distinct column set).
    where = torch.searchsorted(unique_cols, p_cols.to(torch.long))
    inside = (where < n_cols) & (unique_cols[where.clamp_max(n_cols - 1)] == p_cols.to(torch.long))
    colours = colour_columns(p_rows.to(torch.long)[inside], where[inside], n_cols)
    del where, inside
    if colours is None:
        return
    n_groups = int(colours.max()) + 1
    if n_groups * MIN_SAVING > n_cols:
        return
    x = fd.args[p]
    steps = unit_steps(x, unique_cols)
    group_step = torch.zeros(n_groups, dtype=torch.float64).scatter_reduce_(0, colours, steps, reduce="amax")
    coefficient = _weights(n_cols, seed) * steps / group_step[colours]
    n = x.numel()
    owner = colours[inverse]
    # Directions are built a batch of groups at a time: a (groups, n) tensor within an eighth of
    # the budget, and at most as many judged entries as an eighth of the budget holds at
    # ENTRY_WORK bytes each (their group readings, bars, allowances, masks).
    batch = max(1, min(n_groups, fd.max_bytes // (8 * 8 * max(1, n)),
                       n_groups * max(1, fd.max_bytes // 8 // ENTRY_WORK) // max(1, judged.count)))
    order = torch.argsort(owner, stable=True)
    bounds = torch.searchsorted(owner[order], torch.arange(0, n_groups + 1))
    by_group = torch.argsort(colours, stable=True)
    group_bounds = torch.searchsorted(colours[by_group], torch.arange(0, n_groups + 1))
    for g0 in range(0, n_groups, batch):
        g1 = min(n_groups, g0 + batch)
        lo, hi = int(bounds[g0]), int(bounds[g1])
        if lo == hi:
            continue
        D = torch.zeros((g1 - g0, n), dtype=torch.float64)
        members = by_group[int(group_bounds[g0]):int(group_bounds[g1])]
        D[colours[members] - g0, unique_cols[members]] = coefficient[members]
        pick = order[lo:hi]
        c = coefficient[inverse[pick]]
        got = fd.entries(p, D, owner[pick] - g0, judged.rows[pick], steps=group_step[g0:g1],
                         limits=limits[pick] * c.abs())
        del D
        f = got.values / c
        bar = got.bars / c.abs()
        kink = got.kinks
        a, t, scale = judged.a[pick], judged.t[pick], judged.scale[pick]
        slack = judged.slack[pick] if judged.slack is not None else None
        allow_t = judge.allowed(t, scale, tolerance, slack)
        allow_f = judge.allowed(f, scale, tolerance, slack)
        usable = torch.isfinite(f) & torch.isfinite(bar) & ~kink
        guard = usable & ((f - t).abs() <= allow_t + bar)
        gap = torch.where(torch.isfinite(a), (a - f).abs(), torch.full_like(a, math.inf))
        clear = guard & (gap > allow_f + bar + allow_t + bar)
        settled = pick[clear]
        result.values[settled] = f[clear]
        result.bars[settled] = bar[clear]
        result.kinks[settled] = kink[clear]
        result.computed[settled] = True
        pending[settled] = False
    result.groups = n_groups
    result.grouped_columns = n_cols
    result.settled_by_groups = int((~pending).sum())


def _direct(fd: FiniteDifferences, p: int, judged: Judged, direct: torch.Tensor, pending: torch.Tensor,
            limits: torch.Tensor, result: SecondTruth) -> None:
    """One column at a time (unit directions, or their tangent projections), at the pending
    entries of the chosen columns only."""
    n = fd.args[p].numel()
    where = torch.searchsorted(direct, judged.cols)
    hit = pending & (where < direct.numel()) & (direct[where.clamp_max(max(0, direct.numel() - 1))] == judged.cols)
    idx = torch.nonzero(hit).reshape(-1)
    local = where[idx]
    order = torch.argsort(local, stable=True)
    idx, local = idx[order], local[order]
    total = int(direct.numel())
    batch = max(1, fd.max_bytes // (8 * 8 * max(1, n)))
    starts = list(range(0, total, batch))
    bounds = torch.searchsorted(local, torch.tensor(starts + [total], dtype=torch.long)).tolist()
    for k, c0 in enumerate(starts):
        c1 = min(total, c0 + batch)
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        D = fd.unit_directions(p, direct[c0:c1])
        steps = None if p in fd.tangents else unit_steps(fd.args[p], direct[c0:c1])
        pick = idx[lo:hi]
        got = fd.entries(p, D, local[lo:hi] - c0, judged.rows[pick], steps=steps, limits=limits[pick])
        del D
        result.values[pick] = got.values
        result.bars[pick] = got.bars
        result.kinks[pick] = got.kinks
        result.computed[pick] = True
