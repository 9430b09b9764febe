"""Rows of a Jacobian from batched VJPs: chunked equals whole, J v without forming J, projections."""

from __future__ import annotations

import torch

from gradverify.numerics.vjp import VjpSource


def _graph(x: torch.Tensor):  # type: ignore[no-untyped-def]
    leaf = x.clone().requires_grad_(True)
    return leaf, leaf.clone() / leaf.clone().sum(0)


def test_chunked_rows_equal_one_chunk_and_the_exact_jacobian() -> None:
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    leaf, out = _graph(x)
    small = VjpSource([(0, out)], [(0, leaf)], phase="backward", max_bytes=3000)  # a few rows a chunk
    large = VjpSource([(0, out)], [(0, leaf)], phase="backward", max_bytes=2**30)
    assert small.rows_per_chunk(0) < 30 and large.rows_per_chunk(0) == 30
    assert torch.equal(small.block(0, 0), large.block(0, 0))
    exact = torch.autograd.functional.jacobian(lambda a: a / a.sum(0), x)
    assert torch.allclose(large.block(0, 0), exact, atol=1e-12)


def test_jvp_without_forming_the_jacobian() -> None:
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    leaf, out = _graph(x)
    source = VjpSource([(0, out)], [(0, leaf)], phase="reference", max_bytes=2**20)
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    jv = source.jvp({0: v})
    assert jv is not None
    exact = torch.func.jvp(lambda a: a / a.sum(0), (x,), (v,))[1]
    assert torch.allclose(jv[0], exact, atol=1e-12)


def test_rows_are_projected_onto_the_tangent_space() -> None:
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaf = x.clone().requires_grad_(True)
    out = (leaf * torch.arange(9.0, dtype=torch.float64).reshape(3, 3)).sum().reshape(1)
    sym = lambda base, v: (v + v.transpose(-1, -2)) / 2  # noqa: E731
    source = VjpSource([(0, out)], [(0, leaf)], phase="reference", max_bytes=2**20, tangents={0: sym})
    row = source.block(0, 0).reshape(3, 3)
    weights = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    assert torch.allclose(row, (weights + weights.T) / 2)


def test_a_backward_that_mixes_the_batch_falls_back_to_plain_calls() -> None:
    class Mixing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            # Right for one grad_output; under vmap the batch dimension is invisible and this
            # stays right, so mix explicitly through a global to imitate a kernel that does.
            Mixing.calls += 1
            return g * 2

    Mixing.calls = 0
    x = torch.randn(4, dtype=torch.float64).requires_grad_(True)
    out = Mixing.apply(x.clone())
    source = VjpSource([(0, out)], [(0, x)], phase="backward", max_bytes=2**20)
    assert torch.allclose(source.block(0, 0), 2 * torch.eye(4, dtype=torch.float64))
