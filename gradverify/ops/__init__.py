"""Op adapters, one module per kind of op, behind one `Op` protocol (see ops/base.py).

`adapt(obj)` picks the adapter: the first kind in OP_KINDS whose test accepts the object.
Adding a kind is one module and one line here.
"""

from __future__ import annotations

from typing import Any, Callable

from gradverify.ops.base import Op, RawBackward, StandInCtx, as_tuple
from gradverify.ops.callables import CallableOp
from gradverify.ops.custom_op import CustomOpOp, TorchOpsOp, is_custom_op, is_op_overload
from gradverify.ops.function import FunctionOp, is_function_class

# (kind, accepts(obj), adapter(obj, name)) in the order they are tried: a callable last, since
# every other kind is callable too.
OP_KINDS: tuple[tuple[str, Callable[[Any], bool], Callable[..., Op]], ...] = (
    ("Function", is_function_class, FunctionOp),
    ("custom_op", is_custom_op, CustomOpOp),
    ("torch.ops", is_op_overload, TorchOpsOp),
    ("callable", callable, CallableOp),
)


class NotAnOp(TypeError):
    """The object is not a kind of op gradverify can check."""


def adapt(obj: Any, *, name: str | None = None) -> Op:
    """The adapter for `obj`: a Function class (or its `.apply`), a custom op, a torch.ops
    overload, or any other callable."""
    obj = getattr(obj, "__self__", obj) if getattr(obj, "__name__", "") == "apply" else obj
    if isinstance(obj, type) and not is_function_class(obj) and not callable(getattr(obj, "__call__", None)):
        raise NotAnOp(f"expected a torch.autograd.Function, a custom op or a callable, got {obj!r}")
    for _, accepts, adapter in OP_KINDS:
        if accepts(obj):
            return adapter(obj, name=name)
    raise NotAnOp(f"expected a torch.autograd.Function, a torch.library custom op, a torch.ops overload or a "
                  f"differentiable callable, got {type(obj).__name__} {obj!r}")


__all__ = ["OP_KINDS", "CallableOp", "CustomOpOp", "FunctionOp", "NotAnOp", "Op", "RawBackward", "StandInCtx",
           "TorchOpsOp", "adapt", "as_tuple"]
