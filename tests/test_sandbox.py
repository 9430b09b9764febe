"""Global torch state around a case: what a spec sets at import cannot fail a right op, and a
case leaves the state as it found it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gradverify.api import check_paths
from gradverify.config import Settings
from gradverify.report import Status
from gradverify.sandbox import torch_sandbox

RIGHT_OP = '''
import sys
import torch
import gradverify as gv

{preamble}

@gv.check(inputs={{"x": gv.tensor(3, 4)}}{options})
class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * grad * x
'''


@pytest.fixture
def restore_globals():  # type: ignore[no-untyped-def]
    """A spec imported in this process changes its globals: put them back for the other tests."""
    grad, limit, anomaly = torch.is_grad_enabled(), sys.getrecursionlimit(), torch.is_anomaly_enabled()
    yield
    torch.set_grad_enabled(grad)
    sys.setrecursionlimit(limit)
    torch.autograd.set_detect_anomaly(anomaly)


@pytest.mark.parametrize("preamble", ["torch.set_grad_enabled(False)", "sys.setrecursionlimit(100)",
                                      "torch.autograd.set_detect_anomaly(True)"])
def test_global_state_set_at_import_does_not_fail_a_right_op(tmp_path: Path, preamble: str,
                                                               restore_globals: None) -> None:
    path = tmp_path / "spec.py"
    path.write_text(RIGHT_OP.format(preamble=preamble, options=""))
    report = check_paths([path], Settings())
    (case,) = report.cases
    # Every check, gradcheck included (it fails under grad mode off), not only the case's verdict.
    assert [(c.name, c.status) for c in case.checks if c.status not in (Status.PASSED, Status.SKIPPED)] == []
    assert case.status is Status.PASSED


def test_sys_exit_in_a_declared_reference_fails_the_case_instead_of_ending_the_run(tmp_path: Path) -> None:
    path = tmp_path / "spec.py"
    # A wrong backward (a factor 2 missing) with a reference that calls sys.exit(0).
    path.write_text(RIGHT_OP.format(preamble="def reference(x):\n    sys.exit(0)",
                                    options=", reference=reference").replace("2 * grad * x", "grad * x"))
    report = check_paths([path], Settings(gradcheck="off"))
    (case,) = report.cases
    assert case.status is Status.FAILED and report.exit_code == 1
    assert any("SystemExit" in note for check in case.checks for note in check.notes) or \
        any("SystemExit" in note for note in case.notes)


def _state() -> tuple[object, ...]:
    return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
            torch.is_anomaly_enabled(), sys.getrecursionlimit(), torch.get_rng_state().clone().tolist())


def test_the_sandbox_sets_what_checks_need_and_restores_everything() -> None:
    before = _state()
    try:
        torch.set_grad_enabled(False)
        torch.autograd.set_detect_anomaly(True)
        sys.setrecursionlimit(200)
        outside = _state()
        with torch_sandbox(seed=7):
            assert torch.is_grad_enabled() and not torch.is_anomaly_enabled()
            assert sys.getrecursionlimit() >= 1000
            assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))
            # What a case's own code changes must not outlive the case.
            torch.set_default_dtype(torch.float64)
            torch.use_deterministic_algorithms(True)
            torch.set_grad_enabled(False)
            torch.rand(5)
        assert _state() == outside
    finally:
        torch.set_grad_enabled(before[0])  # type: ignore[arg-type]
        torch.autograd.set_detect_anomaly(False)
        sys.setrecursionlimit(before[4])  # type: ignore[arg-type]
    assert _state()[:4] == before[:4]


def test_a_case_does_not_leak_global_state_into_the_next(tmp_path: Path) -> None:
    path = tmp_path / "spec.py"
    # A forward that flips the default dtype and consumes the global RNG on every call.
    path.write_text(RIGHT_OP.format(preamble="", options="").replace(
        "ctx.save_for_backward(x)", "torch.set_default_dtype(torch.float64); torch.rand(1)\n        "
                                    "ctx.save_for_backward(x)"))
    before = (torch.get_default_dtype(), torch.get_rng_state().clone())
    report = check_paths([path], Settings(gradcheck="off"))
    assert report.cases[0].status is Status.PASSED
    assert torch.get_default_dtype() == before[0] and torch.equal(torch.get_rng_state(), before[1])
