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


class SoftmaxHalvedMean(Fn):
    """A dense wrong formula: mean(g) instead of sum(g * y), doubled."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * g - y * g.mean(-1, keepdim=True) * 2.0


class ELU(Fn):
    @staticmethod
    def forward(ctx, x, alpha: float = 1.5):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return torch.where(x > 0, x, alpha * (x.exp() - 1))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 0, torch.ones_like(x), ctx.alpha * x.exp()), None


class ELUNegativeBranchDropsAlpha(ELU):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 0, torch.ones_like(x), x.exp()), None  # alpha dropped for x < 0


class NLLIgnoreIndex(Fn):
    """Per-sample cross entropy with ignore_index (labels == -1 get loss 0 and no gradient)."""

    @staticmethod
    def forward(ctx, logits, label, ignore_index: int = -1):
        logp = torch.log_softmax(logits, dim=1)
        keep = label != ignore_index
        safe = torch.where(keep, label, torch.zeros_like(label))
        ctx.save_for_backward(logp, safe, keep)
        return -logp.gather(1, safe.unsqueeze(1)).squeeze(1) * keep

    @staticmethod
    def backward(ctx, g):
        logp, safe, keep = ctx.saved_tensors
        grad = logp.exp() - torch.nn.functional.one_hot(safe, logp.shape[1]).to(logp.dtype)
        return grad * (g * keep).unsqueeze(1), None, None


class NLLIgnoreIndexUnmasked(NLLIgnoreIndex):
    @staticmethod
    def backward(ctx, g):
        logp, safe, keep = ctx.saved_tensors
        grad = logp.exp() - torch.nn.functional.one_hot(safe, logp.shape[1]).to(logp.dtype)
        return grad * g.unsqueeze(1), None, None  # the ignored rows still get a gradient


def labels_with_ignored(n: int = 16, classes: int = 5) -> torch.Tensor:
    label = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))
    label[[1, 6, 7, 12]] = -1
    return label


class MatmulWeightGrad(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), x.t() @ g


class MatmulWeightGradReshaped(MatmulWeightGrad):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), (g.t() @ x).reshape(w.shape)  # computed (out, in), reshaped instead of .t()


class LayerNormFloat64(Fn):
    @staticmethod
    def forward(ctx, x):
        rstd = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        ctx.save_for_backward(x)
        return (x - x.mean(-1, keepdim=True)) * rstd

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        rstd = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        xhat = (x - x.mean(-1, keepdim=True)) * rstd
        return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


class LayerNormFloat32Stats(LayerNormFloat64):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x32 = x.float()  # statistics "for speed" in float32, the rest in the input's dtype
        rstd = (x32.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        xhat = ((x32 - x32.mean(-1, keepdim=True)) * rstd).double()
        rstd = rstd.double()
        return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


class SafeNormalize(Fn):
    """y = x / (||x|| + eps) over the last dim."""

    @staticmethod
    def forward(ctx, x, eps: float = 1e-4):
        r = x.norm(dim=-1, keepdim=True)
        ctx.save_for_backward(x, r)
        ctx.eps = eps
        return x / (r + eps)

    @staticmethod
    def backward(ctx, g):
        x, r = ctx.saved_tensors
        d = r + ctx.eps
        return g / d - x * (x * g).sum(-1, keepdim=True) / (r * d * d), None


class SafeNormalizeDroppedEps(SafeNormalize):
    @staticmethod
    def backward(ctx, g):
        x, r = ctx.saved_tensors
        d = r + ctx.eps
        return g / d - x * (x * g).sum(-1, keepdim=True) / (r * r * r), None  # eps dropped in the second term


class RoundStraightThrough(Fn):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g  # straight-through, not declared


class ReLUSigmoidProxy(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(4 * x)  # a smooth stand-in for the step, not declared


class RowSoftmaxLastRowSkipped(Fn):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        grad = torch.zeros_like(g)
        for r in range(g.shape[0] - 1):  # the row loop stops one row early
            grad[r] = y[r] * (g[r] - (g[r] * y[r]).sum())
        return grad


class CubeExtraFactor(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**3  # x**2 written as x**3


class RMSNorm(Fn):
    @staticmethod
    def forward(ctx, x):
        rstd = (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
        ctx.save_for_backward(x, rstd)
        return x * rstd

    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        xhat = x * rstd
        return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))


class RMSNormConstantRstd(RMSNorm):
    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        return g * rstd  # rstd treated as a constant: element-wise, and its own diagonal is off too


class Embedding(Fn):
    @staticmethod
    def forward(ctx, indices, weight):
        ctx.save_for_backward(indices)
        ctx.shape = weight.shape
        return weight[indices]

    @staticmethod
    def backward(ctx, g):
        (indices,) = ctx.saved_tensors
        return None, g.new_zeros(ctx.shape).index_add_(0, indices, g)


class EmbeddingOverwrite(Embedding):
    @staticmethod
    def backward(ctx, g):
        (indices,) = ctx.saved_tensors
        grad = g.new_zeros(ctx.shape)
        grad[indices] = g  # a repeated index overwrites instead of accumulating
        return None, grad


class MaxAlongDim1(Fn):
    @staticmethod
    def forward(ctx, x):
        values, idx = x.max(1)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return values

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).scatter_(1, idx.unsqueeze(1), g.unsqueeze(1))


class MaxAlongDim1WrongAxis(MaxAlongDim1):
    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        mask = g.new_zeros(ctx.shape).scatter_(1, idx.unsqueeze(1), 1.0)
        return mask * g  # g broadcast along the wrong dim (a missing unsqueeze(1))


COUPLING = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0], [0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 1.0]],
                        dtype=torch.float64)


class FixedOperandMatmul(Fn):
    @staticmethod
    def forward(ctx, b):
        return COUPLING @ b

    @staticmethod
    def backward(ctx, g):
        return COUPLING @ g  # COUPLING where COUPLING.t() belongs


class BiasReducedOverWrongDims(Fn):
    """x + b over channels of an (N, C, H, W) input; backward hands back a (C, H, W) bias gradient,
    which the engine accepts for W == C and sum-reduces over the wrong dims."""

    @staticmethod
    def forward(ctx, x, b):
        return x + b.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, g):
        return g, g.sum(0)


class SphericalDistance(Fn):
    @staticmethod
    def forward(ctx, x, y):
        c = (x * y).sum(-1).clamp(-1.0, 1.0)
        ctx.save_for_backward(x, y, c)
        return torch.acos(c)

    @staticmethod
    def backward(ctx, g):
        x, y, c = ctx.saved_tensors
        coef = (-g / torch.sqrt(1 - c * c)).unsqueeze(-1)
        c = c.unsqueeze(-1)
        return coef * (y - c * x), coef * (x - c * y)  # Riemannian gradients: valid along the spheres


class SphericalDistanceSwapped(SphericalDistance):
    @staticmethod
    def backward(ctx, g):
        grad_x, grad_y = SphericalDistance.backward(ctx, g)
        return grad_y, grad_x


def unit_rows(*shape: int, seed: int = 0) -> torch.Tensor:
    x = rand(*shape, seed=seed)
    return x / x.norm(dim=-1, keepdim=True)



class AffineLayerNormTailSkipped(Fn):
    """Affine LayerNorm over the last dim whose backward stores dx / dw / db for all but the last 2
    columns (a tiled kernel whose store loop skips the remainder tile)."""

    @staticmethod
    def forward(ctx, x, w, b):
        rstd = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        xhat = (x - x.mean(-1, keepdim=True)) * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w + b

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        gw = g * w
        dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw, db = (g * xhat).sum(0), g.sum(0)
        for grad in (dx, dw, db):
            grad[..., -2:] = 0
        return dx, dw, db


class Diff(Fn):
    """y = x[..., 1:] - x[..., :-1] (torch.diff along the last dim)."""

    @staticmethod
    def forward(ctx, x):
        return x[..., 1:] - x[..., :-1]

    @staticmethod
    def backward(ctx, g):
        zero = g.new_zeros(*g.shape[:-1], 1)
        return torch.cat([zero, g], -1) - torch.cat([g, zero], -1)


class DiffLastColumnSign(Diff):
    @staticmethod
    def backward(ctx, g):
        grad = Diff.backward(ctx, g)
        grad[..., -1] = -grad[..., -1]  # the boundary term written with the wrong sign
        return grad

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
    ("nonconstant_factor", CubeWrongFormula, lambda: (rand(4),), {}),
    ("other", SoftmaxHalvedMean, lambda: (rand(3, 5),), {}),
    ("wrong_branch", ELUNegativeBranchDropsAlpha, lambda: (rand(3, 4),), {}),
    ("wrong_branch", NLLIgnoreIndexUnmasked, lambda: (rand(16, 5), labels_with_ignored()), {}),
    ("transposed", MatmulWeightGradReshaped, lambda: (rand(3, 4), rand(4, 5, seed=1)), {}),
    ("precision", LayerNormFloat32Stats, lambda: (rand(3, 6),), {}),
    ("dropped_eps", SafeNormalizeDroppedEps, lambda: (rand(3, 4), 1e-4), {}),
    ("surrogate", RoundStraightThrough, lambda: (3 * rand(3, 4),), {}),
    ("surrogate", ReLUSigmoidProxy, lambda: (rand(3, 4),), {}),
    ("blockwise", RowSoftmaxLastRowSkipped, lambda: (rand(3, 6),), {}),
    ("missing_offdiag", RMSNormConstantRstd, lambda: (rand(3, 5),), {}),
    ("partial", EmbeddingOverwrite, lambda: (torch.tensor([4, 1, 4, 0, 2, 1]), rand(5, 3)), {}),
    ("sign", DiffLastColumnSign, lambda: (rand(3, 5),), {}),
]


@pytest.mark.parametrize("kind, function, make_inputs, options", BUGS,
                         ids=[f"{b[0]}-{b[1].__name__}" for b in BUGS])
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


def test_backward_zero_on_part_of_the_diagonal_is_a_wrong_branch_when_the_condition_is_evident() -> None:
    for shape in ((3, 4), (2, 3, 3)):
        report = gradverify.verify(LeakyReLUDroppedSlope, nonzero(*shape))
        assert not report.ok
        jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
        (diagnosis,) = jac.diagnoses
        assert diagnosis.kind == "wrong_branch", diagnosis
        assert "x[...] < 0" in diagnosis.message and "x >= 0 matches" in diagnosis.message
        assert "the backward is 0 there" in diagnosis.message and "returns 0" in diagnosis.hint


def test_too_few_entries_to_establish_a_branch_stay_a_zero_on_the_diagonal() -> None:
    # 3 negatives among 5 entries: a condition that fits 3 of 5 by chance 1 time in 10 is an
    # observation, not a diagnosis.
    report = gradverify.verify(LeakyReLUDroppedSlope, nonzero(5))
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    (diagnosis,) = jac.diagnoses
    assert diagnosis.kind == "zero_grad" and "diagonal entries" in diagnosis.message, diagnosis
    assert "all 3 have x[...] < 0, the only such x entries" in diagnosis.message


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


# ---------------------------------------------------------------- what each new name says

def jacobian_diagnosis(report: Report):  # type: ignore[no-untyped-def]
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    (diagnosis,) = jac.diagnoses
    return diagnosis


def test_wrong_branch_names_the_condition_on_the_input() -> None:
    d = jacobian_diagnosis(gradverify.verify(ELUNegativeBranchDropsAlpha, rand(3, 4)))
    assert d.kind == "wrong_branch"
    assert "all wrong entries have x[...] < 0" in d.message and "every entry with x >= 0 matches" in d.message
    assert "0.6667 x the truth there" in d.message  # 1/alpha: the dropped factor


class ELUAlphaDroppedBelowMinusATenth(ELU):
    """Wrong on x < -0.1 only: the negative entries in [-0.1, 0) are right."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x > -0.1, torch.where(x > 0, torch.ones_like(x), ctx.alpha * x.exp()), x.exp()), None


def test_wrong_branch_survives_entries_where_the_wrong_formula_happens_to_agree() -> None:
    # Judged relative to each entry's own scale (issue 11), alpha e^x is wrong however tiny, so
    # the agreeing entries must be real: the negative entries in [-0.1, 0) are right. x < 0
    # still explains the wrong ones (over 75% of its entries), and no slice of x does.
    x = rand(10, 30)
    negative, near = int((x < 0).sum()), int(((x < 0) & (x > -0.1)).sum())
    d = jacobian_diagnosis(gradverify.verify(ELUAlphaDroppedBelowMinusATenth, x, gradcheck="off"))
    assert d.kind == "wrong_branch" and f"{negative - near} of the {negative} such x entries" in d.message, d.message


def test_a_slice_wrong_at_every_entry_is_blockwise_even_where_a_condition_overlaps_it() -> None:
    # LayerNorm whose backward never writes the last 2 columns. With these values out < 0 holds on
    # the 6 entries of those columns and on 2 more (6 of 8: a candidate branch); the slice is wrong
    # at every one of its entries and explains them exactly.
    x = torch.tensor([[1.46, 0.89, 1.04, 0.97, 0.90, 1.78], [1.37, 1.58, 1.77, 1.18, 1.04, 0.99],
                      [1.70, 0.83, 0.67, 0.99, 1.03, 1.06]], dtype=torch.float64)
    w = torch.tensor([0.06, -1.19, -0.57, -0.83, 0.90, 0.21], dtype=torch.float64)
    b = torch.tensor([0.45, -0.61, 0.24, 0.47, -1.95, -0.56], dtype=torch.float64)
    report = gradverify.verify(AffineLayerNormTailSkipped, x, w, b)
    assert kinds(report) == {"blockwise", "partial"}, gradverify.explain(report)


def test_wrong_branch_names_the_condition_on_a_label_the_op_does_not_differentiate() -> None:
    d = jacobian_diagnosis(gradverify.verify(NLLIgnoreIndexUnmasked, rand(16, 5), labels_with_ignored()))
    assert d.kind == "wrong_branch"
    assert "label[...] == -1" in d.message and "every entry with label != -1 matches" in d.message
    assert "the truth is 0 there but the backward is not" in d.message and "mask" in d.hint


def test_wrong_branch_is_not_claimed_where_the_errors_are_not_confined_to_a_condition() -> None:
    # Every entry wrong: there is no region where the backward is right.
    report = gradverify.verify(CubeWrongFormula, rand(12))
    assert "wrong_branch" not in kinds(report)


@pytest.mark.parametrize("function, make_inputs, words", [
    (MatmulWeightGradReshaped, lambda: (rand(3, 4), rand(4, 5, seed=1)), "reshaped instead of transposed"),
    (FixedOperandMatmul, lambda: (rand(4, 3),), "exchanging out's dim 0 with b's dim 0"),
    (MaxAlongDim1WrongAxis, lambda: (rand(4, 4),), "broadcast along the wrong dim"),
], ids=["reshaped_layout", "transposed_operand", "wrong_broadcast_dim"])
def test_transposed_beyond_square_inputs(function, make_inputs, words) -> None:
    d = jacobian_diagnosis(gradverify.verify(function, *make_inputs()))
    assert d.kind == "transposed" and words in d.message, d


def test_a_bias_gradient_reduced_over_the_wrong_dims_is_a_shape_mismatch() -> None:
    report = gradverify.verify(BiasReducedOverWrongDims, rand(2, 3, 2, 3), rand(3, seed=1))
    d = next(d for c in report.cases[0].checks if c.name == "jacobian" for d in c.diagnoses)
    assert not report.ok and d.kind == "shape_mismatch" and d.input == "b"
    assert "pairs b's dim 0 with out's dim 3 where the truth pairs it with out's dim 1" in d.message


def test_precision_names_the_lower_dtype_and_its_rounding() -> None:
    d = jacobian_diagnosis(gradverify.verify(LayerNormFloat32Stats, rand(3, 6)))
    assert d.kind == "precision" and "a float32 intermediate inside a float64 backward" in d.message


def test_dropped_eps_says_the_errors_have_the_size_of_eps() -> None:
    d = jacobian_diagnosis(gradverify.verify(SafeNormalizeDroppedEps, rand(3, 4), 1e-4))
    assert d.kind == "dropped_eps" and "the size of eps = 0.0001" in d.message


def test_tiny_errors_without_an_eps_argument_are_not_named_but_said_to_be_tiny() -> None:
    d = jacobian_diagnosis(gradverify.verify(SafeNormalizeDroppedEps, rand(3, 4)))  # eps left at its default
    assert d.kind == "other" and "a right formula off by a small term" in d.message


def test_undeclared_surrogate_fails_and_says_how_to_declare_it() -> None:
    report = gradverify.verify(RoundStraightThrough, 3 * rand(3, 4))
    d = jacobian_diagnosis(report)
    assert not report.ok and report.exit_code == 1
    assert d.kind == "surrogate" and "straight-through" in d.message and "the identity" in d.message
    assert 'gv.check(surrogate="straight-through estimator")' in d.hint and "surrogate:" in d.hint


def test_declared_surrogate_is_an_expected_failure_not_a_failure() -> None:
    report = gradverify.verify(RoundStraightThrough, 3 * rand(3, 4), surrogate="straight-through estimator")
    assert report.exit_code == 0
    assert next(c for c in report.cases[0].checks if c.name == "jacobian").status is Status.XFAIL


def test_smooth_proxy_and_nearby_function_are_surrogates() -> None:
    d = jacobian_diagnosis(gradverify.verify(ReLUSigmoidProxy, rand(3, 4)))
    assert d.kind == "surrogate" and "smooth proxy" in d.message


def test_blockwise_names_the_block() -> None:
    d = jacobian_diagnosis(gradverify.verify(RowSoftmaxLastRowSkipped, rand(3, 6)))
    assert d.kind == "blockwise" and "∂out[2]/∂x[2]" in d.message and "every entry outside it matches" in d.message


def test_nonconstant_factor_finds_a_power_of_the_input() -> None:
    d = jacobian_diagnosis(gradverify.verify(CubeExtraFactor, rand(5)))
    assert d.kind == "nonconstant_factor" and "backward/truth = 1 x x**1 at every entry" in d.message


def test_missing_offdiag_when_the_backward_is_element_wise_and_its_diagonal_is_off_too() -> None:
    d = jacobian_diagnosis(gradverify.verify(RMSNormConstantRstd, rand(3, 5)))
    assert d.kind == "missing_offdiag" and "∂out[i,j]/∂x[i,k] for k≠j" in d.message
    assert "diagonal entries are off too" in d.message and "constants" in d.hint


def test_partial_names_the_repeated_indices_of_an_overwrite() -> None:
    d = jacobian_diagnosis(gradverify.verify(EmbeddingOverwrite, torch.tensor([4, 1, 4, 0, 2, 1]), rand(5, 3)))
    assert d.kind == "partial" and "that indices selects more than once (1, 4)" in d.message
    assert "index_add_" in d.hint


def test_swapped_inputs_on_a_constraint_set_compare_along_it() -> None:
    report = gradverify.verify(SphericalDistanceSwapped, unit_rows(4, 3), unit_rows(4, 3, seed=1),
                               domains={"x": "unit_norm", "y": "unit_norm"})
    assert kinds(report) >= {"swapped_inputs"} and "other" not in kinds(report), gradverify.explain(report)


def test_other_says_where_the_entries_sit_instead_of_pointing_at_the_table() -> None:
    d = jacobian_diagnosis(gradverify.verify(SoftmaxHalvedMean, rand(3, 5)))
    assert d.kind == "other" and "see the diff table" not in d.message + d.hint
    assert "they touch 15 of 15 out entries" in d.message and "backward/truth from" in d.message


def test_sign_in_a_subset_says_where() -> None:
    d = jacobian_diagnosis(gradverify.verify(DiffLastColumnSign, rand(3, 5)))
    assert d.kind == "sign" and "3 entries have the wrong sign" in d.message
    assert "all in x[..., 4 (the last)]" in d.message


def block_of(analytic: torch.Tensor, truth: torch.Tensor, out_shape: tuple[int, ...],
             in_shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """A BlockComparison judged like checks.jacobian does (1e-8 x row scale + 1e-8 x |truth|)."""
    from gradverify.numerics.blocks import BlockComparison
    from gradverify.numerics.judge import Verdict

    row_scale = truth.abs().amax(dim=tuple(range(len(out_shape), truth.dim())), keepdim=True)
    allowed = 1e-8 * row_scale + 1e-8 * truth.abs()
    bad = ~((analytic - truth).abs() <= allowed)
    verdict = torch.where(bad, int(Verdict.MISMATCH), int(Verdict.AGREE)).to(torch.int8)
    return BlockComparison(out_pos=0, in_pos=0, out_name="out", in_name="x", analytic=analytic, truth=truth,
                           allowed=allowed, verdict=verdict, out_shape=out_shape, in_shape=in_shape)


def test_nan_in_the_backward_is_named_before_any_pattern() -> None:
    from gradverify.diagnose import diagnose_block

    truth = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    analytic = truth.clone()
    analytic[1, 1] = float("nan")
    d = diagnose_block(block_of(analytic, truth, (4,), (4,)))
    assert d is not None and d.kind == "nonfinite" and "1 entries are NaN/Inf" in d.message


class RMSNormChannelsFirst(Fn):
    """RMSNorm over the last dim of x (N, C), written out channels-first: out is (C, N)."""

    @staticmethod
    def forward(ctx, x):
        rstd = (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
        ctx.save_for_backward(x, rstd)
        return (x * rstd).t()

    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        g = g.t()
        xhat = x * rstd
        return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))


class RMSNormChannelsFirstConstantRstd(RMSNormChannelsFirst):
    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        return g.t() * rstd  # rstd treated as a constant


def test_missing_cross_terms_when_output_and_input_shapes_differ() -> None:
    assert gradverify.verify(RMSNormChannelsFirst, rand(3, 5)).ok
    d = jacobian_diagnosis(gradverify.verify(RMSNormChannelsFirstConstantRstd, rand(3, 5)))
    assert d.kind == "missing_offdiag" and "the 15 entries it keeps are off too" in d.message


def test_a_block_without_mismatches_gets_no_name() -> None:
    from gradverify.diagnose import diagnose_block

    truth = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    assert diagnose_block(block_of(truth.clone(), truth, (4,), (4,))) is None


CORRECT_TWINS = [
    ("elu", ELU, lambda: (rand(3, 4),), {}),
    ("diff", Diff, lambda: (rand(3, 5),), {}),
    ("nll_ignore_index", NLLIgnoreIndex, lambda: (rand(16, 5), labels_with_ignored()), {}),
    ("matmul", MatmulWeightGrad, lambda: (rand(3, 4), rand(4, 5, seed=1)), {}),
    ("layer_norm_float64", LayerNormFloat64, lambda: (rand(3, 6),), {}),
    ("layer_norm_float32", LayerNormFloat64, lambda: (rand(3, 6, dtype=torch.float32),), {}),
    ("safe_normalize", SafeNormalize, lambda: (rand(3, 4), 1e-4), {}),
    ("rms_norm", RMSNorm, lambda: (rand(3, 5),), {}),
    ("embedding", Embedding, lambda: (torch.tensor([4, 1, 4, 0, 2, 1]), rand(5, 3)), {}),
    ("max_dim1", MaxAlongDim1, lambda: (rand(4, 4),), {}),
    ("spherical_distance", SphericalDistance, lambda: (unit_rows(4, 3), unit_rows(4, 3, seed=1)),
     {"domains": {"x": "unit_norm", "y": "unit_norm"}}),
]


@pytest.mark.parametrize("name, function, make_inputs, options", CORRECT_TWINS, ids=[c[0] for c in CORRECT_TWINS])
def test_correct_versions_of_the_new_fixtures_pass_with_no_diagnosis(name, function, make_inputs, options) -> None:
    report = gradverify.verify(function, *make_inputs(), **options)
    assert report.ok and not kinds(report), gradverify.explain(report)


def test_located_entries_are_described_in_words_with_a_pointer_to_a_full_diagnosis() -> None:
    from gradverify.diagnose import describe_located

    d = describe_located("out", "x", (4, 6), (4, 6), torch.tensor([5, 11, 17, 23]), torch.tensor([5, 11, 17, 23]),
                         torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), total=576)
    assert d.kind == "other" and "all in x[:, 5 (the last)]" not in d.message
    assert "all in x[:, 5]" in d.message and "the backward is 0 at every one of them" in d.message
    assert "re-run at a smaller shape" in d.hint
    few = describe_located("out", "x", (4,), (4,), torch.tensor([1]), torch.tensor([1]), how="projected")
    assert few.kind == "partial" and "∂out[1]/∂x[1]" in few.message and "projected" in few.message


def test_a_rule_that_raises_costs_the_name_not_the_report(monkeypatch) -> None:
    import gradverify.diagnose as diagnose_module

    def broken(view):  # type: ignore[no-untyped-def]
        raise RuntimeError("rule bug")

    monkeypatch.setattr(diagnose_module, "RULES", (broken,))
    report = gradverify.verify(SquareMissingTwo, rand(3, 4))
    d = jacobian_diagnosis(report)
    assert not report.ok and d.kind == "other" and "RuntimeError" in d.message
