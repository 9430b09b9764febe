"""Complex inputs are checked through their real view, in torch's Wirtinger convention."""

from __future__ import annotations

import torch

import gradverify
from gradverify.report import Status

Fn = torch.autograd.Function


class ComplexMul(Fn):
    """y = z * w; torch's convention: grad_z = g * conj(w)."""

    @staticmethod
    def forward(ctx, z, w):
        ctx.save_for_backward(z, w)
        return z * w

    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        return g * w.conj(), g * z.conj()


class SquaredMagnitude(Fn):
    """A real output of a complex input: |z|^2, grad_z = 2 g z."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z * z.conj()).real

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 2 * g * z


class ComplexMulMissingConj(ComplexMul):
    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        return g * w, g * z


def crand(n: int, seed: int, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(n, generator=gen, dtype=torch.float64),
                         torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)


def test_correct_complex_backwards_pass() -> None:
    for function, inputs in ((ComplexMul, (crand(3, 0), crand(3, 1))), (SquaredMagnitude, (crand(4, 2),))):
        report = gradverify.verify(function, *inputs)
        assert report.ok, gradverify.explain(report)
        jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
        assert jac.status is Status.PASSED and jac.total_entries > 0
        assert any("view_as_real" in note for note in report.cases[0].notes)


def test_missing_conj_is_the_imaginary_cross_terms_with_the_wrong_sign() -> None:
    z, w = crand(3, 0), crand(3, 1)
    report = gradverify.verify(ComplexMulMissingConj, z, w)
    assert not report.ok
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    # Per input: 3 outputs x (re, im) against 3 entries x (re, im), the 2 cross terms of each
    # diagonal pair wrong (the imaginary part of w enters with the wrong sign).
    assert jac.mismatch_count == 12 and jac.total_entries == 72
    assert all(m.out_index[0] == m.in_index[0] and m.out_index[1] != m.in_index[1] for m in jac.mismatches)
    assert {d.kind for d in jac.diagnoses} == {"sign"}
    assert all("conj() is missing or extra" in d.message for d in jac.diagnoses)
    gradcheck = next(c for c in report.cases[0].checks if c.name == "gradcheck")
    assert gradcheck.status is Status.FAILED  # torch agrees


def test_complex64_is_compared_with_the_complex128_truth() -> None:
    report = gradverify.verify(ComplexMul, crand(3, 0, torch.complex64), crand(3, 1, torch.complex64))
    assert report.ok, gradverify.explain(report)
    assert report.cases[0].dtype == "complex64"
