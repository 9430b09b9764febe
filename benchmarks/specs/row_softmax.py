"""Row softmax, right and with a diagonal-only backward (the benchmark's command-line cases).

    python -m gradverify check benchmarks/specs/row_softmax.py --shape 1000,1000
    python -m gradverify check benchmarks/specs/row_softmax.py --op RowSoftmaxDiagonalOnly --shape 1000,1000
"""

from __future__ import annotations

import torch


class RowSoftmax(torch.autograd.Function):
    """y = softmax(x, -1) with the full backward y * (g - sum(g * y))."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return y * (grad_output - (grad_output * y).sum(-1, keepdim=True))


class RowSoftmaxDiagonalOnly(torch.autograd.Function):
    """BUG: keeps only the diagonal y_i (1 - y_i) of each row's Jacobian (drops -y_i y_j)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return grad_output * y * (1 - y)
