"""torch.autograd.gradcheck as a second opinion: its verdict, summarised, never its matrices.

gradcheck's plain finite differences (a fixed eps of 1e-6, no error bars) can step out of an
op's domain (log at 1e-7) or across a kink; where gradverify's own two truths are conclusive
and agree with the backward, gradcheck's failure is reported but does not count (the runner
marks it overruled, see runner.overrule_second_opinions).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gradverify.checks.base import CaseContext, skipped
from gradverify.numerics.forward import call_op, clone_args
from gradverify.report import CheckResult, Status

NAME = "gradcheck"
# torch.autograd.gradcheck's own defaults.
GRADCHECK_ATOL = 1e-5
GRADCHECK_RTOL = 1e-3


def summarise(message: str) -> str:
    """gradcheck's first meaningful line; its matrices ('numerical:' ...) are left out."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    kept: list[str] = []
    for line in lines:
        if line.lower().startswith(("numerical:", "analytical:", "tensor(")) or line.startswith(("[", "(")):
            break
        kept.append(line)
        if len(" ".join(kept)) > 240:
            break
    text = " ".join(kept) or (lines[0] if lines else "gradcheck failed")
    return text[:300].rstrip(",;: ")


def differentiable_function(ctx: CaseContext) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
    """The op as a function of its differentiable inputs only (the rest bound), for torch's
    checkers; forward gets non-leaf copies (the pattern torch's docs give for ops that write
    into their input with ctx.mark_dirty)."""
    args = clone_args(ctx.args)
    positions = list(ctx.diff_positions)

    def fn(*diff: torch.Tensor) -> Any:
        call = list(args)
        for pos, value in zip(positions, diff):
            call[pos] = value.clone()
        outputs = call_op(ctx.op, ctx.signature, call)
        kept = tuple(o for o in outputs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()))
        return kept[0] if len(kept) == 1 else kept

    inputs = tuple(args[pos].detach().clone().requires_grad_(True) for pos in positions)
    return fn, inputs


class GradcheckCheck:
    name = NAME
    default = True
    description = "torch.autograd.gradcheck (fast mode by default) as a second opinion"

    def applies(self, ctx: CaseContext) -> str | None:
        if ctx.settings.gradcheck == "off":
            return "--gradcheck off"
        if ctx.case.dtype not in ("float64", "complex128"):
            return f"gradcheck's finite differences are only meaningful in float64/complex128, not {ctx.case.dtype}"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return [skipped(NAME, reason)]
        mode = ctx.settings.gradcheck
        fn, inputs = differentiable_function(ctx)
        # Looser tolerances the spec or caller chose reach gradcheck too (never stricter ones
        # than its defaults: its plain finite differences are only that accurate).
        tolerances: dict[str, float] = {}
        if ctx.settings.atol is not None and ctx.settings.atol > GRADCHECK_ATOL:
            tolerances["atol"] = ctx.settings.atol
        if ctx.settings.rtol is not None and ctx.settings.rtol > GRADCHECK_RTOL:
            tolerances["rtol"] = ctx.settings.rtol
        # gradcheck draws its fast-mode probes from the global RNG: fork it so the user's RNG
        # state is untouched and the verdict is reproducible from --seed.
        devices = [torch.device(a.device).index or 0 for a in inputs if a.device.type == "cuda"]
        from torch.autograd.gradcheck import GradcheckError

        try:
            with torch.random.fork_rng(devices=devices, enabled=True):
                torch.manual_seed(ctx.case.seed)
                torch.autograd.gradcheck(fn, inputs, fast_mode=mode == "fast", raise_exception=True,
                                         nondet_tol=ctx.settings.nondet_tol, **tolerances)
        except GradcheckError as exc:
            return [CheckResult(name=NAME, status=Status.FAILED, summary=f"({mode}) failed",
                                message=f"torch gradcheck ({mode}) failed: {summarise(str(exc))}",
                                details=(("mode", mode),))]
        except Exception as exc:  # noqa: BLE001 - gradcheck itself could not handle the op
            # Its own verdict is absent, not negative: our checks have already run the op's
            # code on the same case and report what it raised.
            return [CheckResult(name=NAME, status=Status.SKIPPED, summary="not judged",
                                message=f"not judged: torch gradcheck ({mode}) raised {type(exc).__name__}: "
                                        f"{summarise(str(exc))}",
                                details=(("mode", mode),))]
        return [CheckResult(name=NAME, status=Status.PASSED, summary=f"({mode}) passed",
                            message=f"torch gradcheck ({mode}) passed"
                                    + (" with the spec's tolerances" if tolerances else ""),
                            details=(("mode", mode),))]
