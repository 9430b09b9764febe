"""Forward mode: an op that defines `jvp` gets its Jacobian columns compared with the truths.

Columns come from forward-mode AD with one unit tangent per input entry (up to MAX_COLUMNS per
input, then random tangents: projections), judged with the same policy as the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwad

from gradverify.checks.base import CaseContext
from gradverify.checks.jacobian import judge_blocks
from gradverify.diagnose import diagnose
from gradverify.numerics.blocks import all_mismatches, heatmap_of
from gradverify.numerics.forward import call_op, clone_args
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, user_code

NAME = "forward_mode"
# Unit tangents per input beyond which the check is not worth its cost (one forward call each).
MAX_COLUMNS = 4096


def forward_jacobian(ctx: CaseContext) -> dict[tuple[int, int], torch.Tensor]:
    """{(o, p): (out.numel(), in.numel())} by forward-mode AD, one unit tangent per input entry."""
    columns: dict[tuple[int, int], list[torch.Tensor]] = {}
    outs = ctx.out_positions
    for p in ctx.diff_positions:
        x = ctx.args[p]
        for e in range(x.numel()):
            tangent = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
            tangent[e] = 1
            tangent = tangent.reshape(x.shape)
            projection = ctx.tangents.get(p)
            if projection is not None:
                tangent = projection(x.detach(), tangent)
            call = clone_args(ctx.args)
            with user_code("jvp"), fwad.dual_level():
                call[p] = fwad.make_dual(call[p], tangent)
                outputs = call_op(ctx.op, ctx.signature, call)
                for o in outs:
                    primal, out_tangent = fwad.unpack_dual(outputs[o])
                    if out_tangent is None:
                        out_tangent = torch.zeros_like(primal)
                    columns.setdefault((o, p), []).append(out_tangent.detach().reshape(-1))
    return {key: torch.stack(cols, dim=1) for key, cols in columns.items()}


class ForwardModeCheck:
    name = NAME
    default = True
    description = "forward-mode AD (a defined jvp) against the truths"

    def applies(self, ctx: CaseContext) -> str | None:
        if not ctx.settings.forward_ad:
            return "forward mode switched off"
        if not ctx.op.defines_jvp():
            return "the op defines no jvp"
        if any(ctx.args[p].numel() > MAX_COLUMNS for p in ctx.diff_positions):
            return f"an input has more than {MAX_COLUMNS} entries (one forward call per entry)"
        if any(isinstance(a, torch.Tensor) and a.is_complex() for a in ctx.args):
            return "complex inputs"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        if self.applies(ctx):
            return []
        try:
            analytic = forward_jacobian(ctx)
            truth = ctx.truth
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        outputs = {o: out for o, out in ctx.run.diff_outputs}
        leaves = {p: leaf for p, leaf in ctx.run.leaves}
        blocks = {key: col.reshape((*outputs[key[0]].shape, *leaves[key[1]].shape)) for key, col in analytic.items()}
        comparisons, _ = judge_blocks(ctx.tolerance, blocks, outputs, leaves, truth, ctx.output_names,
                                      ctx.input_names)
        mismatches, count = all_mismatches(comparisons, ctx.settings.mismatch_cap)
        total = sum(c.truth.numel() for c in comparisons)
        max_err = max((c.max_abs_err for c in comparisons), default=0.0)
        if not count:
            return [CheckResult(name=NAME, status=Status.PASSED, message=f"jvp: all {total} entries match",
                                summary=f"0 / {total}", max_abs_err=max_err, total_entries=total,
                                compared_entries=total)]
        diagnoses: list[Diagnosis] = list(diagnose(comparisons))
        dropped = [c for c in comparisons if c.mismatch_count and bool((c.analytic == 0).all())]
        if dropped:
            diagnoses.insert(0, Diagnosis("dropped_tangent",
                                          f"the jvp returns a zero tangent for ∂{dropped[0].out_name}/"
                                          f"∂{dropped[0].in_name} where the truth is not zero",
                                          hint="return the tangent of every output from jvp (a None or "
                                               "zeros_like drops it silently)"))
        return [CheckResult(name=NAME, status=Status.FAILED, message=f"jvp: {count} / {total} Jacobian entries "
                                                                      "mismatched",
                            summary=f"{count} / {total}", max_abs_err=max_err, mismatch_count=count,
                            total_entries=total, compared_entries=total, mismatches=tuple(mismatches),
                            diagnoses=tuple(diagnoses),
                            heatmaps=tuple(heatmap_of(c) for c in comparisons if c.mismatch_count),
                            details=(("analytic", "forward mode (jvp), one unit tangent per input entry"),))]


__all__ = ["ForwardModeCheck", "forward_jacobian", "Any"]
