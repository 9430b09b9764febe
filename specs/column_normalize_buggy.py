"""Column normalisation y = x / x.sum(0) whose backward keeps only the diagonal (seed story 1).

Each y[i, j] = x[i, j] / s[j] depends on every x[k, j] of its column, so the Jacobian block of a
column has off-diagonal terms -x[i, j] / s[j]**2. This backward computes only the diagonal
(an element-wise product), so every off-diagonal term within a column is missing.

    gradverify check specs/column_normalize_buggy.py --shape 3,3 --domain positive
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
        return grad_output * (1 / s - x / s**2)  # BUG: the diagonal term only
