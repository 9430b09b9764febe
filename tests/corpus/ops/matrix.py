"""Category 3: matrix functions of SPD inputs (square root, inverse square root, matrix log,
Cholesky factor, log-determinant).

Every forward here reads its input through torch.linalg.eigh / torch.linalg.cholesky, which look
at one triangle only; as a function of all n*n entries the op is therefore *not* the textbook
matrix function off the symmetric subspace. The backwards below return a symmetric gradient
(or, for the *Tril / *Unsym variants, another gradient that agrees with it on symmetric
directions): they are right for symmetric perturbations H = H^T only. A finite-difference check
that perturbs one entry at a time (torch.autograd.gradcheck) leaves that subspace and falsely
fails the correct ops; the manifest notes which.
"""
import torch


def sym(X):
    return 0.5 * (X + X.transpose(-1, -2))


def loewner(w, f_w, df_w, tol=1e-10):
    """Daleckii-Krein / Loewner matrix: (f(w_i) - f(w_j)) / (w_i - w_j), f'(w_i) on the diagonal
    (and where two eigenvalues coincide)."""
    dw = w.unsqueeze(-1) - w.unsqueeze(-2)
    df = f_w.unsqueeze(-1) - f_w.unsqueeze(-2)
    close = dw.abs() < tol
    mean_deriv = 0.5 * (df_w.unsqueeze(-1) + df_w.unsqueeze(-2))
    return torch.where(close, mean_deriv, df / torch.where(close, torch.ones_like(dw), dw))


# ---------------------------------------------------------------------------------------------
# Source: steveli/pytorch-sqrtm, sqrtm.py (MatrixSquareRoot: saves sqrtm, backward solves the
# Sylvester equation sqrtm X + X sqrtm = grad_output with scipy.linalg.solve_sylvester).
# numpy/scipy are not available here: the forward is rewritten with torch.linalg.eigh and the
# Sylvester solve in the eigenbasis of sqrtm (X~ = V^T G V / (s_i + s_j)).
# Valid for symmetric perturbations only (eigh forward); steveli's scipy forward was a true
# sqrtm, which is why their gradcheck in main() passed.
class MatrixSquareRoot(torch.autograd.Function):
    """Square root of a positive definite matrix.

    NOTE: matrix square root is not differentiable for matrices with
          zero eigenvalues.
    """
    @staticmethod
    def forward(ctx, input):
        w, v = torch.linalg.eigh(input)
        sqrtm = v @ torch.diag_embed(w.sqrt()) @ v.transpose(-1, -2)
        ctx.save_for_backward(sqrtm)
        return sqrtm

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            sqrtm, = ctx.saved_tensors
            # Given a positive semi-definite matrix X,
            # since X = X^{1/2}X^{1/2}, we can compute the gradient of the
            # matrix square root dX^{1/2} by solving the Sylvester equation:
            # dX = (d(X^{1/2})X^{1/2} + X^{1/2}(dX^{1/2}).
            s, v = torch.linalg.eigh(sqrtm)
            gt = v.transpose(-1, -2) @ grad_output @ v
            grad_sqrtm = v @ (gt / (s.unsqueeze(-1) + s.unsqueeze(-2))) @ v.transpose(-1, -2)
            grad_input = grad_sqrtm
        return grad_input


class MatrixSquareRoot_bug_nonsymmetric(MatrixSquareRoot):
    # BUG (nonsymmetric): the scalar rule d sqrt(a) = da / (2 sqrt(a)) applied to matrices,
    # 0.5 * sqrtm^{-1} G: right only when G commutes with sqrtm, wrong for symmetric
    # perturbations too.
    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            sqrtm, = ctx.saved_tensors
            grad_input = 0.5 * torch.linalg.solve(sqrtm, grad_output)
        return grad_input


class MatrixSquareRoot_bug_scaled(MatrixSquareRoot):
    # BUG (scaled): an extra 1/2 (the scalar rule's 1/(2 sqrt a)) on top of the Sylvester solve,
    # which already contains it.
    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            sqrtm, = ctx.saved_tensors
            s, v = torch.linalg.eigh(sqrtm)
            gt = v.transpose(-1, -2) @ grad_output @ v
            grad_sqrtm = v @ (gt / (2 * (s.unsqueeze(-1) + s.unsqueeze(-2)))) @ v.transpose(-1, -2)
            grad_input = grad_sqrtm
        return grad_input


# ---------------------------------------------------------------------------------------------
# Source: samuelbx/torchspd (invsqrtm: "explicit formulas", Daleckii-Krein derivative for
# symmetric perturbations) and the ZCA / decorrelated-batch-norm whitening layers that compute
# (A + eps I)^{-1/2} by eigh. forward(ctx, A, eps); backward V (L o V^T sym(G) V) V^T with the
# Loewner matrix L of f(w) = (w + eps)^{-1/2}. Valid for symmetric perturbations only.
class InvSqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, eps=1e-5):
        w, V = torch.linalg.eigh(A)
        f = (w + eps).rsqrt()
        ctx.save_for_backward(w, V)
        ctx.eps = eps
        return V @ torch.diag_embed(f) @ V.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad_output):
        w, V = ctx.saved_tensors
        f = (w + ctx.eps).rsqrt()
        df = -0.5 * (w + ctx.eps).pow(-1.5)
        L = loewner(w, f, df)
        Vt = V.transpose(-1, -2)
        grad_A = V @ (L * (Vt @ sym(grad_output) @ V)) @ Vt
        return grad_A, None


class InvSqrtm_bug_missing_offdiag(InvSqrtm):
    # BUG (missing_offdiag): only the eigenvalue path (the diagonal of the Loewner matrix); the
    # eigenvector derivative, the off-diagonal divided differences, is dropped.
    @staticmethod
    def backward(ctx, grad_output):
        w, V = ctx.saved_tensors
        df = -0.5 * (w + ctx.eps).pow(-1.5)
        Vt = V.transpose(-1, -2)
        grad_A = V @ torch.diag_embed(df * torch.diagonal(Vt @ sym(grad_output) @ V, dim1=-2, dim2=-1)) @ Vt
        return grad_A, None


class InvSqrtm_bug_dropped_eps(InvSqrtm):
    # BUG (dropped_eps): f'(w) = -1/2 w^{-3/2} without the eps that forward adds; the off-diagonal
    # divided differences still use forward's values. A relative error ~1.5 eps / w on the
    # diagonal of L only.
    @staticmethod
    def backward(ctx, grad_output):
        w, V = ctx.saved_tensors
        f = (w + ctx.eps).rsqrt()
        df = -0.5 * w.pow(-1.5)
        L = loewner(w, f, df)
        Vt = V.transpose(-1, -2)
        grad_A = V @ (L * (Vt @ sym(grad_output) @ V)) @ Vt
        return grad_A, None


# ---------------------------------------------------------------------------------------------
# Source: plazadeloslagartos/eigentorch, eigenfunctions.py (LogEig = EigDecomp + EigenLog, the
# LogEig layer of Huang & Van Gool's SPDNet with Ionescu et al.'s matrix backprop), written as
# one Function with the equivalent closed form V (L o V^T sym(G) V) V^T, L the Loewner matrix
# of log. Valid for symmetric perturbations only.
class LogEig(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X):
        S, U = torch.linalg.eigh(X)
        S_log = torch.log(S)
        ctx.save_for_backward(S, U)
        return U @ torch.diag_embed(S_log) @ U.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad_output):
        S, U = ctx.saved_tensors
        L = loewner(S, torch.log(S), 1.0 / S)
        Ut = U.transpose(-1, -2)
        return U @ (L * (Ut @ sym(grad_output) @ U)) @ Ut


class LogEig_bug_nonsymmetric(LogEig):
    # BUG (nonsymmetric): the scalar rule d log(a) = da / a as G X^{-1}: right only when G commutes
    # with X, wrong for symmetric perturbations too.
    @staticmethod
    def backward(ctx, grad_output):
        S, U = ctx.saved_tensors
        X_inv = U @ torch.diag_embed(1.0 / S) @ U.transpose(-1, -2)
        return grad_output @ X_inv


# Same op, a backward that does not symmetrise grad_output. Its gradient is not symmetric, but
# it differs from LogEig's only by an antisymmetric part, which is invisible along symmetric
# directions: just as correct on SPD inputs (not a bug; listed as a correct op).
class LogEigUnsym(LogEig):
    @staticmethod
    def backward(ctx, grad_output):
        S, U = ctx.saved_tensors
        L = loewner(S, torch.log(S), 1.0 / S)
        Ut = U.transpose(-1, -2)
        return U @ (L * (Ut @ grad_output @ U)) @ Ut


# ---------------------------------------------------------------------------------------------
# Source: cornellius-gp/gpytorch, gpytorch/math/functions/log_det.py (the 2017 LogDet Function:
# logdet from the Cholesky factor, 2 * sum(log(diag(L))), gradient A^{-1} from potrs), re-typed
# with torch.linalg.cholesky / cholesky_inverse in the static-method style. The gradient A^{-1}
# is symmetric: right for symmetric perturbations only (cholesky reads the lower triangle).
class CholeskyLogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A):
        chol_matrix = torch.linalg.cholesky(A)
        ctx.save_for_backward(chol_matrix)
        return 2 * chol_matrix.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, grad_output):
        chol_matrix, = ctx.saved_tensors
        grad = torch.cholesky_inverse(chol_matrix)
        return grad * grad_output[..., None, None]


class CholeskyLogDet_bug_ignores_grad_output(CholeskyLogDet):
    # BUG (ignores_grad_output): as in a public numpy LogDet Function ("The gradient of log(L) is
    # defined as (L^-1)^T", returning pinv(L).T): the incoming gradient is never multiplied in.
    @staticmethod
    def backward(ctx, grad_output):
        chol_matrix, = ctx.saved_tensors
        return torch.cholesky_inverse(chol_matrix)


# The same log-det with the *triangular* adjoint that torch's potrf backward returned before
# pytorch/pytorch#19116 ("Modify Cholesky derivative ... from a triangular matrix to symmetric"):
# 2 A^{-1} below the diagonal, A^{-1} on it, 0 above. It is the exact derivative of the op as
# implemented (cholesky reads the lower triangle), so plain gradcheck passes on it, and it agrees
# with CholeskyLogDet on every symmetric direction. Correct, listed as a correct op.
class CholeskyLogDetTril(CholeskyLogDet):
    @staticmethod
    def backward(ctx, grad_output):
        chol_matrix, = ctx.saved_tensors
        A_inv = torch.cholesky_inverse(chol_matrix)
        grad = 2 * A_inv.tril(-1) + torch.diag_embed(A_inv.diagonal(dim1=-2, dim2=-1))
        return grad * grad_output[..., None, None]


# ---------------------------------------------------------------------------------------------
# Source: pytorch/pytorch, torch/csrc/autograd/FunctionsManual.cpp (cholesky_backward, after
# Murray 2016, "Differentiation of the Cholesky decomposition"), re-typed in Python:
# gA = L^{-H} Phi(L^H gL) L^{-1}, symmetrised, Phi = lower triangle with a halved diagonal.
# Valid for symmetric perturbations only.
class CholeskyFactor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A):
        L = torch.linalg.cholesky(A)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, gL):
        L, = ctx.saved_tensors
        gA = (L.mT @ gL).tril()
        # Equivalent to 0.5 * (gA + gA^H - diag(gA))
        gA = 0.5 * (gA + gA.tril(-1).mT)
        gA = torch.linalg.solve_triangular(L.mT, gA, upper=True, left=True)
        gA = torch.linalg.solve_triangular(L, gA, upper=False, left=False)
        return gA


class CholeskyFactor_bug_partial(CholeskyFactor):
    # BUG (partial): Phi without halving the diagonal (gA + gA^T - diag(gA) written as
    # gA + tril(gA, -1)^T, dropping the 0.5): the diagonal of the inner matrix is off by 2x.
    @staticmethod
    def backward(ctx, gL):
        L, = ctx.saved_tensors
        gA = (L.mT @ gL).tril()
        gA = 0.5 * (gA + gA.tril(-1).mT) + 0.5 * torch.diag_embed(gA.diagonal(dim1=-2, dim2=-1))
        gA = torch.linalg.solve_triangular(L.mT, gA, upper=True, left=True)
        gA = torch.linalg.solve_triangular(L, gA, upper=False, left=False)
        return gA
