"""multi_output: the backward with several grad_outputs at once, and with one of them absent.

gradcheck differentiates one output at a time, and the Jacobian check reads rows with one
output's unit cotangent at a time (the engine hands the other outputs zeros, or None), so a
backward that is wrong only when several grad_outputs are non-zero together passes both -- the
"if grad_lse is used, return its gradient, else ..." pattern. A correct backward is linear in
all its grad_outputs jointly: J^T [g_1; ...; g_k] = sum_o J_o^T g_o, whatever the truth is. So:

* random cotangents on every output at once against the sum of the one-output VJPs (which the
  Jacobian check judged), and against the reference where it is usable;
* each output's grad_output absent in turn, as the engine does when that output is unused
  (torch.autograd.grad on a subset of outputs, a wrapper that drops an output): with
  ctx.set_materialize_grads(False) the backward then receives None, and must neither raise nor
  change the other gradients (`undefined_grad`).

A backward that raised on None is also explained where it surfaced first (the contracts or the
Jacobian check, through a wrapper that never uses one of an inner Function's outputs): the
engine is run once more with pre-hooks on the Python Function nodes, which see the None.
"""

from __future__ import annotations

from typing import Any

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.probes import (Gradients, add, describe_difference, differences, engine_vjp, first_line,
                                      python_nodes, random_cotangents)
from gradverify.numerics.forward import ForwardRun
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, user_frame

NAME = "multi_output"
UNDEFINED_HINT = ("test `if grad is not None` before using each grad_output, or drop ctx.set_materialize_grads(False) "
                  "(the engine then passes zeros)")
MULTI_HINT = ("add the contribution of every grad_output (grad_x = J_y^T grad_y + J_lse^T grad_lse), never choose "
              "one by which is non-zero")


def _none_related(exc: BaseException) -> bool:
    """What Python says when None meets arithmetic or a tensor method."""
    return isinstance(exc, (TypeError, AttributeError)) and "NoneType" in str(exc)


class MultiOutputCheck:
    name = NAME
    default = True
    # Runs even after the contracts stopped the case on a backward that raised: it explains a
    # raise caused by a None grad_output (see runner.run_case_once).
    explains_errors = True
    description = ("random grad_outputs on every output at once against the one-output gradients, and each "
                   "grad_output absent (None with materialize_grads off) in turn")

    def applies(self, ctx: CaseContext) -> str | None:
        if len(ctx.run.diff_outputs) < 2:
            return "one differentiable output"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        if not ctx.diff_positions or not ctx.run.diff_outputs:
            return []
        raised = [r for r in ctx.results if r.status is Status.ERROR and r.name in ("contracts", "jacobian")]
        if raised:
            explained = _explain_raise(ctx)
            if explained is not None or ctx.result("contracts") in raised:
                return [explained] if explained is not None else []
        if self.applies(ctx):
            return []
        return [self._probe(ctx)]

    def _probe(self, ctx: CaseContext) -> CheckResult:
        run = ctx.run
        gen = torch.Generator().manual_seed(ctx.case.seed + 606)
        g = random_cotangents(run, gen)
        outs = [o for o, _ in run.diff_outputs]
        try:
            together = engine_vjp(run, g)
        except UserCodeError as exc:
            return ctx.user_error(NAME, exc)
        findings: list[Diagnosis] = []
        # Each output absent in turn (the engine gives it zeros, or None under materialize_grads off).
        without: dict[int, Gradients] = {}
        for o in outs:
            try:
                without[o] = engine_vjp(run, {k: v for k, v in g.items() if k != o})
            except UserCodeError as exc:
                findings.append(_undefined(ctx, o, exc))
        if findings:
            return _failed(findings)
        singles = ({o: without[next(k for k in outs if k != o)] for o in outs} if len(outs) == 2 else {})
        for o in outs:
            if o in singles:
                continue
            try:
                singles[o] = engine_vjp(run, {o: g[o]})
            except UserCodeError as exc:
                findings.append(_undefined(ctx, next(k for k in outs if k != o), exc, several=True))
        if findings:
            return _failed(findings)
        summed: Gradients = {}
        for o in outs:
            summed = add(summed, singles[o])
        wrong = differences(together, summed, ctx.tolerance, leaves=run.leaves)
        if wrong and _reproducible(ctx, run, g, together):
            p, d = next(iter(wrong.items()))
            message = (f"with random grad_outputs on all {len(outs)} outputs at once, "
                       f"{describe_difference(ctx.input_names[p], d)} from the sum of the gradients for one output at "
                       "a time: the backward is wrong only when several grad_outputs are non-zero together (gradcheck "
                       "and the Jacobian check differentiate one output at a time)" + _reference_says(ctx, g, together,
                                                                                                   summed))
            findings.append(Diagnosis("multi_output", message, input=ctx.input_names[p], hint=MULTI_HINT))
        if len(outs) > 2:
            for o in outs:
                rest: Gradients = {}
                for k in outs:
                    if k != o:
                        rest = add(rest, singles[k])
                off = differences(without[o], rest, ctx.tolerance, leaves=run.leaves)
                if off and _reproducible(ctx, run, g, together):
                    p, d = next(iter(off.items()))
                    findings.append(Diagnosis(
                        "multi_output",
                        f"with the grad_output for {ctx.output_names[o]} absent (zeros, or None under "
                        f"materialize_grads off) and the others random, {describe_difference(ctx.input_names[p], d)} "
                        "from the sum of the one-output gradients", input=ctx.input_names[p], hint=MULTI_HINT))
        if findings:
            return _failed(findings)
        probes = 1 + len(outs) + (len(outs) if len(outs) > 2 else 0)
        return CheckResult(name=NAME, status=Status.PASSED, summary=f"{probes}/{probes} ok",
                           message=f"the backward adds up: all {len(outs)} grad_outputs at once equal the sum of one "
                                   "at a time, and it handles each grad_output absent")


def _failed(findings: list[Diagnosis]) -> CheckResult:
    kinds = sorted({d.kind for d in findings})
    message = findings[0].message + (f" (and {len(findings) - 1} more)" if len(findings) > 1 else "")
    return CheckResult(name=NAME, status=Status.FAILED, message=message, summary="failed: " + ", ".join(kinds),
                       diagnoses=tuple(findings))


def _undefined(ctx: CaseContext, o: int, exc: UserCodeError, *, several: bool = False) -> Diagnosis:
    """The backward raised with out[o]'s grad_output absent."""
    name = ctx.output_names[o]
    where = _where(ctx, exc)
    what = "the other grad_outputs" if several else f"the grad_output for {name}"
    unused = "they are" if several else f"{name} is"
    if _none_related(exc.original):
        message = (f"with {what} None (the engine passes None when {unused} unused and materialize_grads is off), "
                   f"backward raised {first_line(exc.original)}{where}")
    else:
        message = f"with {what} absent (as when {unused} unused), backward raised {first_line(exc.original)}{where}"
    return Diagnosis("undefined_grad", message, output=name, hint=UNDEFINED_HINT)


def _reference_says(ctx: CaseContext, g: dict[int, torch.Tensor], together: Gradients, summed: Gradients) -> str:
    """Which of the two the reference sides with, where it is usable (cheap: one batched VJP)."""
    try:
        truth = ctx.truth
    except UserCodeError:
        return ""
    source = truth.reference.source
    if not truth.reference.usable or source is None or set(g) - set(source.outputs):
        return ""
    try:
        rows = source.vjp({o: g[o].detach().double().cpu().unsqueeze(0) for o in g})
    except UserCodeError:
        return ""
    leaves = dict(source.leaves)
    ref: dict[int, torch.Tensor | None] = {p: rows[p][0].reshape(leaves[p].shape) for p in rows}
    together_ok = not differences(_cpu(together), ref, ctx.tolerance)
    summed_ok = not differences(_cpu(summed), ref, ctx.tolerance)
    if summed_ok and not together_ok:
        return "; the reference agrees with the sum of the one-output gradients"
    return ""


def _cpu(grads: Gradients) -> Gradients:
    return {p: (g.detach().double().cpu() if g is not None else None) for p, g in grads.items()}


def _reproducible(ctx: CaseContext, run: ForwardRun, g: dict[int, torch.Tensor], together: Gradients) -> bool:
    """Cross-check before accusing: the all-outputs call gives the same gradient again (if not, the
    difference is nondeterminism, which that check reports)."""
    try:
        again = engine_vjp(run, g)
    except UserCodeError:
        return False
    return not differences(again, together, ctx.tolerance, leaves=run.leaves)


def _where(ctx: CaseContext, exc: UserCodeError) -> str:
    file, line = user_frame(exc.original, prefer=ctx.case.op.file)
    return f" at {file}:{line}" if file and not file.startswith("<") else ""


# --- explaining a raise that surfaced in another check -------------------------------------------


def _explain_raise(ctx: CaseContext) -> CheckResult | None:
    """A backward that raised in the contracts or the Jacobian check because a Python Function
    received None for an output's gradient: run the engine once more with pre-hooks recording
    which grad_outputs each Function node received as None, and say so."""
    run = ctx.run
    received: list[tuple[Any, list[int]]] = []
    handles = []
    for node in python_nodes(run):
        def record(grad_outputs: tuple[Any, ...], node: Any = node) -> None:
            received.append((node, [k for k, go in enumerate(grad_outputs) if go is None]))

        handles.append(node.register_prehook(record))
    gen = torch.Generator().manual_seed(ctx.case.seed + 606)
    try:
        engine_vjp(run, random_cotangents(run, gen))
    except UserCodeError as exc:
        error: UserCodeError | None = exc
    else:
        error = None
    finally:
        for handle in handles:
            handle.remove()
    if error is None or not _none_related(error.original) or not received:
        return None
    node, missing = received[-1]  # the last node the engine reached is the one that raised
    if not missing:
        return None
    function = getattr(node, "_forward_cls", type(node)).__name__
    outputs = ", ".join(str(k) for k in missing)
    message = (f"{function}.backward received None as the grad_output for its output {outputs} (the engine passes "
               f"None for an output that is unused -- {ctx.case.op.name} never uses it -- when materialize_grads is "
               f"off) and raised {first_line(error.original)}{_where(ctx, error)}")
    return CheckResult(name=NAME, status=Status.FAILED, message=message, summary="failed: undefined_grad",
                       diagnoses=(Diagnosis("undefined_grad", message, hint=UNDEFINED_HINT),))


__all__ = ["MultiOutputCheck", "NAME"]
