"""The compile check (opt-in) on ops written here, re-typed from public examples (sources below).

Custom ops live in the `gv_test_compile` namespace, registered once per process (`_once`).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor

import gradverify
from gradverify.checks.compile import backends_for, root_cause
from gradverify.report import CheckResult, Status

_REGISTRY = sys.modules.setdefault("_gv_test_compile_ops", types.ModuleType("_gv_test_compile_ops"))
_OPS: dict[str, Any] = _REGISTRY.__dict__.setdefault("ops", {})


def _once(name: str, define: Callable[[], Any]) -> Any:
    if name not in _OPS:
        _OPS[name] = define()
    return _OPS[name]


def check(report: gradverify.Report, name: str) -> CheckResult:
    return next(c for c in report.cases[0].checks if c.name == name)


def values(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Softplus with a temperature, as a custom op with fake kernel and autograd (the pattern of the
# PyTorch custom-op tutorial, pytorch/tutorials advanced_source/python_custom_ops.py).
def _define_softplus(name: str, with_fake: bool) -> Any:
    @torch.library.custom_op(f"gv_test_compile::{name}", mutates_args=())
    def op(x: Tensor, beta: float) -> Tensor:
        return torch.nn.functional.softplus(x, beta)

    if with_fake:
        @op.register_fake
        def _(x: Tensor, beta: float) -> Tensor:
            return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.beta = inputs[1]

    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(ctx.beta * x), None

    op.register_autograd(backward, setup_context=setup)
    return op


softplus = _once("softplus", lambda: _define_softplus("softplus", True))
softplus_no_fake = _once("softplus_no_fake", lambda: _define_softplus("softplus_no_fake", False))


class Square_bug_compiled_path(torch.autograd.Function):
    # BUG (compile_mismatch): a backward with a separate "compile-friendly" branch, the
    # `if torch.compiler.is_compiling():` pattern libraries use to pick another kernel under
    # torch.compile; the branch drops the factor 2. Eager (what gradcheck sees) is right.
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return g * x
        return 2 * g * x


class RoundSTE(torch.autograd.Function):
    """Straight-through rounding (the custom backward is the identity), in the setup_context style
    torch.func needs. pytorch/pytorch#193279 (re-typed with rounding instead of its sin with a zero
    backward): under torch.compile, torch.func drops the custom backward and differentiates
    round() itself, which gives zeros."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x ** 3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


def chatty_tanh(x: Tensor) -> Tensor:
    """A wrapper that prints (a graph break under torch.compile), as debugging code does."""
    y = torch.tanh(x)
    print("", end="")
    return y * x


def _fn_code() -> types.CodeType:
    from gradverify.checks.transforms import diff_function

    return next(c for c in diff_function.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == "fn")


def test_compile_is_opt_in_and_correct_ops_agree_with_eager() -> None:
    x = values(3, 4)
    assert not any(c.name == "compile" for c in gradverify.verify(softplus, x, 2.0).cases[0].checks)
    for op, args in ((softplus, (x, 2.0)), (Cube, (x,))):
        report = gradverify.verify(op, *args, checks=["compile"])
        assert report.ok, gradverify.explain(report)
        compiled = check(report, "compile")
        assert compiled.status is Status.PASSED and dict(compiled.details)["aot_eager"].startswith("ok")
    assert dict(compiled.details)["torch.func.vjp under aot_eager"].startswith("ok")
    # Dynamo's caches are reset: nothing compiled here is left for other checks or cases.
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(_fn_code()) == []


def test_backward_wrong_only_under_compile_is_named() -> None:
    report = gradverify.verify(Square_bug_compiled_path, values(5), checks=["compile"])
    assert check(report, "jacobian").status is Status.PASSED and check(report, "gradcheck").status is Status.PASSED
    compiled = check(report, "compile")
    assert compiled.status is Status.FAILED and not report.ok
    [diagnosis] = compiled.diagnoses
    assert (diagnosis.kind, diagnosis.input) == ("compile_mismatch", "x")
    assert "aot_eager" in diagnosis.message and "the gradient of x differs from eager" in diagnosis.message


def test_dropped_custom_backward_under_compiled_torch_func_is_named() -> None:
    report = gradverify.verify(RoundSTE, values(6, scale=3.0), checks=["compile"], surrogate="straight-through")
    assert check(report, "jacobian").status is Status.XFAIL  # the surrogate is declared
    compiled = check(report, "compile")
    assert compiled.status is Status.FAILED
    assert dict(compiled.details)["aot_eager"].startswith("ok")  # plain torch.compile keeps the backward
    [diagnosis] = compiled.diagnoses
    assert diagnosis.kind == "compile_mismatch" and "pytorch/pytorch#193279" in diagnosis.message


def test_graph_breaks_are_reported_as_information() -> None:
    report = gradverify.verify(chatty_tanh, values(4), checks=["compile"])
    assert report.ok, gradverify.explain(report)
    compiled = check(report, "compile")
    assert compiled.status is Status.PASSED
    assert any("graph break" in note and "not a failure" in note and "print" in note for note in compiled.notes)


def test_op_that_cannot_be_compiled_is_an_error_with_the_real_cause() -> None:
    report = gradverify.verify(softplus_no_fake, values(3), 1.0, checks=["compile"])
    compiled = check(report, "compile")
    assert compiled.status is Status.ERROR
    assert "There was no fake impl registered" in compiled.message and "when making fake tensor call" not in \
        compiled.message
    assert check(report, "registration").diagnoses[0].kind == "missing_fake"


def test_backends_and_root_cause() -> None:
    assert backends_for("cpu") == ("aot_eager",) and backends_for("cuda:0") == ("aot_eager", "inductor")
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert isinstance(root_cause(exc), KeyError)
