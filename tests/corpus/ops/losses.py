"""Category 1: losses with integer labels (label smoothing, ignore_index, focal, margin, contrastive).

Plain op code, re-typed after public repositories (see the source comment above each op).
Correct ops have plain names; twins carry one bug each and are named ``<Op>_bug_<kind>``.
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Source: CoinCheung/pytorch-loss, pytorch_loss/label_smooth.py (LSRCrossEntropyFunctionV2,
# "version 2: user derived grad computation"). Re-typed without the amp decorators and without
# the float32 cast, so the op keeps the caller's dtype. NCHW logits, NHW int64 labels; pixels
# whose label equals lb_ignore get zero loss and zero gradient. Per-pixel losses (no reduction).
class LSRCrossEntropyFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, label, lb_smooth, lb_ignore):
        # prepare label
        num_classes = logits.size(1)
        lb_pos, lb_neg = 1. - lb_smooth, lb_smooth / num_classes
        label = label.clone().detach()
        ignore = label.eq(lb_ignore)
        label[ignore] = 0
        lb_one_hot = torch.empty_like(logits).fill_(
            lb_neg).scatter_(1, label.unsqueeze(1), lb_pos).detach()

        ignore = ignore.nonzero(as_tuple=False)
        _, M = ignore.size()
        a, *b = ignore.chunk(M, dim=1)
        mask = [a, torch.arange(logits.size(1)), *b]
        lb_one_hot[mask] = 0
        coeff = (num_classes - 1) * lb_neg + lb_pos

        ctx.variables = coeff, mask, logits, lb_one_hot

        loss = torch.log_softmax(logits, dim=1).neg_().mul_(lb_one_hot).sum(dim=1)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        coeff, mask, logits, lb_one_hot = ctx.variables

        scores = torch.softmax(logits, dim=1).mul_(coeff)
        grad = scores.sub_(lb_one_hot).mul_(grad_output.unsqueeze(1))
        grad[mask] = 0
        return grad, None, None, None


class LSRCrossEntropyFunction_bug_wrong_branch(LSRCrossEntropyFunction):
    # BUG (wrong_branch): the ignored pixels are not masked in backward; forward gives them zero
    # loss, so their true gradient is 0, but here they get softmax * coeff.
    @staticmethod
    def backward(ctx, grad_output):
        coeff, mask, logits, lb_one_hot = ctx.variables

        scores = torch.softmax(logits, dim=1).mul_(coeff)
        grad = scores.sub_(lb_one_hot).mul_(grad_output.unsqueeze(1))
        return grad, None, None, None


class LSRCrossEntropyFunction_bug_ignores_grad_output(LSRCrossEntropyFunction):
    # BUG (ignores_grad_output): the incoming per-pixel gradient is never applied (right only when
    # the loss is summed with weight 1).
    @staticmethod
    def backward(ctx, grad_output):
        coeff, mask, logits, lb_one_hot = ctx.variables

        scores = torch.softmax(logits, dim=1).mul_(coeff)
        grad = scores.sub_(lb_one_hot)
        grad[mask] = 0
        return grad, None, None, None


# ---------------------------------------------------------------------------------------------
# Source: NVIDIA/apex, apex/contrib/xentropy/softmax_xentropy.py (SoftmaxCrossEntropyLoss with
# forward(ctx, logits, labels, smoothing=0.0, padding_idx=0, half_to_float=False)), also copied
# in Dao-AILab/flash-attention (xentropy_cuda_lib era), MosaicML Composer and InternLM; the CUDA
# kernels xentropy_cuda.forward/backward are re-typed in torch, and grad_loss is masked out of
# place (see the twin below). Per-row losses
# (1 - smoothing) * nll + smoothing * mean_c(-log p_c); rows whose label is padding_idx get 0.
class LabelSmoothingCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, smoothing=0.0, padding_idx=0, half_to_float=False):
        max_log_sum_exp = torch.logsumexp(logits, dim=-1)
        log_probs = logits - max_log_sum_exp.unsqueeze(-1)
        nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        smooth_loss = -log_probs.mean(dim=-1)
        losses = (1.0 - smoothing) * nll + smoothing * smooth_loss
        losses.masked_fill_(labels == padding_idx, 0)

        ctx.save_for_backward(logits, max_log_sum_exp, labels)
        ctx.smoothing = smoothing
        ctx.padding_idx = padding_idx
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        logits, max_log_sum_exp, labels = ctx.saved_tensors
        grad_loss = grad_loss.masked_fill(labels == ctx.padding_idx, 0)
        num_classes = logits.size(-1)
        probs = torch.exp(logits - max_log_sum_exp.unsqueeze(-1))
        target = torch.full_like(logits, ctx.smoothing / num_classes)
        target.scatter_add_(-1, labels.unsqueeze(-1),
                            torch.full_like(labels.unsqueeze(-1), 1.0 - ctx.smoothing, dtype=logits.dtype))
        grad_logits = (probs - target) * grad_loss.unsqueeze(-1)
        return grad_logits, None, None, None, None


class LabelSmoothingCE_bug_inplace_grad_output(LabelSmoothingCE):
    # BUG (inplace_grad_output): the backward as the apex-derived copies write it
    # (`grad_loss.masked_fill_(labels==ctx.padding_idx, 0)`): grad_loss is masked *in place*,
    # so the caller's gradient buffer (shared with any other consumer of the loss) is
    # overwritten. The returned gradient itself is right.
    @staticmethod
    def backward(ctx, grad_loss):
        logits, max_log_sum_exp, labels = ctx.saved_tensors
        if not grad_loss.is_contiguous():
            grad_loss = grad_loss.contiguous()
        grad_loss.masked_fill_(labels == ctx.padding_idx, 0)
        num_classes = logits.size(-1)
        probs = torch.exp(logits - max_log_sum_exp.unsqueeze(-1))
        target = torch.full_like(logits, ctx.smoothing / num_classes)
        target.scatter_add_(-1, labels.unsqueeze(-1),
                            torch.full_like(labels.unsqueeze(-1), 1.0 - ctx.smoothing, dtype=logits.dtype))
        grad_logits = (probs - target) * grad_loss.unsqueeze(-1)
        return grad_logits, None, None, None, None


class LabelSmoothingCE_bug_scaled(LabelSmoothingCE):
    # BUG (scaled): backward normalises by the number of non-padding rows (as for a 'mean'
    # reduction) although forward returns per-row losses: off by the constant 1 / n_valid.
    @staticmethod
    def backward(ctx, grad_loss):
        logits, max_log_sum_exp, labels = ctx.saved_tensors
        grad_loss = grad_loss.masked_fill(labels == ctx.padding_idx, 0)
        n_valid = (labels != ctx.padding_idx).sum()
        num_classes = logits.size(-1)
        probs = torch.exp(logits - max_log_sum_exp.unsqueeze(-1))
        target = torch.full_like(logits, ctx.smoothing / num_classes)
        target.scatter_add_(-1, labels.unsqueeze(-1),
                            torch.full_like(labels.unsqueeze(-1), 1.0 - ctx.smoothing, dtype=logits.dtype))
        grad_logits = (probs - target) * grad_loss.unsqueeze(-1) / n_valid
        return grad_logits, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Source: CoinCheung/pytorch-loss, pytorch_loss/focal_loss.py (FocalSigmoidLossFuncV2). Re-typed;
# the author's `logits = logits.float()` is dropped so the op keeps the caller's dtype. The
# intermediates are stored as ctx attributes, as in the original (first-order only).
class FocalSigmoidLossFunc(torch.autograd.Function):
    '''
    compute backward directly for better numeric stability
    '''
    @staticmethod
    def forward(ctx, logits, label, alpha, gamma):
        coeff = torch.empty_like(logits).fill_(1 - alpha)
        coeff[label == 1] = alpha

        probs = torch.sigmoid(logits)
        log_probs = torch.where(logits >= 0,
                F.softplus(logits, -1, 50),
                logits - F.softplus(logits, 1, 50))
        log_1_probs = torch.where(logits >= 0,
                -logits + F.softplus(logits, -1, 50),
                -F.softplus(logits, 1, 50))
        probs_gamma = probs ** gamma
        probs_1_gamma = (1. - probs) ** gamma

        ctx.coeff = coeff
        ctx.probs = probs
        ctx.log_probs = log_probs
        ctx.log_1_probs = log_1_probs
        ctx.probs_gamma = probs_gamma
        ctx.probs_1_gamma = probs_1_gamma
        ctx.label = label
        ctx.gamma = gamma

        term1 = probs_1_gamma * log_probs
        term2 = probs_gamma * log_1_probs
        loss = torch.where(label == 1, term1, term2).mul_(coeff).neg_()
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        '''
        compute gradient of focal loss
        '''
        coeff = ctx.coeff
        probs = ctx.probs
        log_probs = ctx.log_probs
        log_1_probs = ctx.log_1_probs
        probs_gamma = ctx.probs_gamma
        probs_1_gamma = ctx.probs_1_gamma
        label = ctx.label
        gamma = ctx.gamma

        term1 = (1. - probs - gamma * probs * log_probs).mul_(probs_1_gamma).neg_()
        term2 = (probs - gamma * (1. - probs) * log_1_probs).mul_(probs_gamma)

        grads = torch.where(label == 1, term1, term2).mul_(coeff).mul_(grad_output)
        return grads, None, None, None


class FocalSigmoidLossFunc_bug_wrong_branch(FocalSigmoidLossFunc):
    # BUG (wrong_branch): sign of the gamma term flipped in the label == 0 branch only.
    @staticmethod
    def backward(ctx, grad_output):
        coeff = ctx.coeff
        probs = ctx.probs
        log_probs = ctx.log_probs
        log_1_probs = ctx.log_1_probs
        probs_gamma = ctx.probs_gamma
        probs_1_gamma = ctx.probs_1_gamma
        label = ctx.label
        gamma = ctx.gamma

        term1 = (1. - probs - gamma * probs * log_probs).mul_(probs_1_gamma).neg_()
        term2 = (probs + gamma * (1. - probs) * log_1_probs).mul_(probs_gamma)

        grads = torch.where(label == 1, term1, term2).mul_(coeff).mul_(grad_output)
        return grads, None, None, None


# ---------------------------------------------------------------------------------------------
# Source: rsokl/MyGrad, src/mygrad/nnet/losses/multiclass_hinge.py (MulticlassHinge operation:
# forward(a, y, hinge=1.), backward from a stored 0/1 matrix). Re-typed as a torch Function.
# Mean over the batch of sum_{j != y_i} max(0, a_ij - a_iy + hinge).
class MulticlassHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, y, hinge=1.0):
        scores = a.detach()
        rows = torch.arange(scores.shape[0])
        correct_class_scores = scores[rows, y]

        Lij = scores - correct_class_scores[:, None] + hinge
        Lij[Lij <= 0] = 0
        Lij[rows, y] = 0

        grad = torch.ones_like(Lij)
        grad[Lij <= 0] = 0  # dL/ds for margins that are not active (and i == y)
        grad[rows, y] = -grad.sum(dim=-1)
        grad /= scores.shape[0]
        ctx.save_for_backward(grad)
        return Lij.sum() / scores.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output, None, None


class MulticlassHinge_bug_partial(torch.autograd.Function):
    # BUG (partial): the -count term at the true class column y_i is left out; every other
    # entry of the gradient is right.
    @staticmethod
    def forward(ctx, a, y, hinge=1.0):
        scores = a.detach()
        rows = torch.arange(scores.shape[0])
        correct_class_scores = scores[rows, y]

        Lij = scores - correct_class_scores[:, None] + hinge
        Lij[Lij <= 0] = 0
        Lij[rows, y] = 0

        grad = torch.ones_like(Lij)
        grad[Lij <= 0] = 0
        grad /= scores.shape[0]
        ctx.save_for_backward(grad)
        return Lij.sum() / scores.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output, None, None


# ---------------------------------------------------------------------------------------------
# Source: the pairwise sigmoid loss of google-research/big_vision,
# big_vision/trainers/proj/image_text/siglip.py (labels 2*eye - 1, logit_scale t, logit_bias b),
# with a hand-derived backward in the style of the CoinCheung "user derived grad" losses.
# Unreduced: returns the (N, N) matrix of per-pair losses -log sigmoid(z_ij * logit_ij).
# Embeddings are L2-normalised upstream (unit_norm inputs); the backward is valid everywhere.
class SigmoidContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias):
        logits = img @ txt.t() * logit_scale + logit_bias
        labels = 2 * torch.eye(logits.size(0), dtype=logits.dtype) - 1
        ctx.save_for_backward(img, txt, logits, labels)
        ctx.logit_scale = logit_scale
        return -F.logsigmoid(labels * logits)

    @staticmethod
    def backward(ctx, grad_output):
        img, txt, logits, labels = ctx.saved_tensors
        # d/dlogit of -log sigmoid(z * logit) = -z * (1 - sigmoid(z * logit))
        grad_logits = -labels * (1 - torch.sigmoid(labels * logits)) * grad_output
        grad_img = grad_logits @ txt * ctx.logit_scale
        grad_txt = grad_logits.t() @ img * ctx.logit_scale
        return grad_img, grad_txt, None, None


class SigmoidContrastiveLoss_bug_precision(SigmoidContrastiveLoss):
    # BUG (precision): the sigmoid is taken in float32 "for stability" and cast back; for the
    # negative pairs (z * logit ~ +10..+20) 1 - sigmoid(.) cancels catastrophically in float32.
    @staticmethod
    def backward(ctx, grad_output):
        img, txt, logits, labels = ctx.saved_tensors
        probs = torch.sigmoid((labels * logits).float())
        grad_logits = -labels * (1 - probs).to(logits.dtype) * grad_output
        grad_img = grad_logits @ txt * ctx.logit_scale
        grad_txt = grad_logits.t() @ img * ctx.logit_scale
        return grad_img, grad_txt, None, None
