"""One small realistic buggy Function per diagnosis kind, each reported with exactly that kind,
and correct Functions that must pass."""

from __future__ import annotations

import pytest
import torch

import gradverify
from gradverify.report import Report, Status

Fn = torch.autograd.Function


def kinds(report: Report) -> set[str]:
    """Diagnosis kinds of the checks that did not pass (or were excused)."""
    return {d.kind for case in report.cases for c in case.checks for d in c.diagnoses}


def failed_checks(report: Report) -> set[str]:
    return {c.name for case in report.cases for c in case.checks if not c.ok}


def rand(*shape: int, seed: int = 0, positive: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if positive:
        return (0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- buggy Functions, one per kind

class DiagonalOnlyNormalize(Fn):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * (1 / s - x / s**2)


class SquareMissingTwo(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x  # forgot the 2 of d(x**2)/dx


class ExpNegWrongSign(Fn):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(-x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y  # d exp(-x)/dx = -exp(-x)


class MatmulTransposedWeightGrad(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), (x.t() @ g).t()  # a .t() too many for the square weight


class MulSwappedGrads(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * x, g * w  # returned in the wrong order


class ScaleZeroGrad(Fn):
    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


class ScaleByWeightNoneGrad(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, None  # w needs grad


class LinearBiasNotReduced(Fn):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x, g  # bias gradient not summed over the batch


class InPlaceColumnNormalize(Fn):
    @staticmethod
    def forward(ctx, x):
        x /= x.sum(0)  # in place, no mark_dirty
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors  # the normalised values, not x
        s = y.sum(0)
        return g / s - (g * y).sum(0) / s**2


class JitteryBackward(Fn):
    """Varies from call to call beyond rounding (noise of 1e-6 against a tolerance of 1.5e-8 in
    float64; rounding-level variation, as atomic adds give, passes with a note)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g + 1e-6 * torch.randn_like(g)


class CubeUsesOnes(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * torch.ones_like(g)  # ignores grad_output


class SquareLastColumnWrong(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = 2 * x * g
        grad[:, -1] = x[:, -1] * g[:, -1]  # a boundary branch with the old formula
        return grad


class LogOfDifference(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x / (x - x)  # 0/0 and x/0


class SquareDetachedBackward(Fn):
    """First order right; backward detaches x, so its own derivative is lost."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x.detach()


class HalfSquareCancelling(Fn):
    """y = x**2 / 2; backward computes x as ((x + c)**2 - x**2 - c**2) / (2c): exact in float64,
    catastrophic cancellation in float32."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x / 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        c = 1e5
        return g * ((x + c) ** 2 - x**2 - c**2) / (2 * c)


class AbsOtherSubgradient(Fn):
    """abs with the subgradient 1 at 0 (torch uses 0): fine, but differs exactly at the kink."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.abs()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class RaisesInBackward(Fn):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("backward for complex strides")


class CubeWrongFormula(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)  # not the derivative at all


BUGS = [
    ("missing_offdiag", DiagonalOnlyNormalize, lambda: (rand(3, 3, positive=True),), {}),
    ("scaled", SquareMissingTwo, lambda: (rand(3, 4),), {}),
    ("sign", ExpNegWrongSign, lambda: (rand(3, 4),), {}),
    ("transposed", MatmulTransposedWeightGrad, lambda: (rand(3, 4), rand(4, 4, seed=1)), {}),
    ("swapped_inputs", MulSwappedGrads, lambda: (rand(3, 4), rand(3, 4, seed=1)), {}),
    ("zero_grad", ScaleZeroGrad, lambda: (rand(5),), {}),
    ("none_grad", ScaleByWeightNoneGrad, lambda: (rand(4), rand(4, seed=1)), {}),
    ("inplace_forward", InPlaceColumnNormalize, lambda: (rand(3, 3, positive=True),), {}),
    ("nondeterministic", JitteryBackward, lambda: (rand(4),), {}),
    ("ignores_grad_output", CubeUsesOnes, lambda: (rand(4),), {}),
    ("partial", SquareLastColumnWrong, lambda: (rand(3, 4),), {}),
    ("nonfinite", LogOfDifference, lambda: (rand(4),), {}),
    ("second_order", SquareDetachedBackward, lambda: (rand(4),), {"order": 2}),
    ("precision", HalfSquareCancelling, lambda: (rand(6, dtype=torch.float32),), {}),
    ("backward_error", RaisesInBackward, lambda: (rand(3),), {}),
    ("other", CubeWrongFormula, lambda: (rand(4),), {}),
]


@pytest.mark.parametrize("kind, function, make_inputs, options", BUGS, ids=[b[0] for b in BUGS])
def test_each_bug_is_named_with_exactly_its_kind(kind, function, make_inputs, options) -> None:
    inputs = make_inputs()
    report = gradverify.verify(function, *inputs, **options)
    assert not report.ok, gradverify.explain(report)
    assert kinds(report) == {kind}, gradverify.explain(report)


def test_scaled_reports_the_factor() -> None:
    report = gradverify.verify(SquareMissingTwo, rand(3, 4))
    (diagnosis,) = [d for c in report.cases[0].checks for d in c.diagnoses]
    assert "factor 0.500 (= 1/2)" in diagnosis.message


def test_partial_says_where_the_wrong_entries_line_up() -> None:
    report = gradverify.verify(SquareLastColumnWrong, rand(3, 4))
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert jac.mismatch_count == 3
    assert "x[..., 3 (the last)]" in jac.diagnoses[0].message


def test_unreduced_broadcast_gradient_is_a_warning_naming_the_dims_and_strict_fails_it() -> None:
    report = gradverify.verify(LinearBiasNotReduced, rand(4, 3), rand(5, 3, seed=1), rand(5, seed=2))
    contracts = next(c for c in report.cases[0].checks if c.name == "contracts")
    assert "shape (4, 5) but b has shape (5,)" in contracts.message and "dim 0" in contracts.message
    assert contracts.status is Status.WARNED and kinds(report) == {"engine_reduced"} and report.exit_code == 0
    assert ".sum(0)" in contracts.diagnoses[0].hint
    assert next(c for c in report.cases[0].checks if c.name == "gradcheck").status is Status.PASSED  # torch misses it
    strict = gradverify.verify(LinearBiasNotReduced, rand(4, 3), rand(5, 3, seed=1), rand(5, seed=2), strict=True)
    assert strict.exit_code == 1 and "--strict" in strict.cases[0].message


def test_wrong_shape_the_engine_rejects_is_a_failure() -> None:
    class WrongShape(Fn):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return torch.cat([g, g])  # (2n,) for an (n,) input: the engine raises on it

    report = gradverify.verify(WrongShape, rand(3))
    assert not report.ok and "shape_mismatch" in kinds(report)


def test_once_differentiable_backward_is_named_under_order_two() -> None:
    from torch.autograd.function import once_differentiable

    class OnceSquare(Fn):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    report = gradverify.verify(OnceSquare, rand(3), order=2)
    second = next(c for c in report.cases[0].checks if c.name == "second_order")
    # It declares that it cannot be differentiated again: not applicable, never a failure.
    assert second.status is Status.SKIPPED and "once_differentiable" in second.message and report.ok


def test_near_a_kink_the_entry_is_not_judged_and_the_op_does_not_fail() -> None:
    x = torch.tensor([0.0, 1.5, -0.7], dtype=torch.float64)
    report = gradverify.verify(AbsOtherSubgradient, x)
    assert report.ok, gradverify.explain(report)
    assert kinds(report) == {"nondifferentiable_point"}


def test_inputs_are_redrawn_when_the_seed_lands_on_a_kink(write_spec) -> None:
    from gradverify.api import check_paths
    from gradverify.cases import input_values
    from gradverify.config import Settings
    from gradverify.spec import load_spec
    from gradverify.cases import expand_cases

    path = write_spec("kink.py", """\
        import torch

        KINK = None

        class ShiftedAbs(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return (x - KINK).abs()

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return g * torch.where(x - KINK >= 0, 1.0, -1.0).to(x.dtype)
        """)
    (op,) = load_spec(path)
    (case,) = expand_cases(op, Settings(shapes=(((3,),),)))
    seed0 = input_values(case)[0]
    # Put the kink exactly on the first input entry that seed 0 draws.
    path.write_text(path.read_text().replace("KINK = None", f"KINK = {float(seed0[0])!r}"))
    report = check_paths([path], Settings(shapes=(((3,),),)))
    (result,) = report.cases
    assert result.ok and result.seed == 1
    assert any("re-drawn with seed 1" in n for n in result.notes)
    no_retry = check_paths([path], Settings(shapes=(((3,),),), retries=0))
    assert no_retry.cases[0].seed == 0 and kinds(no_retry) == {"nondifferentiable_point"}


# ---------------------------------------------------------------- correct Functions must pass

class ReLU(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0).to(g.dtype)


class Softmax(Fn):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


class LogSumExp(Fn):
    @staticmethod
    def forward(ctx, x):
        out = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out = ctx.saved_tensors
        return g.unsqueeze(-1) * torch.exp(x - out.unsqueeze(-1))


class LayerNorm(Fn):
    @staticmethod
    def forward(ctx, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        rstd = (var + 1e-5).rsqrt()
        xhat = (x - mean) * rstd
        ctx.save_for_backward(xhat, rstd)
        return xhat

    @staticmethod
    def backward(ctx, g):
        xhat, rstd = ctx.saved_tensors
        n = xhat.shape[-1]
        return rstd / n * (n * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True))


class Linear(Fn):
    @staticmethod
    def forward(ctx, input, weight, bias=None):
        ctx.save_for_backward(input, weight, bias)
        out = input.mm(weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, g):
        input, weight, bias = ctx.saved_tensors
        return g.mm(weight), g.t().mm(input), (g.sum(0) if bias is not None else None)


class CubeTwiceDifferentiable(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class ExpWithJvp(Fn):
    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * y


class ExpWithWrongJvp(ExpWithJvp):
    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t  # forgot the chain rule factor


def nonzero(*shape: int) -> torch.Tensor:
    x = rand(*shape)
    return torch.where(x.abs() < 0.1, x.sign() * 0.5 + x, x)


GOOD = [
    ("relu", ReLU, lambda: (nonzero(3, 4),), {}),
    ("softmax", Softmax, lambda: (rand(3, 5),), {}),
    ("logsumexp", LogSumExp, lambda: (rand(3, 5),), {}),
    ("layer_norm", LayerNorm, lambda: (rand(3, 6),), {}),
    ("linear_bias", Linear, lambda: (rand(4, 3), rand(5, 3, seed=1), rand(5, seed=2)), {}),
    ("linear_nobias", Linear, lambda: (rand(4, 3), rand(5, 3, seed=1)), {}),
    ("double_backward", CubeTwiceDifferentiable, lambda: (rand(4),), {"order": 2}),
    ("jvp", ExpWithJvp, lambda: (rand(4),), {}),
    ("softmax_float32", Softmax, lambda: (rand(3, 5, dtype=torch.float32),), {}),
]


@pytest.mark.parametrize("name, function, make_inputs, options", GOOD, ids=[g[0] for g in GOOD])
def test_correct_functions_pass(name, function, make_inputs, options) -> None:
    report = gradverify.verify(function, *make_inputs(), **options)
    assert report.ok, gradverify.explain(report)
    names = {c.name for c in report.cases[0].checks}
    if options.get("order") == 2:
        assert {"second_order", "gradgradcheck"} <= names
    if name == "jvp":
        assert "forward_mode" in names


def test_wrong_jvp_is_caught_by_the_forward_mode_check() -> None:
    report = gradverify.verify(ExpWithWrongJvp, rand(4))
    assert failed_checks(report) == {"forward_mode"}
    forward = next(c for c in report.cases[0].checks if c.name == "forward_mode")
    assert forward.mismatch_count == 4


def test_float32_backward_checked_against_float64_truth_of_the_same_values() -> None:
    report = gradverify.verify(HalfSquareCancelling, rand(6, dtype=torch.float32))
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert "right in float64" in jac.diagnoses[0].message
    assert next(c for c in report.cases[0].checks if c.name == "gradcheck").status is Status.SKIPPED


def test_backward_returning_float32_for_float64_input_is_caught() -> None:
    class LowPrecisionGrad(Fn):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return (2 * g).float()

    report = gradverify.verify(LowPrecisionGrad, rand(3))
    contracts = next(c for c in report.cases[0].checks if c.name == "contracts")
    # The engine casts the gradient back: a warning (training works), with what it costs.
    assert contracts.status is Status.WARNED and "float32 but x is float64" in contracts.message
    assert report.ok and kinds(report) == {"engine_cast"}
    strict = gradverify.verify(LowPrecisionGrad, rand(3), strict=True)
    assert not strict.ok and strict.exit_code == 1


def test_contracts_use_random_grad_outputs_not_ones() -> None:
    """A backward that is right for grad_output = ones only must fail."""

    class RightOnlyForOnes(Fn):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x / x.sum(0)

        @staticmethod
        def backward(ctx, g):
            return torch.zeros_like(g)  # J^T @ ones is exactly zero for this op

    report = gradverify.verify(RightOnlyForOnes, rand(3, 3, positive=True))
    assert not report.ok



def test_missing_offdiag_names_the_coupled_dim_of_a_batched_op() -> None:
    class BatchedDiagonalOnly(Fn):
        @staticmethod
        def forward(ctx, x):
            s = x.sum(1, keepdim=True)
            ctx.save_for_backward(x, s)
            return x / s

        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            return g * (1 / s - x / s**2)

    report = gradverify.verify(BatchedDiagonalOnly, rand(2, 3, 3, positive=True))
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert jac.mismatch_count == 2 * 3 * 3 * 2  # per sample and column: 3 outputs x 2 other rows
    (diagnosis,) = jac.diagnoses
    assert diagnosis.kind == "missing_offdiag"
    assert "∂out[i,j,k]/∂x[i,l,k] for l≠j" in diagnosis.message and "dim 1" in diagnosis.message


class LeakyReLUDroppedSlope(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, 0.01 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)  # the 0.01 slope is dropped


def test_backward_zero_on_part_of_the_diagonal_is_named_not_crashed() -> None:
    for shape in ((5,), (3, 4), (2, 3, 3)):
        report = gradverify.verify(LeakyReLUDroppedSlope, nonzero(*shape))
        assert not report.ok
        jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
        (diagnosis,) = jac.diagnoses
        assert diagnosis.kind == "zero_grad" and "diagonal entries" in diagnosis.message, diagnosis


def test_backward_returning_a_list_or_writing_into_grad_output_and_forward_exiting() -> None:
    import sys

    class ReturnsList(Fn):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return [2 * g]

    class WritesGradOutput(Fn):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, g):
            return g.mul_(3)

    class Exits(Fn):
        @staticmethod
        def forward(ctx, x):
            sys.exit(0)

        @staticmethod
        def backward(ctx, g):
            return g

    listed = gradverify.verify(ReturnsList, rand(3))
    contracts = next(c for c in listed.cases[0].checks if c.name == "contracts")
    assert contracts.status is Status.FAILED and "returned a list" in contracts.message
    wrote = gradverify.verify(WritesGradOutput, rand(3))
    assert "grad_output_inplace" in kinds(wrote) and "contracts" in failed_checks(wrote)
    exits = gradverify.verify(Exits, rand(3))
    assert exits.cases[0].status is Status.ERROR and "SystemExit" in exits.cases[0].checks[0].message
