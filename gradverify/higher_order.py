"""Second-order check: is the backward itself differentiated correctly (double backward)?

The map under test is G(x) = J(x)^T v for one fixed random v (never ones): the gradient the
backward returns. Its analytic Jacobian comes from autograd through the user's backward
(create_graph=True); its truth from finite differences of G, evaluated with the user's own
first-order backward (which the first-order check has already verified). This is the same
construction as torch's gradgradcheck, laid out by tensor index.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gradverify.compare import all_mismatches, compare_block, heatmap_of, tolerance_for
from gradverify.diagnose import diagnose
from gradverify.jacobian import (UserCodeError, as_tuple, clone_args, is_differentiable_output, jacobian_by_vjp,
                                 numerical_jacobian)
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.torch_gradcheck import on_copies, summarise


def is_once_differentiable(function: type) -> bool:
    backward = function.__dict__.get("backward")
    backward = getattr(backward, "__func__", backward)
    # torch's decorator wraps backward in a function defined in torch/autograd/function.py.
    code = getattr(backward, "__code__", None)
    return (getattr(backward, "__wrapped__", None) is not None and code is not None
            and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py"))


def _non_leaf(args: list[Any], positions: Sequence[int]) -> list[Any]:
    """Copies of the leaves for forward, so an op that writes into its input (mark_dirty) can run."""
    return [a.clone() if k in positions else a for k, a in enumerate(args)]


def _probe(outputs: Sequence[Any], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 202)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device) for o in outputs]


def _gradient_map(function: type, diff_positions: Sequence[int], seed: int):  # type: ignore[no-untyped-def]
    """G(args) -> the backward's gradients for the differentiable inputs at a fixed random probe."""

    def evaluate(call_args: list[Any]) -> tuple[torch.Tensor, ...]:
        fresh = clone_args(call_args)
        leaves = [fresh[p].requires_grad_(True) for p in diff_positions]
        try:
            with torch.enable_grad():
                outputs = [o for o in as_tuple(function.apply(*_non_leaf(fresh, diff_positions)))
                           if is_differentiable_output(o)]
                grads = torch.autograd.grad(outputs, leaves, _probe(outputs, seed), allow_unused=True)
        except Exception as exc:
            raise UserCodeError("backward", exc) from exc
        return tuple(torch.zeros_like(leaf) if g is None else g.detach() for g, leaf in zip(grads, leaves))

    return evaluate


def second_order_check(function: type, args: Sequence[Any], values64: Sequence[Any], diff_positions: Sequence[int],
                       input_names: Sequence[str], *, dtype: str, seed: int, max_bytes: int,
                       mismatch_cap: int, atol: float | None, rtol: float | None) -> CheckResult:
    names = {p: f"grad_{input_names[p]}" for p in diff_positions}
    if is_once_differentiable(function):
        message = ("backward is marked @once_differentiable: it cannot be differentiated again, so every "
                   "second-order entry would read as zero (gradgradcheck shows exactly that, without saying why)")
        return CheckResult(name="second_order", status=Status.FAILED, message=message,
                           diagnoses=(Diagnosis("second_order", message,
                                                hint="drop @once_differentiable and write backward with "
                                                     "differentiable torch ops, or do not ask for --order 2"),))
    # Analytic: autograd through the user's backward.
    fresh = clone_args(args)
    leaves = [(p, fresh[p].requires_grad_(True)) for p in diff_positions]
    try:
        with torch.enable_grad():
            outputs = [o for o in as_tuple(function.apply(*_non_leaf(fresh, diff_positions)))
                       if is_differentiable_output(o)]
            grads = torch.autograd.grad(outputs, [leaf for _, leaf in leaves], _probe(outputs, seed),
                                        create_graph=True, allow_unused=True)
    except Exception as exc:
        return CheckResult(name="second_order", status=Status.ERROR,
                           message=f"backward raised {type(exc).__name__}: {exc}")
    grad_outputs: list[tuple[int, torch.Tensor]] = []
    constant: list[str] = []
    for (p, leaf), g in zip(leaves, grads):
        if g is None:
            g = torch.zeros_like(leaf)
        if not g.requires_grad:
            constant.append(input_names[p])
            # A gradient with no graph is a constant to autograd: its derivative reads as zero.
            g = g.detach() + 0 * leaf.sum()
        grad_outputs.append((p, g))
    try:
        analytic = jacobian_by_vjp(grad_outputs, leaves, phase="double backward", max_bytes=max_bytes)
    except UserCodeError as exc:
        return CheckResult(name="second_order", status=Status.ERROR,
                           message=f"double backward raised {type(exc.original).__name__}: {exc.original}")
    # Truth: finite differences of the gradient map, in float64.
    evaluate = _gradient_map(function, diff_positions, seed)
    try:
        numerical = numerical_jacobian(evaluate, list(values64), diff_positions, list(diff_positions))
    except UserCodeError as exc:
        return CheckResult(name="second_order", status=Status.ERROR,
                           message=f"gradient map raised {type(exc.original).__name__}: {exc.original}")
    tolerance = tolerance_for(dtype, atol, rtol)
    blocks = []
    for (o, p), a in analytic.blocks.items():
        t = numerical.blocks[(o, p)]
        blocks.append(compare_block(o, p, names[o], input_names[p], t.dim() - values64[p].dim(), a, t,
                                    numerical.error_bars[(o, p)], tolerance, kinks=numerical.kinks[(o, p)]))
    mismatches, count = all_mismatches(blocks, mismatch_cap)
    total = sum(b.truth.numel() for b in blocks)
    if not count:
        return CheckResult(name="second_order", status=Status.PASSED, message=f"all {total} second-order entries match",
                           max_abs_err=max((b.max_abs_err for b in blocks), default=0.0), total_entries=total,
                           details=(("analytic", f"autograd through backward ({analytic.path})"),
                                    ("truth", "finite differences of the backward's gradient map")))
    patterns = diagnose(blocks)
    lead = "first-order gradients are right but the double backward is wrong"
    if constant:
        lead += (f": the gradient for {', '.join(constant)} has no autograd graph (backward detaches or "
                 "runs under no_grad), so its derivative reads as zero")
    described = "; ".join(d.message for d in patterns[:2])
    # One diagnosis for the check: the pattern inside the double backward is its evidence.
    diagnoses = (Diagnosis("second_order", lead, evidence=described,
                           hint="write backward with differentiable torch ops (no .detach(), .item(), numpy, "
                                "or in-place writes into saved tensors)"),)
    return CheckResult(name="second_order", status=Status.FAILED,
                       message=f"{count} / {total} second-order entries mismatched",
                       max_abs_err=max((b.max_abs_err for b in blocks), default=0.0), mismatch_count=count,
                       total_entries=total, mismatches=tuple(mismatches[:mismatch_cap]), diagnoses=diagnoses,
                       heatmaps=tuple(heatmap_of(b) for b in blocks if b.mismatch_count),
                       details=(("analytic", f"autograd through backward ({analytic.path})"),
                                ("truth", "finite differences of the backward's gradient map (Richardson, float64)")))


def run_gradgradcheck(function: type, args: Sequence[Any], diff_positions: Sequence[int], *, dtype: str,
                      seed: int) -> CheckResult:
    if dtype not in ("float64", "complex128"):
        return CheckResult(name="gradgradcheck", status=Status.SKIPPED,
                           message=f"not run in {dtype}: only meaningful in float64/complex128")
    inputs = clone_args(args)
    for p in diff_positions:
        inputs[p].requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.autograd.gradgradcheck(on_copies(function), tuple(inputs), raise_exception=True)
    except Exception as exc:  # gradgradcheck must never crash the run
        return CheckResult(name="gradgradcheck", status=Status.FAILED,
                           message=f"torch gradgradcheck failed: {summarise(str(exc))}")
    return CheckResult(name="gradgradcheck", status=Status.PASSED, message="torch gradgradcheck passed")
