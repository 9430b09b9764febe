"""What a spec describes, whatever format it came from (Python file, YAML, library call)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """One positional argument of the Function's forward.

    A tensor input has a shape (None: take it from the command line or the default) and a
    value domain; a non-tensor input has a fixed `value`. `optional` inputs (a parameter
    defaulting to None, like `bias=None`) are passed only when a shape is given for them.
    """

    name: str
    is_tensor: bool = True
    shape: Shape | None = None
    domain: str | None = None
    requires_grad: bool = True
    optional: bool = False
    value: Any = None
    has_value: bool = False
    # One of forward's *args: present only when a shape is given for it.
    variadic: bool = False


@dataclass(frozen=True)
class CaseDecl:
    """One declared way to call the op: its inputs in forward's order."""

    inputs: tuple[InputSpec, ...]
    label: str = ""


@dataclass(frozen=True)
class OpSpec:
    """A custom autograd Function and how to check it."""

    name: str
    function: type
    file: str
    line: int | None
    params: tuple[InputSpec, ...]
    declared: tuple[CaseDecl, ...] = ()
    reference: Callable[..., Any] | None = None
    surrogate: str | None = None
    expect_failure: str | None = None
    atol: float | None = None
    rtol: float | None = None
    backward_line: int | None = None
    covers: tuple[str, ...] = field(default_factory=tuple)
    # Per-op run settings a spec may fix (a YAML spec's `dtypes:`, `seed:` ...). Empty/None
    # means "whatever the run's settings say"; a value here beats pyproject.toml and the
    # built-in defaults but not a command-line flag or GRADVERIFY_* variable
    # (see cases.case_settings).
    dtypes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    seed: int | None = None
    # (dtype, atol, rtol): tolerances for one dtype, beating the op's overall atol/rtol.
    dtype_tolerances: tuple[tuple[str, float | None, float | None], ...] = ()
    # Optional checks to run (CHECK_NAMES); () = the run's settings decide. The contracts and
    # the Jacobian comparison always run.
    checks: tuple[str, ...] = ()


# Checks a spec can select. "jacobian" (and the contracts) always run; listing it is allowed.
CHECK_NAMES: tuple[str, ...] = ("jacobian", "gradcheck", "second_order", "forward_mode")
