"""Projected checks for Jacobians too large to compare entry by entry, with localisation.

A probe is a pair of random Gaussian vectors (u over the outputs, v over the inputs): the
analytic value u^T A v (one batched backward: (A^T u) . v) is compared with the reference
u^T R v and with finite differences u . (J v) (contracted in the tableau: memory of a few
outputs, whatever their size). Never ones or non-negative probes: with those, errors of
opposite sign cancel.

A probe where A disagrees with both truths beyond their error bars fails the check by itself
(`distributed_error`): it proves the backward wrong, whether or not single entries can then be
named. Localisation is the bonus that names a sample of them, without forming the Jacobian:
* columns: d = (A - R)^T u is a whole input-sized vector from the same two backward calls; its
  entries stand out exactly at the input entries whose column holds a wrong entry;
* rows: bisection over output index sets U, d_U = (A - R)^T u_U, keeping the halves where a
  followed column still stands out; each level is one batched backward per side for the left
  halves (the right half is the parent minus the left, at the followed columns), in batches
  that fit --max-memory.
Every entry found is judged like the full check (numerics.judge), with the scale of its row and
finite differences at the entry (numerics.colouring), and the count is a lower bound.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradverify.numerics import judge
from gradverify.numerics.blocks import unravel
from gradverify.numerics.colouring import MAX_CONFIRM_COLUMNS, Judged, second_truth
from gradverify.numerics.finite_diff import BATCH_SHARE
from gradverify.numerics.judge import Verdict
from gradverify.numerics.richardson import RELEASE_SHARE, release_memory
from gradverify.numerics.streaming import units_scale
from gradverify.numerics.vjp import WORKSPACE_FACTOR, VjpSource
from gradverify.report import CheckResult, Diagnosis, Mismatch
from gradverify.usercode import UserCodeError, user_code

if TYPE_CHECKING:
    from gradverify.checks.base import CaseContext, Truth

# Independent probes. Each misses a given single-entry error only when |u_i v_j| is tiny; four
# make a miss of an error 25x the tolerance less likely than 1e-6 (see smallest_detectable).
PROBES = 4
# Localisation keeps at most this many output index sets alive per level (those whose followed
# columns stand out most), and follows at most MAX_COLUMNS_PER_SET of the most-off input columns
# in each: beyond that the backward is wrong in too many places for a longer list to help (the
# report says the list is a sample), and the cost stays ~log2(m) batched backward calls of at
# most MAX_ACTIVE_SETS cotangents per side (measured ~2 s for 10^6 outputs on 2 cores).
MAX_ACTIVE_SETS = 8
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


def _probe(analytic: VjpSource, seed: int, k: int) -> Probe:
    """Probe k, drawn from its own seed (so it is regenerated instead of kept)."""
    gen = torch.Generator().manual_seed(seed + 4099 + 7919 * k)
    u = {o: torch.randn(out.shape, generator=gen, dtype=torch.float64) for o, out in analytic.outputs.items()}
    v = {p: torch.randn(leaf.shape, generator=gen, dtype=torch.float64) for p, leaf in analytic.leaves}
    return Probe(u, v)


def _batch_size(analytic: VjpSource, budget: int, sides: int = 2) -> int:
    """Cotangents per batched backward: each holds an output-sized cotangent and, per side, an
    input-sized gradient (float64), times the backward's workspace, within a share of the budget
    (finite_diff.BATCH_SHARE)."""
    m = sum(int(out.numel()) for out in analytic.outputs.values())
    n = analytic.in_numel()
    per = (m + sides * n + n) * 8 * WORKSPACE_FACTOR
    return max(1, budget // BATCH_SHARE // max(1, per))


def _dot(g: dict[int, torch.Tensor], k: int, v: dict[int, torch.Tensor], leaves: list) -> float:  # type: ignore[type-arg]
    return sum(float((g[p][k].double() * v[p].reshape(-1)).sum()) for p, _ in leaves)


def _norm(g: dict[int, torch.Tensor], k: int, leaves: list) -> float:  # type: ignore[type-arg]
    return math.sqrt(sum(float(g[p][k].double().pow(2).sum()) for p, _ in leaves))


@dataclass
class _Evidence:
    """What localisation needs from the failing probes: the first one's index, its difference
    (A - R)^T u per input, and the columns any failing probe flags."""

    first: int
    diff: dict[int, torch.Tensor]
    flags: dict[int, torch.Tensor]


def projected_check(ctx: CaseContext, analytic: VjpSource, truth: Truth, entries: int) -> CheckResult:
    from gradverify.checks.jacobian import assemble

    reference = truth.reference.source if truth.reference.usable else None
    fd = truth.fd
    rtol = ctx.tolerance.rtol
    leaves = analytic.leaves
    seed = ctx.case.seed
    budget = ctx.settings.max_memory
    failing: list[int] = []
    evidence: _Evidence | None = None
    unresolved = 0
    worst_tol = 0.0
    largest = 0.0
    batch = min(PROBES, _batch_size(analytic, budget))
    for b0 in range(0, PROBES, batch):
        trials = [_probe(analytic, seed, k) for k in range(b0, min(PROBES, b0 + batch))]
        cot = {o: torch.stack([t.u[o] for t in trials]) for o in analytic.outputs}
        g_a = analytic.vjp(cot)
        g_r = reference.vjp(cot) if reference is not None else None
        del cot
        pending = []
        for local, trial in enumerate(trials):
            k = b0 + local
            v_norm = math.sqrt(sum(float(trial.v[p].pow(2).sum()) for p, _ in leaves))
            size = max(_norm(g_a, local, leaves), _norm(g_r, local, leaves) if g_r is not None else 0.0) * v_norm
            # Cauchy-Schwarz: |u^T E v| <= ||E^T u|| ||v||, so rtol of that size is rtol relative to
            # the largest the projection can be, whatever the cancellation in u^T A v itself.
            tol = rtol * size
            worst_tol = max(worst_tol, tol)
            alpha = _dot(g_a, local, trial.v, leaves)
            difference: dict[int, torch.Tensor] | None = None
            scale = 0.0
            if g_r is not None:
                rho = _dot(g_r, local, trial.v, leaves)
                largest = max(largest, abs(alpha - rho))
                if abs(alpha - rho) <= tol:
                    continue
                # Kept for localisation should this probe fail: (A - R)^T u and the scale of its sides.
                difference = {p: g_a[p][local].double() - g_r[p][local].double() for p, _ in leaves}
                scale = max(max(float(g_a[p][local].abs().max()) if g_a[p][local].numel() else 0.0,
                                float(g_r[p][local].abs().max()) if g_r[p][local].numel() else 0.0) for p, _ in leaves)
            pending.append((k, trial, alpha, tol, difference, scale))
        del g_a, g_r  # the backward products are not needed while finite differences run
        for k, trial, alpha, tol, difference, scale in pending:
            verdicts = []
            readings = []
            for sequence in ((0,) if difference is not None else (0, 1)):
                phi_t, beta_t = fd.contracted(trial.v, {o: trial.u[o].unsqueeze(0) for o in analytic.outputs},
                                              sequence=sequence)
                phi, beta = float(phi_t[0]), float(beta_t[0])
                readings.append((phi, beta))
                resolved = math.isfinite(phi) and math.isfinite(beta) and beta < abs(alpha - phi) / 2
                verdicts.append(resolved and abs(alpha - phi) > tol + beta)
                if difference is None:
                    largest = max(largest, abs(alpha - phi) if math.isfinite(phi) else 0.0)
            if len(readings) == 2 and abs(readings[0][0] - readings[1][0]) > readings[0][1] + readings[1][1]:
                verdicts = [False]  # finite differences alone, and two step sequences disagree: aliasing
            if all(verdicts):
                failing.append(k)
                if difference is not None:
                    evidence = _collect(evidence, k, difference, scale, rtol)
            elif difference is not None:
                unresolved += 1
        del pending, trials
        release_memory(budget // RELEASE_SHARE)
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
    if reference is not None and evidence is not None:
        located = _localise_by_columns(analytic, reference, evidence, rtol, budget)
        how = "read from the flagged columns of A - R (double backward)"
        mismatches = []
        if located is not None:
            found, truncated, backward_calls = located
            mismatches = _judge_entries(ctx, found, analytic, reference, truth)
        if not mismatches:
            u = _probe(analytic, seed, evidence.first).u
            found, truncated, backward_calls = _localise(analytic, reference, u, evidence, rtol, budget)
            mismatches = _judge_entries(ctx, found, analytic, reference, truth)
            how = "bisection of the failing projections"
        details.append(("localisation", f"{len(found)} candidate entr{'y' if len(found) == 1 else 'ies'} in "
                                        f"{backward_calls} batched backward calls per side ({how})"))
        diagnoses.extend(_located_diagnoses(ctx, analytic, mismatches, complete=not truncated))
    notes = ()
    if truncated:
        notes = ("the backward is wrong in more places than localisation follows: the entries listed are a sample",)
    count = len(mismatches)
    return assemble(ctx, truth, details=details, entries=entries, compared=0, count=count, mismatches=mismatches,
                    diagnoses=diagnoses, unverifiable=0, kinks=0, excused=0, heatmaps=(),
                    max_err=max((m.abs_err for m in mismatches), default=largest),
                    lower_bound=bool(count), notes=notes, guarantee="",
                    summary=f"{count}+ located" if count else f"{len(failing)}/{PROBES} projections wrong")


def _located_diagnoses(ctx: CaseContext, analytic: VjpSource, mismatches: list[Mismatch], *,
                       complete: bool) -> list[Diagnosis]:
    """Per (output, input) block, what the located entries establish without the whole block:
    where they sit and how the backward relates to the truth there (diagnose.describe_located)."""
    from gradverify.diagnose import describe_located

    out_pos = {name: o for o, name in ctx.output_names.items()}
    in_pos = {name: p for p, name in enumerate(ctx.input_names)}
    leaves = dict(analytic.leaves)
    groups: dict[tuple[str, str], list[Mismatch]] = {}
    for m in mismatches:
        groups.setdefault((m.output, m.input), []).append(m)
    found = []
    for (out_name, in_name), group in groups.items():
        o, p = out_pos.get(out_name), in_pos.get(in_name)
        if o is None or p is None or o not in analytic.outputs or p not in leaves:
            continue
        out_shape, in_shape = tuple(analytic.outputs[o].shape), tuple(leaves[p].shape)
        out_flat = torch.tensor([_ravel(m.out_index, out_shape) for m in group], dtype=torch.long)
        in_flat = torch.tensor([_ravel(m.in_index, in_shape) for m in group], dtype=torch.long)
        found.append(describe_located(
            out_name, in_name, out_shape, in_shape, out_flat, in_flat,
            torch.tensor([m.got for m in group], dtype=torch.float64),
            torch.tensor([m.expected for m in group], dtype=torch.float64),
            total=math.prod(out_shape) * math.prod(in_shape), how="projected", complete=complete))
    return found


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _collect(evidence: _Evidence | None, k: int, difference: dict[int, torch.Tensor], scale: float,
             rtol: float) -> _Evidence:
    """Keep the first failing probe's difference; other failing probes only add flagged columns
    (a cancellation in one). A column is flagged where (A - R)^T u stands out beyond rtol of the
    larger side."""
    flags = {p: d.abs() > rtol * scale for p, d in difference.items()}
    if evidence is None:
        return _Evidence(first=k, diff=difference, flags=flags)
    for p in flags:
        evidence.flags[p] |= flags[p]
    return evidence


@dataclass
class _Set:
    """An output index range [lo, hi) still holding a wrong entry in its followed columns, with
    (A - R)^T u_U at those columns and the scale of A^T u_U, R^T u_U."""

    lo: int
    hi: int
    cols: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    scale: float

    @property
    def strength(self) -> float:
        return max((float(v.abs().max()) for v in self.values.values() if v.numel()), default=0.0)


def _localise_by_columns(analytic: VjpSource, reference: VjpSource, evidence: _Evidence, rtol: float,
                         budget: int) -> tuple[list[tuple[int, int, int, int]], bool, int] | None:
    """The flagged columns read whole: (A - R) e_j for the MAX_ACTIVE_SETS most-off columns j,
    from the derivative of each side's backward with respect to its cotangent (u -> A^T u is
    linear, so d/du (v . A^T u) along e_j is A e_j): a few double backwards instead of a
    bisection of log2(m) levels. None where a backward is not differentiable (once_differentiable,
    a detach) or an input is constrained: then bisection."""
    truncated = False
    chosen: dict[int, torch.Tensor] = {}
    for p, f in evidence.flags.items():
        js = torch.nonzero(f).reshape(-1)
        if js.numel() > MAX_ACTIVE_SETS:
            js = js[torch.topk(evidence.diff[p].abs()[js], MAX_ACTIVE_SETS).indices]
            truncated = True
        chosen[p] = js
    if any(p in analytic.tangents for p in chosen) or not any(js.numel() for js in chosen.values()):
        return None
    found: list[tuple[int, int, int, int]] = []
    m_total = sum(int(out.numel()) for out in analytic.outputs.values())
    # Per column and side: the direction, J e_j and the double backward's intermediates (twice a
    # plain backward's workspace).
    batch = max(1, budget // BATCH_SHARE // max(1, 3 * m_total * 8 * 2 * WORKSPACE_FACTOR))
    calls = 0
    for p, js in chosen.items():
        for k0 in range(0, int(js.numel()), batch):
            cols = js[k0:k0 + batch]
            a_cols = _columns_of(analytic, p, cols)
            r_cols = _columns_of(reference, p, cols) if a_cols is not None else None
            if a_cols is None or r_cols is None:
                return None
            calls += 1
            for o in analytic.outputs:
                diff = a_cols[o].double() - r_cols[o].double()
                scale = torch.maximum(torch.linalg.vector_norm(a_cols[o].double(), math.inf, dim=1),
                                      torch.linalg.vector_norm(r_cols[o].double(), math.inf, dim=1))
                for b, j in enumerate(cols.tolist()):
                    size = diff[b].abs()
                    rows = torch.nonzero(size > rtol * scale[b]).reshape(-1)
                    if rows.numel() > MAX_COLUMNS_PER_SET:
                        rows = rows[torch.topk(size[rows], MAX_COLUMNS_PER_SET).indices]
                        truncated = True
                    found.extend((o, int(i), p, int(j)) for i in rows.tolist())
            del a_cols, r_cols
            release_memory(budget // RELEASE_SHARE)
    return found, truncated, calls


def _columns_of(source: VjpSource, p: int, cols: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """{o: (k, out.numel())}: columns `cols` of input p of every block of the source, by the
    double-backward trick; None if the backward is not differentiable with respect to its
    cotangent or raises."""
    leaves = [leaf for _, leaf in source.leaves]
    index = [q for q, _ in source.leaves].index(p)
    leaf = leaves[index]
    k = int(cols.numel())
    directions = torch.zeros((k, max(1, leaf.numel())), dtype=leaf.dtype, device=leaf.device)
    directions[torch.arange(k), cols] = 1
    directions = directions[:, :leaf.numel()].reshape(k, *leaf.shape)
    result: dict[int, torch.Tensor] = {}
    for o, out in source.outputs.items():
        try:
            with user_code(source.phase), torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, [leaf], u, create_graph=True, retain_graph=True, allow_unused=True)
                if g is None:
                    result[o] = torch.zeros((k, out.numel()), dtype=out.dtype)
                    continue
                if not g.requires_grad:
                    return None
                jv: torch.Tensor | None
                try:
                    (jv,) = torch.autograd.grad(g, [u], directions, retain_graph=True, allow_unused=True,
                                                is_grads_batched=True)
                except RuntimeError:  # vmap cannot batch this double backward: one column at a time
                    parts = [torch.autograd.grad(g, [u], directions[b], retain_graph=True, allow_unused=True)[0]
                             for b in range(k)]
                    jv = None if any(part is None for part in parts) else torch.stack(parts)
        except UserCodeError:
            return None
        result[o] = torch.zeros((k, out.numel()), dtype=out.dtype) if jv is None else jv.detach().reshape(k, -1)
    return result


def _localise(analytic: VjpSource, reference: VjpSource, u: dict[int, torch.Tensor], evidence: _Evidence,
              rtol: float, budget: int) -> tuple[list[tuple[int, int, int, int]], bool, int]:
    """(out_pos, flat out index, in_pos, flat in index) of entries where A and R differ; whether
    the list is a sample; the batched backward calls spent per side."""
    truncated = False
    calls = 0
    start_cols: dict[int, torch.Tensor] = {}
    for p, f in evidence.flags.items():
        js = torch.nonzero(f).reshape(-1)
        if js.numel() > MAX_COLUMNS_PER_SET * MAX_ACTIVE_SETS:
            size = evidence.diff[p].abs()[js]
            js = js[torch.topk(size, MAX_COLUMNS_PER_SET * MAX_ACTIVE_SETS).indices]
            truncated = True
        start_cols[p] = torch.sort(js).values
    found: list[tuple[int, int, int, int]] = []
    batch = _batch_size(analytic, budget)
    for o, out in analytic.outputs.items():
        m = max(1, out.numel())
        if len(analytic.outputs) > 1:
            (whole,), spent = _diff_for_sets(analytic, reference, u, o, [(0, m)], [start_cols], batch,
                                            budget // RELEASE_SHARE)
            calls += spent
            first = _hits(start_cols, whole[0], whole[1], rtol)
        else:
            first = _Set(0, m, start_cols, {p: evidence.diff[p][js] for p, js in start_cols.items()}, math.inf)
        active = [first] if any(v.numel() for v in first.cols.values()) else []
        while active and any(s.hi - s.lo > 1 for s in active):
            if len(active) > MAX_ACTIVE_SETS:
                truncated = True
                active = sorted(active, key=lambda s: -s.strength)[:MAX_ACTIVE_SETS]
            splitting = [s for s in active if s.hi - s.lo > 1]
            done = [s for s in active if s.hi - s.lo == 1]
            halves = [(s.lo, (s.lo + s.hi) // 2) for s in splitting]
            lefts, spent = _diff_for_sets(analytic, reference, u, o, halves, [s.cols for s in splitting], batch,
                                           budget // RELEASE_SHARE)
            calls += spent
            next_active = list(done)
            for s, (values, scale) in zip(splitting, lefts):
                mid = (s.lo + s.hi) // 2
                left = _hits(s.cols, values, scale, rtol, lo=s.lo, hi=mid)
                if any(v.numel() for v in left.cols.values()):
                    next_active.append(left)
                # The right half's difference is the parent's minus the left's (same probe), at
                # the followed columns; its scale is at most the parent's.
                rest = {p: s.values[p] - values[p] for p in s.cols}
                right = _hits(s.cols, rest, s.scale if math.isfinite(s.scale) else scale, rtol, lo=mid, hi=s.hi)
                if any(v.numel() for v in right.cols.values()):
                    next_active.append(right)
            active = next_active
        for s in active:
            for p, js in s.cols.items():
                for j in js.tolist():
                    found.append((o, s.lo, p, int(j)))
    return found, truncated, calls


def _diff_for_sets(analytic: VjpSource, reference: VjpSource, u: dict[int, torch.Tensor], o: int,
                   ranges: list[tuple[int, int]], cols: list[dict[int, torch.Tensor]], batch: int,
                   allowance: int) -> tuple[list[tuple[dict[int, torch.Tensor], float]], int]:
    """For each output range U of output o (u zero elsewhere): (A - R)^T u_U at that set's
    columns, and max(|A^T u_U|, |R^T u_U|); `batch` sets per batched backward."""
    result: list[tuple[dict[int, torch.Tensor], float]] = []
    calls = 0
    flat = u[o].reshape(-1)
    for b0 in range(0, len(ranges), batch):
        part = ranges[b0:b0 + batch]
        cot = {}
        for oo, out in analytic.outputs.items():
            cotangent = torch.zeros((len(part), max(1, out.numel())), dtype=torch.float64)
            if oo == o:
                for b, (lo, hi) in enumerate(part):
                    cotangent[b, lo:hi] = flat[lo:hi]
            cot[oo] = cotangent[:, :out.numel()].reshape(len(part), *out.shape)
        ga = analytic.vjp(cot)
        gr = reference.vjp(cot)
        calls += 1
        del cot
        sizes = torch.zeros(len(part), dtype=torch.float64)
        for p in ga:
            if ga[p].numel():
                sizes = torch.maximum(sizes, torch.linalg.vector_norm(ga[p].double(), math.inf, dim=1))
                sizes = torch.maximum(sizes, torch.linalg.vector_norm(gr[p].double(), math.inf, dim=1))
        for b in range(len(part)):
            wanted = cols[b0 + b]
            values = {p: ga[p][b].double()[js] - gr[p][b].double()[js] for p, js in wanted.items()}
            result.append((values, float(sizes[b])))
        del ga, gr
        release_memory(allowance)
    return result, calls


def _hits(cols: dict[int, torch.Tensor], values: dict[int, torch.Tensor], scale: float, rtol: float, *,
          lo: int = 0, hi: int = 0) -> _Set:
    """The followed columns where this set's difference still stands out, the largest first."""
    kept_cols, kept_values = {}, {}
    for p, js in cols.items():
        vals = values[p]
        keep = vals.abs() > rtol * scale
        js, vals = js[keep], vals[keep]
        if js.numel() > MAX_COLUMNS_PER_SET:
            top = torch.topk(vals.abs(), MAX_COLUMNS_PER_SET).indices
            js, vals = js[top], vals[top]
        kept_cols[p], kept_values[p] = js, vals
    return _Set(lo, hi, kept_cols, kept_values, scale)


def _judge_entries(ctx: CaseContext, found: list[tuple[int, int, int, int]], analytic: VjpSource,
                   reference: VjpSource, truth: Truth) -> list[Mismatch]:
    """The full check's rule on the located entries: their rows from batched backwards per side
    (unit cotangents at those rows, in batches within --max-memory: each row's scale, its values
    at the located columns and its pattern there), then finite differences at the entries
    (numerics.colouring: compressed where those rows' pattern allows)."""
    from gradverify.checks.jacobian import SLACK_FACTOR, SLACK_MIN_EPS

    found = found[: max(1, ctx.settings.mismatch_cap)]
    if not found:
        return []
    tolerance = ctx.tolerance
    fd = truth.fd
    offsets = fd.row_offsets()
    leaves = dict(analytic.leaves)
    moved = truth.perturbed() if tolerance.eps >= SLACK_MIN_EPS else None
    moved_source = moved.reference.source if moved is not None else None
    cols_of = {p: torch.unique(torch.tensor([j for _, _, q, j in found if q == p], dtype=torch.long)) for p in leaves}
    per_entry: dict[tuple[int, int, int, int], tuple[float, float, float, float]] = {}
    wanted: dict[tuple[int, int, int], list[int]] = {}
    for o, i, p, j in found:
        wanted.setdefault((o, i, p), []).append(j)
    pattern: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in leaves}
    batch = _batch_size(analytic, ctx.settings.max_memory, sides=3 if moved_source is not None else 2)
    for o, out in analytic.outputs.items():
        rows = sorted({i for oo, i, _, _ in found if oo == o})
        for b0 in range(0, len(rows), batch):
            part = rows[b0:b0 + batch]
            cot = {}
            for oo, other in analytic.outputs.items():
                unit = torch.zeros((len(part), max(1, other.numel())), dtype=torch.float64)
                if oo == o:
                    unit[torch.arange(len(part)), torch.tensor(part)] = 1
                cot[oo] = unit[:, :other.numel()].reshape(len(part), *other.shape)
            ga, gr = analytic.vjp(cot), reference.vjp(cot)
            gm = moved_source.vjp(cot) if moved_source is not None else None
            del cot
            for p, leaf in leaves.items():
                cols = cols_of[p]
                if not cols.numel():
                    continue
                a_at, t_at = ga[p].double()[:, cols], gr[p].double()[:, cols]
                hot_r, hot_c = torch.nonzero((a_at != 0) | (t_at != 0), as_tuple=True)
                pattern[p].append((torch.tensor(part, dtype=torch.long)[hot_r] + offsets[o], cols[hot_c]))
                for b, i in enumerate(part):
                    t_row = gr[p][b].double()
                    finite = t_row[torch.isfinite(t_row)].abs()
                    scale = float(finite.max()) if finite.numel() else 0.0
                    if scale == 0.0:
                        scale = units_scale(out, leaf)
                    for j in wanted.get((o, i, p), []):
                        slack = SLACK_FACTOR * abs(float(gm[p][b, j]) - float(t_row[j])) if gm is not None else 0.0
                        per_entry[(o, i, p, j)] = (float(ga[p][b, j]), float(t_row[j]), scale,
                                                   slack if math.isfinite(slack) else 0.0)
            del ga, gr, gm
            release_memory(ctx.settings.max_memory // RELEASE_SHARE)
    mismatches: list[Mismatch] = []
    for p, leaf in leaves.items():
        keys = [key for key in found if key[2] == p and key in per_entry]
        if not keys:
            continue
        values = torch.tensor([per_entry[key] for key in keys], dtype=torch.float64)
        judged = Judged(rows=torch.tensor([offsets[o] + i for o, i, _, _ in keys], dtype=torch.long),
                        cols=torch.tensor([j for _, _, _, j in keys], dtype=torch.long),
                        a=values[:, 0], t=values[:, 1], scale=values[:, 2],
                        slack=values[:, 3] if moved_source is not None else None)
        off = judge.disagrees(judged.a, judged.t, judged.scale, tolerance, judged.slack)
        if not bool(off.any()):
            continue
        keys = [key for key, hit in zip(keys, off.tolist()) if hit]
        judged = Judged(rows=judged.rows[off], cols=judged.cols[off], a=judged.a[off], t=judged.t[off],
                        scale=judged.scale[off], slack=judged.slack[off] if judged.slack is not None else None)
        rows_p = torch.cat([r for r, _ in pattern[p]]) if pattern[p] else None
        cols_p = torch.cat([c for _, c in pattern[p]]) if pattern[p] else None
        second = second_truth(fd, p, judged, tolerance,
                              pattern=(rows_p, cols_p) if rows_p is not None and cols_p is not None else None,
                              max_columns=MAX_CONFIRM_COLUMNS, seed=ctx.case.seed)
        done = second.computed
        verdict = torch.full((judged.count,), int(Verdict.UNVERIFIABLE), dtype=torch.int8)
        verdict[done] = judge.with_reference(judged.a[done], judged.t[done], second.values[done], second.bars[done],
                                             second.kinks[done], judged.scale[done], tolerance,
                                             judged.slack[done] if judged.slack is not None else None)
        allowed = judge.allowed(judged.t, judged.scale, tolerance, judged.slack)
        for e, (o, i, _, j) in enumerate(keys):
            if int(verdict[e]) != int(Verdict.MISMATCH):
                continue
            mismatches.append(Mismatch(output=ctx.output_names[o], input=ctx.input_names[p],
                                       out_index=unravel(i, tuple(analytic.outputs[o].shape)),
                                       in_index=unravel(j, tuple(leaf.shape)), expected=float(judged.t[e]),
                                       got=float(judged.a[e]), tolerance=float(allowed[e]),
                                       second=float(second.values[e])))
    mismatches.sort(key=lambda mm: -mm.abs_err)
    return mismatches
