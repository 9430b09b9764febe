"""Category 7: patterns the autograd engine repairs behind the backward's back.

These backwards return a gradient that does not match its input's shape or dtype, and the
engine fixes it (sum-reducing a broadcast gradient, casting the dtype) before it reaches
.grad. Training is correct, so a checker should *warn*, not fail; the strict versions and one
real bug (a surrogate derivative) are listed too.
"""

import torch


# ---------------------------------------------------------------------------------------------
# Source: NVIDIA/Megatron-LM, megatron/model/fused_bias_gelu.py (bias_gelu / bias_gelu_back /
# GeLUFunction), also tunib-ai/oslo oslo/torch/nn/modules/fused_bias_gelu.py
# (FusedBiasGeLUFunction). Re-typed without @torch.jit.script. backward returns `tmp, tmp`: an
# (N, C) gradient for the (C,) bias. The engine sees that (C,) is expandable to (N, C) and
# sum-reduces it, so the bias gradient that lands in .grad is right: a warning, not a bug.
def bias_gelu(bias, y):
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


# gradient of tanh approximation of gelu
# gradient of actual gelu is:
# 0.5 * (1. + torch.erf(x * 0.70710678)) + 0.3989423 * x * torch.exp(-0.5 * x * x)
def bias_gelu_back(g, bias, y):
    x = bias + y
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    # sqrt(2/pi) * 3 * 0.044715 -> 0.1070322243
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return ff * g


class FusedBiasGeLU(torch.autograd.Function):
    @staticmethod
    # bias is an optional argument
    def forward(ctx, input, bias):
        ctx.save_for_backward(input, bias)
        return bias_gelu(bias, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        tmp = bias_gelu_back(grad_output, bias, input)
        return tmp, tmp


# The same op with the bias gradient reduced explicitly (what a strict checker wants).
class FusedBiasGeLUStrict(FusedBiasGeLU):
    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        tmp = bias_gelu_back(grad_output, bias, input)
        return tmp, tmp.reshape(-1, tmp.shape[-1]).sum(0)


class FusedBiasGeLUStrict_bug_surrogate(FusedBiasGeLU):
    # BUG (surrogate): backward uses the derivative of the exact erf GELU (the formula quoted in
    # the comment above) while forward is the tanh approximation: an undeclared proxy gradient,
    # off by up to ~1e-3 near |x| ~ 2.
    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        x = bias + input
        ff = 0.5 * (1. + torch.erf(x * 0.70710678)) + 0.3989423 * x * torch.exp(-0.5 * x * x)
        tmp = ff * grad_output
        return tmp, tmp.reshape(-1, tmp.shape[-1]).sum(0)


# ---------------------------------------------------------------------------------------------
# Source: the cast_inputs=torch.float32 / custom_bwd pattern of torch.cuda.amp (e.g.
# CoinCheung/pytorch-loss pytorch_loss/label_smooth.py, layer_norm.py), where backward hands
# back float32 gradients for half-precision inputs and the engine casts them to the input's
# dtype; here a Swish (lukemelas/EfficientNet-PyTorch efficientnet_pytorch/utils.py
# SwishImplementation) whose backward ends with .float(). The value is computed in the input
# dtype and rounded once, so for a float64 input it is right to float32 rounding (~6e-8
# relative): the engine-repaired dtype is a warning, not a bug.
class SwishFp32Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        result = i * torch.sigmoid(i)
        ctx.save_for_backward(i)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        i = ctx.saved_tensors[0]
        sigmoid_i = torch.sigmoid(i)
        grad_input = grad_output * (sigmoid_i * (1 + i * (1 - sigmoid_i)))
        return grad_input.float()
