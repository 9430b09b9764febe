"""Independent plain-torch references for the correct ops (autograd through ordinary torch ops).

REFERENCES maps an entry's ``op`` string to a function taking the same positional arguments and
returning the same output(s). validate.py checks every correct op's forward and backward against
it (for domain-restricted inputs only along the domain: symmetric / zero-sum / tangent parts).
"""
import math

import torch
import torch.nn.functional as F


def lsr_ce(logits, label, lb_smooth, lb_ignore):
    C = logits.size(1)
    ignore = label == lb_ignore
    lab = torch.where(ignore, torch.zeros_like(label), label)
    target = torch.full_like(logits, lb_smooth / C).scatter(1, lab.unsqueeze(1), 1 - lb_smooth)
    target = target * (~ignore).unsqueeze(1).to(logits.dtype)
    return -(torch.log_softmax(logits, 1) * target).sum(1)


def label_smoothing_ce(logits, labels, smoothing=0.0, padding_idx=0, half_to_float=False):
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = (1 - smoothing) * nll + smoothing * (-logp.mean(-1))
    return torch.where(labels == padding_idx, torch.zeros_like(loss), loss)


def focal(logits, label, alpha, gamma):
    p = torch.sigmoid(logits)
    pos = -alpha * (1 - p) ** gamma * F.logsigmoid(logits)
    neg = -(1 - alpha) * p ** gamma * F.logsigmoid(-logits)
    return torch.where(label == 1, pos, neg)


def hinge(a, y, hinge=1.0):
    rows = torch.arange(a.shape[0])
    margins = a - a[rows, y].unsqueeze(1) + hinge
    not_y = torch.ones_like(a, dtype=torch.bool)
    not_y[rows, y] = False
    return (torch.relu(margins) * not_y).sum() / a.shape[0]


def siglip(img, txt, logit_scale, logit_bias):
    logits = img @ txt.t() * logit_scale + logit_bias
    labels = 2 * torch.eye(logits.size(0), dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits)


def scatter_add(src, index, out=None, dim=0, dim_size=None):
    return src.new_zeros((dim_size,) + tuple(src.shape[1:])).index_add(0, index, src)


def embedding_bag(indices, offsets, weight, per_sample_weights):
    bounds = list(offsets) + [indices.numel()]
    bags = []
    for k in range(len(offsets)):
        sl = slice(bounds[k], bounds[k + 1])
        bags.append((weight[indices[sl]] * per_sample_weights[sl].unsqueeze(-1)).sum(0))
    return torch.stack(bags)


def spmm(indices, values, shape, b):
    a = torch.zeros(shape, dtype=values.dtype).index_put((indices[0], indices[1]), values, accumulate=True)
    return a @ b


def masked_softmax(inputs, mask, scale):
    return torch.softmax((inputs * scale).masked_fill(mask, -10000.0), -1)


def _spectral(X, f):
    w, V = torch.linalg.eigh(X)
    return V @ torch.diag_embed(f(w)) @ V.transpose(-1, -2)


def layer_norm_over(x, dims, eps):
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def add_rms(x, residual, weight, eps):
    h = x + residual
    return rms(h, weight, eps), h


def softmax_lse(x, dim):
    return torch.softmax(x, dim), torch.logsumexp(x, dim)


def layer_norm_stats(x, normalized_shape, eps):
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    rstd = 1 / torch.sqrt(var + eps)
    return (x - mean) * rstd, mean, rstd


def sqdist(x, y):
    return ((x.unsqueeze(1) - y.unsqueeze(0)) ** 2).sum(-1)


def attention(q, k, v, sm_scale, causal=False):
    s = q @ k.t() * sm_scale
    if causal:
        L, S = s.shape
        s = s.masked_fill(torch.arange(S)[None, :] > torch.arange(L)[:, None], -math.inf)
    return torch.softmax(s, -1) @ v


def tanh_bias_gelu(input, bias):
    x = input + bias
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def fused_lrelu(input, bias):
    x = input + bias.view(1, -1, *([1] * (input.ndim - 2)))
    return F.leaky_relu(x, 0.2) * 2 ** 0.5


def soft_dice(logits, one_hot, p, smooth):
    probs = torch.softmax(logits, -1)
    numer = 2 * (probs * one_hot).sum(1) + smooth
    denor = (probs.pow(p) + one_hot).sum(1) + smooth
    return 1 - numer / denor


def linear(input, weight, bias=None):
    out = input @ weight.t()
    return out if bias is None else out + bias


REFERENCES = {
    # losses
    "LSRCrossEntropyFunction": lsr_ce,
    "LabelSmoothingCE": label_smoothing_ce,
    "FocalSigmoidLossFunc": focal,
    "MulticlassHinge": hinge,
    "SigmoidContrastiveLoss": siglip,
    # sparse
    "Gather": lambda input, dim, index: torch.gather(input, dim, index),
    "ScatterAddFunction": scatter_add,
    "Embedding": lambda indices, weight: weight[indices],
    "EmbeddingBagFunction": embedding_bag,
    "SpecialSpmmFunction": spmm,
    "ScaledMaskedSoftmax": masked_softmax,
    # matrix (torch.linalg autograd: itself valid for symmetric perturbations)
    "MatrixSquareRoot": lambda A: _spectral(A, torch.sqrt),
    "InvSqrtm": lambda A, eps=1e-5: _spectral(A, lambda w: (w + eps).rsqrt()),
    "LogEig": lambda X: _spectral(X, torch.log),
    "LogEigUnsym": lambda X: _spectral(X, torch.log),
    "CholeskyLogDet": lambda A: 2 * torch.linalg.cholesky(A).diagonal(dim1=-2, dim2=-1).log().sum(-1),
    "CholeskyLogDetTril": lambda A: 2 * torch.linalg.cholesky(A).diagonal(dim1=-2, dim2=-1).log().sum(-1),
    "CholeskyFactor": torch.linalg.cholesky,
    # custom ops
    "rms_norm": rms,
    "torch.ops.corpus.rms_norm.default": rms,
    "add_rms_norm": add_rms,
    "torch.ops.corpus.softmax_lse.default": softmax_lse,
    "layer_norm_stats": layer_norm_stats,
    "swiglu": lambda a, b: F.silu(a) * b,
    "pairwise_sqdist": sqdist,
    # triton style
    "FusedSoftmax": lambda x: torch.softmax(x, -1),
    "TritonLayerNorm": lambda x, normalized_shape, weight, bias, eps: F.layer_norm(x, tuple(normalized_shape), weight, bias, eps),
    "FlashAttention": attention,
    "LigerSwiGLU": lambda a, b: F.silu(a) * b,
    # wrappers
    "my_cube": lambda x: x ** 3,
    "MyCube": lambda x: (x ** 3, 3 * x ** 2),
    "my_tanh": torch.tanh,
    "fused_lrelu": fused_lrelu,
    # engine
    "FusedBiasGeLU": tanh_bias_gelu,
    "FusedBiasGeLUStrict": tanh_bias_gelu,
    "SwishFp32Grad": lambda i: i * torch.sigmoid(i),
    # linear
    "LinearFunction": linear,
    "LinearFunctionUnreducedBias": linear,
    # structured
    "SortValues": lambda x, dim=-1, descending=False: tuple(torch.sort(x, dim=dim, descending=descending)),
    "MaxWithIndex": lambda x, dim: tuple(x.max(dim)),
    "SimplexEntropy": lambda p: -(p * torch.log(p)).sum(-1),
    "SphericalDistance": lambda x, y: torch.acos((x * y).sum(-1)),
    "SoftDiceLossFunc": soft_dice,
    # classics
    "Softmax": lambda x, dim: torch.softmax(x, dim),
    "LogSoftmax": lambda x, dim=-1: torch.log_softmax(x, dim),
    "LayerNormV2Func": lambda x, eps: layer_norm_over(x, (1,), eps),
    "ColumnNormalize": lambda x: x / x.sum(0, keepdim=True),
    "GELUFunction": lambda x: F.gelu(x),
    "SwishImplementation": lambda i: F.silu(i),
    "MishFunction": lambda feat: feat * torch.tanh(F.softplus(feat)),
    "Atan2Function": torch.atan2,
}
