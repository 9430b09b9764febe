"""The Functions the benchmark times: correct backwards, plus the two bugs torch's fast mode misses.

Each is a plain custom torch.autograd.Function, written the way users write them.
"""

from __future__ import annotations

import torch


class ColumnNormalize(torch.autograd.Function):
    """y = x / x.sum(0): every output couples with its whole column."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return grad_output / s - (grad_output * x).sum(0) / s**2


class Softmax(torch.autograd.Function):
    """Row softmax with the full backward: g*y - y*sum(g*y)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return y * (grad_output - (grad_output * y).sum(-1, keepdim=True))


class SoftmaxDiagonalOnly(torch.autograd.Function):
    """BUG: drops the off-diagonal terms -y_i y_j of the softmax Jacobian (keeps y_i (1 - y_i))."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return grad_output * y * (1 - y)


class MatMul(torch.autograd.Function):
    """out = a @ b, two differentiable inputs."""

    @staticmethod
    def forward(ctx, a, b):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        a, b = ctx.saved_tensors
        return grad_output @ b.transpose(-1, -2), a.transpose(-1, -2) @ grad_output


class SinTimesTanh(torch.autograd.Function):
    """Element-wise y = sin(x) * tanh(x): a diagonal Jacobian."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.sin(x) * torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        t = torch.tanh(x)
        return grad_output * (torch.cos(x) * t + torch.sin(x) * (1 - t * t))


def wrong_linear_map(n: int, row: int, col: int, error: float = 1.0, seed: int = 0) -> type:
    """y = W x for a fixed n x n W whose backward uses W with one entry off by `error`."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, n, generator=gen, dtype=torch.float64)
    wrong = weight.clone()
    wrong[row, col] += error

    class WrongLinearMap(torch.autograd.Function):
        W = weight
        W_backward = wrong

        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x @ weight.to(x.dtype).T

        @staticmethod
        def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
            return grad_output @ wrong.to(grad_output.dtype)

    return WrongLinearMap


class ScaleWithOneWrongEntry(torch.autograd.Function):
    """y = 3 x element-wise on a huge input, whose backward is wrong at exactly one entry."""

    WRONG_INDEX = 123_457

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return 3 * x

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        grad = 3 * grad_output
        flat = grad.reshape(-1).clone()
        flat[ScaleWithOneWrongEntry.WRONG_INDEX] = flat[ScaleWithOneWrongEntry.WRONG_INDEX] * 1.5
        return flat.reshape(grad_output.shape)


class ColumnNormalizeDiagonalOnly(torch.autograd.Function):
    """BUG: y = x / x.sum(0) with only the diagonal of each column's Jacobian (drops the coupling
    -x_i / s^2 to the other entries of the column)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return grad_output * (1 / s - x / s**2)


class ColumnNormalizeScaled(torch.autograd.Function):
    """BUG: the right gradient of x / x.sum(0), times 1.5 (every non-zero entry wrong)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return 1.5 * (grad_output / s - (grad_output * x).sum(0) / s**2)


class ColumnNormalizeOneWrongEntry(torch.autograd.Function):
    """BUG: the right gradient of x / x.sum(0) plus 0.5 at one entry: d out[1, 5] / d x[3, 5]
    is off by 0.5 (the only wrong entry of the Jacobian)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        grad = grad_output / s - (grad_output * x).sum(0) / s**2
        extra = torch.zeros_like(grad)
        extra[3, 5] = 0.5 * grad_output[1, 5]
        return grad + extra


def _square(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A positive (n, n) input (column sums far from zero), n = sqrt(size)."""
    import math

    n = int(round(math.sqrt(size)))
    return (torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5,)


def _rows64(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    cols = min(size, 64)
    return (torch.randn(size // cols, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),)


def _pair(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    import math

    s = max(2, int(round(math.sqrt(size / 2))))
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, s, generator=gen, dtype=torch.float64), torch.randn(s, s, generator=gen, dtype=torch.float64))


def _vector(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return (torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),)


# name -> (Function, inputs of about `size` elements). Right ops first, then the failing ones.
CASES = {
    "column_normalize": (ColumnNormalize, _square),
    "softmax": (Softmax, _rows64),
    "matmul": (MatMul, _pair),
    "sin_tanh": (SinTimesTanh, _vector),
    "column_normalize_diagonal": (ColumnNormalizeDiagonalOnly, _square),
    "column_normalize_scaled": (ColumnNormalizeScaled, _square),
    "column_normalize_one_wrong": (ColumnNormalizeOneWrongEntry, _square),
    "softmax_diagonal": (SoftmaxDiagonalOnly, _rows64),
}


class SineWithoutGraph(torch.autograd.Function):
    """y = sin(x) computed under no_grad (as a kernel would be): autograd through the forward
    body sees no graph, so there is no reference and finite differences are the only truth."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.sin(x)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad_output * torch.cos(x)


CASES["sine_without_graph"] = (SineWithoutGraph, _vector)


def _square_normal(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    import math

    n = int(round(math.sqrt(size)))
    return (torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),)


CASES["row_softmax"] = (Softmax, _square_normal)
CASES["row_softmax_diagonal"] = (SoftmaxDiagonalOnly, _square_normal)
