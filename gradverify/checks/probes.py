"""What the probing checks (layout, multi_output, nondeterminism, ctx_hygiene) share: random
cotangents, a VJP through the autograd engine, and one way of saying "these two gradients of
the same backward differ beyond rounding".

Those checks compare the user's backward with *itself* under another grad_output layout,
another subset of grad_outputs, or a repeated call: in exact arithmetic the results are equal,
so any difference the case's tolerance does not explain is a bug, whatever the truth is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gradverify.numerics.forward import ForwardRun
from gradverify.numerics.tolerance import Tolerance
from gradverify.usercode import user_code


def random_like(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian tensor shaped and typed like `out` (drawn in float64 on the cpu, so that the
    values do not depend on the device or dtype; never ones: J^T @ ones hides whole classes of
    bugs)."""
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    if out.is_complex():
        g = torch.complex(g, torch.randn(out.shape, generator=gen, dtype=torch.float64))
    return g.to(out.dtype).to(out.device)


def random_cotangents(run: ForwardRun, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """{output position: random grad_output} for every differentiable output of `run`."""
    return {o: random_like(out, gen) for o, out in run.diff_outputs}


Gradients = dict[int, "torch.Tensor | None"]


def engine_vjp(run: ForwardRun, cotangents: dict[int, torch.Tensor], *, phase: str = "backward") -> Gradients:
    """{input position: gradient} through the autograd engine, for grad_outputs on the outputs
    named in `cotangents` only (the engine gives the others zeros, or None where the op turned
    materialize_grads off), on `run`'s graph (kept). Raises UserCodeError when the user's code
    raises. The grad_outputs are passed as they are: their layout is part of some probes."""
    outputs = dict(run.diff_outputs)
    keys = list(cotangents)
    leaves = [leaf for _, leaf in run.leaves]
    with user_code(phase):
        grads = torch.autograd.grad([outputs[o] for o in keys], leaves, [cotangents[o] for o in keys],
                                    retain_graph=True, allow_unused=True)
    # Copies: a backward that returns a tensor it keeps (ctx.grad *= g; return ctx.grad) would
    # otherwise change this result on its next call.
    return {p: (g.detach().clone() if g is not None else None) for (p, _), g in zip(run.leaves, grads)}


def add(a: Gradients, b: Gradients) -> Gradients:
    """a + b per input (None is zero)."""
    out: Gradients = {}
    for p in a.keys() | b.keys():
        x, y = a.get(p), b.get(p)
        out[p] = x if y is None else y if x is None else x + y
    return out


@dataclass(frozen=True)
class Difference:
    """How two gradients of one input differ: entries beyond the allowance, out of how many,
    and the largest difference."""

    count: int
    total: int
    worst: float

    def __bool__(self) -> bool:
        return self.count > 0


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.complex128) if t.is_complex() else t.detach().double()


def difference(got: torch.Tensor | None, want: torch.Tensor | None, tolerance: Tolerance, *,
               floor: float = 0.0, like: torch.Tensor | None = None) -> Difference:
    """Entries where two results of the same backward differ beyond the case's tolerance:

        |got - want| > atol * s + rtol * |want| + floor,   s = the larger of max |want|, max |got|

    The scale s is the gradient's own largest entry: a rounding difference (another summation
    order, another vectorisation of a strided read) is relative to the size of the numbers the
    backward combines, which that entry bounds from below for all but pathological
    cancellations; atol = rtol = sqrt(eps) of the case dtype leaves orders of magnitude of room
    above rounding and is the same allowance the Jacobian check grants the backward, so a
    difference within it can never change a verdict. `floor`: an absolute allowance on top
    (--nondet-tol). None is a zero gradient (`like` gives its shape when both are None)."""
    if got is None and want is None:
        return Difference(0, like.numel() if like is not None else 0, 0.0)
    ref = got if want is None else want
    assert ref is not None
    a = _wide(got) if got is not None else torch.zeros_like(_wide(ref))
    b = _wide(want) if want is not None else torch.zeros_like(_wide(ref))
    if a.shape != b.shape:
        return Difference(max(a.numel(), b.numel()), max(a.numel(), b.numel()), float("inf"))
    if not b.numel():
        return Difference(0, 0, 0.0)
    finite_b = b[torch.isfinite(b)].abs()
    finite_a = a[torch.isfinite(a)].abs()
    scale = max(float(finite_b.max()) if finite_b.numel() else 0.0, float(finite_a.max()) if finite_a.numel() else 0.0)
    allowed = tolerance.atol * scale + tolerance.rtol * b.abs() + floor
    gap = (a - b).abs()
    # A NaN on one side only is a difference; NaN on both sides (the same NaN-producing maths) is not.
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    beyond = (gap > allowed) | (nan_a ^ nan_b)
    beyond &= ~(nan_a & nan_b)
    gap = torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))
    worst = float(gap.max()) if gap.numel() else 0.0
    if bool((nan_a ^ nan_b).any()):
        worst = float("nan")
    return Difference(int(beyond.sum()), b.numel(), worst)


def differences(got: Gradients, want: Gradients, tolerance: Tolerance, *, floor: float = 0.0,
                leaves: Sequence[tuple[int, torch.Tensor]] = ()) -> dict[int, Difference]:
    """difference() per input position, only where some entry differs."""
    shapes = dict(leaves)
    out = {}
    for p in sorted(got.keys() | want.keys()):
        d = difference(got.get(p), want.get(p), tolerance, floor=floor, like=shapes.get(p))
        if d:
            out[p] = d
    return out


def describe_difference(name: str, d: Difference) -> str:
    """`the gradient for x differs at 12 of 12 entries (max difference 0.53)`."""
    worst = "NaN on one side" if d.worst != d.worst else f"max difference {d.worst:.3g}"
    return f"the gradient for {name} differs at {d.count} of {d.total} entries ({worst})"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def python_nodes(run: ForwardRun) -> list[Any]:
    """The Python Function nodes of the run's graph whose ctx the user's code fills (their own
    Functions, and the generated nodes of torch.library custom ops, whose ctx setup_context
    fills; not torch's own, like checkpoint's), in a deterministic order (depth first from the
    outputs)."""
    seen: set[int] = set()
    stack = [out.grad_fn for _, out in reversed(run.diff_outputs) if out.grad_fn is not None]
    nodes = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            module = getattr(cls, "__module__", "") or ""
            if not module.startswith("torch") or module.startswith("torch._library"):
                nodes.append(node)
        stack.extend(next_node for next_node, _ in reversed(tuple(getattr(node, "next_functions", ()))))
    return nodes
