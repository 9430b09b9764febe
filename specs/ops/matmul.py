"""A plain matrix product Function, with no gradverify code in it: specs/matmul.yaml checks it.

This file is the op's module, not a spec: a folder scan of specs/ skips it because a YAML spec
in the folder names it.
"""

import torch


class MatMul(torch.autograd.Function):
    """out = a @ b for a (M, K) and b (K, N)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        grad_a = grad_out @ b.transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_b = a.transpose(-1, -2) @ grad_out if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def matmul_reference(a, b):
    """The same product in plain torch, used as an extra truth."""
    return a @ b
