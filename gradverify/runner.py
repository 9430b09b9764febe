"""One case end to end: inputs -> contracts -> Jacobians -> comparison -> diagnosis -> result.

Computation only: nothing here prints. A case never raises for the user's own code; an
exception in their forward or backward becomes a failing check that says where it happened.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from gradverify.cases import Case, input_values
from gradverify.compare import (BlockComparison, compare_block, heatmap_of, mismatches_of,
                                tolerance_for)
from gradverify.config import Settings
from gradverify.contracts import gradient_contracts, inplace_contract
from gradverify.diagnose import diagnose
from gradverify.jacobian import (ForwardRun, NumericalJacobian, ReferenceJacobian, UserCodeError,
                                 analytic_jacobian, directional_derivatives, make_evaluator,
                                 numerical_jacobian, reference_jacobian, run_forward)
from gradverify.report import (CaseResult, CheckResult, Diagnosis, Mismatch, Status, worst_status)
from gradverify.spec.python import user_frame
from gradverify.torch_gradcheck import run_gradcheck


def device_unavailable(device: str) -> str | None:
    """Why `device` cannot be used here, or None if it can."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "cuda not available"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"{device} not available ({torch.cuda.device_count()} cuda device(s))"
        return None
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return "mps not available"
        return None
    return f"unknown device {device!r}"


def repro_command(case: Case) -> str:
    shapes = ";".join(",".join(map(str, s)) for s in case.shapes)
    parts = ["gradverify", "check", case.op.file, "--op", case.op.name, "--shape", shapes,
             "--dtype", case.dtype, "--device", case.device, "--seed", str(case.seed)]
    if case.domain_override:
        parts += ["--domain", case.domain_override]
    return " ".join(shlex.quote(p) for p in parts)


def _user_error_check(name: str, exc: UserCodeError, spec_file: str) -> CheckResult:
    file, line = user_frame(exc.original, prefer=spec_file)
    where = f" at {file}:{line}" if file else ""
    message = f"{exc.phase} raised {type(exc.original).__name__}: {exc.original}{where}"
    return CheckResult(name=name, status=Status.ERROR, message=message,
                       diagnoses=(Diagnosis("backward_error", message,
                                            hint="fix the exception; the other cases still ran"),))


def output_names(run: ForwardRun) -> dict[int, str]:
    if len(run.outputs) == 1:
        return {0: "out"}
    return {k: f"out{k}" for k in range(len(run.outputs))}


@dataclass
class Truth:
    primary: dict[tuple[int, int], torch.Tensor]
    primary_bars: dict[tuple[int, int], torch.Tensor] | None
    secondary: dict[tuple[int, int], torch.Tensor] | None
    secondary_bars: dict[tuple[int, int], torch.Tensor] | None
    kinks: dict[tuple[int, int], torch.Tensor] | None
    description: str
    notes: list[str]


def _evaluation_candidates(case: Case, values64: list[Any]) -> list[tuple[str, list[Any]]]:
    """Where to compute the truth: float64 on cpu if the op accepts it, else closer to the case."""
    def cast(dtype: torch.dtype, device: str) -> list[Any]:
        return [v.to(dtype).to(device) if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
                else (v.to(device) if isinstance(v, torch.Tensor) else v) for v in values64]

    is_complex = getattr(torch, case.dtype).is_complex
    high = torch.complex128 if is_complex else torch.float64
    options = [("float64 on cpu", cast(high, "cpu"))]
    if case.device != "cpu":
        options.append((f"float64 on {case.device}", cast(high, case.device)))
    if case.dtype not in ("float64", "complex128"):
        options.append((f"{case.dtype} on {case.device}", cast(getattr(torch, case.dtype), case.device)))
    return options


def build_truth(case: Case, values64: list[Any], diff_positions: Sequence[int], out_positions: Sequence[int],
                settings: Settings) -> Truth:
    """Numerical Jacobian always; the reference (autograd through forward) only once it agrees
    with finite differences along random directions. Raises UserCodeError if forward cannot run."""
    function = case.op.function
    notes: list[str] = []
    last_error: UserCodeError | None = None
    numerical: NumericalJacobian | None = None
    where = ""
    chosen: list[Any] = []
    for label, candidate in _evaluation_candidates(case, values64):
        evaluate = make_evaluator(function, out_positions)
        try:
            numerical = numerical_jacobian(evaluate, candidate, diff_positions, out_positions)
        except UserCodeError as exc:
            last_error = exc
            continue
        where, chosen = label, candidate
        break
    if numerical is None:
        assert last_error is not None
        raise last_error
    if where != "float64 on cpu":
        notes.append(f"finite differences computed in {where} (the op rejected float64 on cpu)")

    reference = reference_jacobian(function, chosen, diff_positions, out_positions,
                                   reference=case.op.reference, max_bytes=settings.max_memory)
    trusted, why = _validate_reference(reference, make_evaluator(function, out_positions), chosen,
                                       diff_positions, out_positions, case.seed)
    source = "declared reference" if case.op.reference is not None else "autograd through the forward body"
    if trusted:
        return Truth(primary=reference.blocks or {}, primary_bars=None, secondary=numerical.blocks,
                     secondary_bars=numerical.error_bars, kinks=numerical.kinks,
                     description=f"{source}, cross-checked entry by entry with finite differences ({where})",
                     notes=notes)
    notes.append(f"reference not used: {why}")
    return Truth(primary=numerical.blocks, primary_bars=numerical.error_bars, secondary=None, secondary_bars=None,
                 kinks=numerical.kinks, description=f"finite differences (Richardson, {where})", notes=notes)


# Directions used to decide whether the reference Jacobian can be trusted. Three random
# Gaussian directions: a reference that is wrong anywhere (a detach, an integer op) is caught
# by any of them with probability 1; more would only cost forward calls.
REFERENCE_PROBES = 3


def _validate_reference(reference: ReferenceJacobian, evaluate: Callable[[list[Any]], tuple[torch.Tensor, ...]],
                        args: list[Any], diff_positions: Sequence[int], out_positions: Sequence[int],
                        seed: int) -> tuple[bool, str]:
    if reference.blocks is None:
        return False, reference.reason
    gen = torch.Generator().manual_seed(seed + 7)
    for _ in range(REFERENCE_PROBES):
        directions = {p: torch.randn(args[p].shape, generator=gen, dtype=torch.float64).to(args[p].dtype)
                      .to(args[p].device) for p in diff_positions}
        try:
            estimates, bars = directional_derivatives(evaluate, args, directions)
        except UserCodeError:
            return False, "forward failed along a probe direction"
        for k, o in enumerate(out_positions):
            jv = torch.zeros_like(estimates[k])
            for p in diff_positions:
                block = reference.blocks[(o, p)]
                in_dims = directions[p].dim()
                jv = jv + torch.tensordot(block, directions[p], dims=in_dims) if in_dims else jv + block * directions[p]
            diff = (jv - estimates[k]).abs()
            scale = max(1.0, float(estimates[k].abs().max()) if estimates[k].numel() else 1.0)
            # 1e-6 relative is ~1e6 times the Richardson error in float64 and far below any real
            # disagreement (a zero reference, a missing term); the error bar covers rough spots.
            limit = 1e-6 * scale + bars[k]
            if bool((diff > limit).any()):
                if float(jv.abs().max()) == 0.0 and float(estimates[k].abs().max()) > 0:
                    return False, ("autograd through the forward body gives zero where finite differences "
                                   "do not (it detaches, runs under no_grad, or goes through integer ops)")
                return False, (f"autograd through the forward body disagrees with finite differences along a "
                               f"random direction (max difference {float(diff.max()):.3g})")
    return True, ""


def _jacobian_check(case: Case, analytic: dict[tuple[int, int], torch.Tensor], truth: Truth,
                    names: dict[int, str], input_names: Sequence[str], settings: Settings,
                    path: str, fallback_reason: str) -> CheckResult:
    tolerance = tolerance_for(case.dtype, settings.atol if settings.atol is not None else case.op.atol,
                              settings.rtol if settings.rtol is not None else case.op.rtol)
    blocks: list[BlockComparison] = []
    for (o, p), a in analytic.items():
        t = truth.primary[(o, p)]
        blocks.append(compare_block(
            o, p, names[o], input_names[p], t.dim() - case_dim(case, p),
            a, t, truth.primary_bars[(o, p)] if truth.primary_bars else None, tolerance,
            secondary=truth.secondary[(o, p)] if truth.secondary else None,
            secondary_bars=truth.secondary_bars[(o, p)] if truth.secondary_bars else None,
            kinks=truth.kinks[(o, p)] if truth.kinks else None))
    mismatches: list[Mismatch] = []
    total_bad = 0
    for block in blocks:
        found, count = mismatches_of(block, settings.mismatch_cap)
        mismatches.extend(found)
        total_bad += count
    mismatches.sort(key=lambda m: -m.abs_err if m.abs_err == m.abs_err else float("-inf"))
    mismatches = mismatches[: settings.mismatch_cap]
    diagnoses = diagnose(blocks)
    excused = sum(int(b.excused.sum()) for b in blocks)
    total = sum(b.truth.numel() for b in blocks)
    max_err = max((b.max_abs_err for b in blocks), default=0.0)
    heatmaps = tuple(heatmap_of(b) for b in blocks if b.mismatch_count)
    details = [("analytic", f"{path}" + (f" (vmap fallback: {fallback_reason})" if fallback_reason else "")),
               ("truth", truth.description),
               ("tolerance", f"atol {tolerance.atol:g} x block scale + rtol {tolerance.rtol:g} x |truth|"
                             " + the truth's error bar")]
    notes = list(truth.notes)
    if excused:
        kinks = sum(int((b.excused & b.kinks).sum()) for b in blocks)
        text = (f"{excused} entr{'y' if excused == 1 else 'ies'} not judged: the reference and finite "
                "differences disagree there" + (" (input near a non-differentiable point)" if kinks else ""))
        notes.append(text)
        if total_bad == 0:
            diagnoses.append(Diagnosis("nondifferentiable_point", f"input near a non-differentiable point: {text}",
                                       hint="re-run with another --seed or a --domain away from kinks"))
    for note in notes:
        details.append(("note", note))
    status = Status.FAILED if total_bad else Status.PASSED
    if total_bad:
        message = f"{total_bad} / {total} Jacobian entries mismatched"
    else:
        message = f"all {total} Jacobian entries match"
    return CheckResult(name="jacobian", status=status, message=message, max_abs_err=max_err,
                       mismatch_count=total_bad, total_entries=total, mismatches=tuple(mismatches),
                       diagnoses=tuple(diagnoses), heatmaps=heatmaps, details=tuple(details))


def case_dim(case: Case, position: int) -> int:
    param = case.inputs[position]
    return len(param.shape or ())


def _apply_expectations(case: Case, checks: list[CheckResult]) -> tuple[list[CheckResult], list[str]]:
    """A declared surrogate or known failure turns failed Jacobian checks into expected ones."""
    reason = case.op.surrogate or case.op.expect_failure
    if not reason:
        return checks, []
    adjusted: list[CheckResult] = []
    failed_any = False
    for check in checks:
        if check.name in ("jacobian", "gradcheck") and check.status is Status.FAILED:
            failed_any = True
            adjusted.append(CheckResult(**{**check.__dict__, "status": Status.XFAIL,
                                           "message": f"{check.message} (expected: {reason})"}))
        else:
            adjusted.append(check)
    notes = []
    if not failed_any:
        adjusted = [CheckResult(**{**c.__dict__, "status": Status.XPASS,
                                   "message": f"{c.message} (declared '{reason}' but it matched)"})
                    if c.name == "jacobian" and c.status is Status.PASSED else c for c in adjusted]
        notes.append(f"declared '{reason}', but the backward matched the derivative")
    return adjusted, notes


def run_case(case: Case, settings: Settings, values: list[Any] | None = None) -> CaseResult:
    input_names = tuple(p.name for p in case.inputs)
    base = dict(op=case.op.name, file=case.op.file, line=case.op.line, shapes=case.shapes, dtype=case.dtype,
                device=case.device, seed=case.seed, domain=case.domain_label, repro=repro_command(case),
                input_names=tuple(p.name for p in case.tensor_inputs), backward_line=case.op.backward_line)
    unavailable = device_unavailable(case.device)
    if unavailable:
        status = Status.FAILED if settings.require_device else Status.SKIPPED
        return CaseResult(**base, status=status, message=f"skipped: {unavailable}" if status is Status.SKIPPED
                          else f"required device unavailable: {unavailable}")
    notes: list[str] = []
    if case.shape_source == "default":
        notes.append("no shape given on the command line or in the spec: used the default shape "
                     + ";".join(",".join(map(str, s)) for s in case.shapes))
    values64 = values if values is not None else input_values(case)
    dtype = getattr(torch, case.dtype)
    args: list[Any] = []
    diff_positions: list[int] = []
    for pos, (param, value) in enumerate(zip(case.inputs, values64)):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                args.append(value.detach().to(dtype).to(case.device))
                if param.is_tensor and param.requires_grad:
                    diff_positions.append(pos)
            else:
                args.append(value.detach().to(case.device))
        else:
            args.append(value)
    checks: list[CheckResult] = []
    function = case.op.function
    try:
        run = run_forward(function, args, diff_positions)
    except UserCodeError as exc:
        checks.append(_user_error_check("forward", exc, case.op.file))
        return _finish(case, base, checks, notes, settings)
    checks.append(inplace_contract(run, args, input_names))
    if not diff_positions:
        notes.append("no input needs grad: nothing to differentiate")
        return _finish(case, base, checks, notes, settings)
    if not run.diff_outputs:
        checks.append(CheckResult(name="jacobian", status=Status.FAILED,
                                  message="no output of forward is differentiable (all are integer, detached "
                                          "or marked non-differentiable)",
                                  diagnoses=(Diagnosis("zero_grad", "forward returns no differentiable output"),)))
        return _finish(case, base, checks, notes, settings)
    tolerance = tolerance_for(case.dtype, settings.atol, settings.rtol)
    contract_checks = gradient_contracts(function, run, args, input_names, tolerance, seed=case.seed,
                                         nondet_tol=settings.nondet_tol)
    for check in contract_checks:
        if check.status is Status.ERROR and check.name == "backward":
            check = _backward_error_with_location(check, function, run, case)
        checks.append(check)
    blocking = any(c.status is Status.ERROR or (c.name == "grad_count" and c.status is Status.FAILED)
                   for c in checks)
    if blocking:
        return _finish(case, base, checks, notes, settings)
    try:
        analytic = analytic_jacobian(run, max_bytes=settings.max_memory, seed=case.seed)
    except UserCodeError as exc:
        checks.append(_user_error_check("jacobian", exc, case.op.file))
        return _finish(case, base, checks, notes, settings)
    out_positions = [o for o, _ in run.diff_outputs]
    try:
        truth = build_truth(case, values64, diff_positions, out_positions, settings)
    except UserCodeError as exc:
        checks.append(_user_error_check("jacobian", exc, case.op.file))
        return _finish(case, base, checks, notes, settings)
    checks.append(_jacobian_check(case, analytic.blocks, truth, output_names(run), input_names, settings,
                                  analytic.path, analytic.fallback_reason))
    checks.append(run_gradcheck(function, args, diff_positions, mode=settings.gradcheck, dtype=case.dtype,
                                seed=case.seed, nondet_tol=settings.nondet_tol))
    return _finish(case, base, checks, notes, settings)


def _backward_error_with_location(check: CheckResult, function: type, run: ForwardRun, case: Case) -> CheckResult:
    # Re-raise through the engine path to get the user's frame for the message.
    from gradverify.contracts import _grad_outputs, call_backward

    call = call_backward(function, run, _grad_outputs(run, torch.Generator().manual_seed(case.seed)))
    if call.error is None:
        return check
    return _user_error_check("backward", UserCodeError("backward", call.error), case.op.file)


def _finish(case: Case, base: dict[str, Any], checks: list[CheckResult], notes: list[str],
            settings: Settings) -> CaseResult:
    checks, expectation_notes = _apply_expectations(case, checks)
    status = worst_status([c.status for c in checks])
    failing = [c for c in checks if not c.ok]
    message = "; ".join(c.message for c in failing[:2]) if failing else ""
    return CaseResult(**base, status=status, checks=tuple(checks), message=message,
                      notes=tuple(notes + expectation_notes))
