"""The transforms and forward_mode checks on ops written here (re-typed from public patterns).

vmap rules follow the PyTorch docs "Extending torch.func with autograd.Function" (a Function's
`vmap` staticmethod, `generate_vmap_rule`) and torch.library.register_vmap's docstring example,
whose `numpy_mul` rule moves every batch dim to the *last* position: right for an element-wise
op, wrong for an op that reduces over the last dim, which is the bug re-created here. Custom
ops live in the `gv_test_transforms` namespace, registered once per process (`_once`).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor

import gradverify
from gradverify.checks.transforms import close
from gradverify.numerics.tolerance import tolerance_for
from gradverify.report import CheckResult, Status

_REGISTRY = sys.modules.setdefault("_gv_test_transforms_ops", types.ModuleType("_gv_test_transforms_ops"))
_OPS: dict[str, Any] = _REGISTRY.__dict__.setdefault("ops", {})


def _once(name: str, define: Callable[[], Any]) -> Any:
    if name not in _OPS:
        _OPS[name] = define()
    return _OPS[name]


def check(report: gradverify.Report, name: str) -> CheckResult:
    return next(c for c in report.cases[0].checks if c.name == name)


def rows(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- y = x / ||x|| over the last dim, as a Function -------------------------------------------
# Its Jacobian (I - y y^T) / ||x|| is symmetric: backward and jvp apply the same projection.
def _project(v: Tensor, y: Tensor, n: Tensor) -> Tensor:
    return (v - y * (y * v).sum(-1, keepdim=True)) / n


class RowNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        (x,) = inputs
        n = x.norm(dim=-1, keepdim=True)
        ctx.save_for_backward(output, n)
        ctx.save_for_forward(output, n)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return _project(g, y, n)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return _project(dx, y, n)


class RowNormWithRule(RowNorm):
    generate_vmap_rule = False

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor) -> tuple[Tensor, int]:
        (bdim,) = in_dims
        return RowNormWithRule.apply(x.movedim(bdim, 0)), 0


class RowNorm_bug_vmap_last(RowNorm):
    # BUG (vmap_rule): the rule of the docs' element-wise example (batch dim moved last), applied
    # to an op that reduces over the last dim: it normalises across the batch.
    generate_vmap_rule = False

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor) -> tuple[Tensor, int]:
        (bdim,) = in_dims
        return RowNorm_bug_vmap_last.apply(x.movedim(bdim, -1)), -1


class RowNorm_bug_vmap_assumes_dim0(RowNorm):
    # BUG (vmap_rule): ignores in_dims and assumes the batch dim is 0; right for vmap(f)(x),
    # wrong for vmap(f, in_dims=1) and wherever vmap hands it another batch dim.
    generate_vmap_rule = False

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor) -> tuple[Tensor, int]:
        return RowNorm_bug_vmap_assumes_dim0.apply(x), 0


# --- the projection as a custom op (a "kernel" the backward and jvp call), with a vmap rule ------
def _define_project(name: str, rule_moves_last: bool) -> Any:
    @torch.library.custom_op(f"gv_test_transforms::{name}", mutates_args=())
    def project(v: Tensor, y: Tensor, n: Tensor) -> Tensor:
        return _project(v, y, n)

    @project.register_fake
    def _(v: Tensor, y: Tensor, n: Tensor) -> Tensor:
        return torch.empty_like(v)

    def rule(info: Any, in_dims: tuple[Any, ...], v: Tensor, y: Tensor, n: Tensor) -> tuple[Tensor, int]:
        size = info.batch_size
        target = -1 if rule_moves_last else 0
        moved = [t.movedim(d, target) if d is not None else torch.stack([t] * size, target)
                 for t, d in zip((v, y, n), in_dims)]
        return project(*moved), target

    torch.library.register_vmap(project, rule)
    return project


project_op = _once("project", lambda: _define_project("project", False))
project_bug_vmap = _once("project_bug_vmap", lambda: _define_project("project_bug_vmap", True))


class RowNormKernel(RowNorm):
    """Backward and jvp call the projection kernel (a custom op with a right vmap rule)."""

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return project_op(g, y, n)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return project_op(dx, y, n)


class RowNormKernel_bug_vmap(RowNorm):
    # BUG (vmap_rule): the kernel's vmap rule moves the batch dim last; eager backward and jvp
    # never use it, torch.func.jacrev / jacfwd do.
    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return project_bug_vmap(g, y, n)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        return project_bug_vmap(dx, y, n)


# --- softmax over the last dim as a custom op with register_vmap --------------------------------
def _define_row_softmax(name: str, rule_moves_last: bool) -> Any:
    @torch.library.custom_op(f"gv_test_transforms::{name}", mutates_args=())
    def op(x: Tensor) -> Tensor:
        return torch.softmax(x, -1)

    @op.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)

    def backward(ctx: Any, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))

    op.register_autograd(backward, setup_context=setup)

    def rule(info: Any, in_dims: tuple[Any, ...], x: Tensor) -> tuple[Tensor, int]:
        target = -1 if rule_moves_last else 0
        return op(x.movedim(in_dims[0], target)), target

    op.register_vmap(rule)
    return op


row_softmax = _once("row_softmax", lambda: _define_row_softmax("row_softmax", False))
row_softmax_bug_vmap = _once("row_softmax_bug_vmap", lambda: _define_row_softmax("row_softmax_bug_vmap", True))


# --- forward mode -----------------------------------------------------------------------------
class Mul(torch.autograd.Function):
    """x * y with a jvp (the product rule), as in the PyTorch forward-mode AD tutorial's custom Function."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, y: Tensor) -> Tensor:
        return x * y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, y = ctx.saved_tensors
        return g * y, g * x

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, dy: Tensor) -> Tensor:
        x, y = ctx.saved_tensors
        return dx * y + x * dy


class Mul_bug_dropped_tangent(Mul):
    # BUG (dropped_tangent): half of the product rule; y's tangent never reaches the output.
    @staticmethod
    def jvp(ctx: Any, dx: Tensor, dy: Tensor) -> Tensor:
        x, y = ctx.saved_tensors
        return dx * y


class OldStyleSquare(torch.autograd.Function):
    """forward(ctx, x): the style most code uses, which torch.func cannot transform."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


# --- tests ------------------------------------------------------------------------------------


def test_correct_vmap_rules_pass_with_every_probe_that_applies() -> None:
    for op in (RowNorm, RowNormWithRule, RowNormKernel):
        report = gradverify.verify(op, rows(3, 4))
        assert report.ok, gradverify.explain(report)
        transforms = check(report, "transforms")
        assert transforms.status is Status.PASSED
        probes = dict(transforms.details)
        assert probes["vmap rule"].startswith("ok") and probes["vjp (torch.func)"].startswith("ok")
        assert probes["jvp under vmap (torch.func.jacfwd)"].startswith("ok")
        assert check(report, "forward_mode").status is Status.PASSED


def test_vmap_rule_moving_the_batch_dim_last_is_named() -> None:
    report = gradverify.verify(RowNorm_bug_vmap_last, rows(3, 4))
    assert check(report, "jacobian").status is Status.PASSED  # eager is right
    transforms = check(report, "transforms")
    assert transforms.status is Status.FAILED
    [diagnosis] = transforms.diagnoses
    assert diagnosis.kind == "vmap_rule" and diagnosis.output == "out"
    assert "its vmap staticmethod, with every input batched at dim 0" in diagnosis.message
    assert "in_dims" in diagnosis.hint


def test_vmap_rule_assuming_batch_dim_zero_is_caught_only_by_the_last_dim_layout() -> None:
    report = gradverify.verify(RowNorm_bug_vmap_assumes_dim0, rows(3, 4))
    [diagnosis] = check(report, "transforms").diagnoses
    assert diagnosis.kind == "vmap_rule" and "with the batch dim last" in diagnosis.message


def test_custom_op_register_vmap_rule_right_and_wrong() -> None:
    good = gradverify.verify(row_softmax, rows(3, 5))
    assert good.ok, gradverify.explain(good)
    assert dict(check(good, "transforms").details)["vmap rule"].startswith("ok: its register_vmap rule")
    bad = gradverify.verify(row_softmax_bug_vmap, rows(3, 5))
    transforms = check(bad, "transforms")
    assert transforms.status is Status.FAILED and [d.kind for d in transforms.diagnoses] == ["vmap_rule"]
    assert "register_vmap" in transforms.message
    # torch.func cannot differentiate custom ops in this torch: said, not failed.
    assert "not applicable: torch.func cannot differentiate a torch.library custom op" in \
        dict(transforms.details)["vjp (torch.func)"]


def test_backward_and_jvp_wrong_only_under_vmap_are_named() -> None:
    report = gradverify.verify(RowNormKernel_bug_vmap, rows(3, 4))
    assert check(report, "jacobian").status is Status.PASSED
    assert check(report, "forward_mode").status is Status.PASSED  # jvp one tangent at a time is right
    transforms = check(report, "transforms")
    assert transforms.status is Status.FAILED
    messages = [d.message for d in transforms.diagnoses]
    assert [d.kind for d in transforms.diagnoses] == ["vmap_rule", "vmap_rule"]
    assert "the backward gives other values under vmap (torch.func.jacrev" in messages[0]
    assert "the jvp gives other values under vmap (torch.func.jacfwd)" in messages[1]


def test_dropped_tangent_of_a_declared_jvp_is_named_with_the_input() -> None:
    good = gradverify.verify(Mul, rows(4), rows(4, seed=1))
    assert good.ok, gradverify.explain(good)
    report = gradverify.verify(Mul_bug_dropped_tangent, rows(4), rows(4, seed=1))
    forward = check(report, "forward_mode")
    assert forward.status is Status.FAILED
    assert forward.diagnoses[0].kind == "dropped_tangent" and forward.diagnoses[0].input == "y"
    assert "∂out/∂y" in forward.diagnoses[0].message and "zero_grad" not in {d.kind for d in forward.diagnoses}
    assert check(report, "jacobian").status is Status.PASSED


def test_custom_op_without_forward_rule_is_not_applicable_unless_forward_mode_is_claimed() -> None:
    x = rows(3, 5)
    report = gradverify.verify(row_softmax, x)
    forward = check(report, "forward_mode")
    assert forward.status is Status.SKIPPED and report.ok
    assert "silently return zero tangents" in forward.message
    # gradcheck(check_forward_ad=True) fails this correct op exactly as it would a wrong one; we do not.
    assert check(report, "gradcheck").status is Status.PASSED
    claimed = gradverify.verify(row_softmax, x, checks=["transforms"])
    forward = check(claimed, "forward_mode")
    assert forward.status is Status.FAILED and not claimed.ok
    assert forward.diagnoses[0].kind == "dropped_tangent" and "jacfwd an all-zero Jacobian" in \
        forward.diagnoses[0].message


def test_old_style_function_says_not_applicable_and_fails_only_when_transforms_are_claimed() -> None:
    report = gradverify.verify(OldStyleSquare, rows(4))
    transforms = check(report, "transforms")
    assert report.ok and transforms.status is Status.SKIPPED
    assert "old-style Function" in transforms.message and "setup_context" in transforms.message
    claimed = gradverify.verify(OldStyleSquare, rows(4), checks=["transforms"])
    transforms = check(claimed, "transforms")
    assert transforms.status is Status.ERROR and "setup_context" in transforms.message


def test_callable_gets_the_vjp_probes() -> None:
    report = gradverify.verify(lambda x: torch.tanh(x) * x, rows(5))
    probes = dict(check(report, "transforms").details)
    assert probes["vjp (torch.func)"].startswith("ok") and probes["vmap rule"].startswith("not applicable")


def test_close_allows_rounding_and_nothing_more() -> None:
    tolerance = tolerance_for("float64")
    want = rows(3, 4)
    assert close(want * (1 + 1e-14), want, tolerance)[0]
    ok, err, index = close(want + torch.where(torch.arange(12).reshape(3, 4) == 7, 1e-3, 0.0), want, tolerance)
    assert not ok and index == (1, 3) and abs(err - 1e-3) < 1e-9
    nan = torch.tensor([float("nan"), 1.0])
    assert close(nan, nan, tolerance)[0] and not close(torch.tensor([0.0, 1.0]), nan, tolerance)[0]
    inf = torch.tensor([float("inf"), 1.0])
    huge = torch.tensor([1e300, 1.0], dtype=torch.float64)
    assert close(inf, inf, tolerance)[0] and not close(huge, inf, tolerance)[0]
    assert not close(rows(2, 3), rows(3, 2), tolerance)[0]
