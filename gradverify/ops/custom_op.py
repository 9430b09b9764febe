"""Adapters for torch.library custom ops (`CustomOpDef`) and `torch.ops.<ns>.<name>` overloads.

A custom op's parameters come from its schema, which is what the dispatcher enforces. Its
registered kernel (the decorated Python function, or a per-device kernel) is the forward body:
when it is plain torch code, autograd through it is an exact reference; when it is not
differentiable (numpy, a Triton kernel, `.item()`), the reference check against finite
differences rejects it and finite differences are the truth. A compiled extension's op has
no Python body at all: finite differences plus any declared reference.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from gradverify.ops.base import RawBackward, as_tuple, source_file, source_line
from gradverify.ops.function import _node_of
from gradverify.spec.model import InputSpec
from gradverify.usercode import boundary


def is_custom_op(obj: Any) -> bool:
    from torch._library.custom_ops import CustomOpDef

    return isinstance(obj, CustomOpDef)


def is_op_overload(obj: Any) -> bool:
    return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def _opdef_for(qualname: str) -> Any:
    from torch._library.custom_ops import _maybe_get_opdef

    try:
        return _maybe_get_opdef(qualname)
    except Exception:  # noqa: BLE001 - an op torch.library does not know: none
        return None


# Schema types -> what a parameter is. Tensor lists are not supported as inputs yet.
_VALUE_SCHEMA = ("int", "float", "bool", "str", "SymInt", "Scalar", "ScalarType", "Layout", "Device",
                 "MemoryFormat", "int[]", "SymInt[]", "float[]", "bool[]", "str[]", "Generator")


def params_from_schema(schema: Any) -> tuple[InputSpec, ...]:
    """An op's parameters from its dispatcher schema (`Tensor x, float scale, int[] dims`)."""
    specs: list[InputSpec] = []
    for arg in schema.arguments:
        text = str(arg.type)
        optional = text.endswith("?") or text.startswith("Optional[")
        base = text.rstrip("?").removeprefix("Optional[").removesuffix("]") if optional else text
        keyword = bool(arg.kwarg_only)
        has_default = arg.has_default_value() if hasattr(arg, "has_default_value") else arg.default_value is not None
        default = arg.default_value if has_default else None
        if base == "Tensor":
            if optional:
                specs.append(InputSpec(name=arg.name, optional=True, keyword=keyword, annotation=text))
            else:
                specs.append(InputSpec(name=arg.name, keyword=keyword, annotation=text))
        elif base in ("Tensor[]", "List[Tensor]"):
            specs.append(InputSpec(name=arg.name, is_tensor=False, keyword=keyword, annotation=text,
                                   value_type="Tensor[]"))
        else:
            specs.append(InputSpec(name=arg.name, is_tensor=False, value=default,
                                   has_value=has_default or optional, keyword=keyword, annotation=text,
                                   value_type=base))
    return tuple(specs)


class CustomOpOp:
    """A `torch.library.custom_op` (or `triton_op`): called as users call it."""

    kind = "custom_op"

    def __init__(self, opdef: Any, *, name: str | None = None, target: Any = None) -> None:
        self.opdef = opdef
        self.target = target if target is not None else opdef
        self.name = name or opdef._name
        init = opdef._init_fn
        self.file = source_file(init) if init is not None else None
        self.line = source_line(init) if init is not None else None
        backward = opdef._backward_fn
        self.backward_line = source_line(backward) if backward is not None else None
        self.body_description = "autograd through the op's registered kernel"

    @property
    def qualname(self) -> str:
        return str(self.opdef._qualname)

    @property
    def schema(self) -> Any:
        return self.opdef._opoverload._schema

    def params(self) -> tuple[InputSpec, ...]:
        return params_from_schema(self.schema)

    @boundary
    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.target(*args, **kwargs)

    def body(self, device: str = "cpu") -> Callable[..., Any] | None:
        kernels = getattr(self.opdef, "_backend_fns", {}) or {}
        kernel = kernels.get(device.split(":")[0]) or self.opdef._init_fn
        if kernel is None:
            return None

        @boundary
        def run(*a: Any, **k: Any) -> tuple[Any, ...]:
            return as_tuple(kernel(*a, **k))

        return run

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None:
        if self.opdef._backward_fn is None:
            return None
        if any("Tensor[]" in str(a.type) for a in self.schema.arguments):
            return None  # tensor-list ops go through torch's supports_tensorlist wrapper
        node = _node_of(outputs, None)
        if node is None:
            return None
        backward_fn = self.opdef._backward_fn

        @boundary
        def call(ctx: Any, *grads: Any) -> Any:
            # As torch's generated backward does: the op's own view of needs_input_grad has no
            # entry for the internal metadata input.
            previous = ctx.needs_input_grad
            try:
                ctx.needs_input_grad = previous[:-1]
                return backward_fn(ctx, *grads)
            finally:
                ctx.needs_input_grad = previous

        return RawBackward(node=node, n_inputs=n_inputs, function=call)

    def defines_jvp(self) -> bool:
        return False

    def once_differentiable(self) -> bool:
        return False

    def has_backward(self) -> bool:
        return self.opdef._backward_fn is not None


class TorchOpsOp:
    """A `torch.ops.<ns>.<name>[.<overload>]` overload: a custom op by its dispatcher name, or a
    compiled extension's op. Where torch.library knows the op (a Python custom op), its kernel
    and registered backward are used as for a CustomOpDef."""

    kind = "torch.ops"

    def __init__(self, overload: Any, *, name: str | None = None) -> None:
        if isinstance(overload, torch._ops.OpOverloadPacket):
            overload = overload.default
        self.target = overload
        self.qualname = overload._schema.name
        overload_name = overload._overloadname or "default"
        self.name = name or f"{self.qualname.replace('::', '.')}.{overload_name}"
        self.opdef = _opdef_for(self.qualname)
        self._custom = CustomOpOp(self.opdef, target=overload) if self.opdef is not None else None
        self.file = self._custom.file if self._custom else None
        self.line = self._custom.line if self._custom else None
        self.backward_line = self._custom.backward_line if self._custom else None
        self.body_description = (self._custom.body_description if self._custom
                                 else "none (a compiled kernel: finite differences are the truth)")

    @property
    def schema(self) -> Any:
        return self.target._schema

    def params(self) -> tuple[InputSpec, ...]:
        return params_from_schema(self.schema)

    @boundary
    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.target(*args, **kwargs)

    def body(self, device: str = "cpu") -> Callable[..., Any] | None:
        return self._custom.body(device) if self._custom else None

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None:
        if self._custom is not None:
            return self._custom.raw_backward(outputs, n_inputs)
        return None

    def defines_jvp(self) -> bool:
        return False

    def once_differentiable(self) -> bool:
        return False

    def has_backward(self) -> bool:
        return self._custom.has_backward() if self._custom else True


def resolve_torch_ops(text: str) -> Any:
    """`torch.ops.ns.name[.overload]` (or `ns::name[.overload]`) -> the OpOverload; raises LookupError."""
    name = text.strip()
    if "::" in name:
        ns, _, rest = name.partition("::")
        parts = [ns, *rest.split(".")]
    else:
        parts = name.removeprefix("torch.ops.").split(".")
    if len(parts) not in (2, 3) or not all(p.isidentifier() for p in parts):
        raise LookupError(f"expected torch.ops.<namespace>.<name>[.<overload>], found {text!r}")
    namespace = getattr(torch.ops, parts[0])
    try:
        packet = getattr(namespace, parts[1])
    except (AttributeError, RuntimeError):
        raise LookupError(f"no operator {parts[0]}::{parts[1]} is registered (import the module or load the "
                          "library that defines it first)") from None
    if len(parts) == 3:
        try:
            return getattr(packet, parts[2])
        except (AttributeError, RuntimeError):
            raise LookupError(f"operator {parts[0]}::{parts[1]} has no overload {parts[2]!r} "
                              f"(has: {', '.join(packet.overloads())})") from None
    return packet.default


__all__ = ["CustomOpOp", "TorchOpsOp", "is_custom_op", "is_op_overload", "params_from_schema",
           "resolve_torch_ops", "as_tuple"]
