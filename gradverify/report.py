"""Frozen result types shared by the engine and every renderer.

This module is stdlib-only on purpose: renderers (and anyone reading a JSON report
back) must never need torch. Everything a renderer shows is computed before it gets here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

# The fixed diagnosis vocabulary (documented in README.md). Keep in sync with DIAGNOSIS_HELP.
DIAGNOSIS_KINDS: tuple[str, ...] = (
    "missing_offdiag",
    "scaled",
    "sign",
    "transposed",
    "swapped_inputs",
    "zero_grad",
    "none_grad",
    "shape_mismatch",
    "inplace_forward",
    "nondeterministic",
    "ignores_grad_output",
    "partial",
    "nonfinite",
    "second_order",
    "precision",
    "device_mismatch",
    "nondifferentiable_point",
    "backward_error",
    "other",
)


class Status(str, enum.Enum):
    """Outcome of one check or one case.

    XFAIL is a mismatch the spec declared on purpose (a surrogate gradient, a known bug);
    XPASS is such a declared mismatch that no longer happens. Neither fails the run.
    """

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    SKIPPED = "skipped"
    XFAIL = "xfailed"
    XPASS = "xpassed"

    @property
    def ok(self) -> bool:
        return self not in (Status.FAILED, Status.ERROR)


Index = tuple[int, ...]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Diagnosis:
    """A named bug pattern with the evidence that supports it."""

    kind: str
    message: str
    output: str | None = None
    input: str | None = None
    evidence: str = ""
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in DIAGNOSIS_KINDS:
            raise ValueError(f"unknown diagnosis kind {self.kind!r}")


@dataclass(frozen=True)
class Mismatch:
    """One Jacobian entry d output[out_index] / d input[in_index] that disagrees with the truth."""

    output: str
    input: str
    out_index: Index
    in_index: Index
    expected: float
    got: float
    tolerance: float = 0.0

    @property
    def abs_err(self) -> float:
        return abs(self.got - self.expected)


@dataclass(frozen=True)
class Heatmap:
    """Where mismatches sit in one Jacobian block, already laid out for drawing.

    `rows` holds one string per output row (or bin of rows) with one code per input column
    (or bin): 'X' a mismatch, 'o' an entry that agrees and is non-zero, '.' zero in both,
    '?' an entry excused as uncertain (non-differentiable point), '|' a separator between
    groups of the input's last dimension.
    """

    output: str
    input: str
    out_shape: Shape
    in_shape: Shape
    rows: tuple[str, ...]
    row_labels: tuple[str, ...]
    col_header: str
    binned: bool = False


@dataclass(frozen=True)
class CheckResult:
    """One named check on one case (a contract, the Jacobian comparison, torch's gradcheck...)."""

    name: str
    status: Status
    message: str = ""
    max_abs_err: float | None = None
    mismatch_count: int = 0
    total_entries: int = 0
    mismatches: tuple[Mismatch, ...] = ()
    diagnoses: tuple[Diagnosis, ...] = ()
    heatmaps: tuple[Heatmap, ...] = ()
    details: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status.ok


@dataclass(frozen=True)
class CaseResult:
    """All checks of one op on one (shapes, dtype, device, seed) combination."""

    op: str
    file: str
    shapes: tuple[Shape, ...]
    dtype: str
    device: str
    seed: int
    status: Status
    checks: tuple[CheckResult, ...] = ()
    message: str = ""
    repro: str = ""
    line: int | None = None
    notes: tuple[str, ...] = ()
    domain: str = "any"
    input_names: tuple[str, ...] = ()
    # Line of the Function's backward, where CI annotations point (None when not found).
    backward_line: int | None = None

    @property
    def ok(self) -> bool:
        return self.status.ok


@dataclass(frozen=True)
class Report:
    """Everything one invocation found, in the order it ran."""

    cases: tuple[CaseResult, ...]
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ok(self) -> bool:
        return all(case.ok for case in self.cases)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def failing_cases(self) -> tuple[CaseResult, ...]:
        return tuple(case for case in self.cases if not case.ok)


def worst_status(statuses: list[Status]) -> Status:
    """Case status from its checks: an error beats a failure beats an expected failure."""
    order = [Status.ERROR, Status.FAILED, Status.XPASS, Status.XFAIL, Status.PASSED, Status.SKIPPED]
    for status in order:
        if status in statuses:
            return status
    return Status.PASSED


def format_index(name: str, index: Index) -> str:
    """`x[1,0]`; a 0-d tensor is just `x`."""
    if not index:
        return name
    return f"{name}[{','.join(str(i) for i in index)}]"


def to_dict(report: Report) -> dict[str, Any]:
    """Plain JSON-ready structure of a report (the documented `--format json` schema)."""

    def check_dict(check: CheckResult) -> dict[str, Any]:
        return {
            "name": check.name,
            "ok": check.ok,
            "status": check.status.value,
            "message": check.message,
            "max_abs_err": check.max_abs_err,
            "mismatch_count": check.mismatch_count,
            "total_entries": check.total_entries,
            "mismatches": [
                {
                    "output": m.output,
                    "input": m.input,
                    "out_index": list(m.out_index),
                    "in_index": list(m.in_index),
                    "expected": m.expected,
                    "got": m.got,
                    "abs_err": m.abs_err,
                    "tolerance": m.tolerance,
                }
                for m in check.mismatches
            ],
            "diagnoses": [
                {
                    "kind": d.kind,
                    "message": d.message,
                    "output": d.output,
                    "input": d.input,
                    "evidence": d.evidence,
                    "hint": d.hint,
                }
                for d in check.diagnoses
            ],
            "details": {key: value for key, value in check.details},
        }

    return {
        "schema_version": report.schema_version,
        "ok": report.ok,
        "exit_code": report.exit_code,
        "notes": list(report.notes),
        "cases": [
            {
                "op": case.op,
                "file": case.file,
                "line": case.line,
                "backward_line": case.backward_line,
                "inputs": list(case.input_names),
                "shapes": [list(s) for s in case.shapes],
                "dtype": case.dtype,
                "device": case.device,
                "seed": case.seed,
                "domain": case.domain,
                "ok": case.ok,
                "status": case.status.value,
                "message": case.message,
                "notes": list(case.notes),
                "repro": case.repro,
                "checks": [check_dict(c) for c in case.checks],
            }
            for case in report.cases
        ],
    }
