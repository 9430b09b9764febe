"""The Jacobian check: the analytic Jacobian (the op's backward) against the truths, entry by entry.

Three ways through it, one policy (numerics.judge) for all:

* dense: whole blocks in memory (small Jacobians): every entry compared with the reference,
  finite differences at the input columns holding a disagreement (or at every column when
  there is no usable reference), the full diagnosis on whole blocks;
* streamed: row chunks bounded by --max-memory, only disagreeing entries kept;
* projected (--mode fast, or auto beyond what a full check can afford): random projections
  u^T A v against u^T R v and finite differences, with localisation of the wrong entries.

Next to the per-entry test, a norm-wise test on random projections, ||(A - R)^T u|| <= rtol
||R^T u||, catches errors that are individually below the tolerance but together large; it
accuses only when finite differences along the offending direction confirm it.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Sequence

import torch

from gradverify.checks.base import CaseContext, Truth
from gradverify.diagnose import diagnose
from gradverify.numerics import judge
from gradverify.numerics.blocks import BlockComparison, all_mismatches, heatmap_of, named_values
from gradverify.numerics.colouring import MAX_CONFIRM_COLUMNS, Judged, second_truth
from gradverify.numerics.finite_diff import FiniteDifferences
from gradverify.numerics.judge import Verdict
from gradverify.numerics.tolerance import Tolerance
from gradverify.numerics.vjp import VjpSource
from gradverify.report import CheckResult, Diagnosis, Mismatch, Severity, Status
from gradverify.usercode import UserCodeError

NAME = "jacobian"

# --mode auto: a full check (every entry) when it is estimated to take at most AUTO_FULL_SECONDS
# of CPU time, projections beyond. The estimate is measured on the case: the streamed pass times
# its first row chunks (both backwards and the comparison) and extrapolates (numerics.streaming
# _Plan); before that, a Jacobian so large that even AUTO_NS_PER_ENTRY per entry exceeds the
# limit goes straight to projections. 2 ns an entry is below what the comparison alone costs
# (measured ~25 ns an entry for the whole pass of a 4,096 x 4,096 Jacobian on a 2-core Xeon,
# ~6 of them in the comparison), so the shortcut never takes away a full check that would have
# fit. 40 CPU seconds is "tens of seconds" of wall clock with torch's threads sharing the work
# (a full check of 16,384 x 16,384 entries, 2^28, measured 6 CPU s passing and ~11 failing on one
# thread, stays full); the failing path adds its finite differences, bounded by
# colouring.MAX_CONFIRM_COLUMNS.
AUTO_FULL_SECONDS = 40.0
AUTO_NS_PER_ENTRY = 2.0
# The comparison of one dense block holds at once: A (and its float64 copy below float64), the
# truth, finite differences and their bars, the allowed error, |A - truth|, verdicts and masks,
# the second truth for the mismatch list, and the diagnosis' temporaries: about 12 float64
# copies of the block. Beyond --max-memory / 12, stream (or, without a reference, project).
DENSE_COPIES = 12
# Whole blocks are compared directly up to this working set (~90k entries); larger Jacobians
# are streamed (measured 2-4x faster at 4M+ entries: whole blocks fall out of cache).
DENSE_MAX_BYTES = 8 * 2**20
# Random cotangents for the norm-wise test.
NORM_PROBES = 2


def fits_dense(entries: int, max_bytes: int) -> bool:
    return entries * 8 * DENSE_COPIES <= max_bytes


class JacobianCheck:
    name = NAME
    default = True
    description = "every entry of the backward's Jacobian against the reference and finite differences"

    def applies(self, ctx: CaseContext) -> str | None:
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        try:
            return [self._run(ctx)]
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]

    def _run(self, ctx: CaseContext) -> CheckResult:
        from gradverify.numerics.projection import projected_check
        from gradverify.numerics.streaming import OverBudget, streamed_check

        analytic = ctx.analytic
        truth = ctx.truth
        entries = total_entries(analytic)
        mode = ctx.settings.mode
        budget = ctx.settings.max_memory
        usable = truth.reference.usable
        if mode == "fast":
            return projected_check(ctx, analytic, truth, entries)
        auto = mode == "auto"
        if auto and entries * AUTO_NS_PER_ENTRY * 1e-9 > AUTO_FULL_SECONDS:
            return _auto_projected(ctx, projected_check(ctx, analytic, truth, entries),
                                   f"a full check of {entries:,} entries would take at least "
                                   f"{entries * AUTO_NS_PER_ENTRY * 1e-9:,.3g} s (> {AUTO_FULL_SECONDS:.3g} s)")
        if fits_dense(entries, min(budget, DENSE_MAX_BYTES) if usable else budget):
            if auto and not usable:
                estimate = _finite_differences_cost(truth, analytic, entries)
                if estimate > AUTO_FULL_SECONDS:
                    return _auto_projected(ctx, projected_check(ctx, analytic, truth, entries),
                                           f"without a usable reference every column needs finite differences: "
                                           f"estimated at {estimate:,.3g} s for {entries:,} entries "
                                           f"(> {AUTO_FULL_SECONDS:.3g} s)")
            result = dense_check(ctx, analytic, truth, entries)
            return _auto_full(result, "a small Jacobian: every entry") if auto else result
        if usable:
            try:
                result = streamed_check(ctx, analytic, truth, entries,
                                        time_limit=AUTO_FULL_SECONDS if auto else None)
            except OverBudget as over:
                return _auto_projected(ctx, projected_check(ctx, analytic, truth, entries),
                                       f"a full check of {entries:,} entries was estimated at "
                                       f"{over.estimate_s:,.3g} s of CPU "
                                       f"(> {AUTO_FULL_SECONDS:.3g} s; measured: {over.measured})")
            return _auto_full(result, f"estimated within {AUTO_FULL_SECONDS:.3g} CPU s") if auto else result
        result = projected_check(ctx, analytic, truth, entries)
        result = replace(result, notes=result.notes + (
            "no usable reference and the Jacobian is too large to hold for finite differences within --max-memory: "
            "checked by projections",))
        return _auto_projected(ctx, result, "no usable reference, and the Jacobian is too large to hold for "
                                            "finite differences within --max-memory") if auto else result


# Finite differences alone (no usable reference) take every column: about FD_EVALUATIONS_PER_COLUMN
# forward calls each (2 a level, 3-5 levels, the confirmation of mismatches by a second step
# sequence) and FD_SECONDS_PER_ENTRY for the tableau and verdicts of each entry (measured: 7,172
# forward calls and 23 us an entry for an 800-element sin(x) on a 2-core machine).
FD_EVALUATIONS_PER_COLUMN = 9
FD_SECONDS_PER_ENTRY = 25e-6


def _finite_differences_cost(truth: Truth, analytic: VjpSource, entries: int) -> float:
    """Seconds the finite-difference-only full check would take: one forward call timed here."""
    fd = truth.fd
    start = time.thread_time()
    fd.evaluate(fd.args)
    forward = time.thread_time() - start
    return analytic.in_numel() * FD_EVALUATIONS_PER_COLUMN * forward + entries * FD_SECONDS_PER_ENTRY


def _auto_full(result: CheckResult, why: str) -> CheckResult:
    """--mode auto chose the full check: say so. The dense path states no guarantee (its count of
    wrong entries over all entries says it); the streamed one states its own."""
    return replace(result, details=result.details + (("auto", f"full check ({why})"),))


def _auto_projected(ctx: CaseContext, result: CheckResult, why: str) -> CheckResult:
    """--mode auto chose projections: say why, and that the guarantee is probabilistic."""
    return replace(result, details=result.details + (("auto", f"projections: {why}; --mode full checks every "
                                                              "entry"),))


def total_entries(source: VjpSource) -> int:
    return sum(int(out.numel()) for out in source.outputs.values()) * source.in_numel()


def _fallback_scale(block: torch.Tensor, case_max: float, out: torch.Tensor, leaf: torch.Tensor) -> float:
    """Scale for rows whose truth is all zero: the block's largest entry, then the case's, then
    the block's units (rms(out) / rms(in))."""
    finite = block[torch.isfinite(block)].abs()
    block_max = float(finite.max()) if finite.numel() else 0.0
    if block_max > 0:
        return block_max
    if case_max > 0:
        return case_max
    out_rms = float(out.detach().double().pow(2).mean().sqrt()) if out.numel() else 0.0
    in_rms = float(leaf.detach().double().pow(2).mean().sqrt()) if leaf.numel() else 0.0
    return out_rms / in_rms if out_rms > 0 and in_rms > 0 else 1.0


def dense_check(ctx: CaseContext, analytic: VjpSource, truth: Truth, entries: int) -> CheckResult:
    """Whole blocks: per-entry verdicts, finite differences where needed, full diagnosis."""
    leaves = dict(analytic.leaves)
    a_blocks = {(o, p): block for o in analytic.outputs for p, block in analytic.blocks(o).items()}
    comparisons, fd_columns, described = judged_blocks(ctx.tolerance, a_blocks, analytic.outputs, leaves, truth,
                                                       ctx.output_names, ctx.input_names)
    sampled = SAMPLED in described
    described = [text for text in described if text != SAMPLED]
    nonfinite = sum(int((~torch.isfinite(c.truth)).sum()) for c in comparisons)
    mismatches, count = all_mismatches(comparisons, ctx.settings.mismatch_cap)
    diagnoses = diagnose(comparisons) if count else []
    details = [("mode", "full: every entry, whole blocks in memory"),
               ("analytic", _analytic_detail(analytic)),
               ("truth", truth.description),
               ("tolerance", ctx.tolerance.describe()),
               ("finite differences", ("; ".join(described) if described else
                                       f"{fd_columns} column{'s' if fd_columns != 1 else ''}")
                + f" ({truth.fd.path}); {truth.fd.evaluations} forward evaluations in all")]
    if nonfinite:
        details.append(("nonfinite truth", f"{nonfinite} entries of the truth are NaN/Inf: not judged"))
    extra: list[Diagnosis] = []
    if not count:
        extra.extend(norm_test(ctx, analytic, truth))
    return assemble(ctx, truth, details=details, entries=entries, compared=entries, count=count,
                    mismatches=mismatches, diagnoses=list(diagnoses) + extra,
                    unverifiable=sum(int(c.unjudged.sum()) for c in comparisons),
                    kinks=sum(int(c.kinks.sum()) for c in comparisons),
                    excused=sum(int((c.verdict == int(Verdict.EXCUSED)).sum()) for c in comparisons),
                    heatmaps=tuple(heatmap_of(c) for c in comparisons if c.mismatch_count),
                    max_err=max((c.max_abs_err for c in comparisons), default=0.0),
                    lower_bound=sampled and count > 0,
                    notes=(f"the entries to cross-check span more than {MAX_CONFIRM_COLUMNS} columns that finite "
                           "differences must take one by one: a sample of them was checked (the others are not "
                           "judged) and the count is a lower bound",) if sampled else ())


# Marks, among the second-truth descriptions, that a sample of the columns was differenced.
SAMPLED = "sampled"


# An entry may also differ from the truth by SLACK_FACTOR times the change of the truth itself
# when the inputs move by one rounding of the case's dtype (x (1 + eps s)): a backward evaluated
# in float32 rounds its intermediates, which moves its result like such a perturbation would
# (backward error analysis), and where the derivative is ill-conditioned (cos(2000 x) near a
# zero: an entry of 26 next to entries of 2000) that change exceeds any relative tolerance. The
# factor 4 covers the several roundings of a formula. It is computed only where an entry
# disagrees, and only below float64: there it would be ~1e-16 relative for a smooth op, and at a
# kink (where the derivative jumps) it would wrongly clear a real disagreement.
SLACK_FACTOR = 4.0
SLACK_MIN_EPS = 1e-10


def judge_blocks(tolerance: Tolerance, a_blocks: dict[tuple[int, int], torch.Tensor],
                 outputs: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor], truth: Truth,
                 out_names: dict[int, str], in_names: Sequence[str]) -> tuple[list[BlockComparison], int]:
    """Verdicts for whole analytic blocks {(o, p): out.shape + in.shape} against the truths
    (numerics.judge); returns the comparisons and the number of finite-difference columns."""
    comparisons, fd_columns, _ = judged_blocks(tolerance, a_blocks, outputs, leaves, truth, out_names, in_names)
    return comparisons, fd_columns


def judged_blocks(tolerance: Tolerance, a_blocks: dict[tuple[int, int], torch.Tensor],
                  outputs: dict[int, torch.Tensor], leaves: dict[int, torch.Tensor], truth: Truth,
                  out_names: dict[int, str], in_names: Sequence[str]) -> tuple[list[BlockComparison], int, list[str]]:
    """judge_blocks, plus how the second truth was obtained (one text per input differenced)."""
    fd = truth.fd
    described: list[str] = []
    reference = truth.reference
    r_blocks = {o: reference.source.blocks(o) for o in outputs} if reference.source is not None else None
    use_reference = reference.usable and r_blocks is not None
    fd_columns = 0
    f_blocks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if not use_reference:
        for p in leaves:
            n = leaves[p].numel()
            cols = fd.columns(p, torch.arange(n))
            fd_columns += n
            for o in outputs:
                f_blocks[(o, p)] = (cols.estimates[o], cols.bars[o], cols.kinks[o])
    t_flat: dict[tuple[int, int], torch.Tensor] = {}
    a_flat: dict[tuple[int, int], torch.Tensor] = {}
    for (o, p), block in a_blocks.items():
        m = outputs[o].numel()
        a_flat[(o, p)] = block.reshape(m, -1).double()
        t_flat[(o, p)] = (r_blocks[o][p].reshape(m, -1).double() if use_reference and r_blocks is not None
                          else f_blocks[(o, p)][0].double())
    case_max = max((float(t[torch.isfinite(t)].abs().max()) for t in t_flat.values()
                    if t.numel() and bool(torch.isfinite(t).any())), default=0.0)
    verdicts: dict[tuple[int, int], torch.Tensor] = {}
    scales: dict[tuple[int, int], torch.Tensor] = {}
    slacks: dict[tuple[int, int], torch.Tensor] = {}
    moved_blocks: dict[int, dict[int, torch.Tensor]] = {}
    for (o, p), t in t_flat.items():
        a = a_flat[(o, p)]
        scale = judge.row_scales(t, _fallback_scale(t, case_max, outputs[o], leaves[p])).unsqueeze(1).expand_as(t)
        scales[(o, p)] = scale
        if use_reference:
            verdict = torch.zeros(t.shape, dtype=torch.int8)
            # Where the truth itself is not finite (the op undefined there) nothing is judged.
            verdict[~torch.isfinite(t)] = int(Verdict.UNVERIFIABLE)
            disagree = judge.disagrees(a, t, scale, tolerance)
            if bool(disagree.any()):
                slack = _reference_slack(truth, o, p, t, tolerance.eps, moved_blocks)
                if slack is not None:
                    slacks[(o, p)] = slack
                    disagree = judge.disagrees(a, t, scale, tolerance, slack)
            verdict[disagree] = int(Verdict.UNVERIFIABLE)  # pending finite differences
        else:
            f, bar, kink = f_blocks[(o, p)]
            verdict = judge.finite_differences_only(a, f.double(), bar.double(), kink, scale, tolerance)
            verdict[~torch.isfinite(t)] = int(Verdict.UNVERIFIABLE)
            if reference.source is not None and r_blocks is not None:
                verdict = judge.spare_reference_matches(verdict, a, r_blocks[o][p].reshape(t.shape).double(),
                                                        scale, tolerance)
        verdicts[(o, p)] = verdict
    seconds: dict[tuple[int, int], torch.Tensor] = {}
    if use_reference:
        fd_columns += _second_truth_dense(fd, tolerance, verdicts, a_flat, t_flat, scales, slacks, seconds, leaves,
                                          described)
    else:
        fd_columns += _confirm(fd, verdicts, a_flat, scales, tolerance)
        fd_columns += _fd_slack(truth, verdicts, a_flat, t_flat, f_blocks, scales, slacks, tolerance)
    comparisons = []
    for (o, p), t in t_flat.items():
        out_shape = tuple(outputs[o].shape)
        in_shape = tuple(leaves[p].shape)
        shape = (*out_shape, *in_shape)
        comparisons.append(BlockComparison(
            out_pos=o, in_pos=p, out_name=out_names[o], in_name=in_names[p],
            analytic=a_flat[(o, p)].reshape(shape), truth=t.reshape(shape),
            allowed=judge.allowed(t, scales[(o, p)], tolerance, slacks.get((o, p))).reshape(shape),
            verdict=verdicts[(o, p)].reshape(shape), out_shape=out_shape, in_shape=in_shape,
            second=seconds[(o, p)].reshape(shape) if (o, p) in seconds else None,
            tangent=truth.fd.tangents.get(p), dtype=tolerance.dtype,
            **named_values(truth.args, in_names, outputs, out_names)))
    return comparisons, fd_columns, described


def _second_truth_dense(fd: FiniteDifferences, tolerance: Tolerance, verdicts: dict[tuple[int, int], torch.Tensor],
                        a_flat: dict[tuple[int, int], torch.Tensor], t_flat: dict[tuple[int, int], torch.Tensor],
                        scales: dict[tuple[int, int], torch.Tensor], slacks: dict[tuple[int, int], torch.Tensor],
                        seconds: dict[tuple[int, int], torch.Tensor], leaves: dict[int, torch.Tensor],
                        described: list[str]) -> int:
    """Finite differences at the entries pending a second truth (A disagrees with R), one input
    at a time over every output, compressed where the blocks' pattern allows
    (numerics.colouring); their verdicts by numerics.judge.with_reference. Returns the number of
    directions differenced."""
    offsets = fd.row_offsets()
    directions = 0
    for p in leaves:
        keys = [(o, q) for (o, q) in verdicts if q == p]
        parts, pattern_rows, pattern_cols = [], [], []
        for key in keys:
            o = key[0]
            pending = verdicts[key] == int(Verdict.UNVERIFIABLE)
            if not bool(pending.any()):
                continue
            r, c = torch.nonzero(pending, as_tuple=True)
            slack = slacks.get(key)
            parts.append((key, r, c, slack[r, c] if slack is not None else None))
            hot = torch.nonzero(pending.any(dim=1)).reshape(-1)
            pr, pc = torch.nonzero((a_flat[key][hot] != 0) | (t_flat[key][hot] != 0), as_tuple=True)
            pattern_rows.append(offsets[o] + hot[pr])
            pattern_cols.append(pc)
        if not parts:
            continue
        with_slack = any(part[3] is not None for part in parts)
        judged = Judged(
            rows=torch.cat([offsets[key[0]] + r for key, r, _, _ in parts]),
            cols=torch.cat([c for _, _, c, _ in parts]),
            a=torch.cat([a_flat[key][r, c] for key, r, c, _ in parts]),
            t=torch.cat([t_flat[key][r, c] for key, r, c, _ in parts]),
            scale=torch.cat([scales[key][r, c] for key, r, c, _ in parts]),
            slack=torch.cat([s if s is not None else torch.zeros(r.numel(), dtype=torch.float64)
                             for _, r, _, s in parts]) if with_slack else None)
        second = second_truth(fd, p, judged, tolerance, pattern=(torch.cat(pattern_rows), torch.cat(pattern_cols)),
                              max_columns=MAX_CONFIRM_COLUMNS, seed=fd.seed)
        directions += second.columns
        described.append(second.describe())
        if second.sampled:
            described.append(SAMPLED)
        offset = 0
        for key, r, c, _ in parts:
            k = int(r.numel())
            done = second.computed[offset:offset + k]
            values, bars = second.values[offset:offset + k], second.bars[offset:offset + k]
            kinks = second.kinks[offset:offset + k]
            rd, cd = r[done], c[done]
            slack = slacks.get(key)
            verdict = judge.with_reference(a_flat[key][rd, cd], t_flat[key][rd, cd], values[done], bars[done],
                                           kinks[done], scales[key][rd, cd], tolerance,
                                           slack[rd, cd] if slack is not None else None)
            verdicts[key][rd, cd] = verdict
            second_block = torch.full(t_flat[key].shape, math.nan, dtype=torch.float64)
            second_block[rd, cd] = values[done]
            seconds[key] = second_block
            offset += k
    return directions


def _reference_slack(truth: Truth, o: int, p: int, t: torch.Tensor, eps: float,
                     cache: dict[int, dict[int, torch.Tensor]] | None = None) -> torch.Tensor | None:
    if eps < SLACK_MIN_EPS:
        return None
    moved = truth.perturbed()
    if moved is None or moved.reference.source is None:
        return None
    if cache is None:
        cache = {}
    if o not in cache:  # one pass over output o's rows gives every input's block
        cache[o] = moved.reference.source.blocks(o)
    block = cache[o][p].reshape(t.shape).double()
    return SLACK_FACTOR * (block - t).abs().nan_to_num(0.0, 0.0, 0.0)


def _fd_slack(truth: Truth, verdicts: dict[tuple[int, int], torch.Tensor], a_flat: dict[tuple[int, int], torch.Tensor],
              t_flat: dict[tuple[int, int], torch.Tensor],
              f_blocks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              scales: dict[tuple[int, int], torch.Tensor], slacks: dict[tuple[int, int], torch.Tensor],
              tolerance: Tolerance) -> int:
    """Finite differences only: the same slack at the columns holding a mismatch."""
    columns = 0
    if tolerance.eps < SLACK_MIN_EPS:
        return columns
    for (o, p), verdict in verdicts.items():
        bad = verdict == int(Verdict.MISMATCH)
        if not bool(bad.any()):
            continue
        moved = truth.perturbed()
        if moved is None:
            return columns
        cols = torch.nonzero(bad.any(dim=0)).reshape(-1)
        columns += int(cols.numel())
        f2 = moved.fd.columns(p, cols).estimates[o].double()
        slack = torch.zeros_like(t_flat[(o, p)])
        slack[:, cols] = SLACK_FACTOR * (f2 - t_flat[(o, p)][:, cols]).abs().nan_to_num(0.0, 0.0, 0.0)
        slacks[(o, p)] = slack
        f, bar, _ = f_blocks[(o, p)]
        gap = (a_flat[(o, p)] - f.double()).abs()
        allow = judge.allowed(f.double(), scales[(o, p)], tolerance, slack)
        cleared = bad & (gap <= allow + bar.double())
        verdict[cleared & (bar.double() <= allow)] = int(Verdict.AGREE)
        verdict[cleared & (bar.double() > allow)] = int(Verdict.UNVERIFIABLE)
    return columns


def _confirm(fd: FiniteDifferences, verdicts: dict[tuple[int, int], torch.Tensor],
             a_flat: dict[tuple[int, int], torch.Tensor], scales: dict[tuple[int, int], torch.Tensor],
             tolerance: Tolerance) -> int:
    """Finite differences accuse alone only where a second, independent step sequence agrees."""
    columns = 0
    by_input: dict[int, torch.Tensor] = {}
    for (_o, p), verdict in verdicts.items():
        hit = (verdict == int(Verdict.MISMATCH)).any(dim=0)
        by_input[p] = hit if p not in by_input else (by_input[p] | hit)
    for p, hit in by_input.items():
        cols = torch.nonzero(hit).reshape(-1)
        if not cols.numel():
            continue
        columns += int(cols.numel())
        again = fd.columns(p, cols, sequence=1)
        first = fd.columns(p, cols)
        for (o, q), verdict in verdicts.items():
            if q != p:
                continue
            a = a_flat[(o, p)][:, cols]
            sub = judge.confirm(verdict[:, cols], a, again.estimates[o].double(), again.bars[o].double(),
                                again.kinks[o], scales[(o, p)][:, cols], tolerance,
                                f1=first.estimates[o].double(), bar1=first.bars[o].double())
            verdict[:, cols] = sub
    return columns


def norm_test(ctx: CaseContext, analytic: VjpSource, truth: Truth) -> list[Diagnosis]:
    """||(A - R)^T u|| <= rtol ||R^T u|| for random u; a violation confirmed by finite
    differences along the offending direction is a distributed error (a FAILED diagnosis)."""
    reference = truth.reference
    fd = truth.fd
    gen = torch.Generator().manual_seed(ctx.case.seed + 313)
    u = {o: torch.randn((NORM_PROBES, *out.shape), generator=gen, dtype=torch.float64)
         for o, out in analytic.outputs.items()}
    g_a = analytic.vjp(u)
    g_r = reference.source.vjp(u) if reference.usable and reference.source is not None else None
    rtol = ctx.tolerance.rtol
    for b in range(NORM_PROBES):
        a_vec = torch.cat([g_a[p][b].double() for p, _ in analytic.leaves])
        if not bool(torch.isfinite(a_vec).all()) or (
                g_r is not None and not bool(torch.isfinite(torch.cat([g_r[p][b] for p, _ in analytic.leaves])).all())):
            continue  # non-finite values are the per-entry test's and the contracts' to report
        if g_r is not None:
            r_vec = torch.cat([g_r[p][b].double() for p, _ in analytic.leaves])
            diff = a_vec - r_vec
            size = float(torch.linalg.vector_norm(r_vec))
            if float(torch.linalg.vector_norm(diff)) <= rtol * size:
                continue
            direction = diff / float(torch.linalg.vector_norm(diff))
        else:
            direction = torch.randn(a_vec.shape, generator=gen, dtype=torch.float64)
            direction /= float(torch.linalg.vector_norm(direction))
            size = float(torch.linalg.vector_norm(a_vec))
        v, offset = {}, 0
        for p, leaf in analytic.leaves:
            v[p] = direction[offset:offset + leaf.numel()].reshape(leaf.shape)
            offset += leaf.numel()
        alpha = float(a_vec @ direction)
        # u . (F v), contracted inside the tableau (memory of a few outputs), from two disjoint
        # step sequences: finite differences accuse (with the reference, or alone) only when
        # both agree and resolve the difference.
        cotangent = {o: u[o][b:b + 1] for o in analytic.outputs}
        readings = []
        for sequence in (0, 1):
            values, bars = fd.contracted(v, cotangent, sequence=sequence)
            readings.append((float(values[0]), float(bars[0])))
        (phi, beta), (phi2, beta2) = readings
        if not (math.isfinite(phi) and math.isfinite(beta) and math.isfinite(phi2) and math.isfinite(beta2)):
            continue
        if abs(phi - phi2) > beta + beta2:
            continue
        if abs(alpha - phi) > rtol * size + beta and beta < abs(alpha - phi) / 2:
            rho = float(torch.cat([g_r[p][b].double() for p, _ in analytic.leaves]) @ direction) if g_r is not None \
                else phi
            message = (f"every entry is within tolerance, but together they are not: ||(A - R)^T u|| exceeds "
                       f"rtol x ||R^T u|| for a random u, and finite differences along the offending direction "
                       f"confirm it (u^T A v = {alpha:.6g}, reference {rho:.6g}, finite differences {phi:.6g} "
                       f"+- {beta:.2g})")
            return [Diagnosis("distributed_error", message,
                              hint="many entries are slightly off in the same direction: a missing small term, a "
                                   "dropped eps, or a low-precision intermediate")]
    return []


def truth_nonfinite(details: list[tuple[str, str]]) -> bool:
    return any(key == "nonfinite truth" for key, _ in details)


def _analytic_detail(analytic: VjpSource) -> str:
    return analytic.path + (f" (vmap fallback: {analytic.fallback_reason})" if analytic.fallback_reason else "")


def assemble(ctx: CaseContext, truth: Truth, *, details: list[tuple[str, str]], entries: int, compared: int,
             count: int, mismatches: list[Mismatch], diagnoses: list[Diagnosis], unverifiable: int, kinks: int,
             excused: int, heatmaps: tuple[Any, ...], max_err: float, lower_bound: bool = False,
             notes: tuple[str, ...] = (), guarantee: str = "", summary: str = "", message: str = "") -> CheckResult:
    """The jacobian CheckResult from what one of the three paths found."""
    notes_list = list(truth.notes) + list(notes)
    if ctx.constrained:
        notes_list.append("compared along " + "; ".join(f"{text} of {name}" for name, text in ctx.constrained.items())
                          + " (the input's domain): entry (i, j) is the derivative along the projection of e_j")
    if excused:
        notes_list.append(f"{excused} entr{'y' if excused == 1 else 'ies'} where the reference disagrees with the "
                          "backward but finite differences side with the backward: not accused")
    failing = count > 0 or any(d.severity is Severity.ERROR for d in diagnoses)
    if unverifiable and not failing:
        where = " (the input is near a non-differentiable point)" if kinks else ""
        if truth_nonfinite(details):
            where = " (the op is not finite there: the inputs may be outside its domain, try --domain positive)"
        text = (f"{unverifiable} entr{'y' if unverifiable == 1 else 'ies'} not judged: the backward disagrees with "
                f"the reference there and finite differences cannot settle it{where}" if truth.reference.usable else
                f"{unverifiable} entr{'y' if unverifiable == 1 else 'ies'} not judged: finite differences did not "
                f"converge there{where}")
        kind = "nondifferentiable_point" if kinks else "unverifiable"
        diagnoses = list(diagnoses) + [Diagnosis(kind, text, severity=Severity.WARNING,
                                                 hint="re-run with another --seed, or a --domain away from kinks"
                                                 if kinks else "try another --seed or smaller values (--domain)")]
    for note in notes_list:
        details.append(("note", note))
    more = " (at least)" if lower_bound else ""
    if failing:
        status = Status.FAILED
        if count:
            message = f"{count}{'+' if lower_bound else ''} / {entries} Jacobian entries mismatched{more}"
        else:
            message = next(d.message for d in diagnoses if d.severity is Severity.ERROR)
        summary = summary or (f"{count}{'+' if lower_bound else ''} / {entries}" if count else "norm-wise error")
    elif unverifiable:
        status = Status.WARNED
        message = f"no mismatch among {compared - unverifiable} judged entries; {unverifiable} not judged"
        summary = summary or f"0 / {entries}, {unverifiable} not judged"
    else:
        status = Status.PASSED
        message = message or (f"all {compared} Jacobian entries match" if compared == entries else "no error found")
        summary = summary or f"0 / {entries}"
    return CheckResult(name=NAME, status=status, message=message, summary=summary, max_abs_err=max_err,
                       mismatch_count=count, mismatch_count_is_lower_bound=lower_bound, total_entries=entries,
                       compared_entries=compared, unverifiable_count=unverifiable, excused_count=excused,
                       mismatches=tuple(mismatches), diagnoses=tuple(diagnoses), heatmaps=heatmaps,
                       details=tuple(details), notes=tuple(notes_list), guarantee=guarantee)
