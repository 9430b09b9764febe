"""The three Jacobians of an op: analytic (its backward), numerical (finite differences) and
reference (autograd through its forward body).

Every Jacobian is a dict {(output position, input position): tensor of shape
out.shape + in.shape}, so entries are addressed by tensor index, never by a flat row number.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from gradverify.spec.python import uses_setup_context

Block = dict[tuple[int, int], torch.Tensor]


class UserCodeError(Exception):
    """The user's forward or backward raised; carries the original exception and the phase."""

    def __init__(self, phase: str, original: BaseException) -> None:
        super().__init__(f"{phase} raised {type(original).__name__}: {original}")
        self.phase = phase
        self.original = original


def as_tuple(result: Any) -> tuple[Any, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def clone_args(args: Sequence[Any], *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> list[Any]:
    """Fresh copies of every tensor argument, so the user's code can never change ours."""
    out: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            copy = arg.detach().clone()
            if dtype is not None and (copy.is_floating_point() or copy.is_complex()):
                copy = copy.to(dtype)
            if device is not None:
                copy = copy.to(device)
            out.append(copy)
        else:
            out.append(arg)
    return out


def is_differentiable_output(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) \
        and value.requires_grad


# --------------------------------------------------------------------------------------
# Jacobians from vector-Jacobian products (used for the analytic and the reference Jacobian)
# --------------------------------------------------------------------------------------

@dataclass
class VjpJacobian:
    blocks: Block
    path: str
    fallback_reason: str = ""


def _rows_per_chunk(out_numel: int, in_numel: int, itemsize: int, max_bytes: int) -> int:
    per_row = max(1, in_numel + out_numel) * itemsize
    return max(1, min(out_numel, max_bytes // per_row))


def jacobian_by_vjp(
    outputs: Sequence[tuple[int, torch.Tensor]],
    leaves: Sequence[tuple[int, torch.Tensor]],
    *,
    phase: str,
    max_bytes: int,
    allow_batched: bool = True,
    check_seed: int = 0,
) -> VjpJacobian:
    """All rows of d outputs / d leaves: batched VJPs where the backward allows vmap, else one
    backward per row.

    The rows are unit grad_outputs: that is the Jacobian itself, not a probe. Batched results
    are cross-checked against one plain backward with a random grad_output, because a vmap
    that runs is not proof that it ran the same maths as the plain call.
    """
    leaf_tensors = [leaf for _, leaf in leaves]
    blocks: Block = {}
    path = "batched"
    reason = ""
    for out_pos, out in outputs:
        m = out.numel()
        rows: dict[int, list[torch.Tensor]] = {in_pos: [] for in_pos, _ in leaves}
        batched_ok = allow_batched and path == "batched"
        if batched_ok:
            try:
                chunk = _rows_per_chunk(m, max(leaf.numel() for leaf in leaf_tensors),
                                        out.element_size(), max_bytes)
                eye = torch.eye(m, dtype=out.dtype, device=out.device)
                for start in range(0, m, chunk):
                    grad_outputs = eye[start:start + chunk].reshape(-1, *out.shape)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        grads = torch.autograd.grad(out, leaf_tensors, grad_outputs,
                                                    retain_graph=True, allow_unused=True,
                                                    is_grads_batched=True)
                    for (in_pos, leaf), grad in zip(leaves, grads):
                        if grad is None:
                            grad = torch.zeros((grad_outputs.shape[0], *leaf.shape),
                                               dtype=leaf.dtype, device=leaf.device)
                        rows[in_pos].append(grad.reshape(grad_outputs.shape[0], *leaf.shape))
                _cross_check_batched(out, leaves, rows, check_seed)
            except _BatchedDisagrees as exc:
                batched_ok = False
                path = "per-row"
                reason = str(exc)
            except Exception as exc:  # vmap cannot run this backward: fall back, say why
                batched_ok = False
                path = "per-row"
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                first_sentence = first_line.split(". ")[0]
                reason = f"{type(exc).__name__}: {first_sentence[:160]}"
        if not batched_ok:
            rows = {in_pos: [] for in_pos, _ in leaves}
            flat_eye_row = torch.zeros(m, dtype=out.dtype, device=out.device)
            for r in range(m):
                flat_eye_row.zero_()
                flat_eye_row[r] = 1
                try:
                    grads = torch.autograd.grad(out, leaf_tensors, flat_eye_row.reshape(out.shape).clone(),
                                                retain_graph=True, allow_unused=True)
                except Exception as exc:
                    raise UserCodeError(phase, exc) from exc
                for (in_pos, leaf), grad in zip(leaves, grads):
                    if grad is None:
                        grad = torch.zeros_like(leaf)
                    rows[in_pos].append(grad.reshape(1, *leaf.shape))
        for in_pos, leaf in leaves:
            stacked = torch.cat(rows[in_pos], dim=0) if rows[in_pos] else \
                torch.zeros((0, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
            blocks[(out_pos, in_pos)] = stacked.reshape(*out.shape, *leaf.shape).detach()
    return VjpJacobian(blocks=blocks, path=path if outputs else "none", fallback_reason=reason)


class _BatchedDisagrees(Exception):
    pass


def _cross_check_batched(out: torch.Tensor, leaves: Sequence[tuple[int, torch.Tensor]],
                         rows: dict[int, list[torch.Tensor]], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 17)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [leaf for _, leaf in leaves], probe, retain_graph=True,
                                allow_unused=True)
    for (in_pos, leaf), grad in zip(leaves, grads):
        jac = torch.cat(rows[in_pos], dim=0).reshape(out.numel(), -1)
        from_batched = probe.reshape(1, -1).to(jac.dtype) @ jac
        plain = torch.zeros(leaf.numel(), dtype=jac.dtype, device=jac.device) if grad is None \
            else grad.reshape(-1).to(jac.dtype)
        scale = max(1.0, float(plain.abs().max()) if plain.numel() else 1.0)
        tol = 1e3 * torch.finfo(jac.dtype if jac.is_floating_point() else torch.float64).eps * scale \
            * math.sqrt(max(1, out.numel()))
        if plain.numel() and float((from_batched.reshape(-1) - plain).abs().max()) > tol:
            raise _BatchedDisagrees("the batched backward disagreed with a plain backward call")


# --------------------------------------------------------------------------------------
# Analytic Jacobian: the user's backward through Function.apply
# --------------------------------------------------------------------------------------

@dataclass
class ForwardRun:
    """One call of Function.apply on fresh leaves, with the graph kept for backward."""

    leaves: list[tuple[int, torch.Tensor]]
    args: list[Any]
    outputs: tuple[Any, ...]
    diff_outputs: list[tuple[int, torch.Tensor]]


def run_forward(function: type, args: Sequence[Any], diff_positions: Sequence[int]) -> ForwardRun:
    call_args = clone_args(args)
    leaves: list[tuple[int, torch.Tensor]] = []
    for pos in diff_positions:
        call_args[pos] = call_args[pos].requires_grad_(True)
        leaves.append((pos, call_args[pos]))
    try:
        with torch.enable_grad():
            outputs = as_tuple(function.apply(*call_args))
    except Exception as exc:
        raise UserCodeError("forward", exc) from exc
    diff_outputs = [(i, o) for i, o in enumerate(outputs) if is_differentiable_output(o)]
    return ForwardRun(leaves=leaves, args=call_args, outputs=outputs, diff_outputs=diff_outputs)


def analytic_jacobian(run: ForwardRun, *, max_bytes: int, seed: int) -> VjpJacobian:
    return jacobian_by_vjp(run.diff_outputs, run.leaves, phase="backward", max_bytes=max_bytes,
                           check_seed=seed)


# --------------------------------------------------------------------------------------
# Numerical Jacobian: Richardson-extrapolated central differences in float64
# --------------------------------------------------------------------------------------

@dataclass
class NumericalJacobian:
    blocks: Block
    error_bars: Block
    kinks: Block
    dtype: torch.dtype
    evaluations: int = 0


def step_sizes(x: torch.Tensor) -> torch.Tensor:
    """Per-entry steps: eps**(1/5) * max(1, |x|), rounded to a power of two.

    Richardson extrapolation of central differences has truncation error O(h^4) and rounding
    error O(eps/h); they balance at h ~ eps**(1/5) (about 7e-4 in float64), which gives ~1e-12
    relative accuracy instead of ~1e-10 at the plain-central optimum cbrt(eps). Scaling with
    |x| keeps the step meaningful for large values; a power of two makes x +- h and x +- h/2
    exactly representable, so the step the function sees is the step we divide by.
    """
    eps = torch.finfo(x.dtype).eps
    raw = eps ** 0.2 * torch.clamp(x.abs(), min=1.0)
    return torch.exp2(torch.round(torch.log2(raw)))


def numerical_jacobian(
    evaluate: Callable[[list[Any]], tuple[torch.Tensor, ...]],
    args: Sequence[Any],
    diff_positions: Sequence[int],
    out_positions: Sequence[int],
) -> NumericalJacobian:
    """Column by column: perturb one input entry, watch every output.

    Each column costs four forward calls (x +- h, x +- h/2). From the same values we get the
    estimate R = (4 D(h/2) - D(h)) / 3, its error bar |R - D(h/2)| (the gap between an O(h^2)
    and an O(h^4) estimate bounds the error of the better one), and a kink test: at a smooth
    point the gap between one-sided slopes halves with h; at a kink it does not.
    """
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    f0 = evaluate(base)
    blocks: Block = {}
    bars: Block = {}
    kinks: Block = {}
    evaluations = 1
    dtype = next((a.dtype for a in base if isinstance(a, torch.Tensor)), torch.float64)
    eps = torch.finfo(dtype).eps
    for in_pos in diff_positions:
        x = base[in_pos]
        steps = step_sizes(x).reshape(-1)
        cols: dict[int, list[torch.Tensor]] = {o: [] for o in out_positions}
        col_bars: dict[int, list[torch.Tensor]] = {o: [] for o in out_positions}
        col_kinks: dict[int, list[torch.Tensor]] = {o: [] for o in out_positions}
        flat = x.reshape(-1)
        for e in range(flat.numel()):
            h = float(steps[e])
            values = {}
            for k, delta in (("p1", h), ("m1", -h), ("p2", h / 2), ("m2", -h / 2)):
                perturbed = flat.clone()
                perturbed[e] = perturbed[e] + delta
                call = list(base)
                call[in_pos] = perturbed.reshape(x.shape)
                values[k] = evaluate(call)
            evaluations += 4
            for idx, o in enumerate(out_positions):
                fp1, fm1, fp2, fm2, fz = (values["p1"][idx], values["m1"][idx], values["p2"][idx],
                                          values["m2"][idx], f0[idx])
                d1 = (fp1 - fm1) / (2 * h)
                d2 = (fp2 - fm2) / h
                estimate = (4 * d2 - d1) / 3
                scale = torch.maximum(torch.maximum(fp1.abs(), fm1.abs()), fz.abs())
                # Rounding in f(x +- h) is ~eps*|f| per value; the combination above divides
                # by h with coefficients summing to ~3, so 8*eps*|f|/h is a safe floor.
                bar = (estimate - d2).abs() + 8 * eps * scale / h
                gap1 = ((fp1 - fz) / h - (fz - fm1) / h).abs()
                gap2 = ((fp2 - fz) / (h / 2) - (fz - fm2) / (h / 2)).abs()
                kink = (gap2 > 0.75 * gap1) & (gap2 > 1e-6 * torch.clamp(d2.abs(), min=1.0)) \
                    & (gap2 > 64 * eps * scale / h)
                # At a kink the derivative is any value between the one-sided slopes.
                bar = torch.where(kink, torch.maximum(bar, torch.maximum(gap1, gap2)), bar)
                cols[o].append(estimate.reshape(-1))
                col_bars[o].append(bar.reshape(-1))
                col_kinks[o].append(kink.reshape(-1))
        for o, out in zip(out_positions, f0):
            if flat.numel():
                stack = torch.stack(cols[o], dim=1)
                bar_stack = torch.stack(col_bars[o], dim=1)
                kink_stack = torch.stack(col_kinks[o], dim=1)
            else:
                stack = bar_stack = torch.zeros((out.numel(), 0), dtype=dtype)
                kink_stack = torch.zeros((out.numel(), 0), dtype=torch.bool)
            shape = (*out.shape, *x.shape)
            blocks[(o, in_pos)] = stack.reshape(shape)
            bars[(o, in_pos)] = bar_stack.reshape(shape)
            kinks[(o, in_pos)] = kink_stack.reshape(shape)
    return NumericalJacobian(blocks=blocks, error_bars=bars, kinks=kinks, dtype=dtype,
                             evaluations=evaluations)


def make_evaluator(function: type, out_positions: Sequence[int]) -> Callable[[list[Any]], tuple[torch.Tensor, ...]]:
    """f(args) -> the differentiable outputs, through the real Function.apply, without grad."""

    def evaluate(call_args: list[Any]) -> tuple[torch.Tensor, ...]:
        fresh = clone_args(call_args)
        try:
            with torch.no_grad():
                outputs = as_tuple(function.apply(*fresh))
        except Exception as exc:
            raise UserCodeError("forward", exc) from exc
        return tuple(outputs[o].detach() for o in out_positions)

    return evaluate


def directional_derivatives(
    evaluate: Callable[[list[Any]], tuple[torch.Tensor, ...]],
    args: Sequence[Any],
    directions: dict[int, torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """d/dt f(x + t v) at t=0 by Richardson-extrapolated central differences, with error bars."""
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    dtype = next((a.dtype for a in base if isinstance(a, torch.Tensor)), torch.float64)
    eps = torch.finfo(dtype).eps
    largest = max(float(base[p].abs().max()) if base[p].numel() else 0.0 for p in directions)
    v_norm = max(float(v.abs().max()) if v.numel() else 0.0 for v in directions.values()) or 1.0
    h = 2.0 ** round(math.log2(eps ** 0.2 * max(1.0, largest) / v_norm))

    def at(t: float) -> tuple[torch.Tensor, ...]:
        call = list(base)
        for p, v in directions.items():
            call[p] = base[p] + t * v
        return evaluate(call)

    fp1, fm1, fp2, fm2 = at(h), at(-h), at(h / 2), at(-h / 2)
    estimates, bars = [], []
    for a, b, c, d in zip(fp1, fm1, fp2, fm2):
        d1 = (a - b) / (2 * h)
        d2 = (c - d) / h
        est = (4 * d2 - d1) / 3
        scale = torch.maximum(a.abs(), b.abs())
        estimates.append(est)
        bars.append((est - d2).abs() + 8 * eps * scale / h)
    return tuple(estimates), tuple(bars)


# --------------------------------------------------------------------------------------
# Reference Jacobian: autograd through the forward body, outside Function.apply
# --------------------------------------------------------------------------------------

class StandInCtx:
    """Accepts everything forward may do with a real ctx, so the body runs outside apply."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[Any, ...] = ()
        self.dirty: tuple[Any, ...] = ()
        self.non_differentiable: tuple[Any, ...] = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        self.saved_for_forward = tensors

    def mark_dirty(self, *tensors: Any) -> None:
        self.dirty = tensors

    def mark_non_differentiable(self, *tensors: Any) -> None:
        self.non_differentiable = tensors

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value


@dataclass
class ReferenceJacobian:
    blocks: Block | None
    reason: str = ""
    path: str = ""
    details: dict[str, str] = field(default_factory=dict)


def reference_jacobian(
    function: type,
    args: Sequence[Any],
    diff_positions: Sequence[int],
    out_positions: Sequence[int],
    *,
    reference: Callable[..., Any] | None,
    max_bytes: int,
) -> ReferenceJacobian:
    """Autograd through the forward body (or a declared reference) at the given float64 args."""
    call_args = clone_args(args)
    leaves: list[tuple[int, torch.Tensor]] = []
    for pos in diff_positions:
        leaf = call_args[pos].requires_grad_(True)
        leaves.append((pos, leaf))
        # The body may write into its input in place; give it a non-leaf view of the leaf.
        call_args[pos] = leaf.clone()
    needs = tuple(pos in diff_positions for pos in range(len(call_args)))
    try:
        with torch.enable_grad():
            if reference is not None:
                outputs = as_tuple(reference(*call_args))
            elif uses_setup_context(function):
                outputs = as_tuple(function.forward(*call_args))
            else:
                outputs = as_tuple(function.forward(StandInCtx(needs), *call_args))
    except Exception as exc:
        source = "the declared reference" if reference is not None else "the forward body"
        return ReferenceJacobian(None, f"{source} cannot run outside Function.apply "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    selected: list[tuple[int, torch.Tensor]] = []
    for o in out_positions:
        if o >= len(outputs) or not isinstance(outputs[o], torch.Tensor):
            return ReferenceJacobian(None, "the forward body returns different outputs outside apply")
        out = outputs[o]
        if not out.requires_grad:
            return ReferenceJacobian(None, "the forward body has no autograd history (it detaches, "
                                           "runs under no_grad, or leaves torch)")
        selected.append((o, out))
    try:
        vjp = jacobian_by_vjp(selected, leaves, phase="reference", max_bytes=max_bytes)
    except Exception as exc:
        return ReferenceJacobian(None, f"autograd through the forward body failed ({type(exc).__name__})")
    return ReferenceJacobian(vjp.blocks, path=vjp.path)
