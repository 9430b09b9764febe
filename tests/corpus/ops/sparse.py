"""Category 2: sparse / index ops (gather, scatter-add segment sums, embedding lookups with the
int64 index tensor first, COO SpMM with indices and values, masked softmax with a bool mask)."""
import torch


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, torch/autograd/_functions/tensor.py (the 0.2-era Python Gather
# Function: forward(ctx, input, dim, index), backward scatters grad_output into zeros). The
# scatter_ version of that backward was pytorch/pytorch#1631 "Gather backward is incorrect with
# repeated indices" (see the twin).
class Gather(torch.autograd.Function):

    @staticmethod
    def forward(ctx, input, dim, index):
        assert not ctx.needs_input_grad[2], "Gather can't differentiate the index"
        ctx.input_size = input.size()
        ctx.save_for_backward(index)
        ctx.dim = dim
        return input.gather(dim, index)

    @staticmethod
    def backward(ctx, grad_output):
        index, = ctx.saved_tensors
        grad_input = grad_output.new_zeros(ctx.input_size)
        return grad_input.scatter_add_(ctx.dim, index, grad_output), None, None


class Gather_bug_duplicate_index(Gather):
    # BUG (duplicate_index): scatter_ overwrites where an index repeats instead of accumulating
    # (pytorch/pytorch#1631); right wherever each index occurs once.
    @staticmethod
    def backward(ctx, grad_output):
        index, = ctx.saved_tensors
        grad_input = grad_output.new_zeros(ctx.input_size)
        return grad_input.scatter_(ctx.dim, index, grad_output), None, None


# ---------------------------------------------------------------------------------------------
# Source: Ascend/DrivingSDK, mx_driving/ops/scatter_add.py (ScatterAddFunction: forward(ctx, src, index,
# out=None, dim=0, dim_size=None), index saved for backward); the NPU kernels are re-typed as
# index_add_ / index_select. A segment sum: out[index[i]] += src[i].
class ScatterAddFunction(torch.autograd.Function):
    @staticmethod
    # pylint: disable=too-many-arguments
    def forward(ctx, src, index, out=None, dim=0, dim_size=None):
        if dim_size is None:
            dim_size = int(index.max()) + 1
        if out is None:
            out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))
        res = out.index_add(0, index, src)
        ctx.dim = dim
        ctx.save_for_backward(index)
        return res

    @staticmethod
    def backward(ctx, grad_out):
        index, = ctx.saved_tensors
        result = grad_out.index_select(ctx.dim, index)
        return result, None, None, None, None


class ScatterAddFunction_bug_shape_mismatch(ScatterAddFunction):
    # BUG (shape_mismatch): returns grad_out as is, as if dim_size == len(index); the gradient
    # has the output's shape (dim_size, C), not src's (N, C), and the engine cannot reduce it.
    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, torch/nn/_functions/thnn/sparse.py (the 0.3-era Python Embedding
# Function, forward(ctx, indices, weight, ...) with the int64 indices FIRST; its backward
# accumulated rows with index_add_). Re-typed without max_norm / padding_idx / sparse grads.
class Embedding(torch.autograd.Function):

    @staticmethod
    def forward(ctx, indices, weight):
        assert indices.dim() <= 2
        assert not ctx.needs_input_grad[0], "Embedding doesn't compute the gradient w.r.t. the indices"
        ctx._weight_size = weight.size()
        ctx.save_for_backward(indices)
        output = weight.index_select(0, indices.view(-1))
        return output.view(indices.size() + (weight.size(1),))

    @staticmethod
    def backward(ctx, grad_output):
        indices, = ctx.saved_tensors
        grad_output = grad_output.contiguous().view(-1, ctx._weight_size[1])
        grad_weight = grad_output.new_zeros(ctx._weight_size)
        grad_weight.index_add_(0, indices.view(-1), grad_output)
        return None, grad_weight


class Embedding_bug_duplicate_index(Embedding):
    # BUG (duplicate_index): advanced-index assignment keeps one row per repeated token instead
    # of summing them.
    @staticmethod
    def backward(ctx, grad_output):
        indices, = ctx.saved_tensors
        grad_output = grad_output.contiguous().view(-1, ctx._weight_size[1])
        grad_weight = grad_output.new_zeros(ctx._weight_size)
        grad_weight[indices.view(-1)] = grad_output
        return None, grad_weight


# ---------------------------------------------------------------------------------------------
# Source: intel/intel-extension-for-pytorch, intel_pytorch_extension_py/ops/embeddingbag.py
# (EmbeddingBagFunction) and the offset2bag construction of aten/src/ATen/native/EmbeddingBag.cpp;
# re-typed as a 'sum' bag with per_sample_weights and the int64 indices FIRST. offsets is a
# plain list[int] of bag starts.
class EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, offsets, weight, per_sample_weights):
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        pos = torch.arange(indices.numel())
        # offset2bag: bag id of every index position
        offset2bag = torch.searchsorted(offsets, pos, right=True) - 1
        rows = weight.index_select(0, indices) * per_sample_weights.unsqueeze(-1)
        out = weight.new_zeros(offsets.numel(), weight.size(1)).index_add_(0, offset2bag, rows)
        ctx.save_for_backward(indices, offsets, weight, per_sample_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, weight, per_sample_weights = ctx.saved_tensors
        pos = torch.arange(indices.numel())
        offset2bag = torch.searchsorted(offsets, pos, right=True) - 1
        grad_rows = grad_out.index_select(0, offset2bag)
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.zeros_like(weight).index_add_(
                0, indices, grad_rows * per_sample_weights.unsqueeze(-1))
        if ctx.needs_input_grad[3]:
            grad_psw = (grad_rows * weight.index_select(0, indices)).sum(-1)
        return None, None, grad_weight, grad_psw


class EmbeddingBagFunction_bug_none_grad(EmbeddingBagFunction):
    # BUG (none_grad): per_sample_weights "not supported in backward": None although it needs grad.
    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, weight, per_sample_weights = ctx.saved_tensors
        pos = torch.arange(indices.numel())
        offset2bag = torch.searchsorted(offsets, pos, right=True) - 1
        grad_rows = grad_out.index_select(0, offset2bag)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.zeros_like(weight).index_add_(
                0, indices, grad_rows * per_sample_weights.unsqueeze(-1))
        return None, None, grad_weight, None


class EmbeddingBagFunction_bug_partial(EmbeddingBagFunction):
    # BUG (partial): offset2bag recomputed with searchsorted(right=False): the first index of
    # every bag is credited to the previous bag (the very first one wraps to the last bag).
    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, weight, per_sample_weights = ctx.saved_tensors
        pos = torch.arange(indices.numel())
        offset2bag = torch.searchsorted(offsets, pos) - 1
        grad_rows = grad_out[offset2bag]
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.zeros_like(weight).index_add_(
                0, indices, grad_rows * per_sample_weights.unsqueeze(-1))
        if ctx.needs_input_grad[3]:
            grad_psw = (grad_rows * weight.index_select(0, indices)).sum(-1)
        return None, None, grad_weight, grad_psw


# ---------------------------------------------------------------------------------------------
# Source: Diego999/pyGAT, layers.py (SpecialSpmmFunction, "Special function for only sparse
# region backpropataion layer"): forward(ctx, indices, values, shape, b) with the (2, E) int64
# COO indices first. Re-typed as written; shape is a plain list [N, N].
class SpecialSpmmFunction(torch.autograd.Function):
    """Special function for only sparse region backpropataion layer."""
    @staticmethod
    def forward(ctx, indices, values, shape, b):
        assert indices.requires_grad == False
        a = torch.sparse_coo_tensor(indices, values, shape)
        ctx.save_for_backward(a, b)
        ctx.N = shape[0]
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        grad_values = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a_dense = grad_output.matmul(b.t())
            edge_idx = a._indices()[0, :] * ctx.N + a._indices()[1, :]
            grad_values = grad_a_dense.view(-1)[edge_idx]
        if ctx.needs_input_grad[3]:
            grad_b = a.t().matmul(grad_output)
        return None, grad_values, None, grad_b


class SpecialSpmmFunction_bug_transposed(SpecialSpmmFunction):
    # BUG (transposed): grad_b = a @ grad_output; a is N x N, so nothing fails, but it is a^T
    # that belongs there.
    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        grad_values = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a_dense = grad_output.matmul(b.t())
            edge_idx = a._indices()[0, :] * ctx.N + a._indices()[1, :]
            grad_values = grad_a_dense.view(-1)[edge_idx]
        if ctx.needs_input_grad[3]:
            grad_b = a.matmul(grad_output)
        return None, grad_values, None, grad_b


class SpecialSpmmFunction_bug_needs_input_grad(SpecialSpmmFunction):
    # BUG (needs_input_grad): the two guards are swapped; with both values and b requiring grad
    # the result is right, with only one of them it returns None for the one that needs it.
    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        grad_values = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a_dense = grad_output.matmul(b.t())
            edge_idx = a._indices()[0, :] * ctx.N + a._indices()[1, :]
            grad_values = grad_a_dense.view(-1)[edge_idx]
        if ctx.needs_input_grad[1]:
            grad_b = a.t().matmul(grad_output)
        return None, grad_values, None, grad_b


# ---------------------------------------------------------------------------------------------
# Source: NVIDIA/Megatron-LM, megatron/core/fusions/fused_softmax.py (ScaledMaskedSoftmax:
# forward(ctx, inputs, mask, scale), saves softmax_results and scale_t); the CUDA kernels
# scaled_masked_softmax_cuda.forward/backward are re-typed in torch. mask is bool, True = masked
# out, filled with -10000.0 as the kernel does (so a fully masked row is uniform, not NaN); the
# mask is saved and re-applied in backward, which matters for fully masked rows (see the
# wrong_branch twin).
class ScaledMaskedSoftmax(torch.autograd.Function):
    """
    Fused operation which performs following three operations in sequence
    1. Scale the tensor.
    2. Apply the mask.
    3. Perform softmax.
    """

    @staticmethod
    def forward(ctx, inputs, mask, scale):
        scale_t = torch.tensor([scale])
        x = (inputs * scale_t[0]).masked_fill(mask, -10000.0)
        softmax_results = torch.softmax(x, dim=-1)
        ctx.save_for_backward(softmax_results, mask, scale_t)
        return softmax_results

    @staticmethod
    def backward(ctx, output_grads):
        softmax_results, mask, scale_t = ctx.saved_tensors
        input_grads = softmax_results * (
            output_grads - (output_grads * softmax_results).sum(-1, keepdim=True))
        # masked positions do not depend on the inputs (they were overwritten by -10000)
        input_grads = input_grads.masked_fill(mask, 0) * scale_t[0]
        return input_grads, None, None


class ScaledMaskedSoftmax_bug_wrong_branch(ScaledMaskedSoftmax):
    # BUG (wrong_branch): the backward formula as the kernel-free fallbacks write it,
    # y * (g - sum(g * y)) * scale, without re-applying the mask. In a partly masked row the
    # masked y are ~exp(-10000) = 0, so it is right; in a fully masked row y is uniform and
    # the backward returns a non-zero gradient for inputs the output does not depend on.
    @staticmethod
    def backward(ctx, output_grads):
        softmax_results, mask, scale_t = ctx.saved_tensors
        input_grads = softmax_results * (
            output_grads - (output_grads * softmax_results).sum(-1, keepdim=True))
        input_grads = input_grads * scale_t[0]
        return input_grads, None, None


class ScaledMaskedSoftmax_bug_missing_offdiag(ScaledMaskedSoftmax):
    # BUG (missing_offdiag): the element-wise softmax "derivative" y * (1 - y).
    @staticmethod
    def backward(ctx, output_grads):
        softmax_results, mask, scale_t = ctx.saved_tensors
        input_grads = output_grads * softmax_results * (1 - softmax_results)
        input_grads = input_grads.masked_fill(mask, 0) * scale_t[0]
        return input_grads, None, None


class ScaledMaskedSoftmax_bug_scaled(ScaledMaskedSoftmax):
    # BUG (scaled): the scale applied in forward is forgotten in backward.
    @staticmethod
    def backward(ctx, output_grads):
        softmax_results, mask, scale_t = ctx.saved_tensors
        input_grads = softmax_results * (
            output_grads - (output_grads * softmax_results).sum(-1, keepdim=True))
        input_grads = input_grads.masked_fill(mask, 0)
        return input_grads, None, None
