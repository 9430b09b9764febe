"""One case end to end: inputs -> contracts -> Jacobians -> comparison -> diagnosis -> result.

Computation only: nothing here prints. A case never raises for the user's own code; an
exception in their forward or backward becomes a failing check that says where it happened.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from gradverify.cases import Case, case_settings, input_values
from gradverify.complex_view import complex_positions, real_view_case
from gradverify.forward_mode import defines_jvp
from gradverify.compare import (BlockComparison, all_mismatches, compare_block, heatmap_of,
                                tolerance_for)
from gradverify.config import Settings
from gradverify.contracts import gradient_contracts, inplace_contract
from gradverify.diagnose import diagnose
from gradverify.devices import device_checks
from gradverify.jacobian import (FiniteDifferences, ForwardRun, LazyBlocks, ReferenceJacobian, UserCodeError,
                                 VjpSource, analytic_jacobian, directional_derivatives, make_evaluator,
                                 reference_jacobian, run_forward)
from gradverify.streaming import cross_check_columns, fits_dense, stream_compare
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


def _user_error_check(name: str, exc: UserCodeError, spec_file: str, op: Any = None) -> CheckResult:
    file, line = user_frame(exc.original, prefer=spec_file)
    if op is not None and (file is None or "/torch/" in file.replace("\\", "/")):
        # Raised by torch about what the user's code returned (a list, a numpy array): point at
        # the user's Function instead of torch's internals.
        file = op.file
        line = op.backward_line if exc.phase != "forward" else op.line
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
    # Streaming / projected checks (issue 6): the trusted reference as a row source, and finite
    # differences on demand (only the columns a check needs). `primary` stays a Block mapping
    # (lazy when the reference is trusted) for the checks that need whole blocks.
    reference_source: VjpSource | None = None
    fd: FiniteDifferences | None = None


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
    """The reference (autograd through forward) once it agrees with finite differences along
    random directions; finite differences as the second truth, computed on demand (batched) only
    where a check needs them. Without a trusted reference, the whole numerical Jacobian (when it
    fits the memory budget). Raises UserCodeError if forward cannot run."""
    function = case.op.function
    notes: list[str] = []
    last_error: UserCodeError | None = None
    fd: FiniteDifferences | None = None
    where = ""
    chosen: list[Any] = []
    for label, candidate in _evaluation_candidates(case, values64):
        evaluate = make_evaluator(function, out_positions)
        try:
            fd = FiniteDifferences(function, evaluate, candidate, diff_positions, out_positions,
                                   max_bytes=settings.max_memory, seed=case.seed)
        except UserCodeError as exc:
            last_error = exc
            continue
        where, chosen = label, candidate
        break
    if fd is None:
        assert last_error is not None
        raise last_error
    if where != "float64 on cpu":
        notes.append(f"finite differences computed in {where} (the op rejected float64 on cpu)")

    reference = reference_jacobian(function, chosen, diff_positions, out_positions,
                                   reference=case.op.reference, max_bytes=settings.max_memory)
    trusted, why = _validate_reference(reference, fd.evaluate, chosen, diff_positions, out_positions, case.seed)
    source = "declared reference" if case.op.reference is not None else "autograd through the forward body"
    if trusted:
        return Truth(primary=reference.blocks or {}, primary_bars=None, secondary=None, secondary_bars=None,
                     kinks=None,
                     description=f"{source}; finite differences ({where}) as the second truth wherever the "
                                 "backward disagrees with it",
                     notes=notes, reference_source=reference.source, fd=fd)
    notes.append(f"reference not used: {why}")
    entries = sum(int(fd.f0[k].numel()) for k in range(len(out_positions))) * \
        sum(int(chosen[p].numel()) for p in diff_positions)
    if not fits_dense(entries, 8, settings.max_memory) and settings.mode != "full":
        # Too large for a whole numerical Jacobian: the projected check uses finite differences
        # along probe directions instead (see _jacobian_check).
        return Truth(primary={}, primary_bars=None, secondary=None, secondary_bars=None, kinks=None,
                     description=f"finite differences (Richardson, {where}) along probe directions",
                     notes=notes, fd=fd)
    numerical = fd.jacobian()
    return Truth(primary=numerical.blocks, primary_bars=numerical.error_bars, secondary=None, secondary_bars=None,
                 kinks=numerical.kinks, description=f"finite differences (Richardson, {where}"
                 + (", batched" if numerical.path == "batched" else "") + ")", notes=notes, fd=fd)


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
        # J v without forming J (two backward passes) where the graph allows; else whole blocks.
        jvs = reference.source.jvp(directions) if reference.source is not None else None
        for k, o in enumerate(out_positions):
            if jvs is not None:
                jv = jvs[o].to(estimates[k].dtype).reshape(estimates[k].shape)
            else:
                jv = torch.zeros_like(estimates[k])
                try:
                    for p in diff_positions:
                        block = reference.blocks[(o, p)]
                        in_dims = directions[p].dim()
                        jv = jv + torch.tensordot(block, directions[p], dims=in_dims) if in_dims \
                            else jv + block * directions[p]
                except Exception as exc:
                    return False, f"autograd through the forward body failed ({type(exc).__name__})"
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


# --mode auto checks every entry up to this many Jacobian entries (16,384 x 16,384: a full check
# streams each entry a few times, ~10 s on a 2-core laptop) and uses projections beyond it.
AUTO_FULL_MAX_ENTRIES = 2**28

# Whole blocks are compared directly up to this working set (~130k entries); larger Jacobians are
# streamed first (measured 2-4x faster at 4M+ entries: whole blocks fall out of cache).
DENSE_FIRST_BYTES = 8 * 2**20


def _jacobian_check(case: Case, analytic: dict[tuple[int, int], torch.Tensor], truth: Truth,
                    names: dict[int, str], input_names: Sequence[str], settings: Settings,
                    path: str, fallback_reason: str) -> CheckResult:
    """Dispatch by --mode and size: dense full, streamed full, or projected (issue 6)."""
    try:
        return _jacobian_check_inner(case, analytic, truth, names, input_names, settings, path, fallback_reason)
    except UserCodeError as exc:  # the user's backward raised while rows were being computed
        return _user_error_check("jacobian", exc, case.op.file, case.op)


def _jacobian_check_inner(case: Case, analytic: dict[tuple[int, int], torch.Tensor], truth: Truth,
                          names: dict[int, str], input_names: Sequence[str], settings: Settings,
                          path: str, fallback_reason: str) -> CheckResult:
    tolerance = tolerance_for(case.dtype, settings.atol if settings.atol is not None else case.op.atol,
                              settings.rtol if settings.rtol is not None else case.op.rtol)
    source = analytic.source if isinstance(analytic, LazyBlocks) else None
    entries = 0
    if source is not None:
        entries = sum(int(out.numel()) for out in source.outputs.values()) * source.in_numel()
    mode = settings.mode
    if mode == "auto":
        mode = "full" if entries <= AUTO_FULL_MAX_ENTRIES else "fast"
    if source is not None and mode == "fast" and truth.reference_source is not None and truth.fd is not None:
        return _projected_check(case, source, truth, names, input_names, settings, tolerance)
    if source is not None and truth.reference_source is not None and truth.fd is not None \
            and not fits_dense(entries, 8, min(settings.max_memory, DENSE_FIRST_BYTES)):
        # Streaming is also the faster way through a large Jacobian (chunks stay in cache); the
        # dense path is only worth its memory for its richer diagnosis, so it runs afterwards,
        # when something failed and the blocks fit the budget.
        streamed = _streamed_check(case, source, truth, names, input_names, settings, tolerance)
        if streamed.status is Status.PASSED or not fits_dense(entries, 8, settings.max_memory):
            return streamed
    if not truth.primary:
        return CheckResult(name="jacobian", status=Status.ERROR,
                           message="not checked: the reference cannot be trusted and a numerical Jacobian of "
                                   f"{entries} entries exceeds --max-memory; re-run with --mode full or a "
                                   "larger --max-memory",
                           details=(("truth", truth.description),) + tuple(("note", n) for n in truth.notes))
    blocks: list[BlockComparison] = []
    out_ndims: dict[int, int] = {}
    for (o, p), a in analytic.items():
        t = truth.primary[(o, p)]
        out_ndims[o] = t.dim() - case_dim(case, p)
        blocks.append(compare_block(
            o, p, names[o], input_names[p], t.dim() - case_dim(case, p),
            a, t, truth.primary_bars[(o, p)] if truth.primary_bars else None, tolerance,
            secondary=truth.secondary[(o, p)] if truth.secondary else None,
            secondary_bars=truth.secondary_bars[(o, p)] if truth.secondary_bars else None,
            kinks=truth.kinks[(o, p)] if truth.kinks else None))
    differenced = 0
    if truth.reference_source is not None and truth.fd is not None and truth.secondary is None:
        # Never accuse on one truth alone: finite differences at the columns that disagree.
        blocks, differenced = cross_check_columns(blocks, analytic, truth.primary, truth.fd, tolerance, out_ndims)
    if source is not None:
        path, fallback_reason = source.path, source.fallback_reason
    mismatches, total_bad = all_mismatches(blocks, settings.mismatch_cap)
    diagnoses = diagnose(blocks)
    excused = sum(int(b.excused.sum()) for b in blocks)
    total = sum(b.truth.numel() for b in blocks)
    max_err = max((b.max_abs_err for b in blocks), default=0.0)
    heatmaps = tuple(heatmap_of(b) for b in blocks if b.mismatch_count)
    details = [("mode", "full: every entry, whole blocks in memory"),
               ("analytic", f"{path}" + (f" (vmap fallback: {fallback_reason})" if fallback_reason else "")),
               ("truth", truth.description),
               ("tolerance", f"atol {tolerance.atol:g} x block scale + rtol {tolerance.rtol:g} x |truth|"
                             " + the truth's error bar")]
    if truth.reference_source is not None and truth.fd is not None:
        details.append(("cross-check", _fd_detail(truth.fd, differenced)))
    kinks = sum(int((b.excused & b.kinks).sum()) for b in blocks)
    return _assemble(truth, details, excused, kinks, total_bad, total, max_err, mismatches, diagnoses, heatmaps)


def _fd_detail(fd: FiniteDifferences, columns: int) -> str:
    how = "batched (vmap over the forward body)" if fd.path == "batched" else \
        "plain forward calls" + (f" (vmap fallback: {fd.fallback_reason})" if fd.fallback_reason else "")
    return (f"finite differences at {columns} input column{'s' if columns != 1 else ''} holding a disagreement "
            f"with the reference, {how}; {fd.evaluations} forward evaluations")


def _assemble(truth: Truth, details: list[tuple[str, str]], excused: int, kinks: int, total_bad: int, total: int,
              max_err: float, mismatches: list[Mismatch], diagnoses: list[Diagnosis],
              heatmaps: tuple[Any, ...], extra_notes: Sequence[str] = ()) -> CheckResult:
    notes = list(truth.notes) + list(extra_notes)
    if excused:
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


def _streamed_check(case: Case, source: VjpSource, truth: Truth, names: dict[int, str],
                    input_names: Sequence[str], settings: Settings, tolerance: Any) -> CheckResult:
    """Every entry, in row chunks bounded by --max-memory (the Jacobian does not fit whole)."""
    assert truth.reference_source is not None and truth.fd is not None
    outcome = stream_compare(source, truth.reference_source, truth.fd, names, input_names, tolerance,
                             max_bytes=settings.max_memory, mismatch_cap=settings.mismatch_cap)
    details = [("mode", f"full: every entry, streamed in {outcome.chunks} row chunks "
                        f"({outcome.passes} pass{'es' if outcome.passes > 1 else ''}) within --max-memory "
                        f"{settings.max_memory / 2**20:.0f} MiB; only statistics and disagreeing entries kept"),
               ("analytic", source.path + (f" (vmap fallback: {source.fallback_reason})"
                                           if source.fallback_reason else "")),
               ("truth", truth.description),
               ("tolerance", f"atol {tolerance.atol:g} x block scale + rtol {tolerance.rtol:g} x |truth|"
                             " + the truth's error bar"),
               ("cross-check", _fd_detail(truth.fd, outcome.columns_differenced))]
    return _assemble(truth, details, outcome.excused, outcome.kinks_excused, outcome.mismatch_count, outcome.total,
                     outcome.max_abs_err, outcome.mismatches, outcome.diagnoses, outcome.heatmaps, outcome.notes)


def _projected_check(case: Case, source: VjpSource, truth: Truth, names: dict[int, str],
                     input_names: Sequence[str], settings: Settings, tolerance: Any) -> CheckResult:
    """Random signed projections with localisation (gradverify.projection)."""
    from gradverify.projection import projection_check

    assert truth.reference_source is not None and truth.fd is not None
    outcome, details = projection_check(source, truth.reference_source, truth.fd, names, input_names, tolerance,
                                        seed=case.seed, mismatch_cap=settings.mismatch_cap)
    details = details + [("analytic", source.path + (f" (vmap fallback: {source.fallback_reason})"
                                                     if source.fallback_reason else "")),
                         ("truth", truth.description)]
    result = _assemble(truth, details, outcome.excused, outcome.kinks_excused, outcome.mismatch_count,
                       outcome.total, outcome.max_abs_err, outcome.mismatches, outcome.diagnoses, outcome.heatmaps,
                       outcome.notes)
    if outcome.mismatch_count:
        lower_bound = any("lower bound" in n for n in outcome.notes)
        message = ("at least " if lower_bound else "") + \
            f"{outcome.mismatch_count} Jacobian entr{'y' if outcome.mismatch_count == 1 else 'ies'} " \
                  f"mismatched (localised from random projections of {outcome.total} entries)"
    else:
        message = f"{outcome.total} Jacobian entries checked by random projections: no error found"
    return replace(result, message=message)


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


def run_case_once(case: Case, settings: Settings, values: list[Any] | None = None) -> CaseResult:
    settings = case_settings(case, settings)
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
        checks.append(_user_error_check("forward", exc, case.op.file, case.op))
        return _finish(case, base, checks, notes, settings)
    checks.append(inplace_contract(run, args, input_names))
    if not diff_positions:
        # Never a silent pass: a case that differentiates nothing checked nothing.
        message = "not run: no floating-point tensor input requires grad (nothing to differentiate)"
        checks.append(CheckResult(name="jacobian", status=Status.SKIPPED, message=message))
        result = _finish(case, base, checks, notes, settings)
        return replace(result, status=Status.SKIPPED, message=message) if result.ok else result
    if not run.diff_outputs:
        checks.append(CheckResult(name="jacobian", status=Status.FAILED,
                                  message="no output of forward is differentiable (all are integer, detached "
                                          "or marked non-differentiable)",
                                  diagnoses=(Diagnosis("zero_grad", "forward returns no differentiable output"),)))
        return _finish(case, base, checks, notes, settings)
    contract_checks = gradient_contracts(function, run, args, input_names, seed=case.seed,
                                         nondet_tol=settings.nondet_tol)
    for check in contract_checks:
        if check.status is Status.ERROR and check.name == "backward":
            check = _backward_error_with_location(check, function, run, case)
        checks.append(check)
    blocking = any(c.status is Status.ERROR or (c.name == "grad_count" and c.status is Status.FAILED)
                   for c in checks)
    if blocking:
        return _finish(case, base, checks, notes, settings)
    # Complex tensors are checked through their real views (torch's Wirtinger convention): the
    # Jacobian machinery then only ever sees a real function of real inputs.
    positions = complex_positions(args)
    jac_case, jac_values, jac_args, jac_run = case, values64, args, run
    if positions:
        jac_case, jac_values, jac_args = real_view_case(case, values64, args, positions)
        notes.append("complex inputs checked through torch.view_as_real: an entry's last index is 0 for the "
                     "real part, 1 for the imaginary part")
        try:
            jac_run = run_forward(jac_case.op.function, jac_args, diff_positions)
        except UserCodeError as exc:
            checks.append(_user_error_check("forward", exc, case.op.file, case.op))
            return _finish(case, base, checks, notes, settings)
    try:
        analytic = analytic_jacobian(jac_run, max_bytes=settings.max_memory, seed=case.seed)
    except UserCodeError as exc:
        checks.append(_user_error_check("jacobian", exc, case.op.file, case.op))
        return _finish(case, base, checks, notes, settings)
    out_positions = [o for o, _ in jac_run.diff_outputs]
    try:
        truth = build_truth(jac_case, jac_values, diff_positions, out_positions, settings)
    except UserCodeError as exc:
        checks.append(_user_error_check("jacobian", exc, case.op.file, case.op))
        return _finish(case, base, checks, notes, settings)
    checks.append(_jacobian_check(jac_case, analytic.blocks, truth, output_names(jac_run), input_names, settings,
                                  analytic.path, analytic.fallback_reason))
    checks.append(run_gradcheck(function, args, diff_positions, mode=settings.gradcheck, dtype=case.dtype,
                                seed=case.seed, nondet_tol=settings.nondet_tol))
    checks = _explain_low_precision(jac_case, checks, jac_values, diff_positions, truth, input_names, settings,
                                    jac_run)
    checks = _discount_gradcheck_at_kinks(checks)
    if positions:
        if settings.order >= 2 or defines_jvp(function):
            notes.append("forward-mode and second-order checks are not run for complex inputs")
    else:
        checks.extend(further_checks(case, settings, run, args, values64, diff_positions, truth, input_names))
    checks.extend(device_checks(case, args, diff_positions, settings))
    return _finish(case, base, checks, notes, settings)


def _backward_error_with_location(check: CheckResult, function: type, run: ForwardRun, case: Case) -> CheckResult:
    # Re-raise through the engine path to get the user's frame for the message.
    from gradverify.contracts import _grad_outputs, call_backward

    call = call_backward(function, run, _grad_outputs(run, torch.Generator().manual_seed(case.seed)))
    if call.error is None:
        return check
    return _user_error_check("backward", UserCodeError("backward", call.error), case.op.file, case.op)


def _finish(case: Case, base: dict[str, Any], checks: list[CheckResult], notes: list[str],
            settings: Settings) -> CaseResult:
    checks = link_causes(checks)
    checks, expectation_notes = _apply_expectations(case, checks)
    status = worst_status([c.status for c in checks])
    failing = [c for c in checks if not c.ok]
    message = "; ".join(c.message for c in failing[:2]) if failing else ""
    return CaseResult(**base, status=status, checks=tuple(checks), message=message,
                      notes=tuple(notes + expectation_notes))


def run_case(case: Case, settings: Settings, values: list[Any] | None = None) -> CaseResult:
    """One case; when its inputs landed near a non-differentiable point, re-draw them
    (up to --retries times) rather than judge the op there."""
    result = run_case_once(case, settings, values)
    if values is not None:
        return result  # the caller's own inputs: nothing to re-draw
    tried = [case.seed]
    for attempt in range(1, settings.retries + 1):
        if not _near_kink(result):
            break
        retry_case = replace(case, seed=case.seed + attempt)
        retry = run_case_once(retry_case, settings)
        tried.append(retry_case.seed)
        note = (f"seed {tried[-2]} put an input near a non-differentiable point; inputs re-drawn with seed "
                f"{retry_case.seed}")
        result = replace(retry, notes=retry.notes + (note,))
    return result


def _near_kink(result: CaseResult) -> bool:
    return any(d.kind == "nondifferentiable_point" for c in result.checks for d in c.diagnoses)


# Which contract failure explains a Jacobian mismatch, and how to say so.
_CAUSES: dict[str, tuple[str, str]] = {
    "inplace": ("inplace_forward", "the Jacobian mismatch follows from the in-place forward: backward computes "
                                   "from saved values that forward had already overwritten"),
    "linearity": ("ignores_grad_output", "the Jacobian mismatch follows from a backward that is not linear in "
                                         "grad_output (it ignores it, or uses ones)"),
    "determinism": ("nondeterministic", "the Jacobian mismatch may follow from a non-deterministic backward"),
    "finite": ("nonfinite", "the Jacobian mismatch follows from non-finite values in forward or backward"),
}


def link_causes(checks: list[CheckResult]) -> list[CheckResult]:
    """When a failed contract explains the Jacobian mismatch, name that cause instead of a pattern
    that only describes its symptoms (a None gradient is the cause of an all-zero block)."""
    failed = {c.name: c for c in checks if c.status is Status.FAILED}
    none_inputs = {d.input for c in checks if c.name == "grad_meta" for d in c.diagnoses if d.kind == "none_grad"}
    linked: list[CheckResult] = []
    for check in checks:
        if check.name != "jacobian" or check.status is not Status.FAILED:
            linked.append(check)
            continue
        diagnoses = [d for d in check.diagnoses if not (d.kind == "zero_grad" and d.input in none_inputs)]
        for d in list(check.diagnoses):
            if d.kind == "zero_grad" and d.input in none_inputs:
                diagnoses.append(Diagnosis("none_grad", f"∂{d.output}/∂{d.input} is zero because backward returned "
                                                        f"None for {d.input}", output=d.output, input=d.input))
        for name, (kind, text) in _CAUSES.items():
            if name in failed and not any(d.kind == kind for d in diagnoses):
                diagnoses = [Diagnosis(kind, text, evidence="; ".join(d.message for d in diagnoses)[:300])]
                break
        linked.append(replace(check, diagnoses=tuple(diagnoses)))
    return linked


def _explain_low_precision(case: Case, checks: list[CheckResult], values64: list[Any], diff_positions: list[int],
                           truth: Truth, input_names: tuple[str, ...], settings: Settings,
                           run: ForwardRun) -> list[CheckResult]:
    """A low-precision case that fails: does the same backward pass in float64 at the same values?
    Then the formula is right and the failure is precision, beyond what the dtype's rounding explains."""
    if case.dtype in ("float64", "complex128"):
        return checks
    jac = next((c for c in checks if c.name == "jacobian"), None)
    if jac is None or jac.status is not Status.FAILED:
        return checks
    high = torch.complex128 if getattr(torch, case.dtype).is_complex else torch.float64
    args64 = [v.to(high).to(case.device) if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
              else v for v in values64]
    try:
        run64 = run_forward(case.op.function, args64, diff_positions)
        analytic64 = analytic_jacobian(run64, max_bytes=settings.max_memory, seed=case.seed)
    except Exception:
        return checks
    high_case = replace(case, dtype="float64")
    high_check = _jacobian_check(high_case, analytic64.blocks, truth, output_names(run64), input_names, settings,
                                 analytic64.path, analytic64.fallback_reason)
    if high_check.status is not Status.PASSED:
        return checks
    tolerance = tolerance_for(case.dtype, settings.atol, settings.rtol)
    message = (f"precision: the backward is right in float64 (all {high_check.total_entries} entries match at "
               f"the same input values) but in {case.dtype} {jac.mismatch_count} entries are off by up to "
               f"{jac.max_abs_err:.3g}, beyond {case.dtype} rounding (rtol {tolerance.rtol:g})")
    diagnosis = Diagnosis("precision", message,
                          hint="look for cancellation (a - b of nearly equal values), 1/x**2 on large values, or "
                               "sums of many terms; compute in a higher precision or reformulate")
    return [replace(c, diagnoses=(diagnosis,)) if c is jac else c for c in checks]


def further_checks(case: Case, settings: Settings, run: ForwardRun, args: list[Any], values64: list[Any],
                   diff_positions: list[int], truth: Truth, input_names: tuple[str, ...]) -> list[CheckResult]:
    """Forward mode (when the Function defines jvp) and second order (with --order 2)."""
    from gradverify.forward_mode import defines_jvp, forward_mode_check
    from gradverify.higher_order import run_gradgradcheck, second_order_check

    extra: list[CheckResult] = []
    function = case.op.function
    out_positions = [o for o, _ in run.diff_outputs]
    if settings.forward_ad and defines_jvp(function):
        extra.append(forward_mode_check(function, args, diff_positions, out_positions, truth.primary,
                                        truth.primary_bars, output_names(run), input_names, dtype=case.dtype,
                                        mismatch_cap=settings.mismatch_cap, atol=settings.atol, rtol=settings.rtol))
    if settings.order >= 2:
        values = [v.to(args[k].dtype if isinstance(args[k], torch.Tensor) and args[k].is_complex() else torch.float64)
                  if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) else v
                  for k, v in enumerate(values64)]
        extra.append(second_order_check(function, args, values, diff_positions, input_names, dtype=case.dtype,
                                        seed=case.seed, max_bytes=settings.max_memory,
                                        mismatch_cap=settings.mismatch_cap, atol=settings.atol, rtol=settings.rtol))
        if settings.gradcheck != "off":
            extra.append(run_gradgradcheck(function, args, diff_positions, dtype=case.dtype, seed=case.seed))
    return extra


def _discount_gradcheck_at_kinks(checks: list[CheckResult]) -> list[CheckResult]:
    """gradcheck's plain finite differences straddle a kink and disagree with any subgradient; when
    our own check found the input near one, its failure there is not evidence against the op."""
    at_kink = any(d.kind == "nondifferentiable_point" for c in checks if c.name == "jacobian" for d in c.diagnoses)
    if not at_kink:
        return checks
    return [replace(c, status=Status.SKIPPED,
                    message=f"not judged: the input is near a non-differentiable point ({c.message})")
            if c.name == "gradcheck" and c.status is Status.FAILED else c for c in checks]
