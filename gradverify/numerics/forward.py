"""Calling the op: one forward with the graph kept (for the analytic Jacobian), and the
plain evaluations finite differences need (no graph, on copies, batched where possible)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from gradverify.ops.base import Op, as_tuple
from gradverify.usercode import UserCodeError, boundary, user_code
from gradverify.numerics.vjp import BatchedDisagrees


@dataclass(frozen=True)
class CallSignature:
    """How a case's argument list (in the op's parameter order) maps onto the op's call."""

    names: tuple[str, ...]
    keyword: tuple[bool, ...]

    def split(self, values: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for name, is_keyword, value in zip(self.names, self.keyword, values):
            if is_keyword:
                kwargs[name] = value
            else:
                args.append(value)
        return args, kwargs

    @property
    def n_positional(self) -> int:
        return sum(not k for k in self.keyword)


def clone_args(args: Sequence[Any], *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> list[Any]:
    """Fresh copies of every tensor argument, so the user's code can never change ours."""
    out: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            copy = arg.detach().clone()
            if dtype is not None and (copy.is_floating_point() or copy.is_complex()):
                copy = copy.to(dtype)
            if device is not None:
                copy = copy.to(device)
            out.append(copy)
        else:
            out.append(arg)
    return out


def is_differentiable_output(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) \
        and value.requires_grad


@boundary
def call_op(op: Op, signature: CallSignature, values: Sequence[Any]) -> tuple[Any, ...]:
    args, kwargs = signature.split(values)
    return as_tuple(op.call(args, kwargs))


@dataclass
class ForwardRun:
    """One call of the op on fresh leaves, with the graph kept for backward."""

    leaves: list[tuple[int, torch.Tensor]]
    args: list[Any]
    outputs: tuple[Any, ...]
    diff_outputs: list[tuple[int, torch.Tensor]]


def run_forward(op: Op, signature: CallSignature, args: Sequence[Any], diff_positions: Sequence[int],
                *, phase: str = "forward") -> ForwardRun:
    """The op on copies of `args` whose `diff_positions` require grad; raises UserCodeError."""
    call_args = clone_args(args)
    leaves: list[tuple[int, torch.Tensor]] = []
    for pos in diff_positions:
        leaf = call_args[pos].requires_grad_(True)
        leaves.append((pos, leaf))
        # Forward gets a non-leaf copy, as in real use (x = layer(...)): an op that writes into its
        # input and calls ctx.mark_dirty is legal on that, never on a leaf that requires grad.
        with torch.enable_grad():
            call_args[pos] = leaf.clone()
    with user_code(phase), torch.enable_grad():
        outputs = call_op(op, signature, call_args)
    diff_outputs = [(i, o) for i, o in enumerate(outputs) if is_differentiable_output(o)]
    return ForwardRun(leaves=leaves, args=call_args, outputs=outputs, diff_outputs=diff_outputs)


Evaluator = Callable[[list[Any]], tuple[torch.Tensor, ...]]
# f(args, in_pos, X) -> the outputs at args with args[in_pos] replaced by each X[b]: (B, *out.shape)
BatchedEvaluator = Callable[[list[Any], int, torch.Tensor], tuple[torch.Tensor, ...]]


def make_evaluator(op: Op, signature: CallSignature, out_positions: Sequence[int]) -> Evaluator:
    """f(args) -> the differentiable outputs, through the op as users call it, without grad."""

    def evaluate(call_args: list[Any]) -> tuple[torch.Tensor, ...]:
        fresh = clone_args(call_args)
        with user_code("forward"), torch.no_grad():
            outputs = call_op(op, signature, fresh)
        try:
            return tuple(outputs[o].detach() for o in out_positions)
        except (IndexError, AttributeError) as exc:
            raise UserCodeError("forward", RuntimeError(
                f"forward returned {len(outputs)} outputs on another call (output {out_positions} missing)")) from exc

    return evaluate


def make_batched_evaluator(op: Op, signature: CallSignature, out_positions: Sequence[int],
                           device: str) -> BatchedEvaluator | None:
    """f(args, in_pos, X) -> outputs for each X[b], by torch.func.vmap over the op's forward
    body (or the op itself where it has none). Every call works on copies; the caller checks one
    column against plain calls before trusting it."""
    body = op.body(device)

    @boundary
    def one_call(local: list[Any]) -> tuple[Any, ...]:
        if body is not None:
            args, kwargs = signature.split(local)
            return as_tuple(body(*args, **kwargs))
        return call_op(op, signature, local)

    def evaluate_batch(call_args: list[Any], in_pos: int, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fresh = clone_args(call_args)

        @boundary
        def one(xi: torch.Tensor) -> tuple[torch.Tensor, ...]:
            local = list(fresh)
            local[in_pos] = xi
            outs = one_call(local)
            return tuple(outs[o] for o in out_positions)

        with user_code("forward"), torch.no_grad():
            result = torch.func.vmap(one)(X.clone())
        return tuple(r.detach() for r in result)

    return evaluate_batch


__all__ = ["BatchedDisagrees", "BatchedEvaluator", "CallSignature", "Evaluator", "ForwardRun", "call_op",
           "clone_args", "is_differentiable_output", "make_batched_evaluator", "make_evaluator", "run_forward"]
