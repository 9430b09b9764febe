"""Category 4: torch.library.custom_op ops with register_autograd and register_fake.

Registration pattern (the same in every corpus file that defines custom ops):
each op is built inside a small ``_define_<name>()`` function that calls
``torch.library.custom_op`` / ``register_fake`` / ``register_autograd`` and returns the
CustomOpDef; ``_once(qualname, _define_<name>)`` runs it only the first time in the process and
keeps the CustomOpDef in a process-wide dict (held by a module object in ``sys.modules`` under
the name ``_gradverify_corpus_opdefs``), so importing this file a second time, under any module
name, binds the same CustomOpDef objects again instead of registering ``corpus::<name>`` twice.
All op names live in the ``corpus`` namespace and are unique across the corpus.

The backward formulas follow the pattern of the PyTorch tutorial
pytorch/tutorials advanced_source/python_custom_ops.py (custom_op + register_fake +
register_autograd(backward, setup_context=...)).
"""
import sys
import types

import torch
from torch import Tensor

_REGISTRY_MODULE = "_gradverify_corpus_opdefs"
_OPDEFS = sys.modules.setdefault(_REGISTRY_MODULE, types.ModuleType(_REGISTRY_MODULE)).__dict__.setdefault("opdefs", {})


def _once(qualname, define):
    """Call define() (which registers `qualname`) once per process; return its CustomOpDef."""
    if qualname not in _OPDEFS:
        _OPDEFS[qualname] = define()
    return _OPDEFS[qualname]


# ---------------------------------------------------------------------------------------------
# RMSNorm with a float argument, 1 output. Source: vllm-project/vllm, vllm/_custom_ops.py
# (rms_norm(out, input, weight, epsilon), inference only) and the RMSNorm backward of
# linkedin/Liger-Kernel, src/liger_kernel/ops/rms_norm.py; written as a functional custom_op.
def _rms_bwd(grad, x, weight, rstd):
    xhat = x * rstd
    dxhat = grad * weight
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dw = (grad * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw


def _define_rms_norm():
    @torch.library.custom_op("corpus::rms_norm", mutates_args=())
    def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd * weight

    @rms_norm.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        dx, dw = _rms_bwd(grad, x, weight, rstd)
        return dx, dw, None

    rms_norm.register_autograd(backward, setup_context=setup_context)
    return rms_norm


rms_norm = _once("corpus::rms_norm", _define_rms_norm)


def _define_rms_norm_bug_missing_offdiag():
    # BUG (missing_offdiag): dx = rstd * grad * weight, as if rstd did not depend on x.
    @torch.library.custom_op("corpus::rms_norm_bug_missing_offdiag", mutates_args=())
    def rms_norm_bug_missing_offdiag(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd * weight

    @rms_norm_bug_missing_offdiag.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        dx = rstd * grad * weight
        dw = (grad * x * rstd).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None

    rms_norm_bug_missing_offdiag.register_autograd(backward, setup_context=setup_context)
    return rms_norm_bug_missing_offdiag


rms_norm_bug_missing_offdiag = _once("corpus::rms_norm_bug_missing_offdiag", _define_rms_norm_bug_missing_offdiag)


# ---------------------------------------------------------------------------------------------
# Fused residual-add + RMSNorm, 2 outputs (normed, residual_out = x + residual). Source:
# vllm-project/vllm, vllm/_custom_ops.py fused_add_rms_norm (which updates input and residual
# in place and declares both in mutates_args); here the functional form with autograd.
def _define_add_rms_norm():
    @torch.library.custom_op("corpus::add_rms_norm", mutates_args=())
    def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        h = x + residual
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return h * rstd * weight, h

    @add_rms_norm.register_fake
    def _(x, residual, weight, eps):
        return torch.empty_like(x), torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, residual, weight, eps = inputs
        out, h = output
        ctx.save_for_backward(h, weight)
        ctx.eps = eps

    def backward(ctx, grad_out, grad_h):
        h, weight = ctx.saved_tensors
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ctx.eps)
        dh, dw = _rms_bwd(grad_out, h, weight, rstd)
        if grad_h is not None:
            dh = dh + grad_h
        return dh, dh, dw, None

    add_rms_norm.register_autograd(backward, setup_context=setup_context)
    return add_rms_norm


add_rms_norm = _once("corpus::add_rms_norm", _define_add_rms_norm)


def _define_add_rms_norm_bug_undeclared_mutation():
    # BUG (undeclared_mutation): like vLLM's kernel it accumulates into `residual` in place, but
    # mutates_args=() does not say so (pytorch/pytorch#129372: "undefined behavior"). The
    # gradients are right; the caller's residual tensor is silently overwritten.
    @torch.library.custom_op("corpus::add_rms_norm_bug_undeclared_mutation", mutates_args=())
    def add_rms_norm_bug_undeclared_mutation(x: Tensor, residual: Tensor, weight: Tensor,
                                             eps: float) -> tuple[Tensor, Tensor]:
        residual.add_(x)
        rstd = torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)
        return residual * rstd * weight, residual.clone()

    @add_rms_norm_bug_undeclared_mutation.register_fake
    def _(x, residual, weight, eps):
        return torch.empty_like(x), torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, residual, weight, eps = inputs
        out, h = output
        ctx.save_for_backward(h, weight)
        ctx.eps = eps

    def backward(ctx, grad_out, grad_h):
        h, weight = ctx.saved_tensors
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ctx.eps)
        dh, dw = _rms_bwd(grad_out, h, weight, rstd)
        if grad_h is not None:
            dh = dh + grad_h
        return dh, dh, dw, None

    add_rms_norm_bug_undeclared_mutation.register_autograd(backward, setup_context=setup_context)
    return add_rms_norm_bug_undeclared_mutation


add_rms_norm_bug_undeclared_mutation = _once("corpus::add_rms_norm_bug_undeclared_mutation",
                                             _define_add_rms_norm_bug_undeclared_mutation)


# ---------------------------------------------------------------------------------------------
# Softmax that also returns its log-sum-exp, an int argument, 2 outputs. Source: the
# (out, softmax_lse) pair returned by Dao-AILab/flash-attention's forward kernels, e.g.
# flash_attn/flash_attn_interface.py (_flash_attn_forward -> out, softmax_lse), reduced to a
# plain softmax over `dim`.
def _define_softmax_lse():
    @torch.library.custom_op("corpus::softmax_lse", mutates_args=())
    def softmax_lse(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(x, dim)
        return torch.exp(x - lse.unsqueeze(dim)), lse

    @softmax_lse.register_fake
    def _(x, dim):
        lse_shape = list(x.shape)
        del lse_shape[dim]
        return torch.empty_like(x), x.new_empty(lse_shape)

    def setup_context(ctx, inputs, output):
        x, dim = inputs
        y, lse = output
        ctx.save_for_backward(y)
        ctx.dim = dim

    def backward(ctx, grad_y, grad_lse):
        y, = ctx.saved_tensors
        dim = ctx.dim
        grad_x = y * (grad_y - (grad_y * y).sum(dim, keepdim=True))
        grad_x = grad_x + grad_lse.unsqueeze(dim) * y
        return grad_x, None

    softmax_lse.register_autograd(backward, setup_context=setup_context)
    return softmax_lse


softmax_lse = _once("corpus::softmax_lse", _define_softmax_lse)


def _define_softmax_lse_bug_multi_output():
    # BUG (multi_output): handles "the lse is used" and "the probabilities are used" as two
    # separate cases; when both outputs get a non-zero gradient the softmax part is dropped.
    @torch.library.custom_op("corpus::softmax_lse_bug_multi_output", mutates_args=())
    def softmax_lse_bug_multi_output(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(x, dim)
        return torch.exp(x - lse.unsqueeze(dim)), lse

    @softmax_lse_bug_multi_output.register_fake
    def _(x, dim):
        lse_shape = list(x.shape)
        del lse_shape[dim]
        return torch.empty_like(x), x.new_empty(lse_shape)

    def setup_context(ctx, inputs, output):
        x, dim = inputs
        y, lse = output
        ctx.save_for_backward(y)
        ctx.dim = dim

    def backward(ctx, grad_y, grad_lse):
        y, = ctx.saved_tensors
        dim = ctx.dim
        if grad_lse is not None and bool(grad_lse.ne(0).any()):
            # lse used as a loss term (e.g. z-loss): its gradient is the softmax
            return grad_lse.unsqueeze(dim) * y, None
        return y * (grad_y - (grad_y * y).sum(dim, keepdim=True)), None

    softmax_lse_bug_multi_output.register_autograd(backward, setup_context=setup_context)
    return softmax_lse_bug_multi_output


softmax_lse_bug_multi_output = _once("corpus::softmax_lse_bug_multi_output", _define_softmax_lse_bug_multi_output)


# ---------------------------------------------------------------------------------------------
# LayerNorm returning (y, mean, rstd), list[int] and float arguments, 3 outputs. Source: the
# forward of openai/triton python/tutorials/05-layer-norm.py and NVIDIA/apex
# apex/normalization/fused_layer_norm.py, which return/stash mean and rstd next to y. mean and
# rstd are differentiable functions of x; the backward accounts for all three outputs.
def _define_layer_norm_stats():
    @torch.library.custom_op("corpus::layer_norm_stats", mutates_args=())
    def layer_norm_stats(x: Tensor, normalized_shape: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
        dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        return (x - mean) * rstd, mean, rstd

    @layer_norm_stats.register_fake
    def _(x, normalized_shape, eps):
        stat_shape = list(x.shape[:x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
        return torch.empty_like(x), x.new_empty(stat_shape), x.new_empty(stat_shape)

    def setup_context(ctx, inputs, output):
        x, normalized_shape, eps = inputs
        y, mean, rstd = output
        ctx.save_for_backward(y, rstd)
        ctx.dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))

    def backward(ctx, grad_y, grad_mean, grad_rstd):
        xhat, rstd = ctx.saved_tensors
        dims = ctx.dims
        n = 1
        for d in dims:
            n *= xhat.shape[d]
        dx = rstd * (grad_y - grad_y.mean(dims, keepdim=True)
                     - xhat * (grad_y * xhat).mean(dims, keepdim=True))
        if grad_mean is not None:
            dx = dx + grad_mean / n
        if grad_rstd is not None:
            # d rstd / dx = -rstd^3 (x - mean) / n = -rstd^2 xhat / n
            dx = dx - grad_rstd * rstd.pow(2) * xhat / n
        return dx, None, None

    layer_norm_stats.register_autograd(backward, setup_context=setup_context)
    return layer_norm_stats


layer_norm_stats = _once("corpus::layer_norm_stats", _define_layer_norm_stats)


def _define_layer_norm_stats_bug_dropped_output_grad():
    # BUG (dropped_output_grad): treats mean and rstd as auxiliary outputs and ignores their
    # gradients, although they are differentiable outputs (not marked non-differentiable).
    @torch.library.custom_op("corpus::layer_norm_stats_bug_dropped_output_grad", mutates_args=())
    def layer_norm_stats_bug_dropped_output_grad(x: Tensor, normalized_shape: list[int],
                                                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
        dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        return (x - mean) * rstd, mean, rstd

    @layer_norm_stats_bug_dropped_output_grad.register_fake
    def _(x, normalized_shape, eps):
        stat_shape = list(x.shape[:x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
        return torch.empty_like(x), x.new_empty(stat_shape), x.new_empty(stat_shape)

    def setup_context(ctx, inputs, output):
        x, normalized_shape, eps = inputs
        y, mean, rstd = output
        ctx.save_for_backward(y, rstd)
        ctx.dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))

    def backward(ctx, grad_y, grad_mean, grad_rstd):
        xhat, rstd = ctx.saved_tensors
        dims = ctx.dims
        dx = rstd * (grad_y - grad_y.mean(dims, keepdim=True)
                     - xhat * (grad_y * xhat).mean(dims, keepdim=True))
        return dx, None, None

    layer_norm_stats_bug_dropped_output_grad.register_autograd(backward, setup_context=setup_context)
    return layer_norm_stats_bug_dropped_output_grad


layer_norm_stats_bug_dropped_output_grad = _once("corpus::layer_norm_stats_bug_dropped_output_grad",
                                                 _define_layer_norm_stats_bug_dropped_output_grad)


# ---------------------------------------------------------------------------------------------
# SwiGLU, 2 inputs, 1 output. Source: linkedin/Liger-Kernel, src/liger_kernel/ops/swiglu.py
# (silu(a) * b with a hand-written backward), written as a custom_op.
def _swiglu_bwd(grad, a, b):
    sig = torch.sigmoid(a)
    silu = a * sig
    da = grad * b * (sig + silu * (1 - sig))
    db = grad * silu
    return da, db


def _define_swiglu():
    @torch.library.custom_op("corpus::swiglu", mutates_args=())
    def swiglu(a: Tensor, b: Tensor) -> Tensor:
        return a * torch.sigmoid(a) * b

    @swiglu.register_fake
    def _(a, b):
        return torch.empty_like(a)

    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b)

    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _swiglu_bwd(grad, a, b)

    swiglu.register_autograd(backward, setup_context=setup_context)
    return swiglu


swiglu = _once("corpus::swiglu", _define_swiglu)


def _define_swiglu_bug_missing_autograd():
    # BUG (missing_autograd): register_fake but no register_autograd. Forward works and the
    # output even requires grad; backward raises "no autograd formula was registered".
    @torch.library.custom_op("corpus::swiglu_bug_missing_autograd", mutates_args=())
    def swiglu_bug_missing_autograd(a: Tensor, b: Tensor) -> Tensor:
        return a * torch.sigmoid(a) * b

    @swiglu_bug_missing_autograd.register_fake
    def _(a, b):
        return torch.empty_like(a)

    return swiglu_bug_missing_autograd


swiglu_bug_missing_autograd = _once("corpus::swiglu_bug_missing_autograd", _define_swiglu_bug_missing_autograd)


# ---------------------------------------------------------------------------------------------
# Squared pairwise distances (N, D) x (M, D) -> (N, M). Source: the custom-op + fake-kernel
# pattern of pytorch/tutorials advanced_source/python_custom_ops.py applied to a cdist-like
# kernel; the backward is the usual 2 (rowsum(g) x - g y).
def _sqdist_bwd(g, x, y):
    dx = 2 * (g.sum(1, keepdim=True) * x - g @ y)
    dy = 2 * (g.sum(0).unsqueeze(1) * y - g.t() @ x)
    return dx, dy


def _define_pairwise_sqdist():
    @torch.library.custom_op("corpus::pairwise_sqdist", mutates_args=())
    def pairwise_sqdist(x: Tensor, y: Tensor) -> Tensor:
        return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()).contiguous()

    @pairwise_sqdist.register_fake
    def _(x, y):
        return x.new_empty(x.shape[0], y.shape[0])

    def setup_context(ctx, inputs, output):
        x, y = inputs
        ctx.save_for_backward(x, y)

    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return _sqdist_bwd(grad, x, y)

    pairwise_sqdist.register_autograd(backward, setup_context=setup_context)
    return pairwise_sqdist


pairwise_sqdist = _once("corpus::pairwise_sqdist", _define_pairwise_sqdist)


def _define_pairwise_sqdist_bug_fake_shape():
    # BUG (fake_kernel_mismatch): the fake kernel was copied from a self-distance op and returns
    # (N, N); the real kernel returns (N, M). Gradients are right; torch.compile / export /
    # opcheck see the wrong shape.
    @torch.library.custom_op("corpus::pairwise_sqdist_bug_fake_shape", mutates_args=())
    def pairwise_sqdist_bug_fake_shape(x: Tensor, y: Tensor) -> Tensor:
        return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()).contiguous()

    @pairwise_sqdist_bug_fake_shape.register_fake
    def _(x, y):
        return x.new_empty(x.shape[0], x.shape[0])

    def setup_context(ctx, inputs, output):
        x, y = inputs
        ctx.save_for_backward(x, y)

    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return _sqdist_bwd(grad, x, y)

    pairwise_sqdist_bug_fake_shape.register_autograd(backward, setup_context=setup_context)
    return pairwise_sqdist_bug_fake_shape


pairwise_sqdist_bug_fake_shape = _once("corpus::pairwise_sqdist_bug_fake_shape", _define_pairwise_sqdist_bug_fake_shape)


def _define_pairwise_sqdist_bug_fake_strides():
    # BUG (fake_kernel_mismatch): the real kernel computes the (M, N) "y-major" product and
    # returns its transpose, a non-contiguous (N, M) tensor with strides (1, N); the fake kernel
    # claims a contiguous (N, M) result. Shapes and gradients agree; strides do not.
    @torch.library.custom_op("corpus::pairwise_sqdist_bug_fake_strides", mutates_args=())
    def pairwise_sqdist_bug_fake_strides(x: Tensor, y: Tensor) -> Tensor:
        d_t = y.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1) - 2 * y @ x.t()
        return d_t.t()

    @pairwise_sqdist_bug_fake_strides.register_fake
    def _(x, y):
        return x.new_empty(x.shape[0], y.shape[0])

    def setup_context(ctx, inputs, output):
        x, y = inputs
        ctx.save_for_backward(x, y)

    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return _sqdist_bwd(grad, x, y)

    pairwise_sqdist_bug_fake_strides.register_autograd(backward, setup_context=setup_context)
    return pairwise_sqdist_bug_fake_strides


pairwise_sqdist_bug_fake_strides = _once("corpus::pairwise_sqdist_bug_fake_strides",
                                         _define_pairwise_sqdist_bug_fake_strides)
