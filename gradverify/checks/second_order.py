"""Second order: is the backward itself differentiated correctly (double backward)?

The map under test is G(x) = J(x)^T v for one fixed random v (never ones): the gradient the
backward returns. Its analytic Jacobian comes from autograd through the op's backward
(create_graph=True); its truths are autograd through the forward body twice (where there is a
body) and finite differences of G evaluated with the op's own first-order backward, which the
Jacobian check has already judged. The same judging policy as the first order applies.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from gradverify.checks.base import CaseContext, Truth, skipped
from gradverify.checks.gradcheck import differentiable_function, summarise
from gradverify.checks.jacobian import judge_blocks
from gradverify.diagnose import diagnose
from gradverify.numerics.blocks import all_mismatches, heatmap_of
from gradverify.numerics.finite_diff import FiniteDifferences
from gradverify.numerics.forward import call_op, clone_args, is_differentiable_output
from gradverify.numerics.reference import Reference
from gradverify.numerics.vjp import VjpSource
from gradverify.ops.base import as_tuple
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.usercode import UserCodeError, boundary, user_code

NAME = "second_order"


def _probe(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 202)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device) for o in outputs]


@boundary
def _gradients(outputs_fn: Any, args: list[Any], positions: list[int], seed: int, *,
               create_graph: bool) -> tuple[list[tuple[int, torch.Tensor]], list[torch.Tensor | None]]:
    """Leaves and J^T v at `args` for a fixed random v, through `outputs_fn` (op or body)."""
    fresh = clone_args(args)
    leaves = [(p, fresh[p].requires_grad_(True)) for p in positions]
    call = [a.clone() if k in positions else a for k, a in enumerate(fresh)]
    with torch.enable_grad():
        outputs = [o for o in as_tuple(outputs_fn(call)) if is_differentiable_output(o)]
        grads = torch.autograd.grad(outputs, [leaf for _, leaf in leaves], _probe(outputs, seed),
                                    create_graph=create_graph, allow_unused=True)
    return leaves, list(grads)


class SecondOrderCheck:
    name = NAME
    default = True  # runs with --order 2 (or a spec's `checks: [second_order]`)
    description = "the double backward (--order 2) against autograd through the forward body and finite differences"

    def applies(self, ctx: CaseContext) -> str | None:
        if ctx.settings.order < 2:
            return "--order 1"
        if ctx.op.once_differentiable():
            return "backward is marked @once_differentiable: it declares that it cannot be differentiated again"
        if any(isinstance(a, torch.Tensor) and a.is_complex() for a in ctx.args):
            return "complex inputs"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        if ctx.settings.order < 2:
            return []
        reason = self.applies(ctx)
        if reason:
            return [skipped(NAME, reason)]
        jac = ctx.result("jacobian")
        if jac is not None and not jac.ok:
            return [skipped(NAME, "the first-order gradients are wrong (fix those first)")]
        positions = list(ctx.diff_positions)
        names = {k: f"grad_{ctx.input_names[p]}" for k, p in enumerate(positions)}
        def op_fn(call: list[Any]) -> tuple[Any, ...]:
            return call_op(ctx.op, ctx.signature, call)

        try:
            with user_code("double backward"):
                leaves, grads = _gradients(op_fn, ctx.args, positions, ctx.case.seed, create_graph=True)
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        constant = []
        outputs: list[tuple[int, torch.Tensor]] = []
        for k, ((p, leaf), g) in enumerate(zip(leaves, grads)):
            if g is None:
                g = torch.zeros_like(leaf)
            if not g.requires_grad:
                constant.append(ctx.input_names[p])
                # A gradient with no graph is a constant to autograd: its derivative reads as zero.
                g = g.detach() + 0 * leaf.sum()
            outputs.append((k, g))
        analytic = VjpSource(outputs, leaves, phase="double backward", max_bytes=ctx.settings.max_memory,
                             check_seed=ctx.case.seed)
        try:
            truth = self._truth(ctx, positions)
            a_blocks = {(o, p): block for o, _ in outputs for p, block in analytic.blocks(o).items()}
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        out_tensors = {k: g for k, g in outputs}
        leaf_map = {p: leaf for p, leaf in leaves}
        comparisons, _ = judge_blocks(ctx.tolerance, a_blocks, out_tensors, leaf_map, truth, names, ctx.input_names)
        mismatches, count = all_mismatches(comparisons, ctx.settings.mismatch_cap)
        total = sum(c.truth.numel() for c in comparisons)
        max_err = max((c.max_abs_err for c in comparisons), default=0.0)
        details = (("analytic", f"autograd through backward ({analytic.path})"), ("truth", truth.description))
        results = []
        if not count:
            results.append(CheckResult(name=NAME, status=Status.PASSED, summary=f"0 / {total}",
                                       message=f"all {total} second-order entries match", max_abs_err=max_err,
                                       total_entries=total, compared_entries=total, details=details))
        else:
            patterns = diagnose(comparisons)
            lead = "first-order gradients are right but the double backward is wrong"
            hint = ("write backward with differentiable torch ops (no .detach(), .item(), numpy, or in-place writes "
                    "into saved tensors), and keep tensors it needs in ctx.save_for_backward")
            if constant:
                lead += (f": the gradient for {', '.join(constant)} has no autograd graph (backward detaches, runs "
                         "under no_grad, or uses a tensor stashed on ctx), so its derivative reads as zero")
                hint += ("; a backward that is not meant to be differentiated again should be decorated with "
                         "@once_differentiable, so that double backward raises instead of returning zeros")
            # The ctx_hygiene check (run before) found the tensors on ctx that explain it.
            hygiene = ctx.result("ctx_hygiene")
            stashed = [d for d in (hygiene.diagnoses if hygiene else ())
                       if d.kind == "ctx_attribute" and d.severity is Severity.WARNING]
            if stashed:
                lead += (("; " if constant else ": ") + "backward uses " + " and ".join(d.evidence for d in stashed)
                         + ", kept on ctx (computed in forward, not an input or output), which double backward "
                         "treats as a constant")
            diagnoses = (Diagnosis("second_order", lead, evidence="; ".join(d.message for d in patterns[:2]),
                                   hint=hint),) + tuple(replace(d, severity=Severity.ERROR) for d in stashed)
            results.append(CheckResult(name=NAME, status=Status.FAILED, summary=f"{count} / {total}",
                                       message=f"{count} / {total} second-order entries mismatched",
                                       max_abs_err=max_err, mismatch_count=count, total_entries=total,
                                       compared_entries=total, mismatches=tuple(mismatches), diagnoses=diagnoses,
                                       heatmaps=tuple(heatmap_of(c) for c in comparisons if c.mismatch_count),
                                       details=details))
        if ctx.settings.gradcheck != "off" and ctx.case.dtype in ("float64", "complex128"):
            results.append(_gradgradcheck(ctx))
        return results

    def _truth(self, ctx: CaseContext, positions: list[int]) -> Truth:
        base = ctx.truth
        seed = ctx.case.seed

        def gradient_map(call_args: list[Any]) -> tuple[torch.Tensor, ...]:
            with user_code("backward"):
                leaves, grads = _gradients(lambda c: call_op(ctx.op, ctx.signature, c), call_args, positions, seed,
                                           create_graph=False)
            return tuple(torch.zeros_like(leaf) if g is None else g.detach() for (_, leaf), g in zip(leaves, grads))

        out_positions = list(range(len(positions)))
        fd = FiniteDifferences(gradient_map, base.args, positions, out_positions, tangents=ctx.tangents,
                               max_bytes=ctx.settings.max_memory, seed=seed, target=ctx.tolerance.rtol / 8)
        reference = Reference(None, "autograd through the forward body, twice", "unavailable")
        body = ctx.case.op.reference or ctx.op.body(ctx.case.device)
        if body is not None and base.reference.usable:
            try:
                @boundary
                def body_fn(call: list[Any]) -> tuple[Any, ...]:
                    args, kwargs = ctx.signature.split(call)
                    return as_tuple(body(*args, **kwargs))

                with user_code("reference"):
                    leaves, grads = _gradients(body_fn, base.args, positions, seed, create_graph=True)
                if all(g is not None and g.requires_grad for g in grads):
                    source = VjpSource([(k, g) for k, g in enumerate(grads) if g is not None], leaves,
                                       phase="reference", max_bytes=ctx.settings.max_memory, tangents=ctx.tangents)
                    reference = Reference(source, "autograd through the forward body, twice", "trusted")
            except UserCodeError:
                pass
        return Truth(fd=fd, reference=reference, where=base.where, args=base.args)


def _gradgradcheck(ctx: CaseContext) -> CheckResult:
    fn, inputs = differentiable_function(ctx)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.case.seed)
            torch.autograd.gradgradcheck(fn, inputs, raise_exception=True)
    except Exception as exc:  # noqa: BLE001 - gradgradcheck must never crash the run
        return CheckResult(name="gradgradcheck", status=Status.FAILED, summary="failed",
                           message=f"torch gradgradcheck failed: {summarise(str(exc))}")
    return CheckResult(name="gradgradcheck", status=Status.PASSED, summary="passed",
                       message="torch gradgradcheck passed")
