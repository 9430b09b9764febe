"""Batched and chunked Jacobians must equal their plain, one-at-a-time counterparts."""

from __future__ import annotations

import torch

from gradverify.jacobian import (FiniteDifferences, VjpSource, make_batched_evaluator, make_evaluator,
                                 numerical_columns, numerical_jacobian, run_forward)


class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, s = ctx.saved_tensors
        return g / s - (g * x).sum(0) / s**2


class InplaceBody(torch.autograd.Function):
    """Forward writes into its input: batched differences must work on copies."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        x.mul_(2.0)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        raise NotImplementedError


class ItemInBody(torch.autograd.Function):
    """.item() cannot run under vmap: the numerical Jacobian must fall back to the loop."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x * float(x.sum().item())

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        raise NotImplementedError


def _x(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5


def test_batched_numerical_equals_looped() -> None:
    x = _x(4, 3)
    evaluate = make_evaluator(ColumnNormalize, [0])
    looped = numerical_jacobian(evaluate, [x], [0], [0])
    batched = numerical_jacobian(evaluate, [x], [0], [0], batched=make_batched_evaluator(ColumnNormalize, [0], 1, [0]),
                                 max_bytes=4096)  # tiny budget: many chunks
    assert batched.path == "batched" and looped.path == "loop"
    block_b, block_l = batched.blocks[(0, 0)], looped.blocks[(0, 0)]
    assert torch.allclose(block_b, block_l, rtol=0, atol=1e-10)
    assert torch.equal(batched.kinks[(0, 0)], looped.kinks[(0, 0)])
    # Error bars: the same formula on (nearly) the same values.
    assert torch.allclose(batched.error_bars[(0, 0)], looped.error_bars[(0, 0)], rtol=1e-3, atol=1e-12)
    # And both are right: x / x.sum(0) has a closed-form Jacobian.
    exact = torch.autograd.functional.jacobian(lambda a: a / a.sum(0), x)
    assert torch.allclose(block_b, exact, atol=1e-9)


def test_batched_numerical_works_on_copies_of_an_inplace_body() -> None:
    x = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = x.clone()
    fd = FiniteDifferences(InplaceBody, make_evaluator(InplaceBody, [0]), [x], [0], [0], max_bytes=2**20)
    cols = fd.columns(0, torch.arange(5))
    assert torch.equal(x, before)
    expected = torch.diag(2 * torch.cos(2 * x))
    assert torch.allclose(cols.estimates[0], expected, atol=1e-9)


def test_vmap_failure_falls_back_to_the_loop() -> None:
    x = _x(3)
    evaluate = make_evaluator(ItemInBody, [0])
    cols = numerical_columns(evaluate, [x], 0, torch.arange(3), [0],
                             batched=make_batched_evaluator(ItemInBody, [0], 1, [0]))
    assert cols.path == "loop" and cols.fallback_reason
    exact = torch.autograd.functional.jacobian(lambda a: a * a.sum(), x)
    assert torch.allclose(cols.estimates[0], exact, atol=1e-9)


def test_batched_forward_that_mixes_the_batch_is_not_trusted() -> None:
    x = _x(6)

    def evaluate(args: list) -> tuple[torch.Tensor, ...]:  # type: ignore[type-arg]
        return (args[0] ** 2,)

    def mixing(args: list, in_pos: int, X: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[type-arg]
        return (X ** 2 + 1e-3 * X.roll(1, dims=0),)  # runs, but mixes the batch

    cols = numerical_columns(evaluate, [x], 0, torch.arange(6), [0], batched=mixing)
    assert cols.path == "loop" and "disagreed" in cols.fallback_reason
    assert torch.allclose(cols.estimates[0], torch.diag(2 * x), atol=1e-9)


def test_chunked_rows_equal_one_chunk() -> None:
    x = _x(6, 5)
    run = run_forward(ColumnNormalize, [x], [0])
    small = VjpSource(run.diff_outputs, run.leaves, phase="backward", max_bytes=3000)  # a few rows a chunk
    large = VjpSource(run.diff_outputs, run.leaves, phase="backward", max_bytes=2**30)
    assert small.rows_per_chunk(0) < 30 and large.rows_per_chunk(0) == 30
    assert torch.equal(small.block(0, 0), large.block(0, 0))
    exact = torch.autograd.functional.jacobian(lambda a: a / a.sum(0), x)
    assert torch.allclose(large.block(0, 0), exact, atol=1e-12)


def test_jvp_without_forming_the_jacobian() -> None:
    x = _x(4, 4)
    leaf = x.clone().requires_grad_(True)
    out = leaf.clone() / leaf.clone().sum(0)
    source = VjpSource([(0, out)], [(0, leaf)], phase="reference", max_bytes=2**20)
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    jv = source.jvp({0: v})
    assert jv is not None
    exact = torch.func.jvp(lambda a: a / a.sum(0), (x,), (v,))[1]
    assert torch.allclose(jv[0], exact, atol=1e-12)
