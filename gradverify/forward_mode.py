"""Forward-mode check: a Function that defines `jvp` gets its Jacobian columns compared too."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.autograd.forward_ad as fwad

from gradverify.compare import all_mismatches, compare_block, heatmap_of, tolerance_for
from gradverify.diagnose import diagnose
from gradverify.jacobian import as_tuple, clone_args
from gradverify.report import CheckResult, Diagnosis, Status


def defines_jvp(function: type) -> bool:
    return any("jvp" in getattr(klass, "__dict__", {}) for klass in function.__mro__
               if klass.__module__.split(".")[0] != "torch")


def forward_jacobian(function: type, args: Sequence[Any], diff_positions: Sequence[int],
                     out_positions: Sequence[int]) -> dict[tuple[int, int], torch.Tensor]:
    """Column by column: one forward-mode call per input entry with a unit tangent."""
    blocks: dict[tuple[int, int], list[torch.Tensor]] = {}
    shapes: dict[tuple[int, int], tuple[int, ...]] = {}
    for p in diff_positions:
        x = args[p]
        for e in range(x.numel()):
            tangent = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
            tangent[e] = 1
            call = clone_args(args)
            with fwad.dual_level():
                call[p] = fwad.make_dual(call[p], tangent.reshape(x.shape))
                outputs = as_tuple(function.apply(*call))
                for o in out_positions:
                    primal, out_tangent = fwad.unpack_dual(outputs[o])
                    if out_tangent is None:
                        out_tangent = torch.zeros_like(primal)
                    blocks.setdefault((o, p), []).append(out_tangent.detach().reshape(-1))
                    shapes[(o, p)] = (*primal.shape, *x.shape)
    return {key: torch.stack(cols, dim=1).reshape(shapes[key]) for key, cols in blocks.items()}


def forward_mode_check(function: type, args: Sequence[Any], diff_positions: Sequence[int],
                       out_positions: Sequence[int], truth: dict[tuple[int, int], torch.Tensor],
                       truth_bars: dict[tuple[int, int], torch.Tensor] | None, out_names: dict[int, str],
                       input_names: Sequence[str], *, dtype: str, mismatch_cap: int, atol: float | None,
                       rtol: float | None) -> CheckResult:
    try:
        analytic = forward_jacobian(function, args, diff_positions, out_positions)
    except Exception as exc:
        message = f"jvp raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return CheckResult(name="forward_ad", status=Status.ERROR, message=message,
                           diagnoses=(Diagnosis("backward_error", message),))
    tolerance = tolerance_for(dtype, atol, rtol)
    blocks = [compare_block(o, p, out_names[o], input_names[p], truth[(o, p)].dim() - args[p].dim(), a, truth[(o, p)],
                            truth_bars[(o, p)] if truth_bars else None, tolerance)
              for (o, p), a in analytic.items()]
    mismatches, count = all_mismatches(blocks, mismatch_cap)
    total = sum(b.truth.numel() for b in blocks)
    max_err = max((b.max_abs_err for b in blocks), default=0.0)
    if not count:
        return CheckResult(name="forward_ad", status=Status.PASSED, message=f"jvp: all {total} entries match",
                           max_abs_err=max_err, total_entries=total)
    return CheckResult(name="forward_ad", status=Status.FAILED,
                       message=f"jvp: {count} / {total} Jacobian entries mismatched", max_abs_err=max_err,
                       mismatch_count=count, total_entries=total, mismatches=tuple(mismatches[:mismatch_cap]),
                       diagnoses=tuple(diagnose(blocks)),
                       heatmaps=tuple(heatmap_of(b) for b in blocks if b.mismatch_count),
                       details=(("analytic", "forward mode (jvp), one unit tangent per input entry"),))
