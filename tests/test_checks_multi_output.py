"""The multi_output check: backwards wrong only when several grad_outputs arrive together, and
backwards that break when a grad_output is None (materialize_grads off)."""

from __future__ import annotations

import torch

import gradverify
from gradverify.report import CheckResult, Report, Status

Fn = torch.autograd.Function


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check(report: Report, name: str) -> CheckResult | None:
    return next((c for c in report.cases[0].checks if c.name == name), None)


def kinds(report: Report) -> set[str]:
    return {d.kind for c in report.cases[0].checks if c.counts for d in c.diagnoses}


# --------------------------------------------------------------------------------------------
# Two outputs, (sin x, cos x). The buggy backward treats "cos is used" and "sin is used" as two
# separate cases, the pattern of the (out, softmax_lse) ops of flash-attention-style kernels
# whose lse gradient path returns early: right whenever one grad_output is zero.
class SinCos(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x), torch.cos(x)

    @staticmethod
    def backward(ctx, grad_sin, grad_cos):
        (x,) = ctx.saved_tensors
        return grad_sin * torch.cos(x) - grad_cos * torch.sin(x)


class SinCosPicksOne(SinCos):
    @staticmethod
    def backward(ctx, grad_sin, grad_cos):
        (x,) = ctx.saved_tensors
        if bool(grad_cos.ne(0).any()):  # BUG: the sin term is dropped when both are used
            return -grad_cos * torch.sin(x)
        return grad_sin * torch.cos(x)


def test_backward_wrong_only_with_several_grad_outputs_is_caught_and_named() -> None:
    report = gradverify.verify(SinCosPicksOne, rand(3, 4))
    result = check(report, "multi_output")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    assert kinds(report) & {"multi_output"}
    message = result.diagnoses[0].message
    assert "on all 2 outputs at once" in message and "the gradient for x differs" in message
    assert "the reference agrees with the sum of the one-output gradients" in message
    # The one-output-at-a-time checkers pass it: that is why this check exists.
    assert check(report, "gradcheck").status is Status.PASSED
    assert torch.autograd.gradcheck(SinCosPicksOne.apply, (rand(4).requires_grad_(),))


def test_correct_two_output_op_passes() -> None:
    report = gradverify.verify(SinCos, rand(3, 4))
    result = check(report, "multi_output")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)


def test_single_output_op_gets_no_multi_output_result() -> None:
    report = gradverify.verify(lambda x: x.sin(), rand(3))
    assert report.ok and check(report, "multi_output") is None


# --------------------------------------------------------------------------------------------
# Source: pytorch/pytorch docs/source/notes/extending.rst (MyCube returning (x ** 3, 3 x ** 2)
# and set_materialize_grads), with materialize_grads turned off for speed and a backward that
# still does arithmetic with both grad_outputs.
class CubeAndSlope(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x ** 3, 3 * x ** 2

    @staticmethod
    def backward(ctx, grad_cube, grad_slope):
        (x,) = ctx.saved_tensors
        return grad_cube * 3 * x ** 2 + grad_slope * 6 * x  # BUG: either may be None


class CubeAndSlopeHandlesNone(CubeAndSlope):
    @staticmethod
    def backward(ctx, grad_cube, grad_slope):
        (x,) = ctx.saved_tensors
        grad = torch.zeros_like(x)
        if grad_cube is not None:
            grad = grad + grad_cube * 3 * x ** 2
        if grad_slope is not None:
            grad = grad + grad_slope * 6 * x
        return grad


def test_backward_that_breaks_on_a_none_grad_output_is_named_undefined_grad() -> None:
    report = gradverify.verify(CubeAndSlope, rand(5))
    result = check(report, "multi_output")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    assert {d.kind for d in result.diagnoses} == {"undefined_grad"}
    messages = [d.message for d in result.diagnoses]
    assert len(messages) == 2  # each output's grad_output None in turn breaks it
    message = messages[1]
    assert message.startswith("with the grad_output for out[1] None (the engine passes None when out[1] is unused "
                              "and materialize_grads is off), backward raised TypeError: unsupported operand")
    assert "test_checks_multi_output.py" in message
    assert "is not None" in result.diagnoses[0].hint


def test_backward_that_handles_none_grad_outputs_passes() -> None:
    report = gradverify.verify(CubeAndSlopeHandlesNone, rand(5))
    result = check(report, "multi_output")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)


def cube(x: torch.Tensor) -> torch.Tensor:
    """A wrapper that only returns the first output (as the docs' my_cube does): the engine then
    always passes None for the second one."""
    result, _ = CubeAndSlope.apply(x)
    return result


def test_a_wrapper_dropping_an_output_is_explained_even_though_its_backward_always_raises() -> None:
    report = gradverify.verify(cube, rand(5))
    assert report.cases[0].status is Status.ERROR  # the contracts' backward_error stands
    result = check(report, "multi_output")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    message = result.diagnoses[0].message
    assert message.startswith("CubeAndSlope.backward received None as the grad_output for its output 1")
    assert "cube never uses it" in message and "TypeError" in message


# --------------------------------------------------------------------------------------------
# Three outputs (x, x^2, x^3 element-wise): the buggy backward ignores the x^3 term unless the
# x^2 one is zero, so it is right for every single output and wrong for pairs.
class Powers(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone(), x ** 2, x ** 3

    @staticmethod
    def backward(ctx, g1, g2, g3):
        (x,) = ctx.saved_tensors
        return g1 + g2 * 2 * x + g3 * 3 * x ** 2


class PowersPairWrong(Powers):
    @staticmethod
    def backward(ctx, g1, g2, g3):
        (x,) = ctx.saved_tensors
        if bool(g2.ne(0).any()):
            return g1 + g2 * 2 * x  # BUG: g3's term dropped whenever g2 is used
        return g1 + g3 * 3 * x ** 2


def test_three_outputs_each_absent_in_turn() -> None:
    report = gradverify.verify(Powers, rand(4))
    result = check(report, "multi_output")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert result.summary == "7/7 ok"  # all at once, three single outputs, three with one absent
    report = gradverify.verify(PowersPairWrong, rand(4))
    result = check(report, "multi_output")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    messages = [d.message for d in result.diagnoses]
    assert any("the grad_output for out[0] absent" in m for m in messages), messages
    assert {d.kind for d in result.diagnoses} == {"multi_output"}


def test_the_check_can_be_skipped() -> None:
    report = gradverify.verify(SinCosPicksOne, rand(3, 4), skip_checks=("multi_output",))
    assert check(report, "multi_output") is None
