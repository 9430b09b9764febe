"""Column normalisation y = x / x.sum(0) with the right backward (seed story 1, fixed).

dL/dx[k, j] = g[k, j] / s[j] - sum_i g[i, j] x[i, j] / s[j]**2

    gradverify check specs/column_normalize.py --shape 3,3 --domain positive
"""

import torch

import gradverify as gv


@gv.check(inputs={"x": gv.tensor(3, 3, domain="positive")})
class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output / s - (grad_output * x).sum(0) / s**2
