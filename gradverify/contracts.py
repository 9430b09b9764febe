"""Structural checks of a backward, made by calling it directly on the real ctx.

Calling `Function.backward(grad_fn, *grad_outputs)` ourselves shows what the backward returns
*before* the autograd engine validates, sums or casts it: the engine silently reduces a
gradient of a broadcast shape and casts a float32 gradient to a float64 input, so gradcheck
never sees those mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gradverify.jacobian import ForwardRun, as_tuple
from gradverify.report import CheckResult, Diagnosis, Status


@dataclass
class BackwardCall:
    grads: tuple[Any, ...] | None
    error: BaseException | None = None
    returned_list: bool = False
    wrote_grad_output: bool = False


def _grad_outputs(run: ForwardRun, gen: torch.Generator, scale: float = 1.0) -> list[Any]:
    """Random Gaussian grad_outputs (never ones: J^T @ ones hides whole classes of bugs)."""
    grads: list[Any] = []
    for out in run.outputs:
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            if out.is_complex():
                g = torch.complex(g, torch.randn(out.shape, generator=gen, dtype=torch.float64))
            grads.append((g * scale).to(out.dtype).to(out.device))
        elif isinstance(out, torch.Tensor):
            grads.append(torch.zeros_like(out))
        else:
            grads.append(None)
    return grads


def call_backward(function: type, run: ForwardRun, grad_outputs: Sequence[Any]) -> BackwardCall:
    """The user's backward on the real ctx of `run`, outside the engine."""
    outputs_with_ctx = [o for o in run.outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    if not outputs_with_ctx:
        return BackwardCall(None, RuntimeError("no output of forward has a grad_fn"))
    ctx = outputs_with_ctx[0].grad_fn
    # Copies: a backward that writes into grad_output must not change our probes.
    copies = [g.clone() if isinstance(g, torch.Tensor) else g for g in grad_outputs]
    try:
        with torch.no_grad():
            returned = function.backward(ctx, *copies)
    except (Exception, SystemExit) as exc:
        return BackwardCall(None, exc)
    wrote = any(isinstance(c, torch.Tensor) and not torch.equal(c, g) for c, g in zip(copies, grad_outputs)
                if isinstance(g, torch.Tensor) and not g.is_complex() and bool(torch.isfinite(g).all()))
    return BackwardCall(as_tuple(returned), returned_list=isinstance(returned, list), wrote_grad_output=wrote)


def _dims_to_reduce(grad_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> list[int] | None:
    """The dims of a broadcast gradient that should have been summed to get `input_shape`."""
    if len(grad_shape) < len(input_shape):
        return None
    lead = len(grad_shape) - len(input_shape)
    dims = list(range(lead))
    for k, size in enumerate(input_shape):
        g = grad_shape[lead + k]
        if size == g:
            continue
        if size == 1:
            dims.append(lead + k)
        else:
            return None
    return dims


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex) copy: differences of low-precision values computed exactly."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def _linear_combination_error(a: Sequence[Any], b: Sequence[Any], c: Sequence[Any],
                              alpha: float, beta: float) -> float:
    worst = 0.0
    for ga, gb, gc in zip(a, b, c):
        if isinstance(ga, torch.Tensor) and isinstance(gb, torch.Tensor) and isinstance(gc, torch.Tensor):
            expected = alpha * _wide(ga) + beta * _wide(gb)
            scale = max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
            worst = max(worst, float((_wide(gc) - expected).abs().max() / scale) if gc.numel() else 0.0)
    return worst


def gradient_contracts(
    function: type,
    run: ForwardRun,
    args_before: Sequence[Any],
    input_names: Sequence[str],
    *,
    seed: int,
    nondet_tol: float,
) -> list[CheckResult]:
    """count/shape/dtype/device, finiteness, determinism and linearity of one backward."""
    checks: list[CheckResult] = []
    gen = torch.Generator().manual_seed(seed + 101)
    g1 = _grad_outputs(run, gen)
    g2 = _grad_outputs(run, gen)
    first = call_backward(function, run, g1)
    if first.error is not None:
        return [CheckResult(name="backward", status=Status.ERROR,
                            message=f"backward raised {type(first.error).__name__}: {first.error}",
                            diagnoses=(Diagnosis("backward_error",
                                                 f"backward raised {type(first.error).__name__}: "
                                                 f"{first.error}"),))]
    grads = first.grads or ()
    n_inputs = len(run.args)
    needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in run.args]

    # Count: torch accepts extra trailing Nones, nothing else.
    extra = grads[n_inputs:]
    if len(grads) < n_inputs or any(g is not None for g in extra):
        message = (f"backward returned {len(grads)} gradient{'s' if len(grads) != 1 else ''}, "
                   f"forward takes {n_inputs} input{'s' if n_inputs != 1 else ''} "
                   f"({', '.join(input_names)}): return one per input, None for those without grad")
        checks.append(CheckResult(name="grad_count", status=Status.FAILED, message=message,
                                  diagnoses=(Diagnosis("shape_mismatch", message),)))
        return checks
    if first.returned_list:
        message = "backward returned a list: torch accepts a tuple (or a single tensor), and raises on a list"
        checks.append(CheckResult(name="grad_count", status=Status.FAILED, message=message,
                                  diagnoses=(Diagnosis("shape_mismatch", message,
                                                       hint="return tuple(grads) or the gradients separated by "
                                                            "commas"),)))
        return checks
    checks.append(CheckResult(name="grad_count", status=Status.PASSED,
                              message=f"{n_inputs} gradient(s) for {n_inputs} input(s)"))
    if first.wrote_grad_output:
        message = ("backward modified grad_output in place: autograd may share that tensor with other "
                   "branches of the graph, whose gradients then change too")
        checks.append(CheckResult(name="grad_output_inplace", status=Status.FAILED, message=message,
                                  diagnoses=(Diagnosis("other", message,
                                                       hint="compute out of place (g * 3, not g.mul_(3))"),)))

    problems: list[Diagnosis] = []
    for pos, (grad, arg, name) in enumerate(zip(grads, run.args, input_names)):
        if not needs_grad[pos]:
            continue
        if grad is None:
            problems.append(Diagnosis("none_grad", f"backward returned None for {name}, which needs grad: "
                                                   "its gradient is silently zero", input=name,
                                      hint=f"return the gradient of the loss w.r.t. {name}"))
            continue
        if not isinstance(grad, torch.Tensor):
            problems.append(Diagnosis("shape_mismatch", f"gradient for {name} is a {type(grad).__name__}, "
                                                        "not a tensor", input=name))
            continue
        if tuple(grad.shape) != tuple(arg.shape):
            dims = _dims_to_reduce(tuple(grad.shape), tuple(arg.shape))
            if dims is not None:
                hint = f"sum it over dim{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))}" \
                       f"{' with keepdim' if any(arg.shape[k - (grad.dim() - arg.dim())] == 1 for k in dims if k >= grad.dim() - arg.dim()) else ''}" \
                       f" to get {tuple(arg.shape)}"
                message = (f"gradient for {name} has shape {tuple(grad.shape)} but {name} has shape "
                           f"{tuple(arg.shape)}: it was not reduced over the broadcast "
                           f"dim{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))} "
                           "(the engine sums it silently, gradcheck does not notice)")
            else:
                hint = f"return a tensor of shape {tuple(arg.shape)}"
                message = f"gradient for {name} has shape {tuple(grad.shape)} but {name} has shape {tuple(arg.shape)}"
            problems.append(Diagnosis("shape_mismatch", message, input=name, hint=hint))
            continue
        if grad.dtype != arg.dtype:
            problems.append(Diagnosis(
                "precision",
                f"gradient for {name} is {str(grad.dtype).removeprefix('torch.')} but {name} is "
                f"{str(arg.dtype).removeprefix('torch.')} (the engine casts it silently)",
                input=name, hint=f"compute the gradient in {name}.dtype"))
        if grad.device != arg.device:
            problems.append(Diagnosis("device_mismatch", f"gradient for {name} is on {grad.device} but "
                                                         f"{name} is on {arg.device}", input=name))
    if problems:
        checks.append(CheckResult(name="grad_meta", status=Status.FAILED,
                                  message="; ".join(p.message for p in problems),
                                  diagnoses=tuple(problems)))
        return checks
    checks.append(CheckResult(name="grad_meta", status=Status.PASSED,
                              message="every gradient has its input's shape, dtype and device"))

    # Finite values on finite inputs.
    bad: list[str] = []
    inputs_finite = all(torch.isfinite(a).all() for a in args_before if isinstance(a, torch.Tensor))
    if inputs_finite:
        for k, out in enumerate(run.outputs):
            if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
                mask = ~torch.isfinite(out.detach())
                if mask.any():
                    where = tuple(int(i) for i in torch.nonzero(mask)[0].tolist())
                    bad.append(f"output {k} has {int(mask.sum())} non-finite value(s), first at {list(where)}")
        for grad, name in zip(grads, input_names):
            if isinstance(grad, torch.Tensor) and (grad.is_floating_point() or grad.is_complex()):
                mask = ~torch.isfinite(grad)
                if mask.any():
                    where = tuple(int(i) for i in torch.nonzero(mask)[0].tolist())
                    bad.append(f"gradient for {name} has {int(mask.sum())} non-finite value(s), "
                               f"first at {name}{list(where)}")
    if bad:
        message = "; ".join(bad) + " (on finite inputs)"
        checks.append(CheckResult(name="finite", status=Status.FAILED, message=message,
                                  diagnoses=(Diagnosis("nonfinite", message),)))
    else:
        checks.append(CheckResult(name="finite", status=Status.PASSED,
                                  message="outputs and gradients are finite"))

    # Determinism: the same backward on the same ctx and grad_outputs, twice.
    again = call_backward(function, run, g1)
    if again.error is None and again.grads is not None:
        worst = 0.0
        for a, b in zip(grads, again.grads):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.numel():
                worst = max(worst, float((_wide(a) - _wide(b)).abs().max()))
        if worst > nondet_tol:
            message = (f"backward gave different results on two identical calls "
                       f"(max difference {worst:.3g} > nondet_tol {nondet_tol:g})")
            checks.append(CheckResult(name="determinism", status=Status.FAILED, message=message,
                                      max_abs_err=worst,
                                      diagnoses=(Diagnosis("nondeterministic", message,
                                                           hint="pass --nondet-tol if this is expected "
                                                                "(atomic adds on GPU)"),)))
        else:
            checks.append(CheckResult(name="determinism", status=Status.PASSED,
                                      message="two identical backward calls agree"))

    # Linearity in grad_output: B(a*g1 + b*g2) == a*B(g1) + b*B(g2), random a, b, g1, g2.
    alpha, beta = 0.7, -1.3
    combined = [alpha * x + beta * y if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
                else x for x, y in zip(g1, g2)]
    second = call_backward(function, run, g2)
    mixed = call_backward(function, run, combined)
    if second.grads is not None and mixed.grads is not None:
        err = _linear_combination_error(grads, second.grads, mixed.grads, alpha, beta)
        # Both sides are the same linear map up to rounding; sqrt(eps) of the gradients' dtype
        # (1.5e-8 in float64, 3.5e-4 in float32) is far above the few roundings that adds and
        # far below the O(1) error of a backward that ignores or squares grad_output.
        grad_dtype = next((g.dtype for g in grads if isinstance(g, torch.Tensor)), torch.float64)
        limit = torch.finfo(grad_dtype.to_real() if grad_dtype.is_complex else grad_dtype).eps ** 0.5
        if err > limit:
            message = (f"backward is not linear in grad_output (relative error {err:.3g}): "
                       "it ignores grad_output, uses ones, or transforms it non-linearly")
            checks.append(CheckResult(name="linearity", status=Status.FAILED, message=message, max_abs_err=err,
                                      diagnoses=(Diagnosis("ignores_grad_output", message,
                                                           hint="multiply the local derivative by grad_output "
                                                                "(the chain rule), never by ones"),)))
        else:
            checks.append(CheckResult(name="linearity", status=Status.PASSED,
                                      message="backward is linear in grad_output"))
    return checks


def inplace_contract(run: ForwardRun, args_before: Sequence[Any], input_names: Sequence[str]) -> CheckResult:
    """Forward must not change its inputs unless it says so with ctx.mark_dirty."""
    changed: list[str] = []
    saved_ptrs: set[int] = set()
    for out in run.outputs:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            try:
                saved_ptrs = {t.data_ptr() for t in out.grad_fn.saved_tensors if isinstance(t, torch.Tensor)}
            except Exception:
                saved_ptrs = set()
            break
    output_ids = {id(o) for o in run.outputs if isinstance(o, torch.Tensor)}
    for arg, before, name in zip(run.args, args_before, input_names):
        if not isinstance(arg, torch.Tensor) or not isinstance(before, torch.Tensor):
            continue
        same = arg.shape == before.shape and torch.equal(arg.detach().cpu().to(before.dtype), before.cpu()) \
            if arg.numel() else True
        if same:
            continue
        if id(arg) in output_ids:
            continue  # returned as an output: the mark_dirty pattern, torch tracks it
        saved = arg.data_ptr() in saved_ptrs
        changed.append(
            f"forward modified {name} in place without ctx.mark_dirty"
            + (f" and saved it for backward, so backward sees the modified values, not the original {name}"
               if saved else "")
        )
    if changed:
        message = "; ".join(changed)
        return CheckResult(name="inplace", status=Status.FAILED, message=message,
                           diagnoses=(Diagnosis("inplace_forward", message,
                                                hint="compute out-of-place (out = x / x.sum(dim, keepdim=True)) "
                                                     "or call ctx.mark_dirty(x) and return x"),))
    return CheckResult(name="inplace", status=Status.PASSED, message="forward leaves its inputs unchanged")
