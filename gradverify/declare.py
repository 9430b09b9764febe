"""The small public API a spec file uses to say how its Functions should be checked.

    import gradverify as gv

    @gv.check(inputs={"x": gv.tensor(3, 3, domain="positive")})
    class ColumnNormalize(torch.autograd.Function):
        ...

Stack several `@gv.check(...)` to declare several calls (e.g. with and without bias).
The decorator only records the declaration on the class and returns it unchanged, so the
Function behaves exactly as before when the file is imported by anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

DECLARATION_ATTR = "__gradverify_checks__"

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class TensorArg:
    """A tensor input to draw at random: its shape, value domain and whether it needs grad."""

    shape: tuple[int, ...] | None = None
    domain: str | None = None
    requires_grad: bool = True


@dataclass(frozen=True)
class Declaration:
    """One `@gradverify.check(...)` on a Function."""

    inputs: Mapping[str, Any] | None
    reference: Callable[..., Any] | None
    surrogate: str | None
    expect_failure: str | None
    atol: float | None
    rtol: float | None
    label: str
    line: int | None


def tensor(*shape: int, domain: str | None = None, requires_grad: bool = True) -> TensorArg:
    """Declare a tensor input: `gv.tensor(4, 3, domain="positive")`; no shape means 'from the CLI'."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for size in shape:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TypeError(f"gradverify.tensor: sizes must be non-negative ints, got {shape!r}")
    if domain is not None:
        from gradverify.cases import DOMAINS

        if domain not in DOMAINS:
            raise ValueError(f"gradverify.tensor: domain {domain!r} is not one of {', '.join(DOMAINS)}")
    return TensorArg(shape=tuple(shape) if shape else None, domain=domain, requires_grad=requires_grad)


def check(
    inputs: Mapping[str, Any] | None = None,
    *,
    reference: Callable[..., Any] | None = None,
    surrogate: bool | str = False,
    expect_failure: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    label: str = "",
) -> Callable[[T], T]:
    """Declare how to check a Function.

    inputs: forward's arguments by name: `gv.tensor(...)` for tensors, plain values for the rest.
    reference: a plain function computing the same as forward, used as an extra truth.
    surrogate: the backward is deliberately not the derivative (straight-through, gradient
        reversal): a mismatch is reported as expected, not as a failure. A string says why.
    expect_failure: a known bug kept visible: reported as 'expected failure' until fixed.
    """
    import inspect
    import math

    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"gradverify.check: {label} must be a finite non-negative number, got {value!r}")
    if surrogate and expect_failure:
        raise ValueError("gradverify.check: give surrogate or expect_failure, not both")
    frame = inspect.currentframe()
    line = frame.f_back.f_lineno if frame is not None and frame.f_back is not None else None
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
        atol=atol,
        rtol=rtol,
        label=label,
        line=line,
    )

    def decorate(cls: T) -> T:
        existing = cls.__dict__.get(DECLARATION_ATTR, ())
        # Decorators apply bottom-up; keep the order the user reads them in.
        setattr(cls, DECLARATION_ATTR, (declaration, *existing))
        return cls

    return decorate
