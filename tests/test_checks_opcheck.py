"""torch.library.opcheck as a second opinion: its one-line verdict, shown beside gradverify's, and
when it counts (runner.overrule_second_opinions).

The custom op is registered once per process in the `gv_test_opcheck` namespace (`_once`).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor

import gradverify
from gradverify.checks.opcheck import CHEAP_UTILS, FULL_UTILS, summarise, summarise_message
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.runner import overrule_second_opinions

_REGISTRY = sys.modules.setdefault("_gv_test_opcheck_ops", types.ModuleType("_gv_test_opcheck_ops"))
_OPS: dict[str, Any] = _REGISTRY.__dict__.setdefault("ops", {})


def _once(name: str, define: Callable[[], Any]) -> Any:
    if name not in _OPS:
        _OPS[name] = define()
    return _OPS[name]


# RMSNorm whose backward forgets that rstd depends on x (dx = rstd * g * w): every registration
# is right, only the formula is wrong, which opcheck does not look at (pytorch/pytorch#111931).
# Maths of linkedin/Liger-Kernel src/liger_kernel/ops/rms_norm.py, as a custom op.
def _define_rms_norm_bug_formula() -> Any:
    @torch.library.custom_op("gv_test_opcheck::rms_norm_bug_formula", mutates_args=())
    def op(x: Tensor, w: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    @op.register_fake
    def _(x: Tensor, w: Tensor) -> Tensor:
        return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, w = ctx.saved_tensors
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return rstd * g * w, (g * x * rstd).reshape(-1, x.shape[-1]).sum(0)

    op.register_autograd(backward, setup_context=setup)
    return op


rms_norm_bug_formula = _once("rms_norm_bug_formula", _define_rms_norm_bug_formula)


def check(report: gradverify.Report, name: str) -> CheckResult:
    return next(c for c in report.cases[0].checks if c.name == name)


def test_opcheck_passes_a_wrong_formula_and_both_verdicts_are_shown() -> None:
    x, w = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    report = gradverify.verify(rms_norm_bug_formula, x, w)
    opcheck = check(report, "opcheck")
    assert opcheck.status is Status.PASSED and "not the gradient formula" in opcheck.message
    assert tuple(name for name, _ in opcheck.details) == CHEAP_UTILS
    assert check(report, "jacobian").status is Status.FAILED and not report.ok


def test_asking_for_opcheck_by_name_runs_its_full_default_set() -> None:
    x, w = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    opcheck = check(gradverify.verify(rms_norm_bug_formula, x, w, checks=["opcheck"]), "opcheck")
    assert tuple(name for name, _ in opcheck.details) == FULL_UTILS and opcheck.status is Status.PASSED


def test_long_opcheck_messages_become_one_line_with_the_utility() -> None:
    raised = ("opcheck(op, ...): test_faketensor failed with When comparing the output of ns.op.default on "
              "FakeTensor and concrete Tensors, found mismatched tensor metadata: Stride mismatch! Strides are "
              "(1, 3) and (5, 1) (mismatched at 0)!\nmore lines\n(scroll up for stack trace)")
    assert summarise_message(raised) == ("test_faketensor: Stride mismatch! Strides are (1, 3) and (5, 1) "
                                         "(mismatched at 0)!")
    assert summarise("test_schema", RuntimeError("Argument r is not defined as mutable but was mutated\nTrace")) == \
        "test_schema: Argument r is not defined as mutable but was mutated"
    assert summarise("test_faketensor", KeyError("ns.op.default")).startswith("test_faketensor: KeyError: ")


def _opcheck_failed(*utilities: str) -> CheckResult:
    return CheckResult(name="opcheck", status=Status.FAILED, summary="failed: " + ", ".join(utilities),
                       message="torch opcheck failed: ...", details=(("failed", ", ".join(utilities)),))


def _registration(status: Status, *kinds: str, unjudged: int = 0) -> CheckResult:
    return CheckResult(name="registration", status=status, unverifiable_count=unjudged,
                       diagnoses=tuple(Diagnosis(k, k, severity=Severity.ERROR) for k in kinds))


JACOBIAN_PASSED = CheckResult(name="jacobian", status=Status.PASSED)


def _opcheck(checks: list[CheckResult]) -> CheckResult:
    return next(c for c in overrule_second_opinions(checks) if c.name == "opcheck")


def test_opcheck_failure_explained_by_registration_is_reported_once() -> None:
    result = _opcheck([JACOBIAN_PASSED, _registration(Status.FAILED, "fake_kernel_mismatch"),
                       _opcheck_failed("test_faketensor")])
    assert not result.counts and "consistent with registration (fake_kernel_mismatch)" in result.message


def test_unconfirmed_opcheck_failure_does_not_count_against_a_conclusive_registration() -> None:
    result = _opcheck([JACOBIAN_PASSED, _registration(Status.PASSED), _opcheck_failed("test_aot_dispatch_dynamic")])
    assert not result.counts and "not counted" in result.message and "--check compile" in result.message


def test_opcheck_counts_where_nothing_of_ours_is_conclusive_and_the_jacobian_never_overrules_it() -> None:
    assert _opcheck([JACOBIAN_PASSED, _opcheck_failed("test_schema")]).counts
    assert _opcheck([JACOBIAN_PASSED, _registration(Status.PASSED, unjudged=1), _opcheck_failed("test_schema")]).counts
    # A registration failure the utility does not cover explains nothing.
    assert _opcheck([_registration(Status.FAILED, "output_alias"),
                     _opcheck_failed("test_autograd_registration")]).counts


def test_gradcheck_is_still_overruled_by_a_conclusive_jacobian() -> None:
    gradcheck = CheckResult(name="gradcheck", status=Status.FAILED, summary="(fast) failed", message="m")
    [_, result] = overrule_second_opinions([JACOBIAN_PASSED, gradcheck])
    assert not result.counts and "not counted" in result.message
