"""Finite differences: the truth that needs nothing but the op's forward.

Every estimate is a central difference D(h) = (f(x + h d) - f(x - h d)) / 2h along a direction
d (a unit vector e_j for a Jacobian column; its tangent-space projection for a constrained
input; a random vector for a probe; a sum of columns for a compressed group), refined in a
Richardson (Neville) tableau over the steps h, h/2, h/4, ...:

    T[0][l] = D(h / 2^l),   T[m][l] = (4^m T[m-1][l] - T[m-1][l-1]) / (4^m - 1)

Each T[m][l] (m >= 1) carries an error estimate, the larger of its differences to the two
entries it was built from plus the rounding of f at that step (4 eps |f| / h_l); per entry the
estimate with the smallest error wins, and that error is its bar. Levels are added only where
an entry's bar is still above the target the caller asks for (MAX_LEVELS at most): the usual
function converges at three levels, one that varies faster than the first step takes more,
and one that never settles (a kink, a function the steps cannot resolve) keeps a large bar,
which the comparison then reads as "not judged" instead of inventing a verdict.

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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from gradverify.numerics.forward import BatchedEvaluator, Evaluator
from gradverify.numerics.vjp import CHUNK_TARGET_BYTES, WORKSPACE_FACTOR, BatchedDisagrees
from gradverify.usercode import UserCodeError

Tangent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

START_LEVELS = 4
MAX_LEVELS = 10
# The second, independent step sequence starts at this fraction of the first one's step.
SECOND_SEQUENCE = 2 ** -0.5
SHRINK = 8.0
MAX_SHRINKS = 6
# Floor of the first step, relative to the tensor's rms, for entries at or near zero.
RELATIVE_FLOOR = 1e-3


@dataclass
class Columns:
    """Derivatives along k directions of one input: per output o, (out.numel(), k) tensors."""

    estimates: dict[int, torch.Tensor]
    bars: dict[int, torch.Tensor]
    kinks: dict[int, torch.Tensor]
    evaluations: int = 0


@dataclass
class _Table:
    """One chunk's tableau: per level a (k, M) tensor of central differences (NaN for directions
    not refined at that level) and their rounding; per direction its last three central
    differences and last two one-sided gaps (for the convergence and kink tests)."""

    d: list[torch.Tensor] = field(default_factory=list)
    floor: list[torch.Tensor] = field(default_factory=list)
    recent: list[torch.Tensor] = field(default_factory=list)  # [D_L, D_L-1, D_L-2] per direction
    last_gap: torch.Tensor | None = None
    prev_gap: torch.Tensor | None = None
    last_floor: torch.Tensor | None = None
    # The best (estimate, bar) per entry among the levels at which its differences behaved
    # asymptotically (see `note_level`); bar inf where they never did.
    good_best: torch.Tensor | None = None
    good_err: torch.Tensor | None = None


def first_steps(x: torch.Tensor, directions: torch.Tensor, sequence: int = 0) -> torch.Tensor:
    """The first step for each direction (rows of `directions`, flattened like x).

    sequence 1 starts at 1/sqrt(2) of sequence 0's step: its steps fall halfway (geometrically)
    between the first sequence's, so an estimate that only looks converged by aliasing (steps
    resonating with an oscillation, sin(1e5 x)) does not reproduce from both."""
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps
    flat = x.detach().reshape(-1).abs().to(torch.float64)
    rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0
    typical = rms if rms > 0 else 1.0
    d = directions.abs().to(torch.float64)
    support = d > 0
    # The magnitude of x over each direction's support.
    mag = torch.where(support, flat.unsqueeze(0).expand_as(d), torch.zeros_like(d)).amax(dim=1)
    mag = torch.clamp(mag, min=RELATIVE_FLOOR * typical)
    d_norm = d.amax(dim=1).clamp_min(1e-300)
    raw = eps ** 0.2 * mag / d_norm
    return torch.exp2(torch.round(torch.log2(raw))) * (SECOND_SEQUENCE if sequence else 1.0)


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


def add_level(table: _Table, plus: torch.Tensor, minus: torch.Tensor, f0: torch.Tensor, h: torch.Tensor,
              eps: float, active: torch.Tensor | None) -> None:
    """Append one level (f(x + h d), f(x - h d) for each direction; NaN rows where not refined)."""
    hh = h.reshape(-1, 1)
    d = (plus - minus) / (2 * hh)
    gap = (plus + minus - 2 * f0.unsqueeze(0)).abs() / hh
    scale = torch.maximum(torch.maximum(plus.abs(), minus.abs()), f0.abs().unsqueeze(0))
    floor = 4 * eps * scale / hh
    table.d.append(d)
    table.floor.append(floor)
    if table.last_gap is None:
        table.last_gap, table.last_floor, table.recent = gap, floor, [d]
        return
    mask = torch.ones(d.shape[0], dtype=torch.bool)
    if active is not None:
        mask = torch.zeros(d.shape[0], dtype=torch.bool)
        mask[active] = True
    m = mask.reshape(-1, 1)
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
    differ by less than sqrt(eps)/16 of the column's scale -- rounding, including the rounding
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
    column = finite.amax(dim=1, keepdim=True)
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
    resolved = ((table.last_gap <= 0.5 * size) | halving | (table.last_gap <= 16 * table.last_floor))
    return behaves & resolved


def kinks_of(table: _Table, best: torch.Tensor) -> torch.Tensor:
    """A kink: the one-sided gap does not shrink when h halves (0.75 allows for a curvature term),
    is not a 1e-6 relative wobble, and stands well above rounding."""
    if table.prev_gap is None or table.last_gap is None or table.last_floor is None:
        return torch.zeros_like(best, dtype=torch.bool)
    scale = best.abs().amax(dim=1, keepdim=True)
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


class FiniteDifferences:
    """Directional derivatives of the op's outputs at fixed (float64 where possible) inputs.

    columns(p, cols): the Jacobian columns of input p (projected onto its tangent space for a
    constrained input), memoised, batched over perturbations where the forward body allows
    (vmap, checked against plain calls once), else plain calls.
    directions(p, D): the same along arbitrary directions (rows of D), e.g. compressed groups.
    directional({p: v}): J v along a joint direction over every input (probes, validation).
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

    @property
    def path(self) -> str:
        return "batched" if self.batched is not None else "loop"

    @property
    def dtype(self) -> torch.dtype:
        return next((a.dtype for a in self.args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                    torch.float64)

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
        if todo:
            todo_t = torch.tensor(sorted(set(todo)), dtype=torch.long)
            fresh = self.directions(p, self.unit_directions(p, todo_t), sequence=sequence)
            stacked_e = torch.cat([fresh.estimates[o] for o in self.out_positions], dim=0)
            stacked_b = torch.cat([fresh.bars[o] for o in self.out_positions], dim=0)
            stacked_k = torch.cat([fresh.kinks[o] for o in self.out_positions], dim=0)
            per_column = 2 * 8 * stacked_e.shape[0] + stacked_e.shape[0]
            for k, c in enumerate(todo_t.tolist()):
                if self._memo_bytes + per_column > self.max_bytes // 4:
                    break  # beyond a quarter of the budget, columns are recomputed when asked again
                self._memo[(p, c, sequence)] = (stacked_e[:, k].clone(), stacked_b[:, k].clone(),
                                                stacked_k[:, k].clone())
                self._memo_bytes += per_column
            fresh_index = {c: k for k, c in enumerate(todo_t.tolist())}
        else:
            fresh_index = {}
            stacked_e = stacked_b = stacked_k = torch.zeros(0)
        est_cols, bar_cols, kink_cols = [], [], []
        for c in cols.tolist():
            if (p, c, sequence) in self._memo:
                e, b, k = self._memo[(p, c, sequence)]
            else:
                idx = fresh_index[c]
                e, b, k = stacked_e[:, idx], stacked_b[:, idx], stacked_k[:, idx]
            est_cols.append(e)
            bar_cols.append(b)
            kink_cols.append(k)
        return self._split(est_cols, bar_cols, kink_cols, self.evaluations - before)

    def _split(self, est_cols: list[torch.Tensor], bar_cols: list[torch.Tensor], kink_cols: list[torch.Tensor],
               evaluations: int) -> Columns:
        m_total = sum(self.out_sizes)
        e = torch.stack(est_cols, dim=1) if est_cols else torch.zeros((m_total, 0), dtype=torch.float64)
        b = torch.stack(bar_cols, dim=1) if bar_cols else torch.zeros((m_total, 0), dtype=torch.float64)
        k = torch.stack(kink_cols, dim=1) if kink_cols else torch.zeros((m_total, 0), dtype=torch.bool)
        estimates, bars, kinks = {}, {}, {}
        offset = 0
        for o, size in zip(self.out_positions, self.out_sizes):
            estimates[o] = e[offset:offset + size]
            bars[o] = b[offset:offset + size]
            kinks[o] = k[offset:offset + size]
            offset += size
        return Columns(estimates, bars, kinks, evaluations)

    def directions(self, p: int, directions: torch.Tensor, target: float | None = None,
                   sequence: int = 0) -> Columns:
        """Derivatives of every output along each row of `directions` ((k, n), flattened like x)."""
        x = self.args[p]
        k_total = int(directions.shape[0])
        m_total = sum(self.out_sizes)
        chunk = self._chunk(x.numel(), m_total, x.element_size())
        target = self.target if target is None else target
        parts_e, parts_b, parts_k = [], [], []
        before = self.evaluations
        for start in range(0, k_total, chunk):
            d = directions[start:start + chunk]
            est, bar, kink = self._directions_chunk(p, d, target, sequence)
            parts_e.append(est.T)
            parts_b.append(bar.T)
            parts_k.append(kink.T)
        e = torch.cat(parts_e, dim=1) if parts_e else torch.zeros((m_total, 0), dtype=torch.float64)
        b = torch.cat(parts_b, dim=1) if parts_b else torch.zeros((m_total, 0), dtype=torch.float64)
        kk = torch.cat(parts_k, dim=1) if parts_k else torch.zeros((m_total, 0), dtype=torch.bool)
        return self._split(list(e.T), list(b.T), list(kk.T), self.evaluations - before)

    def _chunk(self, n: int, m_total: int, itemsize: int) -> int:
        # Per direction and level: 2 perturbed copies of the input and 2 outputs, plus the
        # tableau (a few (k, M) tensors); bounded by the chunk target and by the budget.
        per_dir = 2 * max(1, n + m_total) * max(8, itemsize) + 8 * MAX_LEVELS * max(1, m_total)
        cols = max(8, CHUNK_TARGET_BYTES // per_dir)
        cols = min(cols, max(1, self.max_bytes // (per_dir * WORKSPACE_FACTOR)))
        return max(1, cols)

    # --- the adaptive tableau for one chunk of directions ------------------------------------

    def _directions_chunk(self, p: int, d: torch.Tensor, target: float,
                          sequence: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.args[p]
        k = int(d.shape[0])
        steps = first_steps(x, d, sequence)
        f0 = torch.cat([f.reshape(-1).to(torch.float64) for f in self.f0])
        eps = torch.finfo(self.dtype).eps
        # Shrink where a step leaves the domain: re-evaluate the first level for those directions.
        plus, minus = self._evaluate_level(p, d, steps)
        for _ in range(MAX_SHRINKS):
            bad = ~(torch.isfinite(plus) & torch.isfinite(minus)) & torch.isfinite(f0).unsqueeze(0)
            rows = bad.any(dim=1)
            if not bool(rows.any()):
                break
            steps = torch.where(rows, steps / SHRINK, steps)
            idx = torch.nonzero(rows).reshape(-1)
            p2, m2 = self._evaluate_level(p, d[idx], steps[idx])
            plus[idx], minus[idx] = p2, m2
        table = _Table()
        add_level(table, plus, minus, f0, steps, eps, None)
        for level in range(1, MAX_LEVELS):
            h = steps / (2.0 ** level)
            active = None
            if level >= 3:
                best, err = note_level(table, eps)
            if level >= START_LEVELS:
                scale = best.abs().amax(dim=1, keepdim=True)
                limit = target * torch.maximum(best.abs(), 1e-2 * scale)
                unsettled = (~(err <= limit)).any(dim=1)  # inf bar: never behaved yet
                if not bool(unsettled.any()):
                    break
                active = torch.nonzero(unsettled).reshape(-1)
            if active is None or active.numel() == k:
                plus, minus = self._evaluate_level(p, d, h)
                add_level(table, plus, minus, f0, h, eps, None)
            else:
                p2, m2 = self._evaluate_level(p, d[active], h[active])
                plus = torch.full((k, p2.shape[1]), math.nan, dtype=torch.float64)
                minus = torch.full_like(plus, math.nan)
                plus[active], minus[active] = p2, m2
                add_level(table, plus, minus, f0, h, eps, active)
        return finish(table, eps)

    def _evaluate_level(self, p: int, d: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x + h d) and f(x - h d) for each row of d: two (k, M) tensors (outputs flattened)."""
        x = self.args[p]
        k = int(d.shape[0])
        flat = x.detach().reshape(-1)
        delta = (h.reshape(-1, 1) * d).to(flat.dtype)
        X = torch.cat([flat.unsqueeze(0) + delta, flat.unsqueeze(0) - delta]).reshape(2 * k, *x.shape)
        if self.batched is not None:
            try:
                outs = self.batched(self.args, p, X)
                F = torch.cat([o.reshape(2 * k, -1).to(torch.float64) for o in outs], dim=1)
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
        rows = []
        for b in range(2 * k):
            call = list(self.args)
            call[p] = X[b]
            outs = self.evaluate(call)
            rows.append(torch.cat([o.reshape(-1).to(torch.float64) for o in outs]))
        self.evaluations += 2 * k
        F = torch.stack(rows) if rows else torch.zeros((0, sum(self.out_sizes)), dtype=torch.float64)
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
        eps = torch.finfo(self.dtype).eps
        scale = torch.maximum(plain.abs(), batched.abs())
        both_finite = torch.isfinite(plain) & torch.isfinite(batched)
        if bool((torch.isfinite(plain) != torch.isfinite(batched)).any()) or \
                bool(((plain - batched).abs() > 64 * eps * (scale + 1e-300) * max(1, X[0].numel()) ** 0.5)
                     [both_finite].any()):
            raise BatchedDisagrees("the vmapped forward disagreed with a plain forward call")
        self._verified = True

    # --- joint directions over every input ---------------------------------------------------

    def directional(self, directions: dict[int, torch.Tensor], target: float | None = None,
                    sequence: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """d/dt f(x + t v) at t = 0 for a direction over every input, with error bars (plain calls)."""
        target = self.target if target is None else target
        eps = torch.finfo(self.dtype).eps
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
        scale = eps ** 0.2 * max(mags) / v_norm
        if not (math.isfinite(scale) and scale > 0):
            # A direction or an input that is not finite (NaN where the op is undefined): no
            # derivative along it, and no bar.
            nan = tuple(torch.full_like(f, math.nan, dtype=torch.float64) for f in self.f0)
            return nan, tuple(torch.full_like(f, math.inf, dtype=torch.float64) for f in self.f0)
        h = 2.0 ** round(math.log2(scale)) * (SECOND_SEQUENCE if sequence else 1.0)
        f0 = torch.cat([f.reshape(-1).to(torch.float64) for f in self.f0])

        def at(t: float) -> torch.Tensor:
            call = list(self.args)
            for p, v in projected.items():
                call[p] = (self.args[p].to(torch.float64) + t * v).to(self.args[p].dtype)
            self.evaluations += 1
            return torch.cat([o.reshape(-1).to(torch.float64) for o in self.evaluate(call)])

        plus, minus = at(h), at(-h)
        for _ in range(MAX_SHRINKS):
            if bool((torch.isfinite(plus) & torch.isfinite(minus) | ~torch.isfinite(f0)).all()):
                break
            h /= SHRINK
            plus, minus = at(h), at(-h)
        table = _Table()
        steps = torch.tensor([h], dtype=torch.float64)
        add_level(table, plus.unsqueeze(0), minus.unsqueeze(0), f0, steps, eps, None)
        for level in range(1, MAX_LEVELS):
            if level >= 3:
                best, err = note_level(table, eps)
            if level >= START_LEVELS:
                scale = best.abs().amax(dim=1, keepdim=True)
                if not bool((~(err <= target * torch.maximum(best.abs(), 1e-2 * scale))).any()):
                    break
            hl = h / 2.0 ** level
            add_level(table, at(hl).unsqueeze(0), at(-hl).unsqueeze(0), f0, steps / 2.0 ** level, eps, None)
        best, err, kink = finish(table, eps)
        estimates, bars = [], []
        offset = 0
        for f in self.f0:
            size = int(f.numel())
            estimates.append(best[0, offset:offset + size].reshape(f.shape))
            bars.append(err[0, offset:offset + size].reshape(f.shape))
            offset += size
        return tuple(estimates), tuple(bars)
