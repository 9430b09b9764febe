"""Category 9: ops whose inputs live on a structured set: distinct values (sort, max),
probability vectors on the simplex, unit-norm vectors, one-hot targets.

Some backwards here are right only along the set (tangent directions): the simplex entropy
returns the gradient projected onto zero-sum directions, the spherical distance the gradient
projected onto the sphere's tangent space. Finite differences that perturb one coordinate leave
the set, so gradcheck falsely fails them; the manifest notes which.
"""
import torch


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, tools/autograd/derivatives.yaml (sort: values ->
# value_selecting_reduction_backward(grad, dim, indices, sizes, keepdim)), written as a custom
# Function the way sorting layers (e.g. differentiable top-k / rank pooling) re-implement it:
# returns (values, indices) with the int64 indices marked non-differentiable. Needs distinct
# inputs (ties make sort non-differentiable).
class SortValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim=-1, descending=False):
        values, indices = torch.sort(x, dim=dim, descending=descending)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.dim = dim
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        indices, = ctx.saved_tensors
        grad_x = torch.zeros_like(grad_values).scatter_(ctx.dim, indices, grad_values)
        return grad_x, None, None


class SortValues_bug_transposed(SortValues):
    # BUG (transposed): gather instead of scatter: applies the inverse permutation (P^T instead
    # of P). Right only where the permutation is an involution.
    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        indices, = ctx.saved_tensors
        grad_x = grad_values.gather(ctx.dim, indices)
        return grad_x, None, None


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, tools/autograd/derivatives.yaml (max.dim: values ->
# value_selecting_reduction_backward), as a custom Function returning (values, indices);
# max-pooling style. Needs distinct inputs.
class MaxWithIndex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        values, indices = x.max(dim)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.dim = dim
        ctx.shape = x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        indices, = ctx.saved_tensors
        grad_x = grad_values.new_zeros(ctx.shape)
        grad_x.scatter_(ctx.dim, indices.unsqueeze(ctx.dim), grad_values.unsqueeze(ctx.dim))
        return grad_x, None


class MaxWithIndex_bug_transposed(MaxWithIndex):
    # BUG (transposed): the one-hot mask is multiplied by grad_values without unsqueeze(dim), so
    # grad_values broadcasts along the wrong axis: entry (i, j) gets grad_values[j] instead of
    # grad_values[i]. With a square input nothing fails.
    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        indices, = ctx.saved_tensors
        mask = grad_values.new_zeros(ctx.shape).scatter_(ctx.dim, indices.unsqueeze(ctx.dim), 1.0)
        return mask * grad_values, None


# ---------------------------------------------------------------------------------------------
# Shannon entropy of probability vectors with the *Riemannian* (projected) gradient: the
# Euclidean gradient -(log p + 1) projected onto the tangent space of the simplex
# {sum(p) = 1}, i.e. minus its mean. Source: the simplex projection
# proj(p, Y) = Y - mean(Y) of JuliaManifolds/Manifolds.jl (ProbabilitySimplex `project`) and the
# Function-that-returns-a-Riemannian-gradient pattern of Iarrova/hyptorch
# src/hyptorch/operations/autograd.py (RiemannianGradient). Valid only for zero-sum
# perturbations (along the simplex).
class SimplexEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p):
        logp = torch.log(p)
        ctx.save_for_backward(logp)
        return -(p * logp).sum(-1)

    @staticmethod
    def backward(ctx, grad_output):
        logp, = ctx.saved_tensors
        egrad = -(logp + 1)
        rgrad = egrad - egrad.mean(-1, keepdim=True)
        return rgrad * grad_output.unsqueeze(-1)


class SimplexEntropy_bug_sign(SimplexEntropy):
    # BUG (sign): the gradient of the negative entropy (what a maximum-entropy regulariser
    # minimises) returned for the entropy.
    @staticmethod
    def backward(ctx, grad_output):
        logp, = ctx.saved_tensors
        egrad = logp + 1
        rgrad = egrad - egrad.mean(-1, keepdim=True)
        return rgrad * grad_output.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# Geodesic distance arccos(<x, y>) between unit vectors, with the Riemannian gradient on the
# sphere: the Euclidean gradient -y / sqrt(1 - c^2) projected by (I - x x^T). Source: the sphere
# manifold of NickMcNutt/ManifoldOptim.jl src/manifolds/sphere.jl (dist = acos(X'Y),
# proj(X, H) = H - (X'H) X, egrad2rgrad = proj) and the geodesic gradient of
# functionaldata/tFrechet R/SpheGeoGrad.R. Valid only along tangent directions of unit-norm
# inputs.
class SphericalDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        c = (x * y).sum(-1).clamp(-1.0, 1.0)
        ctx.save_for_backward(x, y, c)
        return torch.acos(c)

    @staticmethod
    def backward(ctx, grad_output):
        x, y, c = ctx.saved_tensors
        coef = (-grad_output / torch.sqrt(1 - c * c)).unsqueeze(-1)
        c = c.unsqueeze(-1)
        grad_x = coef * (y - c * x)   # proj_x(y)
        grad_y = coef * (x - c * y)   # proj_y(x)
        return grad_x, grad_y


class SphericalDistance_bug_swapped_inputs(SphericalDistance):
    # BUG (swapped_inputs): the two gradients returned in the wrong order.
    @staticmethod
    def backward(ctx, grad_output):
        x, y, c = ctx.saved_tensors
        coef = (-grad_output / torch.sqrt(1 - c * c)).unsqueeze(-1)
        c = c.unsqueeze(-1)
        grad_x = coef * (y - c * x)
        grad_y = coef * (x - c * y)
        return grad_y, grad_x


# ---------------------------------------------------------------------------------------------
# Source: CoinCheung/pytorch-loss, soft_dice_loss.py (SoftDiceLossV2Func: "compute backward
# directly", numer = 2 sum(p y) + smooth, denor = sum(p^p + y) + smooth, ctx.vars), extended
# from binary sigmoid to multi-class softmax with one-hot targets (channels last: logits and
# one_hot are (N, S, C)); returns the per-(N, C) dice loss.
class SoftDiceLossFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, one_hot, p, smooth):
        probs = torch.softmax(logits, dim=-1)
        numer = 2 * (probs * one_hot).sum(dim=1) + smooth
        denor = (probs.pow(p) + one_hot).sum(dim=1) + smooth
        loss = 1. - numer / denor

        ctx.vars = probs, one_hot, numer, denor, p
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        probs, one_hot, numer, denor, p = ctx.vars
        numer, denor = numer.unsqueeze(1), denor.unsqueeze(1)
        # d loss / d probs
        grad_probs = -(2 * one_hot * denor - numer * p * probs.pow(p - 1)) / denor.pow(2)
        grad_probs = grad_probs * grad_output.unsqueeze(1)
        # through the softmax over classes
        grads = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        return grads, None, None, None


class SoftDiceLossFunc_bug_missing_offdiag(SoftDiceLossFunc):
    # BUG (missing_offdiag): the softmax is differentiated element-wise (p * (1 - p)), as the
    # binary sigmoid version of the loss does, dropping the coupling between classes.
    @staticmethod
    def backward(ctx, grad_output):
        probs, one_hot, numer, denor, p = ctx.vars
        numer, denor = numer.unsqueeze(1), denor.unsqueeze(1)
        grad_probs = -(2 * one_hot * denor - numer * p * probs.pow(p - 1)) / denor.pow(2)
        grad_probs = grad_probs * grad_output.unsqueeze(1)
        grads = grad_probs * probs * (1 - probs)
        return grads, None, None, None
