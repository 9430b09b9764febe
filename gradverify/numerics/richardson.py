"""The Richardson tableau behind every finite difference, on flat entries.

An entry is one output row read along one direction. Per step level it holds the central
difference D(h) = (f(x + h d) - f(x - h d)) / 2h, the one-sided gap |f+ + f- - 2 f0| / h and the
rounding bound 4 eps max|f| / h; Neville's tableau over h, h/2, h/4, ... gives each entry its best
estimate and an error bar (numerics.finite_diff explains the choices). `refine` adds levels only
for the directions that own an entry not settled yet: the same code serves whole Jacobian
columns, the judged entries of compressed groups, and projections contracted with a cotangent.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

START_LEVELS = 4
MAX_LEVELS = 10
SHRINK = 8.0
MAX_SHRINKS = 6


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
    # The best (estimate, bar) per entry among the levels at which its differences behaved
    # asymptotically (see `note_level`); bar inf where they never did.
    good_best: torch.Tensor | None = None
    good_err: torch.Tensor | None = None


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
    size = torch.maximum(finite, column)
    settled = newer <= (eps ** 0.5 / 16) * size
    # In the h^2 regime successive differences shrink by 4 when h halves; before it (or under
    # aliasing) the ratio wanders. A window around 4 rather than "shrinks at all".
    behaves = ((newer >= older / 6) & (newer <= older / 2.5)) | (newer <= 4 * table.last_floor) | settled
    # Resolved: the step is small against the scale the function varies on. The one-sided gap
    # |f(x+h) + f(x-h) - 2 f(x)| / h is ~|f''| h; for sin(k x) it is ~k h |f'|, and Richardson
    # is accurate once k h < 1 -- so the gap must stay below half the derivative's size, or
    # shrink with h (a smooth point where f' = 0: x**2 at 0), or sit at rounding. A function
    # oscillating many times within the step (sin(1e5 x) with h ~ 7e-4) fails all three, even
    # where its central differences happen to look converged (aliasing).
    assert table.last_gap is not None
    prev_gap = table.prev_gap if table.prev_gap is not None else table.last_gap
    halving = (table.last_gap >= 0.35 * prev_gap) & (table.last_gap <= 0.65 * prev_gap)
    resolved = (table.last_gap <= 0.5 * size) | halving | (table.last_gap <= 16 * table.last_floor)
    return behaves & resolved


def kinks_of(table: _Table, best: torch.Tensor) -> torch.Tensor:
    """A kink: the one-sided gap does not shrink when h halves (0.75 allows for a curvature term),
    is not a 1e-6 relative wobble, and stands well above rounding."""
    if table.prev_gap is None or table.last_gap is None or table.last_floor is None:
        return torch.zeros_like(best, dtype=torch.bool)
    scale = table.col_scale[table.owner]
    return (table.last_gap > 0.75 * table.prev_gap) & \
        (table.last_gap > 1e-6 * torch.maximum(best.abs(), scale)) & (table.last_gap > 16 * table.last_floor)


def note_level(table: _Table, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """After each level: keep, per entry, the tableau's best estimate and bar from a level at
    which the entry's differences behaved asymptotically (the smallest such bar so far).

    Judging only the finest levels is wrong where refinement went on past the good steps: a
    forward that cancels (y = a.x with terms of 0.3 summing to 0.003) has rounding far above
    the 4 eps |f| / h floor, so at small h its differences wander although they were settled at
    larger h, and an entry that was right at level 3 would end with no bar. Returns the kept
    (estimate, bar), bar inf where no level behaved yet."""
    best, err = _tableau(table)
    if table.good_best is None or table.good_err is None:
        table.good_best = best.clone()
        table.good_err = torch.full_like(err, math.inf)
    ok = asymptotic(table, eps) & (err < table.good_err)
    table.good_best = torch.where(ok, best, table.good_best)
    table.good_err = torch.where(ok, err, table.good_err)
    return table.good_best, table.good_err


def finish(table: _Table, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best estimate, error bar and kink flag per entry once refinement stopped."""
    best, err = note_level(table, eps)
    kink = kinks_of(table, best)
    if table.last_gap is not None and table.prev_gap is not None:
        # At a kink the derivative is any value between the one-sided slopes; a kinked entry
        # never behaved asymptotically, so its estimate is the tableau's latest best.
        latest, latest_err = _tableau(table)
        widened = torch.maximum(latest_err, table.last_gap + table.prev_gap)
        best = torch.where(kink, latest, best)
        err = torch.where(kink, widened, err)
    return best, err, kink


def finite_abs_max(values: torch.Tensor, dim: int) -> torch.Tensor:
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
        if depth >= 3:
            best, err = note_level(table, eps)
        if depth >= START_LEVELS:
            if limits is None:
                limit = target * torch.maximum(best.abs(), 1e-2 * table.col_scale[owner])
            else:
                limit = limits
            unsettled = ~(err <= limit)  # inf bar: never behaved yet
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


def differences(plus: torch.Tensor, minus: torch.Tensor, f0: torch.Tensor, h: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Central difference, one-sided gap |f+ + f- - 2 f0| / h and rounding 4 eps max|f| / h."""
    d = (plus - minus) / (2 * h)
    gap = (plus + minus - 2 * f0).abs() / h
    floor = 4 * eps * torch.maximum(torch.maximum(plus.abs(), minus.abs()), f0.abs()) / h
    return d, gap, floor


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
