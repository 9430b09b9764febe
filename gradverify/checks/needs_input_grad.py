"""needs_input_grad: the backward with only some inputs requiring grad.

The tutorial's LinearFunction computes each gradient behind `if ctx.needs_input_grad[i]`. With
every input requiring grad (all a plain Jacobian check ever tries) a guard that tests the wrong
index is invisible; in a model where only the weight requires grad it silently drops the
weight's gradient. So for ops with two or more differentiable inputs, the backward also runs
with each input alone requiring grad, and with each input alone not requiring grad: it must not
raise, every needed gradient must equal the one from the all-inputs run (which the Jacobian
check judged against the truths), unneeded ones may be anything (None is best).
"""

from __future__ import annotations

from typing import Any

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.contracts import random_grad_outputs
from gradverify.numerics.forward import run_forward
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, user_code

NAME = "needs_input_grad"


class NeedsInputGradCheck:
    name = NAME
    default = True
    description = "the backward with each input alone requiring grad (and alone not): ctx.needs_input_grad guards"

    def applies(self, ctx: CaseContext) -> str | None:
        if len(ctx.diff_positions) < 2:
            return "fewer than two differentiable inputs"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return []
        try:
            full_run = ctx.run
        except UserCodeError:
            return []
        gen = torch.Generator().manual_seed(ctx.case.seed + 404)
        grads_out = random_grad_outputs(full_run.outputs, gen)
        try:
            full = _engine_grads(full_run, grads_out)
        except UserCodeError:
            return []  # the Jacobian check reports a backward that raises
        names = ctx.input_names
        positions = list(ctx.diff_positions)
        patterns = [[p] for p in positions]
        if len(positions) > 2:
            patterns += [[q for q in positions if q != p] for p in positions]
        computed: dict[tuple[int, ...], dict[int, bool]] = {}
        problems: list[str] = []
        # (label, input position, what) for needed gradients that came back None or wrong; worded
        # once every pattern ran, when the guard each gradient really tests is known.
        wrong: list[tuple[str, int, str]] = []
        for subset in patterns:
            label = _label(subset, positions, names)
            try:
                run = run_forward(ctx.op, ctx.signature, ctx.args, subset, phase="forward")
            except UserCodeError as exc:
                problems.append(f"{label}, forward raised {type(exc.original).__name__}: {exc.original}")
                continue
            if not run.diff_outputs:
                problems.append(f"{label}, no output of forward requires grad")
                continue
            raw = ctx.op.raw_backward(run.outputs, ctx.signature.n_positional)
            if raw is not None:
                try:
                    with user_code("backward"), torch.no_grad():
                        returned, _ = raw([g.clone() if isinstance(g, torch.Tensor) else g
                                           for g in random_grad_outputs(run.outputs, gen)])
                    positional = [pos for pos, p in enumerate(ctx.case.inputs) if not p.keyword]
                    computed[tuple(subset)] = {pos: k < len(returned) and returned[k] is not None
                                               for k, pos in enumerate(positional)}
                except UserCodeError as exc:
                    problems.append(f"{label}, backward raised {type(exc.original).__name__}: {exc.original}")
                    continue
            try:
                grads = _engine_grads(run, grads_out)
            except UserCodeError as exc:
                problems.append(f"{label}, backward raised {type(exc.original).__name__}: {exc.original}")
                continue
            for pos in subset:
                got, want = grads.get(pos), full.get(pos)
                if got is None:
                    if want is not None and bool((want != 0).any()):
                        wrong.append((label, pos, f"backward returned None for `{names[pos]}`"))
                    continue
                if want is None:
                    continue
                bad = _differs(got, want, ctx)
                if bad:
                    wrong.append((label, pos, f"the gradient for `{names[pos]}` differs from the all-inputs run at "
                                              f"{bad} of {got.numel()} entries"))
        problems = [f"{label}, {what}{_guard_hint(pos, computed, positions)}" for label, pos, what in wrong] + problems
        tried = len(patterns)
        if problems:
            message = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            return [CheckResult(name=NAME, status=Status.FAILED, message=message,
                                summary=f"{len(problems)} pattern{'s' if len(problems) != 1 else ''} wrong",
                                diagnoses=(Diagnosis("needs_input_grad", message, evidence="; ".join(problems[1:4]),
                                                     hint="each `if ctx.needs_input_grad[i]` must guard the "
                                                          "gradient of input i (forward's i-th argument)"),))]
        return [CheckResult(name=NAME, status=Status.PASSED, summary=f"{tried}/{tried} ok",
                            message=f"the backward is right with each of {tried} subsets of inputs requiring grad")]


def _label(subset: list[int], positions: list[int], names: tuple[str, ...]) -> str:
    if len(subset) == 1:
        return f"with only `{names[subset[0]]}` requiring grad"
    missing = [p for p in positions if p not in subset]
    return f"with all but `{names[missing[0]]}` requiring grad"


def _guard_hint(pos: int, computed: dict[tuple[int, ...], dict[int, bool]], positions: list[int]) -> str:
    """': the guard for it tests needs_input_grad[k]' when the single-input runs show that the
    gradient of `pos` is computed exactly when input k alone requires grad."""
    singles = {subset[0]: flags for subset, flags in computed.items() if len(subset) == 1}
    if len(singles) < len(positions):
        return ""
    when = [k for k, flags in singles.items() if flags.get(pos)]
    if len(when) == 1 and when[0] != pos:
        return f": the guard for it tests needs_input_grad[{when[0]}]"
    return ""


def _engine_grads(run: Any, grads_out: list[Any]) -> dict[int, torch.Tensor | None]:
    outs = [o for _, o in run.diff_outputs]
    gouts = [grads_out[i].clone() for i, _ in run.diff_outputs]
    leaves = [leaf for _, leaf in run.leaves]
    with user_code("backward"):
        result = torch.autograd.grad(outs, leaves, gouts, retain_graph=True, allow_unused=True)
    return {p: (g.detach() if g is not None else None) for (p, _), g in zip(run.leaves, result)}


def _differs(got: torch.Tensor, want: torch.Tensor, ctx: CaseContext) -> int:
    """Entries where two runs of the same backward differ beyond rounding (the case's tolerance)."""
    if got.shape != want.shape:
        return got.numel()
    a, b = got.double(), want.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    allowed = ctx.tolerance.atol * scale + ctx.tolerance.rtol * b.abs()
    return int(((a - b).abs() > allowed).sum())
