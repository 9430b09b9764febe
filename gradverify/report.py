"""Frozen result types shared by the engine and every renderer.

This module is stdlib-only on purpose: renderers (and anyone reading a JSON report back) must
never need torch. Everything a renderer shows is computed before it gets here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2

# Exit codes, as the ecosystem expects them (pytest's 5 for "nothing was checked", 130 for Ctrl-C).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_NOTHING = 5
EXIT_INTERRUPTED = 130


class Status(str, enum.Enum):
    """Outcome of one check or one case.

    WARNED: a finding the autograd engine repairs in practice (a gradient of broadcast shape it
    sum-reduces), or entries no truth could judge; never a failure unless `--strict`.
    SPEC: the case could not be checked because of the spec (a guessed argument made forward
    raise): the user's backward is not accused. XFAIL/XPASS: a mismatch the spec declared (a
    surrogate gradient, a known bug) that happened / no longer happens.
    """

    PASSED = "passed"
    WARNED = "warned"
    FAILED = "failed"
    ERROR = "error"
    SPEC = "spec_error"
    SKIPPED = "skipped"
    XFAIL = "xfailed"
    XPASS = "xpassed"

    @property
    def ok(self) -> bool:
        return self not in (Status.FAILED, Status.ERROR, Status.SPEC)

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {Status.PASSED: "PASS", Status.WARNED: "WARN", Status.FAILED: "FAIL", Status.ERROR: "ERROR",
           Status.SPEC: "SPEC", Status.SKIPPED: "SKIP", Status.XFAIL: "XFAIL", Status.XPASS: "XPASS"}

# Worst first: a case's status is the first of these that any of its counted checks has.
STATUS_ORDER = (Status.ERROR, Status.FAILED, Status.SPEC, Status.XPASS, Status.XFAIL, Status.WARNED,
                Status.PASSED, Status.SKIPPED)


class Severity(str, enum.Enum):
    """How much a diagnosis weighs: an error fails the check, a warning does not (unless --strict)."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


# The diagnosis vocabulary, each with the one line the README and `--help` show. Every kind a
# check can report is listed here (Diagnosis refuses any other), so renderers and docs never drift.
DIAGNOSIS_KINDS: dict[str, str] = {
    "missing_offdiag": "the backward treats a coupled op as element-wise: cross terms are 0",
    "scaled": "off by a constant factor",
    "nonconstant_factor": "an element-wise formula off by a factor that varies from entry to entry",
    "sign": "the wrong sign everywhere, or in a subset of entries (a conj() for complex inputs)",
    "transposed": "matches the truth after a transpose",
    "swapped_inputs": "the gradients of two inputs are returned in each other's slot",
    "zero_grad": "a gradient that is zero where the truth is not",
    "none_grad": "None returned for an input that needs a gradient",
    "shape_mismatch": "a gradient of the wrong shape, or the wrong number of gradients",
    "engine_reduced": "a gradient of broadcast shape that the autograd engine sum-reduces (works, costs memory)",
    "engine_cast": "a gradient in another dtype that the autograd engine casts (works, costs precision)",
    "inplace_forward": "forward modified an input in place without ctx.mark_dirty",
    "grad_output_inplace": "backward modified grad_output in place",
    "nondeterministic": "two identical backward calls differ beyond rounding",
    "ignores_grad_output": "backward is not linear in grad_output (ignores it, or uses ones)",
    "partial": "a few entries wrong: one index or boundary case of the formula",
    "wrong_branch": "errors confined to the entries where a condition on the input holds",
    "blockwise": "errors confined to some blocks along a dimension",
    "precision": "right in float64, wrong beyond rounding in a lower precision (or a low-precision intermediate)",
    "dropped_eps": "tiny, structured errors: an eps dropped (or added) in one term",
    "surrogate": "looks like a deliberate surrogate gradient (straight-through, smooth proxy) that is not declared",
    "distributed_error": "a projection of the Jacobian is wrong beyond both truths' error bars",
    "nonfinite": "NaN/Inf in the backward where the truth is finite",
    "second_order": "first-order gradients right, the double backward wrong",
    "ctx_attribute": "a tensor stashed on ctx as an attribute instead of save_for_backward",
    "needs_input_grad": "wrong or missing gradients when only some inputs require grad",
    "layout_assumption": "right for contiguous grad_outputs/inputs, wrong for strided ones",
    "undefined_grad": "backward breaks when a grad_output is None (materialize_grads off)",
    "multi_output": "wrong only when several grad_outputs are non-zero together",
    "fake_kernel_mismatch": "the fake (meta) kernel disagrees with the real kernel's metadata",
    "missing_fake": "no fake kernel registered: torch.compile and export cannot trace the op",
    "undeclared_mutation": "the op writes into an argument that mutates_args does not declare",
    "output_alias": "an output aliases an input, which a custom op must not do",
    "autograd_backend_key": "autograd registered on a backend key instead of through register_autograd",
    "untraceable_backward": "the backward cannot be traced (numpy, .item(), data_ptr)",
    "dropped_tangent": "forward mode returns a zero or None tangent where the truth is not zero",
    "vmap_rule": "the op's vmap rule gives other values than a loop over the batch",
    "compile_mismatch": "under torch.compile forward or gradients differ from eager",
    "device_mismatch": "on the device, outputs or gradients differ from the cpu run",
    "nondifferentiable_point": "the input is near a point where the op is not differentiable",
    "unverifiable": "entries where neither truth is conclusive: not judged",
    "spec_guess": "gradverify had to guess an argument and the guess made forward raise: a spec problem",
    "no_backward": "no backward is registered for the op",
    "backward_error": "the user's code raised",
    "timeout": "the user's code did not return within the time limit",
    "crashed": "the process running the user's code died",
    "other": "no known pattern fits; the entries are listed",
}


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
    severity: Severity = Severity.ERROR

    def __post_init__(self) -> None:
        if self.kind not in DIAGNOSIS_KINDS:
            raise ValueError(f"unknown diagnosis kind {self.kind!r}")


@dataclass(frozen=True)
class Mismatch:
    """One Jacobian entry d output[out_index] / d input[in_index] that disagrees with the truth.

    `second` is the second truth's value at the entry (finite differences) when one was computed.
    """

    output: str
    input: str
    out_index: Index
    in_index: Index
    expected: float
    got: float
    tolerance: float = 0.0
    second: float | None = None

    @property
    def abs_err(self) -> float:
        return abs(self.got - self.expected)


@dataclass(frozen=True)
class Heatmap:
    """Where mismatches sit in one Jacobian block, already laid out for drawing.

    `rows` holds one string per output row (or bin of rows) with one code per input column (or
    bin): 'X' a mismatch, 'o' an entry that agrees and is non-zero, '.' zero in both, '?' an
    entry not judged, '|' a separator between groups of the input's last dimension.
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
    """One named check on one case (a contract, the Jacobian comparison, torch's gradcheck...).

    counts: whether the status decides the case's verdict. A second opinion overruled by a
    conclusive verdict (gradcheck stepping out of the domain) keeps its own status for the
    record but does not count.
    summary: the short text of the summary table's cell; `message` is the full sentence.
    """

    name: str
    status: Status
    message: str = ""
    summary: str = ""
    max_abs_err: float | None = None
    mismatch_count: int = 0
    mismatch_count_is_lower_bound: bool = False
    total_entries: int = 0
    compared_entries: int = 0
    unverifiable_count: int = 0
    excused_count: int = 0
    mismatches: tuple[Mismatch, ...] = ()
    diagnoses: tuple[Diagnosis, ...] = ()
    heatmaps: tuple[Heatmap, ...] = ()
    details: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    counts: bool = True
    guarantee: str = ""

    @property
    def ok(self) -> bool:
        return self.status.ok or not self.counts


@dataclass(frozen=True)
class InputInfo:
    """One argument of a case as the report shows it: `label(8) int64`, `x(3,3) spd`, `dim=1`."""

    name: str
    kind: str  # "tensor" | "value" | "none"
    shape: Shape = ()
    dtype: str = ""
    domain: str = ""
    requires_grad: bool = False
    value: str = ""

    @property
    def text(self) -> str:
        if self.kind == "value":
            return f"{self.name}={self.value}"
        if self.kind == "none":
            return f"{self.name}=None"
        text = f"{self.name}({','.join(map(str, self.shape))})"
        if self.dtype and not self.dtype.startswith(("float", "complex", "bfloat")):
            text += f" {self.dtype}"
        return text


@dataclass(frozen=True)
class CaseResult:
    """All checks of one op on one (inputs, dtype, device, seed) combination.

    inputs_from: "seed" when gradverify drew the inputs (the repro line reproduces them), or
    "caller" when the caller passed its own tensors (verify(), the pytest fixture).
    output: what the user's code printed while the case ran (bounded).
    """

    op: str
    file: str
    shapes: tuple[Shape, ...]
    dtype: str
    device: str
    seed: int
    status: Status
    kind: str = "Function"
    checks: tuple[CheckResult, ...] = ()
    message: str = ""
    repro: str = ""
    line: int | None = None
    backward_line: int | None = None
    spec_file: str | None = None
    spec_line: int | None = None
    notes: tuple[str, ...] = ()
    domain: str = "any"
    input_names: tuple[str, ...] = ()
    inputs: tuple[InputInfo, ...] = ()
    inputs_from: str = "seed"
    output: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def title(self) -> str:
        """`ColumnNormalize x(3,3) float64 cpu`: the one-line name of the case."""
        inputs = " ".join(i.text for i in self.inputs if i.kind == "tensor") or " ".join(
            f"({','.join(map(str, s))})" for s in self.shapes)
        return f"{self.op} {inputs} {self.dtype} {self.device}".replace("  ", " ").strip()

    @property
    def location(self) -> str:
        """Where a CI annotation points: the backward's line in the op's file."""
        line = self.backward_line or self.line
        return f"{self.file}:{line}" if line else self.file


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
    def checked_anything(self) -> bool:
        return any(case.status is not Status.SKIPPED for case in self.cases)

    @property
    def exit_code(self) -> int:
        """1 if a backward failed or the user's code raised, 2 if only spec problems stopped
        cases, 5 if nothing was checked (no case, or every case skipped), else 0."""
        statuses = {case.status for case in self.cases}
        if statuses & {Status.FAILED, Status.ERROR}:
            return EXIT_FAILED
        if Status.SPEC in statuses:
            return EXIT_USAGE
        if not self.checked_anything:
            return EXIT_NOTHING
        return EXIT_OK

    def failing_cases(self) -> tuple[CaseResult, ...]:
        return tuple(case for case in self.cases if not case.ok)


def worst_status(statuses: list[Status]) -> Status:
    """A case's status from its counted checks' statuses."""
    for status in STATUS_ORDER:
        if status in statuses:
            return status
    return Status.PASSED


def format_index(name: str, index: Index) -> str:
    """`x[1,0]`; a 0-d tensor is just `x`."""
    if not index:
        return name
    return f"{name}[{','.join(str(i) for i in index)}]"


def entry_name(m: Mismatch) -> str:
    """`∂out[0,1]/∂x[1,1]`: how every format names one Jacobian entry."""
    return f"∂{format_index(m.output, m.out_index)}/∂{format_index(m.input, m.in_index)}"


def to_dict(report: Report) -> dict[str, Any]:
    """Plain JSON-ready structure of a report (the documented `--format json` schema)."""

    def check_dict(check: CheckResult) -> dict[str, Any]:
        return {
            "name": check.name,
            "ok": check.ok,
            "status": check.status.value,
            "counts": check.counts,
            "message": check.message,
            "summary": check.summary,
            "max_abs_err": check.max_abs_err,
            "mismatch_count": check.mismatch_count,
            "mismatch_count_is_lower_bound": check.mismatch_count_is_lower_bound,
            "total_entries": check.total_entries,
            "compared_entries": check.compared_entries,
            "unverifiable_count": check.unverifiable_count,
            "excused_count": check.excused_count,
            "guarantee": check.guarantee,
            "mismatches": [
                {"output": m.output, "input": m.input, "out_index": list(m.out_index),
                 "in_index": list(m.in_index), "expected": m.expected, "got": m.got,
                 "abs_err": m.abs_err, "tolerance": m.tolerance, "second": m.second}
                for m in check.mismatches
            ],
            "diagnoses": [
                {"kind": d.kind, "severity": d.severity.value, "message": d.message, "output": d.output,
                 "input": d.input, "evidence": d.evidence, "hint": d.hint}
                for d in check.diagnoses
            ],
            "notes": list(check.notes),
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
                "kind": case.kind,
                "file": case.file,
                "line": case.line,
                "backward_line": case.backward_line,
                "spec_file": case.spec_file,
                "spec_line": case.spec_line,
                "inputs": [{"name": i.name, "kind": i.kind, "shape": list(i.shape), "dtype": i.dtype,
                            "domain": i.domain, "requires_grad": i.requires_grad, "value": i.value}
                           for i in case.inputs],
                "input_names": list(case.input_names),
                "shapes": [list(s) for s in case.shapes],
                "dtype": case.dtype,
                "device": case.device,
                "seed": case.seed,
                "inputs_from": case.inputs_from,
                "domain": case.domain,
                "ok": case.ok,
                "status": case.status.value,
                "message": case.message,
                "notes": list(case.notes),
                "output": case.output,
                "repro": case.repro,
                "duration_s": case.duration_s,
                "checks": [check_dict(c) for c in case.checks],
            }
            for case in report.cases
        ],
    }
