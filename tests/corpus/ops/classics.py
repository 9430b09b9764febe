"""Category 10: the classics people get wrong (softmax, log-softmax, layer norm, column
normalisation, GELU / Swish / Mish, a two-input atan2)."""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, tools/autograd/derivatives.yaml (_softmax_backward_data:
# y * (grad - (grad * y).sum(dim))), the formula every hand-written softmax backward uses
# (e.g. the ScaledMaskedSoftmax kernels in sparse.py), over an int `dim`.
class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        return y * (grad_output - (grad_output * y).sum(ctx.dim, keepdim=True)), None


class Softmax_bug_wrong_dim(Softmax):
    # BUG (wrong_dim): the reduction in backward is hard-coded to dim=-1 while forward normalises
    # over ctx.dim (right only when dim is the last one).
    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        return y * (grad_output - (grad_output * y).sum(-1, keepdim=True)), None


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, tools/autograd/derivatives.yaml (_log_softmax_backward_data:
# grad - exp(output) * grad.sum(dim)), as a custom Function.
class LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim=-1):
        out = torch.log_softmax(x, dim)
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad_output):
        out, = ctx.saved_tensors
        return grad_output - torch.exp(out) * grad_output.sum(ctx.dim, keepdim=True), None


class LogSoftmax_bug_missing_offdiag(LogSoftmax):
    # BUG (missing_offdiag): grad * (1 - softmax), the diagonal of the Jacobian only.
    @staticmethod
    def backward(ctx, grad_output):
        out, = ctx.saved_tensors
        return grad_output - torch.exp(out) * grad_output, None


# ---------------------------------------------------------------------------------------------
# Source: CoinCheung/pytorch-loss, pytorch_loss/layer_norm.py (LayerNormV2Func: "self-derived
# grad formula", x of shape (N, C, M) normalised over dim 1, ctx.vars = x, eps). The
# published backward of that file is element-wise in grad_output (it cannot be a layer-norm
# VJP); the backward here is the correct one, rstd * (g - mean(g) - xhat * mean(g * xhat)).
class LayerNormV2Func(torch.autograd.Function):
    '''
    compute backward directly for better numeric stability
    '''
    @staticmethod
    def forward(ctx, x, eps):
        '''
        inputs:
            x: (N, C, M)
            eps: float
        outpus:
            x: (N, C, M)
        '''
        mean = x.mean(dim=1, keepdim=True)
        std = (x.var(dim=1, keepdim=True, unbiased=False) + eps).rsqrt()
        out = (x - mean).mul_(std)
        ctx.vars = x, eps
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, eps = ctx.vars
        N, C, M = x.size()
        mean = x.mean(dim=1, keepdim=True)
        rstd = (x.var(dim=1, keepdim=True, unbiased=False) + eps).rsqrt()
        xhat = (x - mean) * rstd
        grads = rstd * (grad_output - grad_output.mean(dim=1, keepdim=True)
                        - xhat * (grad_output * xhat).mean(dim=1, keepdim=True))
        return grads, None


class LayerNormV2Func_bug_missing_offdiag(LayerNormV2Func):
    # BUG (missing_offdiag): mean and variance treated as constants: grads = rstd * grad_output.
    @staticmethod
    def backward(ctx, grad_output):
        x, eps = ctx.vars
        rstd = (x.var(dim=1, keepdim=True, unbiased=False) + eps).rsqrt()
        return rstd * grad_output, None


class LayerNormV2Func_bug_layout(LayerNormV2Func):
    # BUG (layout): flattens grad_output with .view, which raises for a non-contiguous
    # grad_output (e.g. after a permute/transpose downstream) - the failure fixed in
    # NVIDIA/apex#1601 ("ensure grad_output is contiguous"); right for contiguous ones.
    @staticmethod
    def backward(ctx, grad_output):
        x, eps = ctx.vars
        N, C, M = x.size()
        g = grad_output.view(N, C * M).view(N, C, M)
        mean = x.mean(dim=1, keepdim=True)
        rstd = (x.var(dim=1, keepdim=True, unbiased=False) + eps).rsqrt()
        xhat = (x - mean) * rstd
        grads = rstd * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
        return grads, None


# ---------------------------------------------------------------------------------------------
# Column normalisation y = x / x.sum(0) of a positive matrix (one Sinkhorn half-step; also the
# seed example of this project, specs/column_normalize.py).
class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0, keepdim=True)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return (grad_output - (grad_output * x).sum(0, keepdim=True) / s) / s


class ColumnNormalize_bug_missing_offdiag(ColumnNormalize):
    # BUG (missing_offdiag): g * (1/s - x/s^2), the diagonal d y_ij / d x_ij only.
    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output * (1 / s - x / s ** 2)


class ColumnNormalize_bug_inplace_forward(ColumnNormalize):
    # BUG (inplace_forward): normalises x in place to save memory, without ctx.mark_dirty, and
    # saves it: the caller's x is overwritten and backward reads the normalised values where it
    # expects the original ones.
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0, keepdim=True)
        x.div_(s)
        ctx.save_for_backward(x, s)
        return x.clone()


# ---------------------------------------------------------------------------------------------
# Exact (erf) GELU. Source: the derivative quoted in NVIDIA/Megatron-LM
# megatron/model/fused_bias_gelu.py ("gradient of actual gelu is: 0.5 * (1. + torch.erf(x *
# 0.70710678)) + 0.3989423 * x * torch.exp(-0.5 * x * x)"), with exact constants.
class GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return grad_output * (cdf + x * pdf)


class GELUFunction_bug_sign(GELUFunction):
    # BUG (sign): cdf - x * pdf (product rule term with the wrong sign).
    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return grad_output * (cdf - x * pdf)


# ---------------------------------------------------------------------------------------------
# Source: lukemelas/EfficientNet-PyTorch, efficientnet_pytorch/utils.py (SwishImplementation,
# the "memory efficient" Swish, also in open-mmlab/mmdetection mmdet/models/utils/activations.py).
class SwishImplementation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        result = i * torch.sigmoid(i)
        ctx.save_for_backward(i)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        i = ctx.saved_tensors[0]
        sigmoid_i = torch.sigmoid(i)
        return grad_output * (sigmoid_i * (1 + i * (1 - sigmoid_i)))


class SwishImplementation_bug_ignores_grad_output(SwishImplementation):
    # BUG (ignores_grad_output): the local derivative is returned without grad_output.
    @staticmethod
    def backward(ctx, grad_output):
        i = ctx.saved_tensors[0]
        sigmoid_i = torch.sigmoid(i)
        return sigmoid_i * (1 + i * (1 - sigmoid_i))


# ---------------------------------------------------------------------------------------------
# Source: CoinCheung/pytorch-loss, mish.py (MishFunction, "self-computed back-propagation").
# The original computes the local gradient in forward, keeps it on ctx and multiplies it in
# place (`grad *= grad_output`); the version here saves the input and recomputes in backward
# with differentiable ops, so double backward works. (The original also mutates ctx.grad, so a
# second backward through the same graph is wrong; not used as a twin.)
class MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat):
        ctx.save_for_backward(feat)
        return feat * torch.tanh(F.softplus(feat))

    @staticmethod
    def backward(ctx, grad_output):
        feat, = ctx.saved_tensors
        tanhX = torch.tanh(F.softplus(feat))
        grad = tanhX + feat * (1 - torch.pow(tanhX, 2)) * torch.sigmoid(feat)
        return grad * grad_output


class MishFunction_bug_second_order(MishFunction):
    # BUG (second_order): the local gradient is computed in forward (no graph) and kept as a ctx
    # attribute; first derivatives are exact, the double backward treats it as a constant.
    @staticmethod
    def forward(ctx, feat):
        tanhX = torch.tanh(F.softplus(feat))
        out = feat * tanhX
        grad = tanhX + feat * (1 - torch.pow(tanhX, 2)) * torch.sigmoid(feat)
        ctx.grad = grad
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        return grad * grad_output


# ---------------------------------------------------------------------------------------------
# atan2(y, x), two inputs. Source: pytorch/pytorch tools/autograd/derivatives.yaml (atan2:
# self: grad * other / (self * self + other * other), other: grad * -self / (...)), as a custom
# Function.
class Atan2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x):
        ctx.save_for_backward(y, x)
        return torch.atan2(y, x)

    @staticmethod
    def backward(ctx, grad_output):
        y, x = ctx.saved_tensors
        recip = 1.0 / (x * x + y * y)
        return grad_output * x * recip, grad_output * -y * recip


class Atan2Function_bug_swapped_inputs(Atan2Function):
    # BUG (swapped_inputs): gradients returned in (x, y) order for a forward(y, x).
    @staticmethod
    def backward(ctx, grad_output):
        y, x = ctx.saved_tensors
        recip = 1.0 / (x * x + y * y)
        return grad_output * -y * recip, grad_output * x * recip


class Atan2Function_bug_zero_grad(Atan2Function):
    # BUG (zero_grad): x treated as a constant (a zero gradient, not None).
    @staticmethod
    def backward(ctx, grad_output):
        y, x = ctx.saved_tensors
        recip = 1.0 / (x * x + y * y)
        return grad_output * x * recip, torch.zeros_like(x)
