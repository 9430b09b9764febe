"""Contracts: structural checks of a backward, each cheap and each with a precise message.

Where the op's backward can be reached directly (a Function's, a custom op's registered one),
it is called on the real ctx, which shows what it returns *before* the autograd engine
validates, sums or casts it: the engine silently reduces a gradient of a broadcast shape and
casts a float32 gradient to a float64 input, so gradcheck never sees those. Those two are
warnings (the engine repairs them; they cost memory or precision), wrong shapes the engine
would reject and None gradients for inputs that need one are failures. For every other op
(a callable) linearity and determinism are checked through the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.nondeterminism import measure_spread, selected_in
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.usercode import UserCodeError, user_code

NAME = "contracts"


@dataclass
class _Finding:
    contract: str
    diagnosis: Diagnosis

    @property
    def failing(self) -> bool:
        return self.diagnosis.severity is Severity.ERROR


def random_grad_outputs(outputs: Sequence[Any], gen: torch.Generator) -> list[Any]:
    """Random Gaussian grad_outputs (never ones: J^T @ ones hides whole classes of bugs)."""
    grads: list[Any] = []
    for out in outputs:
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            if out.is_complex():
                g = torch.complex(g, torch.randn(out.shape, generator=gen, dtype=torch.float64))
            grads.append(g.to(out.dtype).to(out.device))
        elif isinstance(out, torch.Tensor):
            grads.append(torch.zeros_like(out))
        else:
            grads.append(None)
    return grads


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128) copy: differences of low-precision values computed exactly."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def engine_reducible(grad_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> list[int] | None:
    """The dims the engine sums a broadcast gradient over to get `input_shape` (None if it
    rejects the gradient): it accepts any grad shape the input's shape expands to."""
    try:
        if tuple(torch.broadcast_shapes(input_shape, grad_shape)) != tuple(grad_shape):
            return None
    except RuntimeError:
        return None
    lead = len(grad_shape) - len(input_shape)
    dims = list(range(lead))
    dims += [lead + k for k, size in enumerate(input_shape) if size == 1 and grad_shape[lead + k] != 1]
    return dims


def _size(numel: int, itemsize: int) -> str:
    n = numel * itemsize
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


class ContractsCheck:
    name = NAME
    default = True
    description = ("one gradient per input with its shape/dtype/device, finite values, linear in grad_output, "
                   "deterministic, grad_output untouched, forward leaves inputs alone unless ctx.mark_dirty")

    def applies(self, ctx: CaseContext) -> str | None:
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        findings: list[_Finding] = []
        passed: list[str] = []
        inplace = _inplace(ctx)
        (findings.append(inplace) if inplace else passed.append("inplace"))
        if not ctx.diff_positions or not ctx.run.diff_outputs:
            return [_result(findings, passed)]
        gen = torch.Generator().manual_seed(ctx.case.seed + 101)
        g1 = random_grad_outputs(ctx.run.outputs, gen)
        g2 = random_grad_outputs(ctx.run.outputs, gen)
        n_positional = ctx.signature.n_positional
        raw = ctx.op.raw_backward(ctx.run.outputs, n_positional)
        if raw is not None:
            try:
                first, was_list, wrote = _call_raw(raw, g1)
            except UserCodeError as exc:
                return [ctx.user_error(NAME, exc)]
            stop = _structure(ctx, first, was_list, wrote, findings, passed)
            if stop:
                return [_result(findings, passed)]
            call = lambda g: _call_raw(raw, g)[0]  # noqa: E731
        else:
            call = lambda g: _call_engine(ctx, g)  # noqa: E731
            try:
                first = call(g1)
            except UserCodeError as exc:
                return [ctx.user_error(NAME, exc)]
        try:
            _finite(ctx, first, findings, passed)
            _determinism(ctx, first, call(g1), findings, passed)
            # Linearity compares three calls: on a backward whose calls differ beyond the
            # tolerance it would only measure that difference again, under the wrong name.
            if not any(f.contract == "determinism" for f in findings):
                _linearity(ctx, first, call(g2), call(_combine(g1, g2)), findings, passed)
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        return [_result(findings, passed)]


ALPHA, BETA = 0.7, -1.3


def _combine(g1: list[Any], g2: list[Any]) -> list[Any]:
    return [ALPHA * x + BETA * y if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
            else x for x, y in zip(g1, g2)]


def _call_raw(raw: Any, grads: list[Any]) -> tuple[tuple[Any, ...], bool, bool]:
    # Copies: a backward that writes into grad_output must not change our probes.
    copies = [g.clone() if isinstance(g, torch.Tensor) else g for g in grads]
    with user_code("backward"), torch.no_grad():
        returned, was_list = raw(copies)
    wrote = any(isinstance(c, torch.Tensor) and not torch.equal(c, g) for c, g in zip(copies, grads)
                if isinstance(g, torch.Tensor) and not g.is_complex() and bool(torch.isfinite(g).all()))
    return returned, was_list, wrote


def _call_engine(ctx: CaseContext, grads: list[Any]) -> tuple[Any, ...]:
    """Gradients through the autograd engine, laid out like a raw backward (None where unused)."""
    run = ctx.run
    outs = [o for _, o in run.diff_outputs]
    gouts = [grads[i].clone() for i, _ in run.diff_outputs]
    leaves = [leaf for _, leaf in run.leaves]
    with user_code("backward"):
        result = torch.autograd.grad(outs, leaves, gouts, retain_graph=True, allow_unused=True)
    by_pos = {p: g for (p, _), g in zip(run.leaves, result)}
    return tuple(by_pos.get(pos) for pos in range(len(ctx.case.inputs)) if not ctx.case.inputs[pos].keyword)


def _positional(ctx: CaseContext) -> list[int]:
    return [pos for pos, p in enumerate(ctx.case.inputs) if not p.keyword]


def _structure(ctx: CaseContext, grads: tuple[Any, ...], was_list: bool, wrote: bool, findings: list[_Finding],
               passed: list[str]) -> bool:
    """Count, list-ness, grad_output writes, and per-gradient shape/dtype/device. True: stop here."""
    positional = _positional(ctx)
    n_inputs = len(positional)
    names = [ctx.input_names[p] for p in positional]
    extra = grads[n_inputs:]
    if len(grads) < n_inputs or any(g is not None for g in extra):
        message = (f"backward returned {len(grads)} gradient{'s' if len(grads) != 1 else ''}, "
                   f"forward takes {n_inputs} input{'s' if n_inputs != 1 else ''} ({', '.join(names)}): "
                   "return one per input, None for those without grad")
        findings.append(_Finding("grad_count", Diagnosis("shape_mismatch", message)))
        return True
    if was_list:
        message = "backward returned a list: torch accepts a tuple (or a single tensor), and raises on a list"
        findings.append(_Finding("grad_count", Diagnosis("shape_mismatch", message,
                                                         hint="return tuple(grads) or the gradients separated "
                                                              "by commas")))
        return True
    passed.append("grad_count")
    if wrote:
        message = ("backward modified grad_output in place: autograd may share that tensor with other branches "
                   "of the graph, whose gradients then change too")
        findings.append(_Finding("grad_output_inplace", Diagnosis("grad_output_inplace", message,
                                                                  hint="compute out of place (g * 3, not g.mul_(3))")))
    else:
        passed.append("grad_output_inplace")
    diff = set(ctx.diff_positions)
    before = len(findings)
    # Gradients computed for inputs that need none, while one that needs a gradient gets None:
    # the ctx.needs_input_grad guards test the wrong indices.
    extra_grads = [ctx.input_names[pos] for k, pos in enumerate(positional)
                   if pos not in diff and isinstance(ctx.run.args[pos], torch.Tensor)
                   and (ctx.run.args[pos].is_floating_point() or ctx.run.args[pos].is_complex())
                   and k < len(grads) and grads[k] is not None]
    for k, pos in enumerate(positional):
        if pos not in diff:
            continue
        grad, arg, name = grads[k], ctx.run.args[pos], ctx.input_names[pos]
        if grad is None:
            if extra_grads:
                findings.append(_Finding("grad_meta", Diagnosis(
                    "needs_input_grad",
                    f"backward returned None for {name}, which needs grad, and a gradient for "
                    f"{', '.join(extra_grads)}, which needs none: the ctx.needs_input_grad guards test the wrong "
                    "indices", input=name,
                    hint="each `if ctx.needs_input_grad[i]` must guard the gradient of forward's i-th input")))
                continue
            findings.append(_Finding("grad_meta", Diagnosis(
                "none_grad", f"backward returned None for {name}, which needs grad: its gradient is silently zero",
                input=name, hint=f"return the gradient of the loss w.r.t. {name}")))
            continue
        if not isinstance(grad, torch.Tensor):
            findings.append(_Finding("grad_meta", Diagnosis(
                "shape_mismatch", f"gradient for {name} is a {type(grad).__name__}, not a tensor", input=name)))
            continue
        if tuple(grad.shape) != tuple(arg.shape):
            dims = engine_reducible(tuple(grad.shape), tuple(arg.shape))
            if dims is not None:
                dim_text = ", ".join(map(str, dims))
                waste = _size(grad.numel(), grad.element_size())
                findings.append(_Finding("grad_meta", Diagnosis(
                    "engine_reduced",
                    f"gradient for {name} has shape {tuple(grad.shape)} but {name} has shape {tuple(arg.shape)}: "
                    f"the autograd engine sums it over dim{'s' if len(dims) > 1 else ''} {dim_text} to fit, as for a "
                    f"broadcast input, at the cost of a {waste} gradient per call (the jacobian check judges the "
                    "summed gradient)",
                    input=name, severity=Severity.WARNING,
                    hint=f"sum it yourself: .sum({', '.join(map(str, dims))}"
                         f"{', keepdim=True' if grad.dim() == arg.dim() else ''})"
                         f"{'.reshape(' + str(tuple(arg.shape)) + ')' if grad.dim() != arg.dim() else ''}")))
            else:
                findings.append(_Finding("grad_meta", Diagnosis(
                    "shape_mismatch",
                    f"gradient for {name} has shape {tuple(grad.shape)} but {name} has shape {tuple(arg.shape)} "
                    "(the engine rejects it)", input=name, hint=f"return a tensor of shape {tuple(arg.shape)}")))
                continue
        if grad.dtype != arg.dtype:
            got, want = str(grad.dtype).removeprefix("torch."), str(arg.dtype).removeprefix("torch.")
            lower = grad.is_floating_point() and arg.is_floating_point() and grad.element_size() < arg.element_size()
            if lower:
                # The engine casts back, but the values keep the lower precision: every later
                # check judges them at that dtype's tolerance (the warning says what it costs).
                ctx.judge_at_precision(got)
            findings.append(_Finding("grad_meta", Diagnosis(
                "engine_cast",
                f"gradient for {name} is {got} but {name} is {want}: the autograd engine casts it, so training "
                "works" + (f", with {got}'s precision" if lower else ""),
                input=name, severity=Severity.WARNING, hint=f"compute the gradient in {name}.dtype")))
        if grad.device != arg.device:
            findings.append(_Finding("grad_meta", Diagnosis(
                "device_mismatch", f"gradient for {name} is on {grad.device} but {name} is on {arg.device}",
                input=name)))
    if len(findings) == before:
        passed.append("grad_meta")
    return any(f.failing and f.contract == "grad_meta" and f.diagnosis.kind in ("shape_mismatch",)
               for f in findings[before:])


def _finite(ctx: CaseContext, grads: tuple[Any, ...], findings: list[_Finding], passed: list[str]) -> None:
    """Finite outputs and gradients on finite inputs."""
    inputs_finite = all(bool(torch.isfinite(a).all()) for a in ctx.args
                        if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex()))
    if not inputs_finite:
        passed.append("finite")
        return
    bad: list[str] = []
    for k, out in ctx.run.diff_outputs:
        mask = ~torch.isfinite(out.detach())
        if mask.any():
            where = [int(i) for i in torch.nonzero(mask)[0].tolist()]
            bad.append(f"{ctx.output_names[k]} has {int(mask.sum())} non-finite value(s), first at {where}")
    names = [ctx.input_names[p] for p in _positional(ctx)]
    for grad, name in zip(grads, names):
        if isinstance(grad, torch.Tensor) and (grad.is_floating_point() or grad.is_complex()):
            mask = ~torch.isfinite(grad)
            if mask.any():
                where = [int(i) for i in torch.nonzero(mask)[0].tolist()]
                bad.append(f"gradient for {name} has {int(mask.sum())} non-finite value(s), first at {name}{where}")
    if bad:
        message = "; ".join(bad) + " (on finite inputs)"
        domain_hint = ""
        if any("non-finite value(s)" in b and not b.startswith("gradient") for b in bad):
            domain_hint = "; the inputs may be outside the op's domain: try --domain positive (or another domain)"
        findings.append(_Finding("finite", Diagnosis("nonfinite", message + domain_hint,
                                                     hint="look for a division by zero or log/sqrt of 0")))
    else:
        passed.append("finite")


def _determinism(ctx: CaseContext, first: tuple[Any, ...], again: tuple[Any, ...], findings: list[_Finding],
                 passed: list[str]) -> None:
    """Two identical calls, judged as the nondeterminism check judges its repeats (one criterion:
    the spread against the case's tolerance plus --nondet-tol). The finding stays here as well,
    so that a Jacobian mismatch it explains is linked to it; the rounding-level note and the
    fuller verdict (more calls, torch.use_deterministic_algorithms) are that check's."""
    names = [ctx.input_names[p] for p in _positional(ctx)]
    spread = measure_spread([first, again], ctx.tolerance, ctx.settings.nondet_tol, names)
    if spread.beyond:
        message = (f"backward gave different results on two identical calls (max difference {spread.worst:.3g}, "
                   f"{spread.relative:.2g} of the gradient's scale, beyond the case's tolerance: more than a change "
                   "of summation order)")
        findings.append(_Finding("determinism", Diagnosis(
            "nondeterministic", message,
            hint="a backward that depends on state or randomness; pass --nondet-tol if this is expected")))
        return
    if spread.worst and not selected_in(ctx.settings):
        ctx.notes.append(f"two identical backward calls differ at rounding level ({spread.relative:.2g} of the "
                         "gradient's scale): nondeterministic summation order, not a wrong gradient")
    passed.append("determinism")


def _linearity(ctx: CaseContext, first: tuple[Any, ...], second: tuple[Any, ...], mixed: tuple[Any, ...],
               findings: list[_Finding], passed: list[str]) -> None:
    """B(a g1 + b g2) == a B(g1) + b B(g2) for random a, b, g1, g2."""
    worst = 0.0
    dtype = torch.float64
    for ga, gb, gc in zip(first, second, mixed):
        if isinstance(ga, torch.Tensor) and isinstance(gb, torch.Tensor) and isinstance(gc, torch.Tensor) \
                and ga.shape == gb.shape == gc.shape:
            expected = ALPHA * _wide(ga) + BETA * _wide(gb)
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            scale = max(scale, float(_wide(ga).abs().max()), float(_wide(gb).abs().max())) if ga.numel() else 0.0
            if scale > 0:
                worst = max(worst, float((_wide(gc) - expected).abs().max()) / scale)
            dtype = ga.real.dtype if ga.is_complex() else ga.dtype
    # Both sides are the same linear map up to rounding; sqrt(eps) of the gradients' dtype
    # (1.5e-8 in float64, 3.5e-4 in float32) is far above the few roundings that adds and far
    # below the O(1) error of a backward that ignores or squares grad_output.
    limit = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps ** 0.5
    # A float64 backward that computes part of its work in float32 is linear only to float32
    # rounding (~1e-7 relative): far below the O(1) error of ignoring grad_output, and a matter
    # of precision, which the Jacobian judges entry by entry. Said as a warning, never as the
    # cause of a Jacobian mismatch.
    low_precision = torch.finfo(torch.float32).eps ** 0.5
    if limit < worst <= low_precision and limit < low_precision:
        findings.append(_Finding("linearity", Diagnosis(
            "precision",
            f"backward is linear in grad_output only to {worst:.2g} relative, about float32 rounding in a "
            f"{str(dtype).removeprefix('torch.')} backward: part of it computes in a lower precision",
            severity=Severity.WARNING,
            hint="look for a .float(), a float32 buffer or a float32 kernel inside the backward")))
    elif worst > limit:
        message = (f"backward is not linear in grad_output (relative error {worst:.3g}): it ignores grad_output, "
                   "uses ones, or transforms it non-linearly")
        findings.append(_Finding("linearity", Diagnosis(
            "ignores_grad_output", message,
            hint="multiply the local derivative by grad_output (the chain rule), never by ones")))
    else:
        passed.append("linearity")


def _inplace(ctx: CaseContext) -> _Finding | None:
    """Forward must not change its inputs unless it says so (ctx.mark_dirty, mutates_args)."""
    try:
        run = ctx.run
    except UserCodeError:
        raise
    saved_ptrs: set[int] = set()
    for out in run.outputs:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            try:
                saved_ptrs = {t.data_ptr() for t in out.grad_fn.saved_tensors if isinstance(t, torch.Tensor)}
            except (RuntimeError, AttributeError):
                saved_ptrs = set()
            break
    output_ids = {id(o) for o in run.outputs if isinstance(o, torch.Tensor)}
    declared = _declared_mutations(ctx)
    changed: list[str] = []
    for arg, before, name in zip(run.args, ctx.args, ctx.input_names):
        if not isinstance(arg, torch.Tensor) or not isinstance(before, torch.Tensor) or not arg.numel():
            continue
        if arg.shape == before.shape and torch.equal(arg.detach().cpu().to(before.dtype), before.cpu()):
            continue
        if id(arg) in output_ids or name in declared:
            continue  # returned as an output (mark_dirty), or declared in mutates_args
        saved = arg.data_ptr() in saved_ptrs
        how = "without ctx.mark_dirty" if ctx.op.kind == "Function" else "without declaring it in mutates_args"
        changed.append(f"forward modified {name} in place {how}"
                       + (f" and saved it for backward, so backward sees the modified values, not the original {name}"
                          if saved else ""))
    if not changed:
        return None
    message = "; ".join(changed)
    kind = "inplace_forward" if ctx.op.kind in ("Function", "callable") else "undeclared_mutation"
    return _Finding("inplace", Diagnosis(kind, message,
                                         hint="compute out-of-place (out = x / x.sum(dim, keepdim=True)) or call "
                                              "ctx.mark_dirty(x) and return x" if kind == "inplace_forward" else
                                         "declare it: mutates_args=(\"" + changed[0].split()[2] + "\",)"))


def _declared_mutations(ctx: CaseContext) -> set[str]:
    schema = getattr(ctx.op, "schema", None)
    if schema is None:
        return set()
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def _result(findings: list[_Finding], passed: list[str]) -> CheckResult:
    total = len(findings) + len(passed)
    failing = [f for f in findings if f.failing]
    warnings = [f for f in findings if not f.failing]
    details = tuple((name, "ok") for name in passed) + tuple((f.contract, f.diagnosis.message) for f in findings)
    if failing:
        names = sorted({f.contract for f in failing})
        return CheckResult(name=NAME, status=Status.FAILED, message="; ".join(f.diagnosis.message for f in failing),
                           summary="failed: " + ", ".join(names), diagnoses=tuple(f.diagnosis for f in findings),
                           details=details)
    if warnings:
        kinds = sorted({f.diagnosis.kind for f in warnings})
        return CheckResult(name=NAME, status=Status.WARNED, message="; ".join(f.diagnosis.message for f in warnings),
                           summary="warning: " + ", ".join(kinds), diagnoses=tuple(f.diagnosis for f in warnings),
                           details=details)
    return CheckResult(name=NAME, status=Status.PASSED, message=f"{total}/{total} contracts hold",
                       summary=f"{total}/{total} ok", details=details)
