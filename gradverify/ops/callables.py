"""Adapter for any differentiable Python callable: a wrapper around Functions, a partial, ...

Its reference is the callable itself run with every `torch.autograd.Function.apply` replaced
by that Function's forward body, so autograd differentiates the forward maths instead of the
hand-written backwards; the reference is trusted only after it agrees with finite differences
(ops it cannot see through, like custom ops, keep their registered backward and are caught
there). Its backward is only reachable through the autograd engine, so the contracts that
need the raw return value of a backward do not apply.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Sequence

import torch

from gradverify.ops.base import RawBackward, StandInCtx, as_tuple, params_from_signature, source_file, source_line
from gradverify.ops.function import uses_setup_context
from gradverify.spec.model import InputSpec
from gradverify.usercode import boundary


@contextlib.contextmanager
def functions_through_bodies() -> Iterator[None]:
    """While active, `SomeFunction.apply(*args)` runs the forward body under autograd."""
    from torch.autograd.function import Function

    original = Function.__dict__["apply"]

    @boundary
    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if uses_setup_context(cls):
            return cls.forward(*args, **kwargs)
        needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        return cls.forward(StandInCtx(needs), *args, **kwargs)

    Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        Function.apply = original  # type: ignore[method-assign]


def callable_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)})"
    return getattr(fn, "__name__", None) or type(fn).__name__


class CallableOp:
    """Any callable whose outputs are differentiable functions of its tensor arguments."""

    kind = "callable"
    body_description = "autograd through the callable with Functions run through their forward bodies"

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None) -> None:
        self.target = fn
        self.name = name or callable_name(fn)
        inner = fn.func if isinstance(fn, functools.partial) else fn
        self.file = source_file(inner)
        self.line = source_line(inner)
        self.backward_line = None

    def params(self) -> tuple[InputSpec, ...]:
        return params_from_signature(inspect.signature(self.target))

    @boundary
    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.target(*args, **kwargs)

    def body(self, device: str = "cpu") -> Callable[..., Any] | None:
        fn = self.target

        @boundary
        def run(*a: Any, **k: Any) -> tuple[Any, ...]:
            with functions_through_bodies():
                return as_tuple(fn(*a, **k))

        return run

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None:
        return None

    def defines_jvp(self) -> bool:
        return False

    def once_differentiable(self) -> bool:
        return False

    def has_backward(self) -> bool:
        return True
