"""torch.autograd.gradcheck as a second opinion: its verdict, summarised, never its matrices."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.autograd.gradcheck import GradcheckError

from gradverify.jacobian import clone_args
from gradverify.report import CheckResult, Status


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


def on_copies(function: type) -> Any:
    """Function.apply on non-leaf copies of gradcheck's leaves: the pattern torch's docs give for
    ops that modify their input (ctx.mark_dirty), and an identity for the gradient of every other."""

    def apply(*args: Any) -> Any:
        return function.apply(*[a.clone() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args])

    return apply


def run_gradcheck(function: type, args: Sequence[Any], diff_positions: Sequence[int], *,
                  mode: str, dtype: str, seed: int, nondet_tol: float) -> CheckResult:
    if mode == "off":
        return CheckResult(name="gradcheck", status=Status.SKIPPED, message="not run (--gradcheck off)")
    if dtype not in ("float64", "complex128"):
        return CheckResult(name="gradcheck", status=Status.SKIPPED,
                           message=f"not run in {dtype}: gradcheck's finite differences are only "
                                   "meaningful in float64/complex128")
    inputs = clone_args(args)
    for pos in diff_positions:
        inputs[pos].requires_grad_(True)
    fast = mode == "fast"
    # gradcheck draws its fast-mode probes from the global RNG: fork it so the user's RNG state
    # is untouched and the verdict is reproducible from --seed.
    devices = [torch.device(a.device).index or 0 for a in inputs
               if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.manual_seed(seed)
            torch.autograd.gradcheck(on_copies(function), tuple(inputs), fast_mode=fast,
                                     raise_exception=True, nondet_tol=nondet_tol)
    except GradcheckError as exc:
        return CheckResult(name="gradcheck", status=Status.FAILED,
                           message=f"torch gradcheck ({mode}) failed: {summarise(str(exc))}",
                           details=(("mode", mode),))
    except Exception as exc:  # gradcheck must never crash the run
        # gradcheck itself could not handle this Function (a None output, say). Its own verdict
        # is absent, not negative: our checks have already run the user's code on the same case.
        return CheckResult(name="gradcheck", status=Status.SKIPPED,
                           message=f"not judged: torch gradcheck ({mode}) raised {type(exc).__name__}: "
                                   f"{summarise(str(exc))}",
                           details=(("mode", mode),))
    return CheckResult(name="gradcheck", status=Status.PASSED, message=f"torch gradcheck ({mode}) passed",
                       details=(("mode", mode),))
