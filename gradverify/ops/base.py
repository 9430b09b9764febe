"""The one notion of "the op under check", whatever kind of op it is.

Every op kind (a torch.autograd.Function, a torch.library custom op, a torch.ops overload,
any differentiable callable) has an adapter here with the same small surface, so cases,
Jacobians, contracts, diagnosis and the report never ask which kind they have:

* `params()`: the op's parameters, from its signature or schema (what is a tensor, what is
  a plain value, what has a default);
* `call(args, kwargs)`: the op as users call it, through autograd, so its own backward runs;
* `body()`: the op's forward maths as a differentiable torch function that does *not* use the
  user's backward (the reference truth), or None where there is none (a compiled kernel);
* `raw_backward(outputs)`: the user's backward called directly on the real ctx, before the
  engine sums, casts or validates what it returns, or None where it is out of reach;
* `defines_jvp()`, `once_differentiable()`, `has_backward()`: what the other checks need.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from gradverify.spec.model import InputSpec
from gradverify.usercode import boundary


class Op(Protocol):
    name: str
    kind: str
    target: Any
    file: str | None
    line: int | None
    backward_line: int | None
    body_description: str

    def params(self) -> tuple[InputSpec, ...]: ...

    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any: ...

    def body(self, device: str = "cpu") -> Callable[..., Any] | None: ...

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None: ...

    def defines_jvp(self) -> bool: ...

    def once_differentiable(self) -> bool: ...

    def has_backward(self) -> bool: ...


@dataclass
class RawBackward:
    """The user's backward bound to the ctx of one forward call.

    `__call__(grads)` returns what the backward returned, before the autograd engine: one
    entry per op input (trailing entries for internal inputs already removed), plus whether it
    came back as a list (torch raises on that).
    """

    node: Any
    n_inputs: int
    strip_trailing: int = 0
    function: Callable[..., Any] | None = None

    @boundary
    def __call__(self, grads: Sequence[Any]) -> tuple[tuple[Any, ...], bool]:
        if self.function is not None:
            returned = self.function(self.node, *grads)
        else:
            returned = self.node.apply(*grads)
        was_list = isinstance(returned, list)
        values = tuple(returned) if isinstance(returned, (tuple, list)) else (returned,)
        if self.strip_trailing:
            values = values[: len(values) - self.strip_trailing]
        return values, was_list


def as_tuple(result: Any) -> tuple[Any, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


class StandInCtx:
    """Accepts everything forward may do with a real ctx, so a forward body runs outside apply."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[Any, ...] = ()
        self.dirty: tuple[Any, ...] = ()
        self.non_differentiable: tuple[Any, ...] = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        self.saved_for_forward = tensors

    def mark_dirty(self, *tensors: Any) -> None:
        self.dirty = tensors

    def mark_non_differentiable(self, *tensors: Any) -> None:
        self.non_differentiable = tensors

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value


# --- parameters from a Python signature -------------------------------------------------------

# Annotations naming a tensor; the Long/Int/Bool variants also fix the dtype.
_TENSOR_NAMES = {"Tensor": None, "torch.Tensor": None, "FloatTensor": None, "torch.FloatTensor": None,
                 "DoubleTensor": None, "torch.DoubleTensor": None, "LongTensor": "int64",
                 "torch.LongTensor": "int64", "IntTensor": "int32", "torch.IntTensor": "int32",
                 "BoolTensor": "bool", "torch.BoolTensor": "bool"}
_VALUE_TYPES = ("int", "float", "bool", "str", "complex", "dtype", "torch.dtype", "device", "torch.device",
                "SymInt", "Number", "number")


@dataclass(frozen=True)
class Annotation:
    """What a parameter annotation says: a tensor (maybe of a fixed dtype), or a plain value."""

    kind: str  # "tensor" | "value" | "unknown" | "none"
    optional: bool = False
    dtype: str | None = None
    value_type: str = ""
    text: str = ""


def annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        module = annotation.__module__
        return annotation.__qualname__ if module == "builtins" else f"{module}.{annotation.__qualname__}"
    return str(annotation).replace("typing.", "")


def classify_annotation(annotation: Any) -> Annotation:
    """Read an annotation (a type or, with `from __future__ import annotations`, its text)."""
    text = annotation_text(annotation).strip()
    if not text:
        return Annotation("none")
    cleaned = re.sub(r"\s+", "", text).replace("typing.", "").replace("torch._tensor.Tensor", "torch.Tensor")
    optional = False
    match = re.fullmatch(r"Optional\[(.*)\]", cleaned)
    if match:
        cleaned, optional = match.group(1), True
    parts = cleaned.split("|")
    if "None" in parts and len(parts) > 1:
        optional = True
        parts = [p for p in parts if p != "None"]
        cleaned = "|".join(parts)
    match = re.fullmatch(r"Union\[(.*)\]", cleaned)
    if match:
        members = [m for m in match.group(1).split(",") if m]
        if "None" in members:
            optional = True
            members = [m for m in members if m != "None"]
        cleaned = "|".join(members)
    if cleaned in _TENSOR_NAMES:
        return Annotation("tensor", optional, _TENSOR_NAMES[cleaned], text=text)
    head = cleaned.split("[")[0].split("|")[0]
    if head in _VALUE_TYPES or head.lower() in ("list", "tuple", "sequence", "literal", "dict") or \
            head in ("List", "Tuple", "Sequence", "Literal", "Dict", "Mapping"):
        if "Tensor" in cleaned:
            return Annotation("unknown", optional, text=text)  # a list of tensors: not supported as a value
        return Annotation("value", optional, value_type=head, text=text)
    return Annotation("unknown", optional, text=text)


# How many tensors a forward(ctx, *args) can be given from the command line.
MAX_VARIADIC = 8


def params_from_signature(signature: inspect.Signature, *, skip_first: bool = False,
                          allow_keyword_only: bool = True) -> tuple[InputSpec, ...]:
    """The parameters of a Python callable (a Function's forward, a wrapper function).

    Annotated int/float/bool/str/list[int]/torch.dtype/Optional[...] parameters are plain
    values; Tensor annotations are tensors (LongTensor/BoolTensor fix the dtype); defaults
    are passed as they are, `param=None` is an optional tensor unless annotated as a value;
    an unannotated parameter without default is a tensor, marked `guessed`.
    """
    params = list(signature.parameters.values())
    if skip_first and params:
        params = params[1:]
    specs: list[InputSpec] = []
    for param in params:
        note = classify_annotation(param.annotation)
        if param.kind is param.VAR_POSITIONAL:
            # *xs: one tensor at least, more when --shape names more ("3;3;3").
            specs.append(InputSpec(name=f"{param.name}[0]", variadic=True, annotation=note.text))
            specs.extend(InputSpec(name=f"{param.name}[{k}]", optional=True, variadic=True, annotation=note.text)
                         for k in range(1, MAX_VARIADIC))
            continue
        if param.kind is param.VAR_KEYWORD:
            continue
        keyword = param.kind is param.KEYWORD_ONLY
        if keyword and not allow_keyword_only:
            continue
        has_default = param.default is not inspect.Parameter.empty
        if note.kind == "value":
            specs.append(InputSpec(name=param.name, is_tensor=False, value=param.default if has_default else None,
                                   has_value=has_default, keyword=keyword, value_type=note.value_type,
                                   annotation=note.text))
        elif note.kind == "tensor":
            if has_default and param.default is None:
                specs.append(InputSpec(name=param.name, optional=True, dtype=note.dtype, keyword=keyword,
                                       annotation=note.text))
            elif has_default:
                specs.append(InputSpec(name=param.name, is_tensor=False, value=param.default, has_value=True,
                                       keyword=keyword, annotation=note.text))
            else:
                specs.append(InputSpec(name=param.name, dtype=note.dtype, keyword=keyword, annotation=note.text))
        elif has_default and param.default is None:
            specs.append(InputSpec(name=param.name, optional=True, keyword=keyword, annotation=note.text))
        elif has_default:
            specs.append(InputSpec(name=param.name, is_tensor=False, value=param.default, has_value=True,
                                   keyword=keyword, annotation=note.text))
        else:
            # No annotation and no default: most such parameters are tensors, but it is a guess.
            specs.append(InputSpec(name=param.name, guessed=True, keyword=keyword, annotation=note.text))
    return tuple(specs)


def source_line(obj: Any) -> int | None:
    """The line of `def`/`class` itself (below decorators), where a reader looks."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    try:
        lines, start = inspect.getsourcelines(obj)
    except (OSError, TypeError):
        return None
    for offset, text in enumerate(lines):
        if text.lstrip().startswith(("def ", "async def ", "class ")):
            return start + offset
    return start


def source_file(obj: Any) -> str | None:
    try:
        return inspect.getsourcefile(inspect.unwrap(obj) if callable(obj) else obj)
    except (TypeError, OSError):
        return None
