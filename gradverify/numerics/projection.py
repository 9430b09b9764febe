"""Projected checks for Jacobians too large to compare entry by entry, with localisation.

A probe is a pair of random Gaussian vectors (u over the outputs, v over the inputs): the
analytic value u^T A v (one batched backward: (A^T u) . v) is compared with the reference
u^T R v and with finite differences u . (J v). Never ones or non-negative probes: with those,
errors of opposite sign cancel.

A probe where A disagrees with both truths beyond their error bars fails the check by itself
(`distributed_error`): it proves the backward wrong, whether or not single entries can then be
named. Localisation is the bonus that names them, without forming the Jacobian:
* columns: d = (A - R)^T u is a whole input-sized vector from the same two backward calls; its
  entries stand out exactly at the input entries whose column holds a wrong entry;
* rows: bisection over output index sets U, d_U = (A - R)^T u_U, keeping the halves where a
  flagged column still stands out; each level is one batched backward per side.
Every entry found is judged like the full check (numerics.judge), with the scale of its row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradverify.numerics import judge
from gradverify.numerics.blocks import unravel
from gradverify.numerics.judge import Verdict
from gradverify.numerics.vjp import VjpSource
from gradverify.report import CheckResult, Diagnosis, Mismatch

if TYPE_CHECKING:
    from gradverify.checks.base import CaseContext, Truth

# Independent probes. Each misses a given single-entry error only when |u_i v_j| is tiny; four
# make a miss of an error 25x the tolerance less likely than 1e-6 (see smallest_detectable).
PROBES = 4
# Localisation keeps at most this many output index sets alive per level, and follows at most
# MAX_COLUMNS_PER_SET of the most-off input columns in each: beyond that the backward is wrong in
# too many places for a longer list to help (the report says the list is a sample), and the cost
# stays ~log2(m) batched backward calls of at most MAX_ACTIVE_SETS probes.
MAX_ACTIVE_SETS = 64
MAX_COLUMNS_PER_SET = 8
# Miss probability the stated "smallest detectable error" refers to.
MISS_PROBABILITY = 1e-6


def smallest_detectable(tol: float, probes: int = PROBES) -> float:
    """Smallest single-entry error delta that all `probes` miss with probability < 1e-6.

    A wrong entry delta at (i, j) moves u^T A v by delta * u_i * v_j with u_i, v_j ~ N(0, 1); a
    probe misses it when |u_i v_j| < tol / delta. P(|u v| < s) = E_v[erf(s / (|v| sqrt 2))],
    computed on a grid; we solve P(miss)^probes = 1e-6 for s by bisection.
    """
    v = torch.linspace(1e-6, 8.0, 20001, dtype=torch.float64)
    weight = torch.exp(-v * v / 2) * math.sqrt(2 / math.pi) * (v[1] - v[0])

    def p_small(s: float) -> float:
        return float((torch.special.erf(s / (v * math.sqrt(2))) * weight).sum())

    target = MISS_PROBABILITY ** (1 / probes)
    lo, hi = 1e-12, 10.0
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if p_small(mid) > target:
            hi = mid
        else:
            lo = mid
    return tol / lo


@dataclass
class Probe:
    u: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]


def _probes(analytic: VjpSource, seed: int, count: int) -> list[Probe]:
    gen = torch.Generator().manual_seed(seed + 4099)
    probes = []
    for _ in range(count):
        u = {o: torch.randn(out.shape, generator=gen, dtype=torch.float64) for o, out in analytic.outputs.items()}
        v = {p: torch.randn(leaf.shape, generator=gen, dtype=torch.float64) for p, leaf in analytic.leaves}
        probes.append(Probe(u, v))
    return probes


def _dot(g: dict[int, torch.Tensor], k: int, v: dict[int, torch.Tensor], leaves: list) -> float:  # type: ignore[type-arg]
    return sum(float((g[p][k].double() * v[p].reshape(-1)).sum()) for p, _ in leaves)


def _norm(g: dict[int, torch.Tensor], k: int, leaves: list) -> float:  # type: ignore[type-arg]
    return math.sqrt(sum(float(g[p][k].double().pow(2).sum()) for p, _ in leaves))


def projected_check(ctx: CaseContext, analytic: VjpSource, truth: Truth, entries: int) -> CheckResult:
    from gradverify.checks.jacobian import assemble

    reference = truth.reference.source if truth.reference.usable else None
    fd = truth.fd
    rtol = ctx.tolerance.rtol
    trials = _probes(analytic, ctx.case.seed, PROBES)
    cot = {o: torch.stack([t.u[o] for t in trials]) for o in analytic.outputs}
    g_a = analytic.vjp(cot)
    g_r = reference.vjp(cot) if reference is not None else None
    leaves = analytic.leaves
    failing: list[int] = []
    unresolved = 0
    worst_tol = 0.0
    largest = 0.0
    for k, trial in enumerate(trials):
        v_norm = math.sqrt(sum(float(trial.v[p].pow(2).sum()) for p, _ in leaves))
        size = max(_norm(g_a, k, leaves), _norm(g_r, k, leaves) if g_r is not None else 0.0) * v_norm
        # Cauchy-Schwarz: |u^T E v| <= ||E^T u|| ||v||, so rtol of that size is rtol relative to
        # the largest the projection can be, whatever the cancellation in u^T A v itself.
        tol = rtol * size
        worst_tol = max(worst_tol, tol)
        alpha = _dot(g_a, k, trial.v, leaves)
        if g_r is not None:
            rho = _dot(g_r, k, trial.v, leaves)
            largest = max(largest, abs(alpha - rho))
            if abs(alpha - rho) <= tol:
                continue
        verdicts = []
        readings = []
        for sequence in ((0,) if g_r is not None else (0, 1)):
            est, bars = fd.directional(trial.v, sequence=sequence)
            phi = sum(float((trial.u[o].reshape(-1) * e.reshape(-1).double()).sum())
                      for o, e in zip(fd.out_positions, est))
            beta = sum(float((trial.u[o].reshape(-1).abs() * b.reshape(-1).double()).sum())
                       for o, b in zip(fd.out_positions, bars))
            readings.append((phi, beta))
            resolved = math.isfinite(phi) and math.isfinite(beta) and beta < abs(alpha - phi) / 2
            verdicts.append(resolved and abs(alpha - phi) > tol + beta)
            if g_r is None:
                largest = max(largest, abs(alpha - phi) if math.isfinite(phi) else 0.0)
        if len(readings) == 2 and abs(readings[0][0] - readings[1][0]) > readings[0][1] + readings[1][1]:
            verdicts = [False]  # finite differences alone, and two step sequences disagree: aliasing
        if all(verdicts):
            failing.append(k)
        elif g_r is not None:
            unresolved += 1
    delta = smallest_detectable(worst_tol) if worst_tol > 0 else 0.0
    details = [("mode", f"fast: {PROBES} random Gaussian projections u^T J v (u over outputs, v over inputs)"),
               ("analytic", analytic.path), ("truth", truth.description),
               ("tolerance", f"rtol {rtol:.2g} x ||J^T u|| ||v|| per projection")]
    guarantee = (f"{PROBES} random projections agree; a single wrong entry off by more than {delta:.2g} would be "
                 f"detected with probability > 1 - {MISS_PROBABILITY:g}")
    if not failing:
        summary = f"{PROBES} projections agree"
        notes: tuple[str, ...] = ()
        if unresolved:
            notes = (f"{unresolved} projection(s) disagree with the reference but finite differences could not "
                     "settle them: not judged",)
        return assemble(ctx, truth, details=details, entries=entries, compared=0, count=0, mismatches=[],
                        diagnoses=[], unverifiable=0, kinks=0, excused=0, heatmaps=(), max_err=0.0,
                        notes=notes, guarantee=guarantee, summary=summary, message=guarantee)
    message = (f"{len(failing)} of {PROBES} random projections u^T J v disagree with both truths beyond their error "
               f"bars (largest difference {largest:.3g}, allowed {worst_tol:.2g}): the backward is wrong")
    diagnoses = [Diagnosis("distributed_error", message,
                           hint="re-run at a smaller --shape for a full, entry-by-entry diagnosis")]
    mismatches: list[Mismatch] = []
    truncated = False
    if g_r is not None and reference is not None:
        found, truncated = _localise(analytic, reference, trials, failing, g_a, g_r, rtol)
        mismatches = _judge_entries(ctx, found, analytic, reference, truth)
        if mismatches:
            listed = ", ".join(f"∂{m.output}{list(m.out_index)}/∂{m.input}{list(m.in_index)}" for m in mismatches[:3])
            more = f" and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
            diagnoses.append(Diagnosis("partial" if len(mismatches) <= 3 and not truncated else "other",
                                       f"{len(mismatches)} entr{'y' if len(mismatches) == 1 else 'ies'} located by "
                                       f"bisection of the failing projections: {listed}{more}",
                                       hint="re-run at a smaller --shape for a full diagnosis of the pattern"))
    notes = ()
    if truncated:
        notes = ("the backward is wrong in more places than localisation follows: the entries listed are a sample",)
    count = len(mismatches)
    return assemble(ctx, truth, details=details, entries=entries, compared=0, count=count, mismatches=mismatches,
                    diagnoses=diagnoses, unverifiable=0, kinks=0, excused=0, heatmaps=(),
                    max_err=max((m.abs_err for m in mismatches), default=largest),
                    lower_bound=bool(count), notes=notes, guarantee="",
                    summary=f"{count}+ located" if count else f"{len(failing)}/{PROBES} projections wrong")


def _column_flags(d: torch.Tensor, ga: torch.Tensor, gr: torch.Tensor, rtol: float) -> torch.Tensor:
    """Input entries where (A - R)^T u stands out beyond the tolerance of the larger side."""
    scale = max(float(ga.abs().max()) if ga.numel() else 0.0, float(gr.abs().max()) if gr.numel() else 0.0)
    return d.abs() > rtol * scale


def _localise(analytic: VjpSource, reference: VjpSource, trials: list[Probe], failing: list[int],
              g_a: dict[int, torch.Tensor], g_r: dict[int, torch.Tensor],
              rtol: float) -> tuple[list[tuple[int, int, int, int]], bool]:
    """(out_pos, flat out index, in_pos, flat in index) of entries where A and R differ."""
    k = failing[0]
    u = trials[k].u
    flags = {p: _column_flags(g_a[p][k] - g_r[p][k], g_a[p][k], g_r[p][k], rtol) for p, _ in analytic.leaves}
    for j in failing[1:]:  # other failing probes can only add columns (a cancellation in one)
        for p, _ in analytic.leaves:
            flags[p] |= _column_flags(g_a[p][j] - g_r[p][j], g_a[p][j], g_r[p][j], rtol)
    found: list[tuple[int, int, int, int]] = []
    truncated = False
    for o, out in analytic.outputs.items():
        m = out.numel()
        start_cols = {}
        for p, f in flags.items():
            js = torch.nonzero(f).reshape(-1)
            if js.numel() > MAX_COLUMNS_PER_SET * MAX_ACTIVE_SETS:
                size = (g_a[p][k] - g_r[p][k]).abs()[js]
                js = js[torch.topk(size, MAX_COLUMNS_PER_SET * MAX_ACTIVE_SETS).indices]
                truncated = True
            start_cols[p] = js
        active: list[tuple[int, int, dict[int, torch.Tensor]]] = [(0, m, start_cols)]
        if len(analytic.outputs) > 1:
            d = _diff_for_sets(analytic, reference, u, o, [(0, m)])
            hits = _hits(d, active[0][2], 0, rtol)
            active = [(0, m, hits)] if any(v.numel() for v in hits.values()) else []
        while active and any(hi - lo > 1 for lo, hi, _ in active):
            if len(active) > MAX_ACTIVE_SETS:
                truncated = True
                active = active[:MAX_ACTIVE_SETS]
            halves = []
            for lo, hi, cols in active:
                if hi - lo == 1:
                    halves.append((lo, hi, cols, None))
                    continue
                mid = (lo + hi) // 2
                halves.append((lo, mid, cols, (mid, hi)))
            d = _diff_for_sets(analytic, reference, u, o, [(lo, hi) for lo, hi, _, _ in halves])
            parent = _diff_for_sets(analytic, reference, u, o, [(lo, hi) for lo, hi, _ in active])
            next_active = []
            for b, (lo, hi, cols, right) in enumerate(halves):
                left_hits = _hits(d, cols, b, rtol)
                if any(v.numel() for v in left_hits.values()):
                    next_active.append((lo, hi, left_hits))
                if right is not None:
                    # The right half's difference is the parent's minus the left's (same probe).
                    rest = {p: parent[p][b:b + 1] - d[p][b:b + 1] for p in d}
                    right_hits = _hits(rest, cols, 0, rtol)
                    if any(v.numel() for v in right_hits.values()):
                        next_active.append((right[0], right[1], right_hits))
            active = next_active
        for lo, _, cols in active:
            for p, js in cols.items():
                for j in js.tolist():
                    found.append((o, lo, p, int(j)))
    return found, truncated


def _diff_for_sets(analytic: VjpSource, reference: VjpSource, u: dict[int, torch.Tensor], o: int,
                   ranges: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """(A - R)^T u_U for each output range U of output o (u zero elsewhere), batched."""
    cot = {}
    for oo, out in analytic.outputs.items():
        batch = torch.zeros((len(ranges), out.numel()), dtype=torch.float64)
        if oo == o:
            flat = u[o].reshape(-1)
            for b, (lo, hi) in enumerate(ranges):
                batch[b, lo:hi] = flat[lo:hi]
        cot[oo] = batch.reshape(len(ranges), *out.shape)
    ga = analytic.vjp(cot)
    gr = reference.vjp(cot)
    return {p: (ga[p].double() - gr[p].double()) for p in ga}


def _hits(d: dict[int, torch.Tensor], cols: dict[int, torch.Tensor], b: int, rtol: float) -> dict[int, torch.Tensor]:
    """The followed columns where this set's difference still stands out, the largest first."""
    out = {}
    for p, js in cols.items():
        if not js.numel():
            out[p] = js
            continue
        row = d[p][b]
        scale = float(row.abs().max())
        values = row[js].abs()
        keep = values > rtol * scale
        js, values = js[keep], values[keep]
        if js.numel() > MAX_COLUMNS_PER_SET:
            js = js[torch.topk(values, MAX_COLUMNS_PER_SET).indices]
        out[p] = js
    return out


def _judge_entries(ctx: CaseContext, found: list[tuple[int, int, int, int]], analytic: VjpSource,
                   reference: VjpSource, truth: Truth) -> list[Mismatch]:
    """The full check's rule on the located entries: rows from one batched backward per side
    (unit cotangents at those rows, which also give each row's scale), columns from finite
    differences."""
    found = found[: max(1, ctx.settings.mismatch_cap)]
    rows_of: dict[int, list[int]] = {}
    cols_of: dict[int, list[int]] = {}
    for o, i, p, j in found:
        rows_of.setdefault(o, [])
        if i not in rows_of[o]:
            rows_of[o].append(i)
        cols_of.setdefault(p, [])
        if j not in cols_of[p]:
            cols_of[p].append(j)
    a_rows: dict[int, dict[int, torch.Tensor]] = {}
    t_rows: dict[int, dict[int, torch.Tensor]] = {}
    for o, rows in rows_of.items():
        cot = {}
        for oo, out in analytic.outputs.items():
            unit = torch.zeros((len(rows), out.numel()), dtype=torch.float64)
            if oo == o:
                unit[torch.arange(len(rows)), torch.tensor(rows)] = 1
            cot[oo] = unit.reshape(len(rows), *out.shape)
        a_rows[o] = analytic.vjp(cot)
        t_rows[o] = reference.vjp(cot)
    numeric = {p: truth.fd.columns(p, torch.tensor(cols)) for p, cols in cols_of.items()}
    leaf_shapes = {p: tuple(leaf.shape) for p, leaf in analytic.leaves}
    mismatches = []
    for o, i, p, j in found:
        ri, cj = rows_of[o].index(i), cols_of[p].index(j)
        t_row = t_rows[o][p][ri].double()
        a = a_rows[o][p][ri, j].double().reshape(1)
        t = t_row[j].reshape(1)
        scale = t_row.abs().max().reshape(1) if t_row.numel() else torch.ones(1, dtype=torch.float64)
        nc = numeric[p]
        f = nc.estimates[o][i, cj].double().reshape(1)
        bar = nc.bars[o][i, cj].double().reshape(1)
        kink = nc.kinks[o][i, cj].reshape(1)
        if not bool(judge.disagrees(a, t, scale, ctx.tolerance)[0]):
            continue
        verdict = judge.with_reference(a, t, f, bar, kink, scale, ctx.tolerance)
        if int(verdict[0]) == int(Verdict.MISMATCH):
            mismatches.append(Mismatch(output=ctx.output_names[o], input=ctx.input_names[p],
                                       out_index=unravel(i, tuple(analytic.outputs[o].shape)),
                                       in_index=unravel(j, leaf_shapes[p]), expected=float(t[0]), got=float(a[0]),
                                       tolerance=float(judge.allowed(t, scale, ctx.tolerance)[0]),
                                       second=float(f[0])))
    mismatches.sort(key=lambda mm: -mm.abs_err)
    return mismatches
