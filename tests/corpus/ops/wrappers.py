"""Category 6: public-API wrapper functions around Functions (``def my_cube(x): ...``),
functools.partial, and double backward built from two Functions."""
import functools

import torch
from torch.autograd import Function


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, docs/source/notes/extending.rst and pytorch/tutorials
# intermediate_source/custom_function_double_backward_tutorial.py ("Saving intermediate
# results": MyCube returns dx as a second output so that double backward sees it; setup_context
# style; wrapped by my_cube).
class MyCube(torch.autograd.Function):
    @staticmethod
    def forward(x):
        # We wish to save dx for backward. In order to do so, it must
        # be returned as an output.
        dx = 3 * x ** 2
        result = x ** 3
        return result, dx

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, = inputs
        result, dx = output
        ctx.save_for_backward(x, dx)

    @staticmethod
    def backward(ctx, grad_output, grad_dx):
        x, dx = ctx.saved_tensors
        # In order for the autograd.Function to work with higher-order
        # gradients, we must add the gradient contribution of `dx`,
        # which is grad_dx * 6 * x.
        result = grad_output * dx + grad_dx * 6 * x
        return result


# Wrap MyCube in a function so that it is clearer what the output is
def my_cube(x):
    result, dx = MyCube.apply(x)
    return result


class MyCube_bug_dropped_output_grad(MyCube):
    # BUG (dropped_output_grad): the grad_dx * 6 * x term the docs insist on is left out. Through
    # my_cube the first derivative is still right (dx is discarded, grad_dx == 0); the Function's
    # own second output, and the double backward of my_cube, are wrong.
    @staticmethod
    def backward(ctx, grad_output, grad_dx):
        x, dx = ctx.saved_tensors
        result = grad_output * dx
        return result


class _MyCubeCtxAttr(torch.autograd.Function):
    # BUG (second_order): dx is computed in forward and stashed on ctx instead of being
    # returned as an output, so double backward treats it as a constant.
    @staticmethod
    def forward(ctx, x):
        ctx.dx = 3 * x ** 2
        return x ** 3

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.dx


def my_cube_bug_second_order(x):
    return _MyCubeCtxAttr.apply(x)


class _MyCubeNoMaterialize(MyCube):
    # BUG (undefined_grad): set_materialize_grads(False) for speed, but backward still does
    # arithmetic with grad_dx, which is None whenever dx is unused (always, through my_cube).
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, = inputs
        result, dx = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, dx)


def my_cube_bug_undefined_grad(x):
    result, dx = _MyCubeNoMaterialize.apply(x)
    return result


# ---------------------------------------------------------------------------------------------
# Double backward from two Functions: the backward of MyTanh calls .apply of a second Function
# whose own backward supplies the second derivative. Source: the CubeFunction /
# CubeFunctionBackward pair (nathanjpaek/kb-pilot KernelBench/level9/15826_Cube.py) and the
# same structure in rosinality/stylegan2-pytorch op/fused_act.py; tanh instead of cube.
class TanhBackward(Function):
    @staticmethod
    def forward(ctx, grad_output, y):
        ctx.save_for_backward(grad_output, y)
        return grad_output * (1 - y * y)

    @staticmethod
    def backward(ctx, gg):
        grad_output, y = ctx.saved_tensors
        return gg * (1 - y * y), -2 * gg * grad_output * y


class MyTanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        return TanhBackward.apply(grad_output, y)


def my_tanh(x):
    return MyTanh.apply(x)


class _TanhBackwardSign(TanhBackward):
    # BUG (second_order): sign of the d/dy term of the inner Function flipped; first derivatives
    # are exact, the double backward is wrong.
    @staticmethod
    def backward(ctx, gg):
        grad_output, y = ctx.saved_tensors
        return gg * (1 - y * y), 2 * gg * grad_output * y


class _MyTanhSign(MyTanh):
    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        return _TanhBackwardSign.apply(grad_output, y)


def my_tanh_bug_second_order(x):
    return _MyTanhSign.apply(x)


class _MyTanhDetach(MyTanh):
    # BUG (second_order): plain ops in backward, but on y.detach(): the graph through the saved
    # output is cut, so the double backward misses d(1 - y^2)/dx.
    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        y = y.detach()
        return grad_output * (1 - y * y)


def my_tanh_bug_second_order_detach(x):
    return _MyTanhDetach.apply(x)


# ---------------------------------------------------------------------------------------------
# Source: rosinality/stylegan2-pytorch, op/fused_act.py (FusedLeakyReLUFunction +
# FusedLeakyReLUFunctionBackward, fused_leaky_relu(input, bias=None, negative_slope=0.2,
# scale=2 ** 0.5)); the CUDA fused_bias_act kernel is re-typed in torch. The public entry point
# used here is a functools.partial of the wrapper.
def _fused_bias_act_grad(grad, out, negative_slope, scale):
    # (not `grad * torch.where(out > 0, 1.0, negative_slope)`: a where() of two Python scalars
    # is a float32 tensor, which would round negative_slope in a float64 backward)
    return torch.where(out > 0, grad, grad * negative_slope) * scale


class FusedLeakyReLUFunctionBackward(Function):
    @staticmethod
    def forward(ctx, grad_output, out, bias, negative_slope, scale):
        ctx.save_for_backward(out)
        ctx.negative_slope = negative_slope
        ctx.scale = scale

        empty = grad_output.new_empty(0)

        grad_input = _fused_bias_act_grad(grad_output, out, negative_slope, scale)

        dim = [0]

        if grad_input.ndim > 2:
            dim += list(range(2, grad_input.ndim))

        if bias:
            grad_bias = grad_input.sum(dim).detach()

        else:
            grad_bias = empty

        return grad_input, grad_bias

    @staticmethod
    def backward(ctx, gradgrad_input, gradgrad_bias):
        out, = ctx.saved_tensors
        if gradgrad_bias.numel():
            rest_dim = [1] * (gradgrad_input.ndim - 2)
            gradgrad_input = gradgrad_input + gradgrad_bias.view(1, -1, *rest_dim)
        gradgrad_out = _fused_bias_act_grad(gradgrad_input, out, ctx.negative_slope, ctx.scale)

        return gradgrad_out, None, None, None, None


class FusedLeakyReLUFunction(Function):
    _backward_fn = FusedLeakyReLUFunctionBackward

    @staticmethod
    def forward(ctx, input, bias, negative_slope, scale):
        ctx.bias = bias is not None

        if bias is not None:
            rest_dim = [1] * (input.ndim - 2)
            input = input + bias.view(1, bias.shape[0], *rest_dim)

        out = torch.where(input > 0, input, input * negative_slope) * scale
        ctx.save_for_backward(out)
        ctx.negative_slope = negative_slope
        ctx.scale = scale

        return out

    @classmethod
    def backward(cls, ctx, grad_output):
        out, = ctx.saved_tensors

        grad_input, grad_bias = cls._backward_fn.apply(
            grad_output, out, ctx.bias, ctx.negative_slope, ctx.scale
        )

        if not ctx.bias:
            grad_bias = None

        return grad_input, grad_bias, None, None


def fused_leaky_relu(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    return FusedLeakyReLUFunction.apply(input, bias, negative_slope, scale)


fused_lrelu = functools.partial(fused_leaky_relu, negative_slope=0.2, scale=2 ** 0.5)


class _FusedLeakyReLUBackwardBranch(FusedLeakyReLUFunctionBackward):
    # BUG (wrong_branch): the negative branch gets negative_slope but not scale.
    @staticmethod
    def forward(ctx, grad_output, out, bias, negative_slope, scale):
        ctx.save_for_backward(out)
        ctx.negative_slope = negative_slope
        ctx.scale = scale
        empty = grad_output.new_empty(0)
        grad_input = torch.where(out > 0, grad_output * scale, grad_output * negative_slope)
        dim = [0]
        if grad_input.ndim > 2:
            dim += list(range(2, grad_input.ndim))
        if bias:
            grad_bias = grad_input.sum(dim).detach()
        else:
            grad_bias = empty
        return grad_input, grad_bias


class _FusedLeakyReLUBranch(FusedLeakyReLUFunction):
    _backward_fn = _FusedLeakyReLUBackwardBranch


def _fused_leaky_relu_bug_wrong_branch(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    return _FusedLeakyReLUBranch.apply(input, bias, negative_slope, scale)


fused_lrelu_bug_wrong_branch = functools.partial(_fused_leaky_relu_bug_wrong_branch,
                                                 negative_slope=0.2, scale=2 ** 0.5)


class _FusedLeakyReLUBackwardDims(FusedLeakyReLUFunctionBackward):
    # BUG (shape_mismatch): the bias gradient is reduced over the batch dim only, giving
    # (C, H, W) for a (C,) bias. When W == C the engine accepts it (C is "expandable" to
    # (C, H, W)) and sum-reduces over the wrong dims, silently; otherwise it raises.
    @staticmethod
    def forward(ctx, grad_output, out, bias, negative_slope, scale):
        ctx.save_for_backward(out)
        ctx.negative_slope = negative_slope
        ctx.scale = scale
        empty = grad_output.new_empty(0)
        grad_input = _fused_bias_act_grad(grad_output, out, negative_slope, scale)
        if bias:
            grad_bias = grad_input.sum(0).detach()
        else:
            grad_bias = empty
        return grad_input, grad_bias

    @staticmethod
    def backward(ctx, gradgrad_input, gradgrad_bias):
        out, = ctx.saved_tensors
        if gradgrad_bias.numel():
            gradgrad_input = gradgrad_input + gradgrad_bias.unsqueeze(0)
        gradgrad_out = _fused_bias_act_grad(gradgrad_input, out, ctx.negative_slope, ctx.scale)
        return gradgrad_out, None, None, None, None


class _FusedLeakyReLUDims(FusedLeakyReLUFunction):
    _backward_fn = _FusedLeakyReLUBackwardDims


def _fused_leaky_relu_bug_shape_mismatch(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    return _FusedLeakyReLUDims.apply(input, bias, negative_slope, scale)


fused_lrelu_bug_shape_mismatch = functools.partial(_fused_leaky_relu_bug_shape_mismatch,
                                                   negative_slope=0.2, scale=2 ** 0.5)
