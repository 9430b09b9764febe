"""What a spec describes, whatever format it came from (Python file, YAML, library call)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from gradverify.ops.base import Op

Shape = tuple[int, ...]

# Tensor dtypes a spec may fix for one input; "float" (None) follows the case's dtype.
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
FIXED_DTYPES = INT_DTYPES + ("bool", "float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class InputSpec:
    """One argument of the op's call.

    A tensor input has a shape (None: take it from the command line or the default), a value
    domain and a dtype: None follows the case's floating dtype (the sweep), an integer or bool
    dtype is fixed and never differentiated. A non-tensor input has a fixed `value`.

    optional: a tensor parameter defaulting to None (`bias=None`), passed only when a shape is
        given for it.
    variadic: one of forward's *args, present only when a shape is given for it.
    keyword: passed by keyword (a keyword-only parameter of the op).
    guessed: a tensor only because the parameter has neither annotation nor default; when
        forward raises on it, that is a spec problem, not the user's bug.
    value_type: a plain-value parameter (annotated int, float, ...) that still needs a value.
    """

    name: str
    is_tensor: bool = True
    shape: Shape | None = None
    domain: str | None = None
    requires_grad: bool = True
    optional: bool = False
    value: Any = None
    has_value: bool = False
    variadic: bool = False
    dtype: str | None = None
    low: float | None = None
    high: float | None = None
    keyword: bool = False
    guessed: bool = False
    value_type: str | None = None
    annotation: str = ""

    @property
    def is_float_tensor(self) -> bool:
        return self.is_tensor and (self.dtype is None or not (self.dtype in INT_DTYPES or self.dtype == "bool"))

    @property
    def needs_value(self) -> bool:
        """A plain-value parameter without a value (and without a default)."""
        return not self.is_tensor and not self.has_value


@dataclass(frozen=True)
class CaseDecl:
    """One declared way to call the op: its inputs in the op's parameter order."""

    inputs: tuple[InputSpec, ...]
    label: str = ""


@dataclass(frozen=True)
class OpSpec:
    """One op under check (any kind: Function, custom op, torch.ops overload, callable)."""

    name: str
    op: Op
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
    # Optional checks to run (by name); () = the run's settings decide.
    checks: tuple[str, ...] = ()
    # Other run settings the spec fixes for this op, as (Settings field, value) (a YAML op's
    # `gradcheck:`, `order:`, `mode:`, `nondet_tol:`), applied like `dtypes` and `seed` above.
    settings: tuple[tuple[str, Any], ...] = ()
    # Where the op was declared when that is not its own file (a YAML spec naming it).
    spec_file: str | None = None
    spec_line: int | None = None

    @property
    def kind(self) -> str:
        return self.op.kind
