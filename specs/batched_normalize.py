"""Batched normalisation over dim 1 of an (N, H, W) tensor (seed story 2).

InPlaceBatchNormalize is the user's first attempt: forward divides its input in place and
saves that modified tensor (no ctx.mark_dirty), and backward fills a zeros(requires_grad=True)
tensor sample by sample. BatchNormalize is the working out-of-place version.

    gradverify check specs/batched_normalize.py --shape 2,3,3 --domain positive
"""

import torch

import gradverify as gv


@gv.check(inputs={"input": gv.tensor(2, 3, 3, domain="positive")})
class InPlaceBatchNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input):
        for n in range(input.shape[0]):
            input[n] /= input[n].sum(0)  # BUG: modifies the caller's tensor
        ctx.save_for_backward(input)  # BUG: saves the normalised values, not x
        return input.clone()

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        grad_input = torch.zeros(x.shape, dtype=x.dtype, requires_grad=True)
        grad_input = grad_input.clone()
        for n in range(x.shape[0]):
            s = x[n].sum(0)
            g = grad_output[n]
            grad_input[n] = g / s - (g * x[n]).sum(0) / s**2
        return grad_input


@gv.check(inputs={"x": gv.tensor(2, 3, 3, domain="positive")})
class BatchNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(1, keepdim=True)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output / s - (grad_output * x).sum(1, keepdim=True) / s**2
