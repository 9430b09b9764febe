"""Projected checks for Jacobians too large to compare entry by entry, with localisation.

A probe is a pair of random signed vectors (u over the outputs, v over the inputs, both
Gaussian): the analytic value u^T A v (one batched backward: (A^T u) . v) is compared with the
reference u^T R v and with finite differences u . (J v) (four forward calls). Never ones or
non-negative probes: with those, errors of opposite sign cancel, and torch's fast mode, whose
tolerance also grows with the size, passes a softmax without its off-diagonal terms.

When a probe disagrees, the wrong entries are localised without forming the Jacobian:
* columns: d = (A - R)^T u is a whole input-sized vector from the same two backward calls;
  its entries stand out exactly at the input entries whose column holds a wrong entry;
* rows: bisection over output index sets U, d_U = (A - R)^T u_U, keeping the halves where a
  flagged column still stands out; each level is one batched backward per side.
Every entry found is then judged like the full check: it is reported only if the analytic
value disagrees with the reference and with a finite-difference column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from gradverify.compare import Tolerance, unravel
from gradverify.jacobian import FiniteDifferences, VjpSource
from gradverify.report import Diagnosis, Mismatch
from gradverify.streaming import StreamOutcome

# Independent probes. Each misses a given single-entry error only when |u_i v_j| is tiny; four
# make a miss of an error 25x the tolerance less likely than 1e-6 (see smallest_detectable).
PROBES = 4

# Relative rounding allowance of a projection: u^T A v and u^T R v are the same number computed
# along two routes, each a sum over the Jacobian; their rounding is a few hundred eps relative to
# the Cauchy-Schwarz size ||A^T u|| ||v|| of the terms, for ops with condition numbers up to ~1e4.
# 1e-10 leaves that ~1e4-fold room and is still six orders below the 1e-6 rtol of a full check.
REL_ROUNDING = 1e-10

# Localisation keeps at most this many output index sets alive per level, and follows at most
# MAX_COLUMNS_PER_SET of the most-off input columns in each: beyond that the backward is wrong in
# too many places for a longer list to help (the report says the list is a sample), and the
# cost stays ~log2(m) batched backward calls of at most MAX_ACTIVE_SETS probes.
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


def _batch(cotangents: Sequence[dict[int, torch.Tensor]], source: VjpSource) -> dict[int, torch.Tensor]:
    return {o: torch.stack([c[o].reshape(out.shape) for c in cotangents]).to(out.dtype)
            for o, out in source.outputs.items()}


def projection_check(analytic: VjpSource, reference: VjpSource, fd: FiniteDifferences,
                     out_names: dict[int, str], in_names: Sequence[str], tolerance: Tolerance, *,
                     seed: int, mismatch_cap: int, probes: int = PROBES) -> tuple[StreamOutcome, list[tuple[str, str]]]:
    """Projected check with localisation; returns the outcome and the details to report."""
    trials = _probes(analytic, seed, probes)
    cot = _batch([t.u for t in trials], analytic)
    g_a = analytic.vjp(cot)
    g_r = reference.vjp(cot)
    details: list[tuple[str, str]] = []
    failing: list[int] = []
    worst_tol = 0.0
    max_diff = 0.0
    for k, trial in enumerate(trials):
        alpha = sum(float((g_a[p][k].double() * trial.v[p].reshape(-1)).sum()) for p, _ in analytic.leaves)
        rho = sum(float((g_r[p][k].double() * trial.v[p].reshape(-1)).sum()) for p, _ in analytic.leaves)
        size = sum(float(torch.linalg.vector_norm(g_a[p][k].double()) + torch.linalg.vector_norm(g_r[p][k].double()))
                   * float(torch.linalg.vector_norm(trial.v[p])) for p, _ in analytic.leaves)
        tol_ref = REL_ROUNDING * max(1.0, size)
        worst_tol = max(worst_tol, tol_ref)
        max_diff = max(max_diff, abs(alpha - rho))
        if abs(alpha - rho) <= tol_ref:
            continue
        # Second truth for this probe: u . (J v) by Richardson differences along v, with its bar.
        est, bars = fd.directional({p: trial.v[p].to(fd.args[p].dtype) for p, _ in analytic.leaves})
        nu = sum(float((trial.u[o].reshape(-1) * e.reshape(-1).double()).sum())
                 for o, e in zip(fd.out_positions, est))
        beta = sum(float((trial.u[o].reshape(-1).abs() * b.reshape(-1).double()).sum())
                   for o, b in zip(fd.out_positions, bars))
        if abs(alpha - nu) > beta + tol_ref:
            failing.append(k)
    delta_min = smallest_detectable(worst_tol, probes)
    details.append(("mode", f"fast: {probes} random Gaussian projections u^T J v (u over outputs, v over inputs), "
                            "compared with the reference and, where they disagree, with finite differences"))
    details.append(("guarantee", f"a single wrong entry off by more than {delta_min:.2g} is detected with "
                                 f"probability > 1 - {MISS_PROBABILITY:g}; projection tolerance {worst_tol:.2g} "
                                 f"(rounding allowance {REL_ROUNDING:g} x ||A^T u|| ||v||, not scaled with the size)"))
    total = sum(int(out.numel()) for out in analytic.outputs.values()) * sum(int(leaf.numel()) for _, leaf in analytic.leaves)
    if not failing:
        outcome = StreamOutcome(mismatches=[], mismatch_count=0, total=total, max_abs_err=0.0, excused=0,
                                kinks_excused=0, columns_differenced=0, chunks=0, passes=1, heatmaps=(),
                                diagnoses=[], notes=[])
        details.append(("projections", f"all {probes} agree (largest |u^T (A - R) v| {max_diff:.2g})"))
        return outcome, details
    details.append(("projections", f"{len(failing)} of {probes} disagree with both truths "
                                   f"(largest |u^T (A - R) v| {max_diff:.3g}); localising by bisection"))
    found, evaluations, truncated = _localise(analytic, reference, trials, failing, g_a, g_r)
    outcome = _judge_entries(found, analytic, reference, fd, out_names, in_names, tolerance, mismatch_cap, total)
    details.append(("localisation", f"{len(found)} candidate entr{'y' if len(found) == 1 else 'ies'} in "
                                    f"{evaluations} batched backward calls per Jacobian"
                                    + (f"; wrong in more places than followed ({MAX_ACTIVE_SETS} output sets x "
                                       f"{MAX_COLUMNS_PER_SET} columns): the entries listed are a sample, "
                                       "the count is a lower bound" if truncated else "")))
    if truncated:
        outcome.notes.append("the backward is wrong in more places than localisation follows: the mismatched "
                             "entries listed are a sample and their count a lower bound")
    if outcome.mismatch_count == 0:
        outcome.notes.append("a projection disagreed with both truths but no single entry could be confirmed: "
                             "the error is spread below the per-entry tolerance")
        outcome.mismatch_count = 0
    return outcome, details


def _column_flags(d: torch.Tensor, ga: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """Input entries where (A - R)^T u stands out of rounding (REL_ROUNDING of the larger side)."""
    scale = max(1.0, float(ga.abs().max()) if ga.numel() else 0.0, float(gr.abs().max()) if gr.numel() else 0.0)
    return d.abs() > REL_ROUNDING * scale * 100


def _localise(analytic: VjpSource, reference: VjpSource, trials: list[Probe], failing: list[int],
              g_a: dict[int, torch.Tensor], g_r: dict[int, torch.Tensor]
              ) -> tuple[list[tuple[int, int, int, int]], int, bool]:
    """(out_pos, flat out index, in_pos, flat in index) of entries where A and R differ."""
    k = failing[0]
    u = trials[k].u
    flags = {p: _column_flags(g_a[p][k] - g_r[p][k], g_a[p][k], g_r[p][k]) for p, _ in analytic.leaves}
    for j in failing[1:]:  # other failing probes can only add columns (a cancellation in one)
        for p, _ in analytic.leaves:
            flags[p] |= _column_flags(g_a[p][j] - g_r[p][j], g_a[p][j], g_r[p][j])
    found: list[tuple[int, int, int, int]] = []
    evaluations = 0
    truncated = False
    for o, out in analytic.outputs.items():
        m = out.numel()
        # An active set: a range [lo, hi) of flat output indices with the columns it still hits.
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
            # Several outputs: check this output alone first (its u restricted to it).
            d = _diff_for_sets(analytic, reference, u, o, [(0, m)])
            evaluations += 1
            hits = _hits(d, active[0][2], 0)
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
            ranges = [(lo, hi) for lo, hi, _, _ in halves]
            d = _diff_for_sets(analytic, reference, u, o, ranges)
            evaluations += 1
            parent = _diff_for_sets(analytic, reference, u, o, [(lo, hi) for lo, hi, _ in active])
            evaluations += 1
            next_active = []
            for b, (lo, hi, cols, right) in enumerate(halves):
                left_hits = _hits(d, cols, b)
                if any(v.numel() for v in left_hits.values()):
                    next_active.append((lo, hi, left_hits))
                if right is not None:
                    # The right half's difference is the parent's minus the left's (same probe).
                    rest = {p: parent[p][b:b + 1] - d[p][b:b + 1] for p in d}
                    right_hits = _hits(rest, cols, 0)
                    if any(v.numel() for v in right_hits.values()):
                        next_active.append((right[0], right[1], right_hits))
            active = next_active
        for lo, _, cols in active:
            for p, js in cols.items():
                for j in js.tolist():
                    found.append((o, lo, p, int(j)))
    return found, evaluations, truncated


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
        cot[oo] = batch.reshape(len(ranges), *out.shape).to(out.dtype)
    ga = analytic.vjp(cot)
    gr = reference.vjp(cot)
    return {p: (ga[p].double() - gr[p].double()) for p in ga}


def _hits(d: dict[int, torch.Tensor], cols: dict[int, torch.Tensor], b: int) -> dict[int, torch.Tensor]:
    """The followed columns where this set's difference still stands out, the largest first."""
    out = {}
    for p, js in cols.items():
        if not js.numel():
            out[p] = js
            continue
        row = d[p][b]
        scale = max(1.0, float(row.abs().max()))
        values = row[js].abs()
        keep = values > REL_ROUNDING * scale * 100
        js, values = js[keep], values[keep]
        if js.numel() > MAX_COLUMNS_PER_SET:
            js = js[torch.topk(values, MAX_COLUMNS_PER_SET).indices]
        out[p] = js
    return out


def _judge_entries(found: list[tuple[int, int, int, int]], analytic: VjpSource, reference: VjpSource,
                   fd: FiniteDifferences, out_names: dict[int, str], in_names: Sequence[str],
                   tolerance: Tolerance, mismatch_cap: int, total: int) -> StreamOutcome:
    """The full check's rule on the localised entries: wrong only against both truths.

    Rows come from one batched backward per side (unit cotangents at the localised rows), columns
    from one batched finite-difference call per input.
    """
    mismatches: list[Mismatch] = []
    excused = kinks_excused = 0
    found = found[: max(1, mismatch_cap)]
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
            unit = torch.zeros((len(rows), out.numel()), dtype=out.dtype)
            if oo == o:
                unit[torch.arange(len(rows)), torch.tensor(rows)] = 1
            cot[oo] = unit.reshape(len(rows), *out.shape)
        a_rows[o] = analytic.vjp(cot)
        t_rows[o] = reference.vjp(cot)
    numeric = {p: fd.columns(p, torch.tensor(cols)) for p, cols in cols_of.items()}
    leaf_shapes = {p: tuple(leaf.shape) for p, leaf in analytic.leaves}
    for o, i, p, j in found:
        ri = rows_of[o].index(i)
        cj = cols_of[p].index(j)
        a = float(a_rows[o][p][ri, j])
        t_row = t_rows[o][p][ri]
        t = float(t_row[j])
        nc = numeric[p]
        s_val = float(nc.estimates[o][i, cj])
        s_bar = float(nc.bars[o][i, cj])
        kink = bool(nc.kinks[o][i, cj])
        # The block scale max(1, max|truth|) is unknown without the block; the row of the
        # reference through this entry is a lower bound, so the tolerance is not looser.
        scale = max(1.0, float(t_row.abs().max()))
        allowed = tolerance.atol * scale + tolerance.rtol * abs(t)
        bad_ref = abs(a - t) > allowed or not math.isfinite(a)
        bad_fd = abs(a - s_val) > tolerance.atol * scale + tolerance.rtol * abs(s_val) + s_bar or not math.isfinite(a)
        if bad_ref and bad_fd and not kink:
            mismatches.append(Mismatch(output=out_names[o], input=in_names[p],
                                       out_index=unravel(i, tuple(analytic.outputs[o].shape)),
                                       in_index=unravel(j, leaf_shapes[p]), expected=t, got=a, tolerance=allowed))
        elif bad_ref:
            excused += 1
            kinks_excused += int(kink)
    mismatches.sort(key=lambda mm: -mm.abs_err)
    diagnoses = []
    if mismatches:
        listed = ", ".join(f"∂{m.output}{list(m.out_index)}/∂{m.input}{list(m.in_index)}" for m in mismatches[:5])
        more = f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
        kind = "partial" if len(mismatches) <= 3 else "other"
        diagnoses.append(Diagnosis(kind, f"{len(mismatches)} entr{'y' if len(mismatches) == 1 else 'ies'} localised "
                                         f"by projections: {listed}{more}",
                                   hint="a boundary case or one index of the formula is wrong" if kind == "partial"
                                   else "see the diff table for where they sit"))
    return StreamOutcome(mismatches=mismatches[:mismatch_cap], mismatch_count=len(mismatches), total=total,
                         max_abs_err=max((m.abs_err for m in mismatches), default=0.0), excused=excused,
                         kinks_excused=kinks_excused, columns_differenced=sum(len(c) for c in cols_of.values()),
                         chunks=0, passes=1, heatmaps=(), diagnoses=diagnoses, notes=[])
