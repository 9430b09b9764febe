"""The small public API a spec file uses to say how its ops should be checked.

    import gradverify as gv

    @gv.check(inputs={"x": gv.tensor(3, 3, domain="positive")})
    class ColumnNormalize(torch.autograd.Function):
        ...

    @gv.check(inputs={"logits": gv.tensor(4, 5), "label": gv.tensor(4, dtype="int64", high=5), "smoothing": 0.1})
    def smoothed_ce(logits, label, smoothing):   # any differentiable callable, or a custom op
        return SmoothedCE.apply(logits, label, smoothing)

Stack several `@gv.check(...)` to declare several calls (e.g. with and without bias). The
decorator only records the declaration and returns the object unchanged, so the op behaves
exactly as before when the file is imported by anything else. An op defined elsewhere is
declared in a spec by calling the decorator on it: `my_op = gv.check(inputs=...)(ops.my_op)`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable, Mapping

from gradverify.errors import DeclarationError

DECLARATION_ATTR = "__gradverify_checks__"

T = TypeVar("T")

# Declarations of objects that cannot carry an attribute (a builtin, an OpOverload), by identity.
_REGISTRY: list[tuple[Any, tuple[Declaration, ...]]] = []


@dataclass(frozen=True)
class TensorArg:
    """A tensor input to draw at random: shape, value domain, dtype, range, whether it needs grad.

    dtype None follows the case's floating dtype; "int64"/"int32"/"bool" fix it (labels, indices,
    masks: never differentiated). low/high: the range (integers: high exclusive, as torch.randint).
    """

    shape: tuple[int, ...] | None = None
    domain: str | None = None
    requires_grad: bool = True
    dtype: str | None = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Declaration:
    """One `@gradverify.check(...)` on an op."""

    inputs: Mapping[str, Any] | None
    reference: Callable[..., Any] | None
    surrogate: str | None
    expect_failure: str | None
    atol: float | None
    rtol: float | None
    label: str
    line: int | None
    file: str | None = None
    name: str | None = None
    checks: tuple[str, ...] = ()


def _caller() -> tuple[str | None, int | None]:
    """File and line of the spec code that called gv.tensor / gv.check."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return None, None
    return str(Path(frame.f_code.co_filename).resolve()), frame.f_lineno


def _reject(label: str, exc: Any) -> DeclarationError:
    """The schema's message for a declared value, at the line that declared it."""
    file, line = _caller()
    return DeclarationError(exc.message(label), file=file, line=line)


def tensor(*shape: int, domain: str | None = None, requires_grad: bool = True, dtype: str | None = None,
           low: float | None = None, high: float | None = None) -> TensorArg:
    """Declare a tensor input: `gv.tensor(4, 3, domain="positive")`, `gv.tensor(8, dtype="int64", high=5)`;
    no shape means 'from the command line'."""
    from gradverify import schema

    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    try:
        sizes = schema.shape(list(shape))
    except schema.Invalid as exc:
        raise _reject("gradverify.tensor: shape", exc) from None
    if domain is not None:
        try:
            domain = schema.domain(domain)
        except schema.Invalid as exc:
            raise _reject("gradverify.tensor: domain", exc) from None
    if dtype is not None:
        from gradverify.spec.model import FIXED_DTYPES

        if dtype not in FIXED_DTYPES:
            raise _reject("gradverify.tensor: dtype", schema.Invalid(f"one of {', '.join(FIXED_DTYPES)}", dtype,
                                                                     FIXED_DTYPES))
    for label, value in (("low", low), ("high", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise _reject(f"gradverify.tensor: {label}", schema.Invalid("a finite number", value))
    if low is not None and high is not None and high <= low:
        raise _reject("gradverify.tensor: high", schema.Invalid(f"a number above low ({low})", high))
    fixed_int = dtype is not None and dtype != "bool" and not dtype.startswith(("float", "bfloat"))
    return TensorArg(shape=sizes if shape else None, domain=domain,
                     requires_grad=requires_grad and not fixed_int and dtype != "bool",
                     dtype=dtype, low=low, high=high)


def check(
    inputs: Mapping[str, Any] | None = None,
    *,
    reference: Callable[..., Any] | None = None,
    surrogate: bool | str = False,
    expect_failure: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    label: str = "",
    name: str | None = None,
    checks: tuple[str, ...] | list[str] = (),
) -> Callable[[T], T]:
    """Declare how to check an op (a Function class, a custom op, or any differentiable callable).

    inputs: the op's arguments by name: `gv.tensor(...)` for tensors, plain values for the rest.
    reference: a plain function computing the same as the op, used as an extra truth.
    surrogate: the backward is deliberately not the derivative (straight-through, gradient
        reversal): a mismatch is reported as expected, not as a failure. A string says why.
    expect_failure: a known bug kept visible: reported as 'expected failure' until fixed.
    name: how the report names the op (default: its own name).
    checks: the optional checks to run for this op (e.g. ["layout", "second_order"]).
    """
    from gradverify import schema

    options = schema.keys_for(schema.DECLARE)
    parsed: dict[str, Any] = {}
    for key, value in (("atol", atol), ("rtol", rtol), ("checks", checks or None)):
        if value is not None:
            try:
                parsed[key] = options[key].parse(value)
            except schema.Invalid as exc:
                raise _reject(f"gradverify.check: {key}", exc) from None
    if surrogate and expect_failure:
        file, line = _caller()
        raise DeclarationError("gradverify.check: give surrogate or expect_failure, not both", file=file, line=line)
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    line = caller.f_lineno if caller is not None else None
    file = str(Path(caller.f_code.co_filename).resolve()) if caller is not None else None
    surrogate_reason: str | None
    if surrogate is True:
        surrogate_reason = "declared a surrogate gradient"
    elif surrogate:
        surrogate_reason = str(surrogate)
    else:
        surrogate_reason = None
    declaration = Declaration(
        inputs=dict(inputs) if inputs is not None else None,
        reference=reference,
        surrogate=surrogate_reason,
        expect_failure=expect_failure,
        atol=parsed.get("atol"),
        rtol=parsed.get("rtol"),
        label=label,
        line=line,
        file=file,
        name=name,
        checks=tuple(parsed.get("checks", ())),
    )

    def decorate(obj: T) -> T:
        existing = declarations_of(obj, own=True)
        # Decorators apply bottom-up; keep the order the user reads them in.
        combined = (declaration, *existing)
        try:
            if inspect.isclass(obj):
                type.__setattr__(obj, DECLARATION_ATTR, combined)
            else:
                setattr(obj, DECLARATION_ATTR, combined)
        except (AttributeError, TypeError):
            _REGISTRY[:] = [(o, d) for o, d in _REGISTRY if o is not obj]
            _REGISTRY.append((obj, combined))
        return obj

    return decorate


def declarations_of(obj: Any, *, own: bool = True) -> tuple[Declaration, ...]:
    """The declarations made on `obj` (for a class: on that class itself, not inherited)."""
    if inspect.isclass(obj):
        found = obj.__dict__.get(DECLARATION_ATTR, ()) if own else getattr(obj, DECLARATION_ATTR, ())
    else:
        found = getattr(obj, DECLARATION_ATTR, ())
    if found:
        return tuple(found)
    for registered, decls in _REGISTRY:
        if registered is obj:
            return decls
    return ()
