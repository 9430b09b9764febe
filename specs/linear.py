"""The PyTorch tutorial's LinearFunction: output = input @ weight.T (+ bias), bias optional.

Two declarations: with and without bias. From the command line, one shape per input selects
the variant: --shape "4,3;5,3" (no bias) or --shape "4,3;5,3;5" (with bias).
"""

import torch

import gradverify as gv


@gv.check(inputs={"input": gv.tensor(4, 3), "weight": gv.tensor(5, 3), "bias": gv.tensor(5)})
@gv.check(inputs={"input": gv.tensor(4, 3), "weight": gv.tensor(5, 3)})
class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias=None):
        ctx.save_for_backward(input, weight, bias)
        output = input.mm(weight.t())
        if bias is not None:
            output += bias.unsqueeze(0).expand_as(output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.mm(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.t().mm(input)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_input, grad_weight, grad_bias
