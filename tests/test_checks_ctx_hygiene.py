"""The ctx_hygiene check, and the second-order check explaining itself with it."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

import gradverify
from gradverify.checks.ctx_hygiene import python_nodes, stashes
from gradverify.numerics.forward import CallSignature, run_forward
from gradverify.ops import FunctionOp
from gradverify.report import CheckResult, Report, Severity, Status

Fn = torch.autograd.Function


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check(report: Report, name: str) -> CheckResult | None:
    return next((c for c in report.cases[0].checks if c.name == name), None)


# --------------------------------------------------------------------------------------------
# Source: pytorch/pytorch#58509 ("custom Function intermediary results are dangerous for double
# backward"): BadCustomFunction keeps interm = inp * 2 on ctx; gradcheck passes, gradgradcheck
# is silently wrong.
class BadCustomFunction(Fn):
    @staticmethod
    def forward(ctx, inp):
        interm = inp * 2
        ctx.foo = interm
        return interm ** 2

    @staticmethod
    def backward(ctx, gres):
        return 2 * 2 * ctx.foo * gres


class GoodCustomFunction(Fn):
    """The fix: save the input and recompute the intermediate in backward."""

    @staticmethod
    def forward(ctx, inp):
        ctx.save_for_backward(inp)
        return (inp * 2) ** 2

    @staticmethod
    def backward(ctx, gres):
        (inp,) = ctx.saved_tensors
        return 2 * 2 * (inp * 2) * gres


def test_intermediate_on_ctx_is_a_note_at_first_order() -> None:
    report = gradverify.verify(BadCustomFunction, rand(4))
    result = check(report, "ctx_hygiene")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert "BadCustomFunction: ctx.foo" in result.message and not result.diagnoses
    assert "double backward treats it as a constant" in result.notes[0]
    assert any("--order 2" in n for n in result.notes)


def test_intermediate_on_ctx_explains_the_failing_second_order_check() -> None:
    report = gradverify.verify(BadCustomFunction, rand(4), order=2)
    result = check(report, "ctx_hygiene")
    assert result is not None and result.status is Status.WARNED, gradverify.explain(report)
    assert [(d.kind, d.severity) for d in result.diagnoses] == [("ctx_attribute", Severity.WARNING)]
    second = check(report, "second_order")
    assert second is not None and second.status is Status.FAILED
    assert {d.kind for d in second.diagnoses} == {"second_order", "ctx_attribute"}
    assert "backward uses BadCustomFunction's ctx.foo, kept on ctx" in second.diagnoses[0].message
    assert "extra output of forward" in second.diagnoses[1].hint
    # First order is right: that is why gradcheck (and the Jacobian check) pass it.
    assert check(report, "jacobian").status is Status.PASSED
    assert check(report, "gradcheck").status is Status.PASSED


def test_the_fixed_function_passes_both_orders() -> None:
    report = gradverify.verify(GoodCustomFunction, rand(4), order=2)
    result = check(report, "ctx_hygiene")
    assert report.ok and result is not None and result.summary == "nothing on ctx", gradverify.explain(report)


# Source: pytorch/pytorch#76185 ("Ensure custom Function are correct in double backward
# setting"): MyFn keeps both an intermediate and its input on ctx.
class MyFn(Fn):
    @staticmethod
    def forward(ctx, inp):
        temp = inp * 2
        out = temp * 3
        ctx.temp = temp
        ctx.inp = inp
        return out

    @staticmethod
    def backward(ctx, g_o):
        return g_o * torch.full_like(g_o, 3) * ctx.temp / ctx.inp


def test_an_input_and_an_intermediate_on_ctx_are_told_apart() -> None:
    report = gradverify.verify(MyFn, rand(5).abs() + 0.5, order=2)
    result = check(report, "ctx_hygiene")
    assert result is not None and result.status is Status.WARNED, gradverify.explain(report)
    warning = [d.message for d in result.diagnoses if d.severity is Severity.WARNING]
    notes = [d.message for d in result.diagnoses if d.severity is Severity.NOTE]
    assert len(warning) == 1 and "ctx.temp on ctx, a tensor forward computed from the inputs" in warning[0]
    assert len(notes) == 1 and "ctx.inp, an input, on ctx instead of save_for_backward" in notes[0]
    assert "modified in place" in notes[0]
    assert check(report, "second_order").status is Status.FAILED


class KeepsInputOnCtx(Fn):
    """Source: CoinCheung/pytorch-loss layer_norm.py (ctx.vars = x, eps): an input on ctx is
    reconnected to the graph in double backward, so only the in-place check is lost."""

    @staticmethod
    def forward(ctx, x, eps: float = 1e-5):
        ctx.vars = x, eps
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, eps = ctx.vars
        return 2 * x * g, None


def test_an_input_on_ctx_is_only_a_note_even_at_second_order() -> None:
    report = gradverify.verify(KeepsInputOnCtx, rand(4), order=2)
    result = check(report, "ctx_hygiene")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert "KeepsInputOnCtx: ctx.vars[0]" in result.message
    assert "an input" in result.notes[0]
    assert check(report, "second_order").status is Status.PASSED


class UnusedAndConstantOnCtx(Fn):
    """A tensor kept but never read, and a constant that does not depend on the input."""

    @staticmethod
    def forward(ctx, x):
        ctx.debug = x * 7
        ctx.scale = torch.full((), 3.0, dtype=x.dtype)
        ctx.save_for_backward(x)
        return 3.0 * x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.scale * 2 * x * g


def test_unused_tensors_are_ignored_and_constants_do_not_warn() -> None:
    report = gradverify.verify(UnusedAndConstantOnCtx, rand(4), order=2)
    result = check(report, "ctx_hygiene")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert "ctx.scale" in result.message and "ctx.debug" not in result.message
    assert "independent of the differentiable inputs" in result.notes[0]


def test_the_attribute_is_put_back_after_probing() -> None:
    op = FunctionOp(BadCustomFunction)
    run = run_forward(op, CallSignature(names=("inp",), keyword=(False,)), [rand(3)], [0])
    [node] = python_nodes(run)
    original = node.foo
    [stash] = stashes(run)
    assert stash.label == "ctx.foo" and stash.tensor is original
    from gradverify.checks.ctx_hygiene import _used
    from gradverify.numerics.tolerance import tolerance_for

    class Ctx:
        tolerance = tolerance_for("float64")

    g = {0: rand(3, seed=5)}
    from gradverify.checks.probes import engine_vjp

    base = engine_vjp(run, g)
    assert _used(Ctx(), run, node, stash, g, base, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    assert node.foo is original


# --------------------------------------------------------------------------------------------
class SquareOnceDifferentiable(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class SquareDetachedBackward(Fn):
    """Backward through .detach(): not differentiable, and not marked @once_differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g).detach()


def test_once_differentiable_is_not_applicable_at_second_order() -> None:
    report = gradverify.verify(SquareOnceDifferentiable, rand(4), order=2)
    second = check(report, "second_order")
    assert report.ok and second is not None and second.status is Status.SKIPPED, gradverify.explain(report)
    assert "once_differentiable" in second.message


def test_a_backward_that_is_not_differentiable_gets_the_once_differentiable_hint() -> None:
    report = gradverify.verify(SquareDetachedBackward, rand(4), order=2)
    second = check(report, "second_order")
    assert second is not None and second.status is Status.FAILED, gradverify.explain(report)
    assert "has no autograd graph" in second.diagnoses[0].message
    assert "@once_differentiable" in second.diagnoses[0].hint


def test_the_check_can_be_skipped() -> None:
    report = gradverify.verify(BadCustomFunction, rand(4), order=2, skip_checks=("ctx_hygiene",))
    assert check(report, "ctx_hygiene") is None
    assert {d.kind for d in check(report, "second_order").diagnoses} == {"second_order"}


class DropoutMaskOnCtx(Fn):
    """A random mask kept on ctx: it changes between forwards at the same inputs, so it is not
    a function of them and double backward is not affected by treating it as a constant."""

    @staticmethod
    def forward(ctx, x):
        ctx.mask = (torch.rand(x.shape, dtype=x.dtype) > 0.3).to(x.dtype) / 0.7
        return x * ctx.mask

    @staticmethod
    def backward(ctx, g):
        return g * ctx.mask


def test_a_random_tensor_on_ctx_is_not_taken_for_an_input_dependent_one() -> None:
    from gradverify.cases import Case
    from gradverify.checks.base import CaseContext
    from gradverify.checks.ctx_hygiene import CtxHygieneCheck
    from gradverify.config import Settings
    from gradverify.spec.model import InputSpec, OpSpec

    op = OpSpec(name="DropoutMaskOnCtx", op=FunctionOp(DropoutMaskOnCtx), file="d.py", line=1,
                params=(InputSpec(name="x"),))
    case = Case(op=op, inputs=(InputSpec(name="x", shape=(50,)),), dtype="float64", device="cpu", seed=0)
    [result] = CtxHygieneCheck().run(CaseContext(case, Settings(order=2), [rand(50)]))
    assert result.status is Status.PASSED and "ctx.mask" in result.message
    assert "double backward treats" not in " ".join(result.notes)
