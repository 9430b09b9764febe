"""Cross-device agreement: on a device other than cpu, the op must give the cpu's answers.

A backward can be right on cpu and wrong on cuda (a different kernel, a missing
synchronisation, a device-specific branch). So for every case on another device we run
forward and backward once on that device and once on cpu, in the same dtype, with the same
input values and the same output gradients, and compare outputs and input gradients entry by
entry. A difference beyond the dtype's tolerance is a `device_mismatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gradverify.numerics.forward import CallSignature, call_op, clone_args
from gradverify.numerics.tolerance import Tolerance, tolerance_for
from gradverify.ops.base import Op
from gradverify.report import CheckResult, Diagnosis, Status, format_index
from gradverify.usercode import UserCodeError, user_code

CHECK_NAME = "device"


@dataclass(frozen=True)
class DeviceRun:
    """Outputs and input gradients of one forward + backward, moved to cpu."""

    device: str
    outputs: tuple[torch.Tensor | None, ...]
    grads: tuple[torch.Tensor | None, ...]


def forward_backward(op: Op, signature: CallSignature, args: Sequence[Any], diff_positions: Sequence[int],
                     seed: int) -> DeviceRun:
    """Run forward, then backward with seeded output gradients, wherever `args` live.

    The output gradients are drawn on cpu in float64 from `seed` and cast, so two runs on
    different devices see the same values. Exceptions from the user's code propagate.
    """
    inputs = clone_args(args)
    device = next((str(a.device) for a in inputs if isinstance(a, torch.Tensor)), "cpu")
    for pos in diff_positions:
        inputs[pos].requires_grad_(True)
    # Forward gets non-leaf copies (an op that writes into its input with mark_dirty needs that).
    call = [a.clone() if k in diff_positions else a for k, a in enumerate(inputs)]
    with user_code("forward"):
        outputs = call_op(op, signature, call)
    gen = torch.Generator().manual_seed(seed + 11)
    diff_out: list[torch.Tensor] = []
    grad_out: list[torch.Tensor] = []
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            if out.is_complex():
                g = torch.complex(g, torch.randn(out.shape, generator=gen, dtype=torch.float64))
            diff_out.append(out)
            grad_out.append(g.to(out.dtype).to(out.device))
    leaves = [inputs[p] for p in diff_positions]
    grads: tuple[torch.Tensor | None, ...] = ()
    if diff_out and leaves:
        with user_code("backward"):
            grads = torch.autograd.grad(diff_out, leaves, grad_out, allow_unused=True)
    return DeviceRun(
        device=device,
        outputs=tuple(o.detach().to("cpu") if isinstance(o, torch.Tensor) else None for o in outputs),
        grads=tuple(g.detach().to("cpu") if g is not None else None for g in grads),
    )


def _differences(name: str, cpu: torch.Tensor | None, other: torch.Tensor | None,
                 tolerance: Tolerance) -> tuple[int, str]:
    """How many entries of one tensor disagree, and the worst one as text."""
    if cpu is None and other is None:
        return 0, ""
    if cpu is None or other is None:
        return 1, f"{name}: None on {'cpu' if cpu is None else 'the device'} only"
    if cpu.shape != other.shape:
        return cpu.numel() or 1, f"{name}: shape {tuple(cpu.shape)} on cpu, {tuple(other.shape)} on the device"
    a = cpu.to(torch.complex128 if cpu.is_complex() else torch.float64)
    b = other.to(a.dtype)
    scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).max()) if a.numel() else 0.0
    allowed = tolerance.atol * scale + tolerance.rtol * a.abs()
    both_nan = a.isnan() & b.isnan()
    bad = ((a - b).abs() > allowed) | (a.isnan() ^ b.isnan()) | (~both_nan & (a.isinf() | b.isinf()) & (a != b))
    bad &= ~both_nan
    count = int(bad.sum())
    if not count:
        return 0, ""
    err = (a - b).abs().nan_to_num(float("inf"), float("inf")) * bad
    flat = int(err.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    return count, (f"{format_index(name, index)}: cpu {complex(a[index]) if a.is_complex() else float(a[index]):.6g}, "
                   f"device {complex(b[index]) if b.is_complex() else float(b[index]):.6g}")


def compare_runs(cpu: DeviceRun, other: DeviceRun, *, dtype: str, output_names: Sequence[str],
                 input_names: Sequence[str], tolerance: Tolerance) -> CheckResult:
    """Outputs and gradients of `other` against the cpu run, within the dtype's tolerance."""
    bad_total = 0
    total = 0
    worst: list[str] = []
    if not output_names:
        output_names = ["out"] if len(cpu.outputs) == 1 else [f"out{k}" for k in range(len(cpu.outputs))]
    for k, (a, b) in enumerate(zip(cpu.outputs, other.outputs)):
        count, text = _differences(output_names[k] if k < len(output_names) else f"out{k}", a, b, tolerance)
        bad_total += count
        total += a.numel() if a is not None else 0
        if text:
            worst.append(text)
    for k, (a, b) in enumerate(zip(cpu.grads, other.grads)):
        name = f"grad {input_names[k] if k < len(input_names) else k}"
        count, text = _differences(name, a, b, tolerance)
        bad_total += count
        total += a.numel() if a is not None else 0
        if text:
            worst.append(text)
    if len(cpu.outputs) != len(other.outputs) or len(cpu.grads) != len(other.grads):
        bad_total += 1
        worst.append(f"{len(other.outputs)} outputs on {other.device}, {len(cpu.outputs)} on cpu")
    tol = (("tolerance", f"atol {tolerance.atol:g} x scale + rtol {tolerance.rtol:g} x |cpu value| ({dtype})"),)
    if not bad_total:
        return CheckResult(name=CHECK_NAME, status=Status.PASSED, total_entries=total,
                           message=f"outputs and gradients on {other.device} match the cpu run", details=tol)
    message = f"{bad_total} / {total} output and gradient entries on {other.device} differ from the cpu run"
    diagnosis = Diagnosis("device_mismatch", message, evidence="; ".join(worst[:3]),
                          hint=f"the op computes something different on {other.device}: compare its "
                               f"{other.device} kernel or branch with the cpu one")
    return CheckResult(name=CHECK_NAME, status=Status.FAILED, message=message, mismatch_count=bad_total,
                       total_entries=total, diagnoses=(diagnosis,), details=tol)


class DeviceCheck:
    """On a device other than cpu, the op must give the cpu's answers (same values, same dtype)."""

    name = CHECK_NAME
    default = True
    description = "outputs and gradients on the device against a cpu run of the same inputs"

    def applies(self, ctx: Any) -> str | None:
        if ctx.case.device.split(":")[0] == "cpu":
            return "the case runs on cpu"
        if not ctx.diff_positions:
            return "nothing to differentiate"
        return None

    def run(self, ctx: Any) -> list[CheckResult]:
        if self.applies(ctx):
            return []
        tolerance = tolerance_for(ctx.case.dtype, ctx.settings.atol, ctx.settings.rtol)
        names = [ctx.input_names[p] for p in ctx.diff_positions]
        try:
            other = forward_backward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions, ctx.case.seed)
        except UserCodeError as exc:  # the case's own checks already report errors on the device
            return [CheckResult(name=CHECK_NAME, status=Status.SKIPPED, summary="not compared",
                                message=f"not compared with cpu: the run on the device raised "
                                        f"{type(exc.original).__name__}: {exc.original}")]
        try:
            cpu = forward_backward(ctx.op, ctx.signature, clone_args(ctx.args, device="cpu"), ctx.diff_positions,
                                   ctx.case.seed)
        except UserCodeError as exc:
            return [CheckResult(name=CHECK_NAME, status=Status.SKIPPED, summary="not compared",
                                message=f"not compared with cpu: the op does not run on cpu "
                                        f"({type(exc.original).__name__}: {exc.original})")]
        return [compare_runs(cpu, other, dtype=ctx.case.dtype, output_names=[], input_names=names,
                             tolerance=tolerance)]
