"""Forward mode: Jacobian columns from forward-mode AD compared with the truths.

Columns come from forward-mode AD with one unit tangent per input entry (up to MAX_COLUMNS
entries per input), judged with the same policy as the backward.

"This op has no forward-mode rule" is not "its forward-mode rule is wrong". A Function
without `jvp` makes forward AD raise; a torch.library custom op cannot define a jvp at all, and
forward AD through it silently returns no tangent (torch.func.jacfwd gives an all-zero
Jacobian, gradcheck(check_forward_ad=True) fails every such op, right or wrong, with the same
mismatch). So without a rule the check does not apply (with a note for custom ops, where
the zeros are silent), unless forward mode is claimed: `--check transforms` (or `transforms`
in a spec's `checks:`). A claimed or declared rule is judged; a block
whose tangent is zero or absent where the truth is not is named `dropped_tangent`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwad

from gradverify.checks.base import CaseContext
from gradverify.checks.jacobian import judge_blocks
from gradverify.checks.common import not_applicable_result, requested
from gradverify.diagnose import diagnose
from gradverify.numerics.blocks import all_mismatches, heatmap_of
from gradverify.numerics.forward import call_op, clone_args
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, user_code

NAME = "forward_mode"
# Unit tangents per input beyond which the check is not worth its cost (one forward call each).
MAX_COLUMNS = 4096


def claims_forward_mode(ctx: CaseContext) -> bool:
    """The user asked for transforms by name (--check transforms, a spec's `checks:`): forward
    mode is then claimed even where no rule is declared. Naming forward_mode itself only selects
    the check, which runs where it applies (a spec listing it for a Function without jvp stays
    valid)."""
    return "transforms" in ctx.settings.add_checks or "transforms" in (ctx.settings.checks or ())


def forward_jacobian(ctx: CaseContext,
                     absent: set[tuple[int, int]] | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """{(o, p): (out.numel(), in.numel())} by forward-mode AD, one unit tangent per input entry.
    `absent` collects the blocks for which forward AD returned no tangent at all (None)."""
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
                        if absent is not None:
                            absent.add((o, p))
                        out_tangent = torch.zeros_like(primal)
                    columns.setdefault((o, p), []).append(out_tangent.detach().reshape(-1))
    return {key: torch.stack(cols, dim=1) for key, cols in columns.items()}


class ForwardModeCheck:
    name = NAME
    default = True
    description = ("forward-mode AD (a defined jvp, or any op with --check transforms) against the truths; a "
                   "dropped tangent named")

    def applies(self, ctx: CaseContext) -> str | None:
        if not ctx.settings.forward_ad:
            return "forward mode switched off"
        if not ctx.op.defines_jvp() and not claims_forward_mode(ctx):
            return no_rule_reason(ctx)
        if any(ctx.args[p].numel() > MAX_COLUMNS for p in ctx.diff_positions):
            return f"an input has more than {MAX_COLUMNS} entries (one forward call per entry)"
        if any(isinstance(a, torch.Tensor) and a.is_complex() for a in ctx.args):
            return "complex inputs"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            # Said where it matters: a custom op's forward-mode zeros are silent.
            if ctx.op.kind in ("custom_op", "torch.ops") or claims_forward_mode(ctx) or requested(ctx, NAME):
                return [not_applicable_result(NAME, reason)]
            return []
        absent: set[tuple[int, int]] = set()
        try:
            analytic = forward_jacobian(ctx, absent)
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
            diagnoses = [d for d in diagnoses if d.kind != "zero_grad"]  # the same finding, named once
            diagnoses.insert(0, dropped_diagnosis(ctx, dropped, absent))
        return [CheckResult(name=NAME, status=Status.FAILED, message=f"jvp: {count} / {total} Jacobian entries "
                                                                      "mismatched",
                            summary=f"{count} / {total}", max_abs_err=max_err, mismatch_count=count,
                            total_entries=total, compared_entries=total, mismatches=tuple(mismatches),
                            diagnoses=tuple(diagnoses),
                            heatmaps=tuple(heatmap_of(c) for c in comparisons if c.mismatch_count),
                            details=(("analytic", "forward mode (jvp), one unit tangent per input entry"),))]


def no_rule_reason(ctx: CaseContext) -> str:
    if ctx.op.kind in ("custom_op", "torch.ops"):
        return ("the op has no forward-mode rule (torch.library custom ops cannot define a jvp): forward AD and "
                "torch.func.jacfwd silently return zero tangents through it; --check transforms checks that claim")
    if ctx.op.kind == "Function":
        return "the op defines no jvp (forward AD raises for it)"
    return "a plain callable: forward AD goes through torch's own rules (--check transforms checks it)"


def dropped_diagnosis(ctx: CaseContext, dropped: list[Any], absent: set[tuple[int, int]]) -> Diagnosis:
    block = dropped[0]
    names = ", ".join(f"∂{c.out_name}/∂{c.in_name}" for c in dropped[:3])
    if not ctx.op.defines_jvp() and ctx.op.kind in ("custom_op", "torch.ops"):
        return Diagnosis("dropped_tangent",
                         f"forward mode silently drops the tangent ({names}): the op has no forward-mode rule (a "
                         "torch.library custom op cannot define one), so forward AD returns no tangent and "
                         "torch.func.jacfwd an all-zero Jacobian, with no error",
                         output=block.out_name, input=block.in_name,
                         hint="do not use forward mode (jvp, jacfwd, hessian) through this op, or wrap it in an "
                              "autograd.Function with a jvp")
    how = "no tangent (None)" if any((c.out_pos, c.in_pos) in absent for c in dropped) else "a zero tangent"
    return Diagnosis("dropped_tangent", f"the jvp returns {how} for {names} where the truth is not zero",
                     output=block.out_name, input=block.in_name,
                     hint="return the tangent of every output from jvp, summing the contribution of every input "
                          "tangent (a None or zeros_like drops it silently)")


__all__ = ["ForwardModeCheck", "claims_forward_mode", "forward_jacobian", "Any"]
