"""What every check shares: the `Check` protocol and the lazily built `CaseContext`.

A check looks at one case and returns one or more CheckResults. Everything expensive that
several checks need (the forward run with its graph, the analytic Jacobian, the truths) lives
on the context and is built at most once, on first use, so a check that is switched off costs
nothing and the order of checks never changes what they compute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from gradverify.cases import Case
from gradverify.complex_view import REAL_OF, RealViewOp, complex_positions, real_view
from gradverify.config import Settings
from gradverify.domains import DOMAINS
from gradverify.numerics.finite_diff import FiniteDifferences
from gradverify.numerics.forward import (CallSignature, ForwardRun, make_batched_evaluator, make_evaluator,
                                         run_forward)
from gradverify.numerics.reference import Reference, build_reference, validate
from gradverify.numerics.tolerance import Tolerance, tolerance_for
from gradverify.numerics.vjp import Tangent, VjpSource
from gradverify.ops.base import Op
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, user_frame


class Check(Protocol):
    """One check: `applies` says why it does not apply to a case (None if it does)."""

    name: str
    default: bool
    description: str

    def applies(self, ctx: CaseContext) -> str | None: ...

    def run(self, ctx: CaseContext) -> list[CheckResult]: ...


@dataclass
class Truth:
    """The truths of one case, computed where the op accepts float64 (cpu first).

    perturbed(): the same truths at inputs moved by the case dtype's rounding (x (1 + eps s),
    random signs s): how much the truth itself changes under the rounding a low-precision
    backward cannot avoid (see SLACK_FACTOR in checks/jacobian.py). Built on first use.
    """

    fd: FiniteDifferences
    reference: Reference
    where: str
    args: list[Any]
    notes: list[str] = field(default_factory=list)
    perturb: Any = None
    _perturbed: Any = None

    @property
    def description(self) -> str:
        if self.reference.usable:
            text = f"{self.reference.description}"
            if self.reference.status == "unvalidated":
                text += " (not validated: finite differences did not resolve the op)"
            return text + f"; finite differences ({self.where}) wherever the backward disagrees with it"
        return f"finite differences ({self.where}, adaptive Richardson)"

    def perturbed(self) -> Truth | None:
        if self._perturbed is None and self.perturb is not None:
            self._perturbed = self.perturb()
        return self._perturbed


class CaseContext:
    """One case's shared state for the checks."""

    def __init__(self, case: Case, settings: Settings, values64: list[Any], *, caller_values: bool = False) -> None:
        self.case = case
        self.settings = settings
        self.op: Op = case.op.op
        self.values64 = values64
        self.original_values = values64
        self.caller_values = caller_values
        self.notes: list[str] = []
        self.signature = CallSignature(names=tuple(p.name for p in case.inputs),
                                       keyword=tuple(p.keyword for p in case.inputs))
        self.input_names = tuple(p.name for p in case.inputs)
        dtype = getattr(torch, case.dtype)
        self.args: list[Any] = []
        self.diff_positions: list[int] = []
        for pos, (param, value) in enumerate(zip(case.inputs, values64)):
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() or value.is_complex():
                    target = getattr(torch, param.dtype) if param.dtype else dtype
                    self.args.append(value.detach().to(target).to(case.device))
                    if case.differentiable(param) and value.numel() > 0:
                        self.diff_positions.append(pos)
                else:
                    self.args.append(value.detach().to(case.device))
            else:
                self.args.append(value)
        # Complex tensors are checked through their real views (torch's Wirtinger convention):
        # the Jacobian machinery then only ever sees a real function of real inputs.
        self.dtype = case.dtype
        positions = complex_positions(self.args)
        if positions:
            positional_index = {pos: k for k, pos in enumerate(
                [i for i, p in enumerate(case.inputs) if not p.keyword])}
            self.op = RealViewOp(self.op, frozenset(positional_index[p] for p in positions if p in positional_index),
                                 frozenset(case.inputs[p].name for p in positions if case.inputs[p].keyword))
            self.values64 = real_view(values64, positions)
            self.args = real_view(self.args, positions)
            self.dtype = REAL_OF.get(case.dtype, case.dtype)
            self.notes.append("complex inputs checked through torch.view_as_real: an entry's last index is 0 for "
                              "the real part, 1 for the imaginary part")
        self.tangents: dict[int, Tangent] = {}
        self.constrained: dict[int, str] = {}
        for pos in self.diff_positions:
            domain = DOMAINS.get(case.domain_of(case.inputs[pos]))
            if domain is not None and domain.tangent is not None:
                self.tangents[pos] = domain.tangent
                self.constrained[self.input_names[pos]] = domain.tangent_text
        self.tolerance: Tolerance = tolerance_for(self.dtype, settings.atol, settings.rtol)
        self.results: list[CheckResult] = []

    # --- lazily built shared state -----------------------------------------------------------

    @functools.cached_property
    def run(self) -> ForwardRun:
        """The op called once on leaves that require grad (raises UserCodeError)."""
        return run_forward(self.op, self.signature, self.args, self.diff_positions)

    @property
    def out_positions(self) -> list[int]:
        return [o for o, _ in self.run.diff_outputs]

    @functools.cached_property
    def output_names(self) -> dict[int, str]:
        outputs = self.run.outputs
        if len(outputs) == 1:
            return {0: "out"}
        return {k: f"out[{k}]" for k in range(len(outputs))}

    @functools.cached_property
    def analytic(self) -> VjpSource:
        run = self.run
        return VjpSource(run.diff_outputs, run.leaves, phase="backward", max_bytes=self.settings.max_memory,
                         tangents=self.tangents, check_seed=self.case.seed)

    @functools.cached_property
    def truth(self) -> Truth:
        """Finite differences and the reference, where the op accepts float64 (raises UserCodeError)."""
        last_error: UserCodeError | None = None
        for where, args in self._evaluation_candidates():
            try:
                truth = self._truth_at(where, args, validated=True)
            except UserCodeError as exc:
                last_error = exc
                continue
            if where != "float64 on cpu":
                truth.notes.insert(0, f"truths computed in {where} (the op rejected float64 on cpu)")
            return truth
        assert last_error is not None
        raise last_error

    def _truth_at(self, where: str, args: list[Any], *, validated: bool, status: str = "") -> Truth:
        evaluate = make_evaluator(self.op, self.signature, self.out_positions)
        fd = FiniteDifferences(evaluate, args, self.diff_positions, self.out_positions,
                               batched=make_batched_evaluator(self.op, self.signature, self.out_positions,
                                                              self.case.device),
                               tangents=self.tangents, max_bytes=self.settings.max_memory, seed=self.case.seed,
                               target=self.tolerance.rtol / 8)
        reference = build_reference(self.op, self.signature, args, self.diff_positions, self.out_positions,
                                    declared=self.case.op.reference, tangents=self.tangents,
                                    max_bytes=self.settings.max_memory, device=self.case.device)
        notes = []
        if validated:
            reference = validate(reference, fd, self.case.seed)
            if reference.status in ("rejected", "unavailable") and reference.reason:
                notes.append(f"reference not used: {reference.reason}")
            elif reference.status == "unvalidated":
                notes.append(reference.reason)
        elif reference.source is not None:
            reference = Reference(reference.source, reference.description, status or reference.status)
        truth = Truth(fd=fd, reference=reference, where=where, args=args, notes=notes)
        if validated:
            truth.perturb = lambda: self._truth_at(where, self._perturbed_args(args), validated=False,
                                                   status=truth.reference.status)
        return truth

    def _perturbed_args(self, args: list[Any]) -> list[Any]:
        """The differentiable inputs moved by the case dtype's rounding, x (1 + eps s)."""
        gen = torch.Generator().manual_seed(self.case.seed + 991)
        out = list(args)
        for pos in self.diff_positions:
            x = args[pos]
            sign = torch.randint(0, 2, x.shape, generator=gen).to(torch.float64) * 2 - 1
            moved = x.double() * (1 + self.tolerance.eps * sign.to(x.device))
            tangent = self.tangents.get(pos)
            if tangent is not None:
                moved = x.double() + tangent(x.double(), moved - x.double())  # stay on the constraint set
            out[pos] = moved.to(x.dtype)
        return out

    def _evaluation_candidates(self) -> list[tuple[str, list[Any]]]:
        def cast(dtype: torch.dtype, device: str) -> list[Any]:
            out = []
            for param, v in zip(self.case.inputs, self.values64):
                if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
                    fixed = param.dtype is not None and not param.is_float_tensor
                    out.append(v.to(getattr(torch, param.dtype) if fixed and param.dtype else dtype).to(device))
                elif isinstance(v, torch.Tensor):
                    out.append(v.to(device))
                else:
                    out.append(v)
            return out

        device = self.case.device
        options = [("float64 on cpu", cast(torch.float64, "cpu"))]
        if device != "cpu":
            options.append((f"float64 on {device}", cast(torch.float64, device)))
        if self.dtype != "float64":
            options.append((f"{self.dtype} on {device}", cast(getattr(torch, self.dtype), device)))
        return options

    # --- helpers for checks -------------------------------------------------------------------

    def judge_at_precision(self, dtype: str) -> None:
        """The backward computes in a lower precision than the case (a float32 gradient for a
        float64 input, which the engine casts back): judge its values at that dtype's tolerance."""
        lower = tolerance_for(dtype, self.settings.atol, self.settings.rtol)
        if lower.rtol > self.tolerance.rtol:
            self.tolerance = Tolerance(atol=lower.atol, rtol=lower.rtol, dtype=self.tolerance.dtype)
            self.notes.append(f"the backward returns {dtype} gradients: its values are judged at {dtype}'s "
                              f"tolerance (rtol {lower.rtol:.2g})")

    def result(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    def user_error(self, name: str, exc: UserCodeError) -> CheckResult:
        return user_error_result(name, exc, self.case)


def user_error_result(name: str, exc: UserCodeError, case: Case) -> CheckResult:
    """A check that failed because the user's code raised: where, and what to do about it.

    When the exception came from an argument gradverify guessed (a tensor for an unannotated
    parameter, the range of an index tensor), it is a spec problem, not the user's bug."""
    op = case.op
    file, line = user_frame(exc.original, prefer=op.file)
    if file is None:
        # Raised by torch about what the user's code returned (a list, a wrong shape): point at
        # the user's op instead of torch's internals.
        file = op.file
        line = op.backward_line if exc.phase not in ("forward", "reference") else op.line
    where = f" at {file}:{line}" if file and not file.startswith("<") else ""
    text = str(exc.original).strip().splitlines()[0] if str(exc.original).strip() else ""
    message = f"{exc.phase} raised {type(exc.original).__name__}: {text}{where}"
    if exc.phase in ("forward", "reference") and case.guesses and looks_like_a_type_mismatch(exc.original):
        guessed = [g.split(":")[0] for g in case.guesses]
        first = guessed[0]
        spec_message = (f"{message}; gradverify guessed {', '.join(guessed)} ({case.guesses[0].split(': ', 1)[1]}): "
                        f"declare it, e.g. --arg {first}=VALUE, YAML `{first}: VALUE`, or annotate `{first}: int`")
        return CheckResult(name=name, status=Status.SPEC, message=spec_message, summary="spec problem",
                           diagnoses=(Diagnosis("spec_guess", spec_message,
                                                hint=f"say what {first} is: a value (--arg {first}=...) or a "
                                                     "tensor with a shape/range in a YAML spec"),))
    hint = "fix the exception; the other cases still ran"
    if isinstance(exc.original, SystemExit):
        hint = "the op called sys.exit(); gradverify reports it instead of exiting"
    return CheckResult(name=name, status=Status.ERROR, message=message, summary=f"{exc.phase} raised",
                       diagnoses=(Diagnosis("backward_error", message, hint=hint),))


# What torch says when a tensor arrives where a plain value (or an integer tensor) was expected.
_TYPE_MISMATCH = ("not tensor", "must be int", "must be tuple of ints", "must be number", "expected dtype int",
                  "expected scalar type long", "expected scalar type int", "only integer tensors", "got tensor",
                  "must be a number", "must be bool", "must be str", "tensors used as indices",
                  "index_select(): expected", "expected index", "argument 'dim'", "boolean value of tensor",
                  "a tensor with more than one value", "only one element tensors", "could not be converted")


def looks_like_a_type_mismatch(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, TypeError) or any(marker in text for marker in _TYPE_MISMATCH)


def skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name=name, status=Status.SKIPPED, message=f"not run: {reason}", summary="not run")


__all__ = ["Case", "CaseContext", "Check", "Truth", "skipped", "user_error_result", "Sequence"]
