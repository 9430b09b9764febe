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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradverify.numerics.forward import BatchedEvaluator, Evaluator
from gradverify.numerics.richardson import (
    MAX_LEVELS,
    RELEASE_SHARE,
    START_LEVELS,
    LevelFn,
    differences,
    finite_abs_max,
    refine,
)
from gradverify.numerics.vjp import (
    CHUNK_TARGET_BYTES,
    WORKSPACE_FACTOR,
    BatchedDisagrees,
)
from gradverify.usercode import UserCodeError

Tangent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Floor of the first step, relative to the tensor's rms, for entries at or near zero.
RELATIVE_FLOOR = 1e-3
# The second, independent step sequence starts at this fraction of the first one's step.
SECOND_SEQUENCE = 2 ** -0.5
# One batch of perturbed evaluations may take this share of the budget (with its workspace): the
# rest holds what the check keeps meanwhile (the case's graphs, kept entries, freed pages not yet
# handed back), so that the whole stays within 1.25 x --max-memory above the process's baseline.
BATCH_SHARE = 2
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


def first_steps(x: torch.Tensor, directions: torch.Tensor, sequence: int = 0) -> torch.Tensor:
    """The first step for each direction (rows of `directions`, flattened like x).

    sequence 1 starts at 1/sqrt(2) of sequence 0's step: its steps fall halfway (geometrically)
    between the first sequence's, so an estimate that only looks converged by aliasing (steps
    resonating with an oscillation, sin(1e5 x)) does not reproduce from both."""
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
    return torch.exp2(torch.round(torch.log2(raw))) * (SECOND_SEQUENCE if sequence else 1.0)


def unit_steps(x: torch.Tensor, cols: torch.Tensor, sequence: int = 0) -> torch.Tensor:
    """first_steps for the unit directions e_j, j in `cols`, without forming them."""
    eps = _eps(x)
    flat = x.detach().reshape(-1).abs().to(torch.float64)
    mag = torch.clamp(flat[cols.to(torch.long)], min=RELATIVE_FLOOR * _typical(flat))
    return torch.exp2(torch.round(torch.log2(eps ** 0.2 * mag))) * (SECOND_SEQUENCE if sequence else 1.0)


def _eps(x: torch.Tensor) -> float:
    return torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps


def _typical(flat_abs: torch.Tensor) -> float:
    rms = float(flat_abs.pow(2).mean().sqrt()) if flat_abs.numel() else 0.0
    return rms if rms > 0 else 1.0


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
        if owner.numel() < 2 or bool((owner[1:] >= owner[:-1]).all()):
            order = torch.arange(int(owner.numel()))  # already grouped by direction
            sorted_owner = owner
        else:
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
        cols = min(cols, max(1, self.max_bytes // BATCH_SHARE // (per_dir * WORKSPACE_FACTOR)))
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
            scale = finite_abs_max((plus - minus) / (2 * hh), 1)
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
                dd, gap, floor = differences(pe, me, fe, he, eps)
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
            dd, gap, floor = differences(pe, me, f0_rows, he, eps)
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
        scale = eps ** 0.2 * max(mags) / v_norm
        if not (math.isfinite(scale) and scale > 0):
            # A direction or an input that is not finite (NaN where the op is undefined): no
            # derivative along it, and no bar (callers check for a NaN step).
            return projected, math.nan
        h = 2.0 ** round(math.log2(scale)) * (SECOND_SEQUENCE if sequence else 1.0)
        return projected, h

    def _joint_level(self, projected: dict[int, torch.Tensor]) -> LevelFn:
        def at(t: float) -> torch.Tensor:
            call = list(self.args)
            for p, v in projected.items():
                call[p] = torch.add(self.args[p].to(torch.float64), v, alpha=t).to(self.args[p].dtype)
            self.evaluations += 1
            outs = self.evaluate(call)
            del call
            if len(outs) == 1:  # one output: no joined copy
                return outs[0].reshape(-1).to(torch.float64)
            return torch.cat([o.reshape(-1).to(torch.float64) for o in outs])

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
        if math.isnan(h):
            return (tuple(torch.full_like(f, math.nan, dtype=torch.float64) for f in self.f0),
                    tuple(torch.full_like(f, math.inf, dtype=torch.float64) for f in self.f0))
        f0 = self.f0_flat
        eps = self.eps

        def extract(plus: torch.Tensor, minus: torch.Tensor, which: torch.Tensor,
                    hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            dd, gap, floor = differences(plus[0], minus[0], f0, hs.reshape(1)[0].reshape(1), eps)
            return dd, gap, floor, torch.ones_like(dd, dtype=torch.bool), finite_abs_max(dd.unsqueeze(0), 1)

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
        batch = next(iter(cotangents.values())).shape[0]
        if math.isnan(h):
            return (torch.full((batch,), math.nan, dtype=torch.float64),
                    torch.full((batch,), math.inf, dtype=torch.float64))
        f0 = self.f0_flat
        eps = self.eps
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
            bound = plus.abs()
            torch.maximum(bound, minus.abs(), out=bound)
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


__all__ = ["MAX_LEVELS", "START_LEVELS", "Columns", "Estimates", "FiniteDifferences", "first_steps", "unit_steps"]
