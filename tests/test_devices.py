"""Devices: agreement with the cpu run, and unavailable devices (skipped, or failed with --require-device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gradverify.runner as runner
from conftest import SPECS, run_cli
from gradverify.cases import Case
from gradverify.checks.base import CaseContext
from gradverify.checks.device import DeviceCheck, DeviceRun, compare_runs, forward_backward
from gradverify.config import Settings
from gradverify.numerics.forward import CallSignature
from gradverify.numerics.tolerance import tolerance_for
from gradverify.ops import FunctionOp
from gradverify.report import Status
from gradverify.spec.model import InputSpec, OpSpec

SIGNATURE = CallSignature(names=("x", "w"), keyword=(False, False))


class Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x


def args() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)]


def case_on(device: str) -> Case:
    op = OpSpec(name="Mul", op=FunctionOp(Mul), file="mul.py", line=1,
                params=(InputSpec(name="x"), InputSpec(name="w")))
    inputs = (InputSpec(name="x", shape=(3, 2)), InputSpec(name="w", shape=(3, 2)))
    return Case(op=op, inputs=inputs, dtype="float64", device=device, seed=0)


def test_same_inputs_on_cpu_agree() -> None:
    run = forward_backward(FunctionOp(Mul), SIGNATURE, args(), [0, 1], seed=0)
    check = compare_runs(run, run, dtype="float64", output_names=["out"], input_names=["x", "w"],
                         tolerance=tolerance_for("float64"))
    assert check.status is Status.PASSED and check.total_entries == 18


def test_a_perturbed_output_or_gradient_is_a_device_mismatch() -> None:
    cpu = forward_backward(FunctionOp(Mul), SIGNATURE, args(), [0, 1], seed=0)
    tolerance = tolerance_for("float64")
    assert compare_runs(cpu, cpu, dtype="float64", output_names=[], input_names=["x", "w"],
                        tolerance=tolerance).status is Status.PASSED
    grad_w = cpu.grads[1].clone()
    grad_w[2, 1] += 1e-3
    other = DeviceRun(device="cuda:0", outputs=cpu.outputs, grads=(cpu.grads[0], grad_w))
    check = compare_runs(cpu, other, dtype="float64", output_names=[], input_names=["x", "w"], tolerance=tolerance)
    assert check.status is Status.FAILED and check.mismatch_count == 1
    [diagnosis] = check.diagnoses
    assert diagnosis.kind == "device_mismatch"
    assert "grad w[2,1]" in diagnosis.evidence and "cuda:0" in check.message
    out = cpu.outputs[0].clone()
    out[0, 0] = float("nan")
    check = compare_runs(cpu, DeviceRun("mps", (out,), cpu.grads), dtype="float64", output_names=[],
                         input_names=["x", "w"], tolerance=tolerance)
    assert check.status is Status.FAILED and "out[0,0]" in check.diagnoses[0].evidence


def test_rounding_within_the_dtype_tolerance_is_not_a_mismatch() -> None:
    cpu = forward_backward(FunctionOp(Mul), SIGNATURE, [a.float() for a in args()], [0, 1], seed=0)
    nudged = DeviceRun("cuda", tuple(o * (1 + 1e-6) for o in cpu.outputs), cpu.grads)
    check = compare_runs(cpu, nudged, dtype="float32", output_names=[], input_names=["x", "w"],
                         tolerance=tolerance_for("float32"))
    assert check.status is Status.PASSED


def test_no_device_check_on_cpu() -> None:
    ctx = CaseContext(case_on("cpu"), Settings(), args())
    assert DeviceCheck().applies(ctx) == "the case runs on cpu" and DeviceCheck().run(ctx) == []


def test_unavailable_device_is_skipped_or_failed() -> None:
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    skipped = runner.run_case(case_on("cuda"), Settings())
    assert skipped.status is Status.SKIPPED and "cuda not available" in skipped.message
    failed = runner.run_case(case_on("cuda"), Settings(require_device=True))
    assert failed.status is Status.FAILED and "required device unavailable" in failed.message


def test_require_device_flag_through_the_cli(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    spec = str(SPECS / "column_normalize.py")
    result = run_cli("check", spec, "--device", "cpu", "--device", "cuda", "--require-device", "--format", "json")
    assert result.code == 1, result.stderr
    statuses = {c["device"]: c["status"] for c in result.json()["cases"]}
    assert statuses == {"cpu": "passed", "cuda": "failed"}
    result = run_cli("check", spec, "--device", "cuda", "--format", "json", env={"GRADVERIFY_REQUIRE_DEVICE": "0"})
    # Every case skipped: nothing was checked, which is exit 5 (as pytest's), never a green 0.
    assert result.code == 5 and result.json()["cases"][0]["status"] == "skipped"
