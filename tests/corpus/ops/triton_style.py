"""Category 5: Triton-style kernels written in plain torch (no triton import).

The kernels are emulated the way they are written in Triton: one "program" per row (or per
block of rows), explicit loops over column tiles of BLOCK_SIZE with a tail mask, loads and
stores through flat "pointers" (the tensor's storage plus an offset computed from a stride),
fused forward and a hand-written backward.
"""
import math

import torch


def _ptr(t):
    """The storage of `t` seen from its first element, as a flat 1-D tensor: what a Triton
    kernel gets when it is handed `t` and then does pointer arithmetic with strides."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return torch.as_strided(t, (n,), (1,), t.storage_offset())


def _load(ptr, offs, mask, other=0.0):
    out = torch.full(offs.shape, other, dtype=ptr.dtype)
    out[mask] = ptr[offs[mask]]
    return out


def _store(ptr, offs, vals, mask):
    ptr[offs[mask]] = vals[mask]


# ---------------------------------------------------------------------------------------------
# Source: openai/triton, python/tutorials/02-fused-softmax.py (softmax_kernel: one program per
# row, row pointer = input_ptr + row_idx * input_row_stride), with a hand-written backward in
# the style of linkedin/Liger-Kernel src/liger_kernel/ops/softmax.py (whose @ensure_contiguous
# makes grad_output contiguous before the kernel reads it with the forward's row stride).
BLOCK_SIZE_SOFTMAX = 4


def _softmax_fwd(x):
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    x_ptr, y_ptr = _ptr(x), _ptr(y)
    for row in range(n_rows):
        row_start = row * x.stride(0)
        m = torch.tensor(-math.inf, dtype=x.dtype)
        d = torch.tensor(0.0, dtype=x.dtype)
        for off in range(0, n_cols, BLOCK_SIZE_SOFTMAX):
            cols = off + torch.arange(BLOCK_SIZE_SOFTMAX)
            mask = cols < n_cols
            xb = _load(x_ptr, row_start + cols, mask, other=-math.inf)
            m_new = torch.maximum(m, xb.max())
            d = d * torch.exp(m - m_new) + torch.exp(xb - m_new).sum()
            m = m_new
        for off in range(0, n_cols, BLOCK_SIZE_SOFTMAX):
            cols = off + torch.arange(BLOCK_SIZE_SOFTMAX)
            mask = cols < n_cols
            xb = _load(x_ptr, row_start + cols, mask, other=-math.inf)
            _store(y_ptr, row * y.stride(0) + cols, torch.exp(xb - m) / d, mask)
    return y


def _softmax_bwd(dy, y):
    n_rows, n_cols = y.shape
    dx = torch.empty_like(y)
    dy_ptr, y_ptr, dx_ptr = _ptr(dy), _ptr(y), _ptr(dx)
    for row in range(n_rows):
        row_start = row * y.stride(0)  # the kernel is given y's row stride for all three
        dot = torch.tensor(0.0, dtype=y.dtype)
        for off in range(0, n_cols, BLOCK_SIZE_SOFTMAX):
            cols = off + torch.arange(BLOCK_SIZE_SOFTMAX)
            mask = cols < n_cols
            dot = dot + (_load(dy_ptr, row_start + cols, mask) * _load(y_ptr, row_start + cols, mask)).sum()
        for off in range(0, n_cols, BLOCK_SIZE_SOFTMAX):
            cols = off + torch.arange(BLOCK_SIZE_SOFTMAX)
            mask = cols < n_cols
            yb = _load(y_ptr, row_start + cols, mask)
            dyb = _load(dy_ptr, row_start + cols, mask)
            _store(dx_ptr, row_start + cols, yb * (dyb - dot), mask)
    return dx


class FusedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = _softmax_fwd(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        dy = dy.contiguous()
        return _softmax_bwd(dy, y)


class FusedSoftmax_bug_layout(FusedSoftmax):
    # BUG (layout): no dy.contiguous(); the kernel reads dy through its storage with y's row
    # stride. Right for a contiguous grad_output, silently wrong for a transposed one, and an
    # out-of-bounds read (error) for an expanded one such as the gradient of y.sum().
    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        return _softmax_bwd(dy, y)


# ---------------------------------------------------------------------------------------------
# Source: openai/triton, python/tutorials/05-layer-norm.py (_layer_norm_fwd_fused,
# _layer_norm_bwd_dx_fused with GROUP_SIZE_M partial dw/db buffers, _layer_norm_bwd_dwdb).
# The tutorial loads every tile with .to(tl.float32); here the kernels compute in the input
# dtype (the float32 version is the precision twin). forward(ctx, x, normalized_shape, weight,
# bias, eps) with normalized_shape a tuple/list as in the tutorial's LayerNorm.apply.
BLOCK_SIZE_LN = 4
GROUP_SIZE_M = 2


def _ln_fwd(x, weight, bias, eps):
    M, N = x.shape
    y = torch.empty_like(x)
    mean_buf = torch.empty(M, dtype=x.dtype)
    rstd_buf = torch.empty(M, dtype=x.dtype)
    X, Y, W, B = _ptr(x), _ptr(y), _ptr(weight), _ptr(bias)
    for row in range(M):
        start = row * x.stride(0)
        _mean = torch.zeros(BLOCK_SIZE_LN, dtype=x.dtype)
        for off in range(0, N, BLOCK_SIZE_LN):
            cols = off + torch.arange(BLOCK_SIZE_LN)
            _mean += _load(X, start + cols, cols < N)
        mean = _mean.sum() / N
        _var = torch.zeros(BLOCK_SIZE_LN, dtype=x.dtype)
        for off in range(0, N, BLOCK_SIZE_LN):
            cols = off + torch.arange(BLOCK_SIZE_LN)
            xb = torch.where(cols < N, _load(X, start + cols, cols < N) - mean, 0.0)
            _var += xb * xb
        var = _var.sum() / N
        rstd = 1 / torch.sqrt(var + eps)
        mean_buf[row] = mean
        rstd_buf[row] = rstd
        for off in range(0, N, BLOCK_SIZE_LN):
            cols = off + torch.arange(BLOCK_SIZE_LN)
            mask = cols < N
            w = _load(W, cols, mask)
            b = _load(B, cols, mask)
            xb = _load(X, start + cols, mask)
            _store(Y, start + cols, (xb - mean) * rstd * w + b, mask)
    return y, mean_buf, rstd_buf


def _ln_bwd(dy, x, weight, mean_buf, rstd_buf, store_stop=None, compute_dtype=None):
    """dx via _layer_norm_bwd_dx_fused (two passes over the column tiles of each row), dw/db via
    GROUP_SIZE_M partial buffers reduced by _layer_norm_bwd_dwdb."""
    M, N = x.shape
    cdt = compute_dtype or x.dtype
    dx = torch.zeros_like(x)
    DX, DY, X, W = _ptr(dx), _ptr(dy), _ptr(x), _ptr(weight)
    partial_dw = torch.zeros(GROUP_SIZE_M, N, dtype=cdt)
    partial_db = torch.zeros(GROUP_SIZE_M, N, dtype=cdt)
    stop = N if store_stop is None else store_stop(N)
    for row in range(M):
        start = row * x.stride(0)
        lock_id = row % GROUP_SIZE_M
        mean = mean_buf[row].to(cdt)
        rstd = rstd_buf[row].to(cdt)
        c1 = torch.zeros((), dtype=cdt)
        c2 = torch.zeros((), dtype=cdt)
        for off in range(0, N, BLOCK_SIZE_LN):
            cols = off + torch.arange(BLOCK_SIZE_LN)
            mask = cols < N
            xb = _load(X, start + cols, mask).to(cdt)
            dyb = _load(DY, start + cols, mask).to(cdt)
            w = _load(W, cols, mask).to(cdt)
            xhat = torch.where(mask, (xb - mean) * rstd, 0.0)
            wdy = w * dyb
            c1 = c1 + (xhat * wdy).sum()
            c2 = c2 + wdy.sum()
        c1 = c1 / N
        c2 = c2 / N
        for off in range(0, stop, BLOCK_SIZE_LN):
            cols = off + torch.arange(BLOCK_SIZE_LN)
            mask = cols < N
            xb = _load(X, start + cols, mask).to(cdt)
            dyb = _load(DY, start + cols, mask).to(cdt)
            w = _load(W, cols, mask).to(cdt)
            xhat = torch.where(mask, (xb - mean) * rstd, 0.0)
            wdy = w * dyb
            dxb = (wdy - (xhat * c1 + c2)) * rstd
            _store(DX, start + cols, dxb.to(x.dtype), mask)
            # accumulate partial sums for dw/db into the row's lock group
            partial_dw[lock_id, cols[mask]] += (dyb * xhat)[mask]
            partial_db[lock_id, cols[mask]] += dyb[mask]
    dw = partial_dw.sum(0).to(x.dtype)
    db = partial_db.sum(0).to(x.dtype)
    return dx, dw, db


class TritonLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        # reshape input data into 2D tensor
        x_arg = x.reshape(-1, x.shape[-1]).contiguous()
        y, mean, rstd = _ln_fwd(x_arg, weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(x_arg, weight, bias, mean, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, w, b, m, v = ctx.saved_tensors
        dy = dy.reshape(-1, x.shape[-1]).contiguous()
        dx, dw, db = _ln_bwd(dy, x, w, m, v)
        return dx.view(ctx.x_shape), None, dw, db, None


class TritonLayerNorm_bug_partial(TritonLayerNorm):
    # BUG (partial): the store loop of the dx kernel runs `range(0, N - BLOCK + 1, BLOCK)`, so
    # when N is not a multiple of BLOCK_SIZE the tail tile of every row is never written
    # (dx stays 0 there) and its dw/db partial sums are never accumulated; the row reductions
    # c1, c2 run over every tile, so all other columns are right.
    @staticmethod
    def backward(ctx, dy):
        x, w, b, m, v = ctx.saved_tensors
        dy = dy.reshape(-1, x.shape[-1]).contiguous()
        dx, dw, db = _ln_bwd(dy, x, w, m, v, store_stop=lambda N: N - BLOCK_SIZE_LN + 1)
        return dx.view(ctx.x_shape), None, dw, db, None


class TritonLayerNorm_bug_precision(TritonLayerNorm):
    # BUG (precision): the backward kernel loads every tile with .to(float32), as the Triton
    # tutorial does for fp16 inputs; for float64 inputs dx, dw and db carry float32 rounding.
    @staticmethod
    def backward(ctx, dy):
        x, w, b, m, v = ctx.saved_tensors
        dy = dy.reshape(-1, x.shape[-1]).contiguous()
        dx, dw, db = _ln_bwd(dy, x, w, m, v, compute_dtype=torch.float32)
        return dx.view(ctx.x_shape), None, dw, db, None


# ---------------------------------------------------------------------------------------------
# Source: openai/triton, python/tutorials/06-fused-attention.py and Dao-AILab/flash-attention
# (FlashAttention-2): forward with an online softmax over BLOCK_N key tiles (running max m_i,
# running sum l_i, rescaled accumulator), saving the row log-sum-exp; backward recomputes
# P = exp(S - lse) per tile, with the preprocessing D = rowsum(dO * O).
BLOCK_M = 2
BLOCK_N = 2


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sm_scale, causal=False):
        L, d = q.shape
        S = k.shape[0]
        o = torch.empty(L, v.shape[1], dtype=q.dtype)
        lse = torch.empty(L, dtype=q.dtype)
        for start_m in range(0, L, BLOCK_M):
            rows = torch.arange(start_m, min(start_m + BLOCK_M, L))
            qb = q[rows]
            m_i = torch.full((rows.numel(),), -math.inf, dtype=q.dtype)
            l_i = torch.zeros(rows.numel(), dtype=q.dtype)
            acc = torch.zeros(rows.numel(), v.shape[1], dtype=q.dtype)
            for start_n in range(0, S, BLOCK_N):
                cols = torch.arange(start_n, min(start_n + BLOCK_N, S))
                qk = qb @ k[cols].t() * sm_scale
                if causal:
                    qk = qk.masked_fill(cols[None, :] > rows[:, None], -math.inf)
                m_ij = torch.maximum(m_i, qk.max(1).values)
                p = torch.exp(qk - m_ij[:, None])
                alpha = torch.exp(m_i - m_ij)
                l_i = l_i * alpha + p.sum(1)
                acc = acc * alpha[:, None] + p @ v[cols]
                m_i = m_ij
            o[rows] = acc / l_i[:, None]
            lse[rows] = m_i + torch.log(l_i)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sm_scale = sm_scale
        ctx.causal = causal
        return o

    @staticmethod
    def _bwd(ctx, do, with_delta=True, scale_grads=True):
        q, k, v, o, lse = ctx.saved_tensors
        sm_scale, causal = ctx.sm_scale, ctx.causal
        L, S = q.shape[0], k.shape[0]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # _attn_bwd_preprocess: delta = rowsum(o * do)
        delta = (o * do).sum(1) if with_delta else torch.zeros(L, dtype=q.dtype)
        for start_n in range(0, S, BLOCK_N):
            cols = torch.arange(start_n, min(start_n + BLOCK_N, S))
            kb, vb = k[cols], v[cols]
            for start_m in range(0, L, BLOCK_M):
                rows = torch.arange(start_m, min(start_m + BLOCK_M, L))
                qk = q[rows] @ kb.t() * sm_scale
                if causal:
                    qk = qk.masked_fill(cols[None, :] > rows[:, None], -math.inf)
                p = torch.exp(qk - lse[rows][:, None])
                dv[cols] += p.t() @ do[rows]
                dp = do[rows] @ vb.t()
                ds = p * (dp - delta[rows][:, None])
                scale = sm_scale if scale_grads else 1.0
                dk[cols] += ds.t() @ q[rows] * scale
                dq[rows] += ds @ kb * scale
        return dq, dk, dv

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = FlashAttention._bwd(ctx, do.contiguous())
        return dq, dk, dv, None, None


class FlashAttention_bug_missing_offdiag(FlashAttention):
    # BUG (missing_offdiag): the _attn_bwd_preprocess step (delta = rowsum(o * do)) is skipped,
    # so ds = p * dp: the softmax is differentiated as if element-wise.
    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = FlashAttention._bwd(ctx, do.contiguous(), with_delta=False)
        return dq, dk, dv, None, None


class FlashAttention_bug_scaled(FlashAttention):
    # BUG (scaled): sm_scale is applied to qk in forward but not to dq / dk in backward
    # (dv is right).
    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = FlashAttention._bwd(ctx, do.contiguous(), scale_grads=False)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------
# Source: linkedin/Liger-Kernel, src/liger_kernel/ops/swiglu.py (LigerSiLUMulFunction,
# _swiglu_forward_kernel / _swiglu_backward_kernel: c = silu(a) * b, one program per row).
# In Liger the backward kernel writes da and db *into the saved a and b buffers* to save
# memory; the correct version here allocates fresh outputs (the in-place one is a twin).
def _swiglu_fwd_rows(a, b):
    n_cols = a.shape[-1]
    a2, b2 = a.reshape(-1, n_cols), b.reshape(-1, n_cols)
    c = torch.empty_like(a2)
    A, B, C = _ptr(a2), _ptr(b2), _ptr(c)
    for row in range(a2.shape[0]):
        cols = torch.arange(n_cols)
        off = row * a2.stride(0) + cols
        ar, br = A[off], B[off]
        C[row * c.stride(0) + cols] = ar * torch.sigmoid(ar) * br
    return c.view(a.shape)


def _swiglu_bwd_rows(dc, a, b, da_out, db_out):
    n_cols = a.shape[-1]
    DC, A, B, DA, DB = _ptr(dc), _ptr(a), _ptr(b), _ptr(da_out), _ptr(db_out)
    for row in range(dc.numel() // n_cols):
        off = row * n_cols + torch.arange(n_cols)
        dcr, ar, br = DC[off], A[off], B[off]
        sig_a = torch.sigmoid(ar)
        silu_a = ar * sig_a
        db_row = dcr * silu_a
        da_row = dcr * (silu_a * (1 - sig_a) + sig_a) * br
        DA[off] = da_row
        DB[off] = db_row


class LigerSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        c = _swiglu_fwd_rows(a, b)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        _swiglu_bwd_rows(dc, a, b, da, db)
        return da, db


class LigerSwiGLU_bug_swapped_inputs(LigerSwiGLU):
    # BUG (swapped_inputs): the two gradients are returned in the wrong order (same shapes, so
    # the engine accepts them).
    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        _swiglu_bwd_rows(dc, a, b, da, db)
        return db, da


class LigerSwiGLU_bug_inplace_backward(LigerSwiGLU):
    # BUG (inplace_backward): Liger's memory trick: da and db are written into the saved a and b
    # (which are the caller's own input tensors when those were contiguous), and the same
    # buffers are returned. One backward is right; the inputs are overwritten, and a second
    # backward (retain_graph=True) reads gradients where inputs used to be.
    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        _swiglu_bwd_rows(dc, a.detach(), b.detach(), a.detach(), b.detach())
        return a, b
