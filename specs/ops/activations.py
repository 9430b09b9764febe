"""Two element-wise Functions checked by specs/activations.yaml (no gradverify code here)."""

import torch


class Softplus(torch.autograd.Function):
    """out = log(1 + exp(beta * x)) / beta, with a non-tensor `beta`."""

    @staticmethod
    def forward(ctx, x, beta=1.0):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return torch.nn.functional.softplus(x, beta=beta)

    @staticmethod
    def backward(ctx, grad_out):
        x, = ctx.saved_tensors
        return grad_out * torch.sigmoid(ctx.beta * x), None


class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through gradient: backward passes grad_out unchanged on purpose."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out
