"""Adapter for a torch.autograd.Function subclass (both forward styles)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from gradverify.ops.base import (RawBackward, StandInCtx, as_tuple, params_from_signature, source_file,
                                 source_line)
from gradverify.spec.model import InputSpec
from gradverify.usercode import boundary


def is_function_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj is not torch.autograd.Function


def uses_setup_context(function: type) -> bool:
    """True for the `forward(*args)` + `setup_context` style (forward takes no ctx)."""
    from torch.autograd.function import _SingleLevelFunction

    return getattr(function, "setup_context", None) is not _SingleLevelFunction.setup_context


def defines_jvp(function: type) -> bool:
    return any("jvp" in getattr(klass, "__dict__", {}) for klass in function.__mro__
               if klass.__module__.split(".")[0] != "torch")


def is_once_differentiable(function: type) -> bool:
    backward = next((klass.__dict__["backward"] for klass in function.__mro__ if "backward" in klass.__dict__), None)
    backward = getattr(backward, "__func__", backward)
    # torch's decorator wraps backward in a function defined in torch/autograd/function.py.
    code = getattr(backward, "__code__", None)
    return (getattr(backward, "__wrapped__", None) is not None and code is not None
            and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py"))


class FunctionOp:
    """A torch.autograd.Function: called through `apply`; its forward body is the reference."""

    kind = "Function"
    body_description = "autograd through the forward body"

    def __init__(self, function: type, *, name: str | None = None) -> None:
        self.target = function
        self.name = name or function.__name__
        self.file = source_file(function)
        self.line = source_line(function)
        backward = next((klass.__dict__["backward"] for klass in function.__mro__ if "backward" in klass.__dict__
                         and klass.__module__.split(".")[0] != "torch"), None)
        self.backward_line = source_line(getattr(backward, "__func__", backward)) if backward else None

    def params(self) -> tuple[InputSpec, ...]:
        signature = inspect.signature(self.target.forward)
        # Function.apply passes positional arguments only: keyword-only ones keep their defaults.
        return params_from_signature(signature, skip_first=not uses_setup_context(self.target),
                                     allow_keyword_only=False)

    @boundary
    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.target.apply(*args)

    def body(self, device: str = "cpu") -> Callable[..., Any] | None:
        function = self.target
        if uses_setup_context(function):
            @boundary
            def plain(*a: Any, **k: Any) -> tuple[Any, ...]:
                return as_tuple(function.forward(*a))

            return plain

        @boundary
        def forward(*a: Any, **k: Any) -> tuple[Any, ...]:
            needs = tuple(isinstance(x, torch.Tensor) and x.requires_grad for x in a)
            return as_tuple(function.forward(StandInCtx(needs), *a))

        return forward

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None:
        node = _node_of(outputs, self.target)
        if node is None:
            return None
        return RawBackward(node=node, n_inputs=n_inputs)

    def defines_jvp(self) -> bool:
        return defines_jvp(self.target)

    def once_differentiable(self) -> bool:
        return is_once_differentiable(self.target)

    def has_backward(self) -> bool:
        return True


def _node_of(outputs: Sequence[Any], forward_cls: type | None) -> Any:
    """The autograd node of a Python Function among `outputs` (its ctx)."""
    for out in outputs:
        node = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if node is None:
            continue
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and (forward_cls is None or cls is forward_cls):
            return node
    return None
