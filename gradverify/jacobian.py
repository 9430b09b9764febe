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


# Size target of one chunk of Jacobian rows (or finite-difference columns), counting one row of
# the gradients and one of the grad_outputs. Small chunks stay in the CPU caches: measured on a
# 2-core machine, a 32-row chunk of a 16,384-column Jacobian ran a batched backward in ~2 ms,
# while 512 rows took ~400 ms (past the cache every element-wise pass goes to memory and fresh
# allocations page-fault). Below MIN_ROWS the per-call overhead (vmap setup, the autograd engine,
# Python) dominates instead. Whole verify() at 4,096 elements over 1/2/4/8 MiB targets: 8 MiB
# with 32 rows was fastest (0.18 s vs 0.23-0.39 s), within noise of 4 MiB.
CHUNK_TARGET_BYTES = 8 * 2**20
MIN_ROWS = 32

# A chunk's temporaries: the grad_outputs, the gradients, and the autograd/vmap intermediates
# of one batched backward (or forward), each about the size of a row; 4 is a measured-safe factor.
# Only the memory budget (--max-memory) uses it: it bounds chunks from above.
WORKSPACE_FACTOR = 4


def _rows_per_chunk(out_numel: int, in_numel: int, itemsize: int, max_bytes: int) -> int:
    per_row = max(1, in_numel + out_numel) * itemsize
    rows = max(MIN_ROWS, CHUNK_TARGET_BYTES // per_row)
    rows = min(rows, max(1, max_bytes // (per_row * WORKSPACE_FACTOR)))
    return max(1, min(out_numel, rows))


def unit_rows(out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """grad_outputs e_start ... e_{stop-1}, shaped (stop - start, *out.shape), built per chunk."""
    k = stop - start
    rows = torch.zeros((k, max(1, out.numel())), dtype=out.dtype, device=out.device)
    if k:
        rows[torch.arange(k, device=out.device), torch.arange(start, stop, device=out.device)] = 1
    return rows[:, : out.numel()].reshape(k, *out.shape)


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
                for start in range(0, m, chunk):
                    grad_outputs = unit_rows(out, start, min(m, start + chunk))
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
            blocks[(out_pos, in_pos)] = stacked.reshape((*out.shape, *leaf.shape)).detach()
    return VjpJacobian(blocks=blocks, path=path if outputs else "none", fallback_reason=reason)


class _BatchedDisagrees(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class VjpSource:
    """Rows of d output / d leaves on demand, by batched VJPs on a kept graph (per-row fallback).

    A Jacobian of 16,384 x 16,384 float64 entries is 2 GiB: streaming it in row chunks lets a
    check hold one chunk at a time. The batched path is cross-checked on the first chunk of each
    output against one plain backward with a random grad_output restricted to that chunk.
    """

    def __init__(self, outputs: Sequence[tuple[int, torch.Tensor]], leaves: Sequence[tuple[int, torch.Tensor]],
                 *, phase: str, max_bytes: int, allow_batched: bool = True, check_seed: int = 0) -> None:
        self.outputs = {o: out for o, out in outputs}
        self.leaves = list(leaves)
        self.phase = phase
        self.max_bytes = max_bytes
        self.batched = allow_batched
        self.fallback_reason = ""
        self.check_seed = check_seed
        self._verified: set[int] = set()
        self._vjp_verified = False
        self._buffers: dict[int, torch.Tensor] = {}

    @property
    def path(self) -> str:
        return "batched" if self.batched else "per-row"

    def out_shape(self, o: int) -> tuple[int, ...]:
        return tuple(self.outputs[o].shape)

    def in_numel(self) -> int:
        return sum(leaf.numel() for _, leaf in self.leaves)

    def rows_per_chunk(self, o: int) -> int:
        out = self.outputs[o]
        return _rows_per_chunk(out.numel(), max(1, self.in_numel()), out.element_size(), self.max_bytes)

    def rows(self, o: int, start: int, stop: int) -> dict[int, torch.Tensor]:
        """{in_pos: (stop - start, leaf.numel())}: rows start..stop-1 of every block of output o."""
        out = self.outputs[o]
        if self.batched:
            try:
                grad_outputs = self._unit_rows(o, start, stop)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    grads = torch.autograd.grad(out, [leaf for _, leaf in self.leaves], grad_outputs,
                                                retain_graph=True, allow_unused=True, is_grads_batched=True)
                result = {p: (g.reshape(stop - start, -1) if g is not None else
                              torch.zeros((stop - start, leaf.numel()), dtype=leaf.dtype, device=leaf.device))
                          for (p, leaf), g in zip(self.leaves, grads)}
                if o not in self._verified:
                    self._verify(o, start, stop, result)
                    self._verified.add(o)
                return result
            except _BatchedDisagrees as exc:
                self.batched = False
                self.fallback_reason = exc.reason
            except Exception as exc:  # vmap cannot run this backward: fall back, say why
                self.batched = False
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.fallback_reason = f"{type(exc).__name__}: {text.split('. ')[0][:160]}"
        result_rows: dict[int, list[torch.Tensor]] = {p: [] for p, _ in self.leaves}
        row = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
        for r in range(start, stop):
            row.zero_()
            row[r] = 1
            try:
                grads = torch.autograd.grad(out, [leaf for _, leaf in self.leaves], row.reshape(out.shape).clone(),
                                            retain_graph=True, allow_unused=True)
            except Exception as exc:
                raise UserCodeError(self.phase, exc) from exc
            for (p, leaf), g in zip(self.leaves, grads):
                result_rows[p].append(torch.zeros(leaf.numel(), dtype=leaf.dtype, device=leaf.device)
                                      if g is None else g.reshape(-1))
        return {p: (torch.stack(v) if v else torch.zeros((0, leaf.numel()), dtype=leaf.dtype))
                for (p, leaf), v in zip(self.leaves, result_rows.values())}

    def _unit_rows(self, o: int, start: int, stop: int) -> torch.Tensor:
        """unit_rows into a buffer kept per output: fresh memory page-faults on every chunk (that
        cost more than the backward itself in a VM), and zeroing the whole buffer each time also
        undoes a backward that writes into its grad_output."""
        out = self.outputs[o]
        k = stop - start
        buf = self._buffers.get(o)
        if buf is None or buf.shape[0] < k:
            buf = torch.zeros((k, max(1, out.numel())), dtype=out.dtype, device=out.device)
            self._buffers[o] = buf
        view = buf[:k]
        view.zero_()
        view[torch.arange(k, device=out.device), torch.arange(start, stop, device=out.device)] = 1
        return view[:, : out.numel()].reshape(k, *out.shape)

    def _verify(self, o: int, start: int, stop: int, rows: dict[int, torch.Tensor]) -> None:
        out = self.outputs[o]
        gen = torch.Generator().manual_seed(self.check_seed + 17 + o)
        probe = torch.zeros(out.numel(), dtype=torch.float64)
        probe[start:stop] = torch.randn(stop - start, generator=gen, dtype=torch.float64)
        probe = probe.to(out.dtype).to(out.device)
        grads = torch.autograd.grad(out, [leaf for _, leaf in self.leaves], probe.reshape(out.shape),
                                    retain_graph=True, allow_unused=True)
        for (p, leaf), grad in zip(self.leaves, grads):
            jac = rows[p]
            from_batched = probe[start:stop].reshape(1, -1).to(jac.dtype) @ jac
            plain = torch.zeros(leaf.numel(), dtype=jac.dtype, device=jac.device) if grad is None \
                else grad.reshape(-1).to(jac.dtype)
            scale = max(1.0, float(plain.abs().max()) if plain.numel() else 1.0)
            # Same maths in another summation order: a few hundred eps relative, times
            # sqrt(rows) for the length of the sums; 1e3 eps leaves room and is still ~1e-12.
            tol = 1e3 * torch.finfo(jac.dtype if jac.is_floating_point() else torch.float64).eps * scale \
                * math.sqrt(max(1, stop - start))
            if plain.numel() and float((from_batched.reshape(-1) - plain).abs().max()) > tol:
                raise _BatchedDisagrees("the batched backward disagreed with a plain backward call")

    def vjp(self, cotangents: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{in_pos: (B, leaf.numel())} = J^T u for a batch of cotangents {out: (B, *out.shape)},
        one batched backward (or B plain ones when vmap cannot run the backward)."""
        outs = [self.outputs[o] for o in cotangents]
        grads_in = [cotangents[o].to(self.outputs[o].dtype) for o in cotangents]
        batch = grads_in[0].shape[0]
        leaves = [leaf for _, leaf in self.leaves]
        if self.batched:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    grads = torch.autograd.grad(outs, leaves, grads_in, retain_graph=True, allow_unused=True,
                                                is_grads_batched=True)
                result_b = {p: (g.reshape(batch, -1) if g is not None else
                                torch.zeros((batch, leaf.numel()), dtype=leaf.dtype))
                            for (p, leaf), g in zip(self.leaves, grads)}
                if not self._vjp_verified:
                    # A vmap that runs is not proof it ran the same maths: one plain call on the
                    # first cotangent must agree to rounding (1e3 eps relative, as for rows).
                    plain = torch.autograd.grad(outs, leaves, [g[0] for g in grads_in], retain_graph=True,
                                                allow_unused=True)
                    for (p, leaf), g in zip(self.leaves, plain):
                        ref = torch.zeros(leaf.numel(), dtype=leaf.dtype) if g is None else g.reshape(-1)
                        scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
                        tol = 1e3 * torch.finfo(ref.dtype).eps * scale
                        if ref.numel() and float((result_b[p][0] - ref).abs().max()) > tol:
                            raise _BatchedDisagrees("the batched backward disagreed with a plain backward call")
                    self._vjp_verified = True
                return result_b
            except _BatchedDisagrees as exc:
                self.batched = False
                self.fallback_reason = exc.reason
            except Exception as exc:
                self.batched = False
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.fallback_reason = f"{type(exc).__name__}: {text.split('. ')[0][:160]}"
        result: dict[int, list[torch.Tensor]] = {p: [] for p, _ in self.leaves}
        for b in range(batch):
            try:
                grads = torch.autograd.grad(outs, leaves, [g[b] for g in grads_in], retain_graph=True,
                                            allow_unused=True)
            except Exception as exc:
                raise UserCodeError(self.phase, exc) from exc
            for (p, leaf), g in zip(self.leaves, grads):
                result[p].append(torch.zeros(leaf.numel(), dtype=leaf.dtype) if g is None else g.reshape(-1))
        return {p: torch.stack(v) for p, v in result.items()}

    def block(self, o: int, p: int) -> torch.Tensor:
        """The whole (o, p) block, out.shape + leaf.shape (only where it fits in memory)."""
        out = self.outputs[o]
        leaf = dict(self.leaves)[p]
        m = out.numel()
        step = self.rows_per_chunk(o)
        parts = [self.rows(o, s, min(m, s + step))[p] for s in range(0, m, step)]
        flat = torch.cat(parts) if parts else torch.zeros((0, leaf.numel()), dtype=leaf.dtype)
        return flat.reshape((*out.shape, *leaf.shape)).detach()

    def jvp(self, directions: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """J v for every output without forming J: u -> J^T u is linear in u, so the VJP of that
        VJP with cotangent v is J v (two backward passes). None if the graph cannot do it."""
        result: dict[int, torch.Tensor] = {}
        try:
            for o, out in self.outputs.items():
                u = torch.zeros_like(out, requires_grad=True)
                with torch.enable_grad():
                    grads = torch.autograd.grad(out, [leaf for _, leaf in self.leaves], u, create_graph=True,
                                                retain_graph=True, allow_unused=True)
                pairs = [(g, directions[p]) for (p, _), g in zip(self.leaves, grads)
                         if g is not None and g.requires_grad]
                if not pairs:
                    result[o] = torch.zeros_like(out).detach()
                    continue
                (jv,) = torch.autograd.grad([g for g, _ in pairs], [u], [v.to(g.dtype) for g, v in pairs],
                                            retain_graph=True, allow_unused=True)
                result[o] = torch.zeros_like(out).detach() if jv is None else jv.detach()
        except Exception:
            return None
        return result


class LazyBlocks(dict):  # type: ignore[type-arg]
    """A Block dict whose entries are computed from a VjpSource on first access, so callers that
    need whole blocks still get them while a streaming check never materialises them."""

    def __init__(self, source: VjpSource, keys: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.source = source
        self._keys = list(keys)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        if not dict.__contains__(self, key):
            if key not in self._keys:
                raise KeyError(key)
            dict.__setitem__(self, key, self.source.block(*key))
        return dict.__getitem__(self, key)

    def keys(self):  # type: ignore[no-untyped-def, override]
        return list(self._keys)

    def __iter__(self):  # type: ignore[no-untyped-def, override]
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __bool__(self) -> bool:
        return bool(self._keys)

    def items(self):  # type: ignore[no-untyped-def, override]
        return [(k, self[k]) for k in self._keys]

    def values(self):  # type: ignore[no-untyped-def, override]
        return [self[k] for k in self._keys]

    def get(self, key, default=None):  # type: ignore[no-untyped-def, override]
        return self[key] if key in self._keys else default


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
        leaf = call_args[pos].requires_grad_(True)
        leaves.append((pos, leaf))
        # Forward gets a non-leaf copy, as in real use (x = layer(...)): an op that writes into its
        # input and calls ctx.mark_dirty is legal on that, never on a leaf that requires grad.
        with torch.enable_grad():
            call_args[pos] = leaf.clone()
    try:
        with torch.enable_grad():
            outputs = as_tuple(function.apply(*call_args))
    except (Exception, SystemExit) as exc:  # the user's code must not end the run (sys.exit in forward)
        raise UserCodeError("forward", exc) from exc
    diff_outputs = [(i, o) for i, o in enumerate(outputs) if is_differentiable_output(o)]
    return ForwardRun(leaves=leaves, args=call_args, outputs=outputs, diff_outputs=diff_outputs)


class AnalyticJacobian:
    """The user's backward as a Jacobian: rows streamed from `source`, or whole blocks on first
    access of `blocks` (the dense path of small cases)."""

    def __init__(self, run: ForwardRun, *, max_bytes: int, seed: int) -> None:
        self.source = VjpSource(run.diff_outputs, run.leaves, phase="backward", max_bytes=max_bytes,
                                check_seed=seed)
        self.blocks = LazyBlocks(self.source, [(o, p) for o, _ in run.diff_outputs for p, _ in run.leaves])

    @property
    def path(self) -> str:
        return self.source.path if self.source.outputs else "none"

    @property
    def fallback_reason(self) -> str:
        return self.source.fallback_reason


def analytic_jacobian(run: ForwardRun, *, max_bytes: int, seed: int) -> AnalyticJacobian:
    """Lazy: rows are computed (batched, with the per-row fallback) when a check asks for them."""
    return AnalyticJacobian(run, max_bytes=max_bytes, seed=seed)


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
    path: str = "loop"
    fallback_reason: str = ""


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


Evaluator = Callable[[list[Any]], tuple[torch.Tensor, ...]]
# f(args, in_pos, X) -> the outputs at args with args[in_pos] replaced by each X[b]: (B, *out.shape)
BatchedEvaluator = Callable[[list[Any], int, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass
class NumericalColumns:
    """Finite-difference columns d out / d x[flat_cols] of one input, per output: (out.numel(), k)."""

    estimates: dict[int, torch.Tensor]
    bars: dict[int, torch.Tensor]
    kinks: dict[int, torch.Tensor]
    evaluations: int
    path: str
    fallback_reason: str = ""


def _richardson(values: Sequence[torch.Tensor], f0: torch.Tensor, h: torch.Tensor,
                eps: float, widen_at_kinks: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate, error bar and kink flag from f(x+h), f(x-h), f(x+h/2), f(x-h/2), each (k, m).

    R = (4 D(h/2) - D(h)) / 3 removes the h^2 term of the central difference D; the gap between
    the O(h^2) and the O(h^4) estimate, |R - D(h/2)|, bounds the error of the better one. At a
    smooth point the gap between one-sided slopes halves with h; at a kink it does not.
    """
    fp1, fm1, fp2, fm2 = values
    d1 = (fp1 - fm1) / (2 * h)
    d2 = (fp2 - fm2) / h
    estimate = (4 * d2 - d1) / 3
    scale = torch.maximum(torch.maximum(fp1.abs(), fm1.abs()), f0.abs())
    # Rounding in f(x +- h) is ~eps*|f| per value; the combination above divides by h with
    # coefficients summing to ~3, so 8*eps*|f|/h is a safe floor for the error bar.
    bar = (estimate - d2).abs() + 8 * eps * scale / h
    gap1 = ((fp1 - f0) / h - (f0 - fm1) / h).abs()
    gap2 = ((fp2 - f0) / (h / 2) - (f0 - fm2) / (h / 2)).abs()
    # A kink: the one-sided gap does not shrink when h halves (0.75 allows for a curvature
    # term), is not a mere 1e-6 relative wobble, and stands well above rounding (64 eps|f|/h).
    kink = (gap2 > 0.75 * gap1) & (gap2 > 1e-6 * torch.clamp(d2.abs(), min=1.0)) \
        & (gap2 > 64 * eps * scale / h)
    # At a kink the derivative is any value between the one-sided slopes.
    if widen_at_kinks:
        bar = torch.where(kink, torch.maximum(bar, torch.maximum(gap1, gap2)), bar)
    return estimate, bar, kink


def _fd_columns_per_chunk(n: int, m_total: int, itemsize: int, max_bytes: int) -> int:
    # Per column: 4 perturbed copies of the input and 4 outputs, times the forward's temporaries.
    per_col = 4 * max(1, n + m_total) * itemsize
    cols = max(MIN_ROWS // 4, CHUNK_TARGET_BYTES // per_col)
    cols = min(cols, max(1, max_bytes // (per_col * WORKSPACE_FACTOR)))
    return max(1, min(max(1, n), cols))


def numerical_columns(
    evaluate: Evaluator,
    args: Sequence[Any],
    in_pos: int,
    flat_cols: torch.Tensor,
    out_positions: Sequence[int],
    *,
    batched: BatchedEvaluator | None = None,
    max_bytes: int = 512 * 2**20,
    f0: tuple[torch.Tensor, ...] | None = None,
    seed: int = 0,
    step_scale: float = 1.0,
) -> NumericalColumns:
    """Richardson central differences for the input entries `flat_cols` of args[in_pos].

    With `batched`, each chunk of columns is one vmapped forward over the 4*k perturbed copies;
    the batched path is trusted only after one of its columns matched the same column computed
    by plain calls, because a vmap that runs is not proof it ran the same maths (a body that
    mixes batch entries, or writes into a shared buffer, runs fine and is wrong). Without it, or
    when vmap fails, four plain forward calls per column.
    """
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    if f0 is None:
        f0 = evaluate(base)
    x = base[in_pos]
    dtype = x.dtype
    eps = torch.finfo(dtype).eps
    flat = x.reshape(-1)
    cols = flat_cols.reshape(-1).to(torch.long)
    k_total = int(cols.numel())
    steps = step_sizes(x).reshape(-1) * step_scale
    m_total = sum(int(f.numel()) for f in f0)
    chunk = _fd_columns_per_chunk(flat.numel(), m_total, x.element_size(), max_bytes)
    per_out: dict[int, dict[str, list[torch.Tensor]]] = {o: {"e": [], "b": [], "k": []} for o in out_positions}
    evaluations = 0
    path = "batched" if batched is not None else "loop"
    reason = ""

    def perturbed(chunk_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = steps[chunk_cols]
        k = chunk_cols.numel()
        X = flat.unsqueeze(0).repeat(4 * k, 1)
        rows = torch.arange(4 * k)
        deltas = torch.cat([h, -h, h / 2, -h / 2])
        X[rows, chunk_cols.repeat(4)] += deltas  # the same x + delta the plain loop computes
        return X.reshape(4 * k, *x.shape), h

    def looped(chunk_cols: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        X, h = perturbed(chunk_cols)
        outs = [evaluate([*base[:in_pos], X[b], *base[in_pos + 1:]]) for b in range(X.shape[0])]
        return [torch.stack([o[idx].reshape(-1) for o in outs]) if outs else
                torch.zeros((0, f0[idx].numel()), dtype=dtype) for idx in range(len(out_positions))], h

    def run_batched(chunk_cols: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        assert batched is not None
        X, h = perturbed(chunk_cols)
        outs = batched(base, in_pos, X)
        return [o.reshape(X.shape[0], -1) for o in outs], h

    verified = False
    for start in range(0, k_total, chunk):
        chunk_cols = cols[start:start + chunk]
        k = int(chunk_cols.numel())
        if path == "batched":
            try:
                F, h = run_batched(chunk_cols)
                if not verified:
                    _verify_batched_column(F, chunk_cols, looped, f0, eps, seed)
                    evaluations += 4
                    verified = True
            except Exception as exc:  # vmap cannot run this body, or ran different maths: loop
                path = "loop"
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = exc.reason if isinstance(exc, _BatchedDisagrees) else \
                    f"{type(exc).__name__}: {text.split('. ')[0][:160]}"
                if isinstance(exc, UserCodeError):
                    raise
        if path == "loop":
            F, h = looped(chunk_cols)
        evaluations += 4 * k
        hk = h.reshape(k, 1)
        for idx, o in enumerate(out_positions):
            Fo = F[idx].reshape(4, k, -1)
            est, bar, kink = _richardson([Fo[0], Fo[1], Fo[2], Fo[3]], f0[idx].reshape(1, -1), hk, eps)
            per_out[o]["e"].append(est.T)
            per_out[o]["b"].append(bar.T)
            per_out[o]["k"].append(kink.T)
    estimates: dict[int, torch.Tensor] = {}
    bars: dict[int, torch.Tensor] = {}
    kinks: dict[int, torch.Tensor] = {}
    for idx, o in enumerate(out_positions):
        m = f0[idx].numel()
        if per_out[o]["e"]:
            estimates[o] = torch.cat(per_out[o]["e"], dim=1)
            bars[o] = torch.cat(per_out[o]["b"], dim=1)
            kinks[o] = torch.cat(per_out[o]["k"], dim=1)
        else:
            estimates[o] = bars[o] = torch.zeros((m, 0), dtype=dtype)
            kinks[o] = torch.zeros((m, 0), dtype=torch.bool)
    return NumericalColumns(estimates, bars, kinks, evaluations, path, reason)


# Step levels: the default step, then 8 and 64 times smaller (powers of two, so x +- h stays
# exact). The default step suits functions that vary on the scale of max(1, |x|); an op that
# varies faster (1/x near 1e-4, sin(2000 x)) is only resolved by a smaller step, and the error
# estimate below picks, entry by entry, the level where successive estimates agree best.
STEP_LEVELS = (1.0, 1 / 8, 1 / 64)


def best_of_levels(levels: Sequence[NumericalColumns]) -> NumericalColumns:
    """Per entry, the finer estimate of the pair of successive levels that agree best.

    Its error bar is that disagreement plus the finer level's own bar: two estimates whose steps
    differ 8-fold only agree when both are in the asymptotic regime, so the gap bounds the error
    (a Richardson bar from one step size alone can be far too small when the step is too large).
    """
    if len(levels) == 1:
        return levels[0]
    estimates: dict[int, torch.Tensor] = {}
    bars: dict[int, torch.Tensor] = {}
    kinks: dict[int, torch.Tensor] = {}
    for o in levels[0].estimates:
        E = torch.stack([lv.estimates[o] for lv in levels])
        B = torch.stack([lv.bars[o] for lv in levels])
        K = torch.stack([lv.kinks[o] for lv in levels])
        err = (E[:-1] - E[1:]).abs() + B[1:]
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
        choice = err.argmin(dim=0, keepdim=True)
        estimates[o] = E[1:].gather(0, choice)[0]
        bars[o] = err.gather(0, choice)[0]
        kinks[o] = K[1:].gather(0, choice)[0]
    last = levels[-1]
    return NumericalColumns(estimates, bars, kinks, sum(lv.evaluations for lv in levels), last.path,
                            next((lv.fallback_reason for lv in levels if lv.fallback_reason), ""))


def _verify_batched_column(F: list[torch.Tensor], chunk_cols: torch.Tensor,
                           looped: Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]],
                           f0: tuple[torch.Tensor, ...], eps: float, seed: int) -> None:
    """One column of the batched chunk (a seeded random one) against plain forward calls.

    The derivatives must agree within the sum of their error bars: vmap may sum in another
    order (rounding of a few eps*|f|, i.e. under the 8*eps*|f|/h floor of each bar), while any
    different maths moves the derivative by far more.
    """
    k = int(chunk_cols.numel())
    pick = int(torch.randint(0, k, (1,), generator=torch.Generator().manual_seed(seed + 29)))
    plain, h = looped(chunk_cols[pick:pick + 1])
    eps_t = eps
    for idx in range(len(F)):
        Fb = F[idx].reshape(4, k, -1)[:, pick]
        Fl = plain[idx].reshape(4, 1, -1)[:, 0]
        f = f0[idx].reshape(1, -1)
        hh = h.reshape(1, 1)
        # Bars without the widening at kinks: a batch that mixes its entries looks like a kink
        # to the one-sided slopes, and must not be excused as one.
        eb, bb, _ = _richardson([Fb[j:j + 1] for j in range(4)], f, hh, eps_t, widen_at_kinks=False)
        el, bl, _ = _richardson([Fl[j:j + 1] for j in range(4)], f, hh, eps_t, widen_at_kinks=False)
        finite = torch.isfinite(eb) & torch.isfinite(el)
        if bool(((eb - el).abs() > bb + bl)[finite].any()) or bool((torch.isfinite(eb) != torch.isfinite(el)).any()):
            raise _BatchedDisagrees("the vmapped forward disagreed with plain forward calls")


def numerical_jacobian(
    evaluate: Evaluator,
    args: Sequence[Any],
    diff_positions: Sequence[int],
    out_positions: Sequence[int],
    *,
    batched: BatchedEvaluator | None = None,
    max_bytes: int = 512 * 2**20,
    seed: int = 0,
) -> NumericalJacobian:
    """Every column of every block, by `numerical_columns` (batched where the body allows)."""
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    f0 = evaluate(base)
    blocks: Block = {}
    bars: Block = {}
    kinks: Block = {}
    evaluations = 1
    dtype = next((a.dtype for a in base if isinstance(a, torch.Tensor)), torch.float64)
    path, reason = ("batched" if batched is not None else "loop"), ""
    for in_pos in diff_positions:
        x = base[in_pos]
        cols = best_of_levels([numerical_columns(evaluate, base, in_pos, torch.arange(x.numel()), out_positions,
                                                 batched=batched, max_bytes=max_bytes, f0=f0, seed=seed,
                                                 step_scale=scale) for scale in STEP_LEVELS])
        evaluations += cols.evaluations
        if cols.path == "loop" and path == "batched":
            path, reason = "loop", cols.fallback_reason
        for o, out in zip(out_positions, f0):
            shape = (*out.shape, *x.shape)
            blocks[(o, in_pos)] = cols.estimates[o].reshape(shape)
            bars[(o, in_pos)] = cols.bars[o].reshape(shape)
            kinks[(o, in_pos)] = cols.kinks[o].reshape(shape)
    return NumericalJacobian(blocks=blocks, error_bars=bars, kinks=kinks, dtype=dtype,
                             evaluations=evaluations, path=path, fallback_reason=reason)


def forward_body(function: type, needs: tuple[bool, ...]) -> Callable[..., tuple[Any, ...]]:
    """The forward maths outside Function.apply: forward(*args) for setup_context-style
    Functions, else forward(StandInCtx, *args)."""
    if uses_setup_context(function):
        return lambda *a: as_tuple(function.forward(*a))
    return lambda *a: as_tuple(function.forward(StandInCtx(needs), *a))


def make_batched_evaluator(function: type, out_positions: Sequence[int],
                           n_args: int, diff_positions: Sequence[int]) -> BatchedEvaluator:
    """f(args, in_pos, X) -> outputs for each X[b], by torch.func.vmap over the forward body.

    Every call works on copies: a body that writes into its input writes into our copy (and
    one that writes into an unbatched argument fails under vmap, which sends us to the loop).
    """
    needs = tuple(pos in diff_positions for pos in range(n_args))
    body = forward_body(function, needs)

    def evaluate_batch(call_args: list[Any], in_pos: int, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fresh = clone_args(call_args)

        def one(xi: torch.Tensor) -> tuple[torch.Tensor, ...]:
            local = list(fresh)
            local[in_pos] = xi
            outs = body(*local)
            return tuple(outs[o] for o in out_positions)

        with torch.no_grad():
            result = torch.func.vmap(one)(X.clone())
        return tuple(r.detach() for r in result)

    return evaluate_batch


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


# Directional probes are cheap (four forward calls a level), so they try a wider range of steps.
DIRECTIONAL_LEVELS = (1.0, 1 / 8, 1 / 64, 1 / 512)


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

    per_level: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    for level in DIRECTIONAL_LEVELS:
        hl = h * level
        fp1, fm1, fp2, fm2 = at(hl), at(-hl), at(hl / 2), at(-hl / 2)
        estimates, bars = [], []
        for a, b, c, d in zip(fp1, fm1, fp2, fm2):
            d1 = (a - b) / (2 * hl)
            d2 = (c - d) / hl
            est = (4 * d2 - d1) / 3
            scale = torch.maximum(a.abs(), b.abs())
            estimates.append(est)
            bars.append((est - d2).abs() + 8 * eps * scale / hl)
        per_level.append((estimates, bars))
    # Per output entry, the finer estimate of the best-agreeing pair of successive step sizes.
    best_estimates, best_bars = [], []
    for k in range(len(per_level[0][0])):
        E = torch.stack([lvl[0][k] for lvl in per_level])
        B = torch.stack([lvl[1][k] for lvl in per_level])
        err = (E[:-1] - E[1:]).abs() + B[1:]
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
        choice = err.argmin(dim=0, keepdim=True)
        best_estimates.append(E[1:].gather(0, choice)[0])
        best_bars.append(err.gather(0, choice)[0])
    return tuple(best_estimates), tuple(best_bars)


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
    source: VjpSource | None = None


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
    # Lazy: rows are streamed by the check (or whole blocks built on first access).
    source = VjpSource(selected, leaves, phase="reference", max_bytes=max_bytes)
    return ReferenceJacobian(LazyBlocks(source, [(o, p) for o, _ in selected for p, _ in leaves]),
                             path="batched", source=source)


# --------------------------------------------------------------------------------------
# Finite differences on demand: the second truth, computed only where a check needs it
# --------------------------------------------------------------------------------------

class FiniteDifferences:
    """Numerical columns and directional derivatives at fixed float64 args, on demand.

    With a trusted reference, finite differences are only needed at the input entries (columns)
    where the analytic Jacobian disagrees with the reference, and along probe directions; this
    object computes exactly those, batched over perturbations where the forward body allows.
    """

    def __init__(self, function: type | None, evaluate: Evaluator, args: Sequence[Any],
                 diff_positions: Sequence[int], out_positions: Sequence[int], *, max_bytes: int,
                 seed: int = 0, allow_batched: bool = True) -> None:
        self.evaluate = evaluate
        self.args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.diff_positions = list(diff_positions)
        self.out_positions = list(out_positions)
        self.max_bytes = max_bytes
        self.seed = seed
        self.batched: BatchedEvaluator | None = None
        if function is not None and allow_batched:
            self.batched = make_batched_evaluator(function, out_positions, len(self.args), diff_positions)
        self.f0 = evaluate(self.args)
        self.evaluations = 1
        self.path = "batched" if self.batched is not None else "loop"
        self.fallback_reason = ""

    def columns(self, in_pos: int, flat_cols: torch.Tensor) -> NumericalColumns:
        levels = []
        for scale in STEP_LEVELS:
            cols = numerical_columns(self.evaluate, self.args, in_pos, flat_cols, self.out_positions,
                                     batched=self.batched, max_bytes=self.max_bytes, f0=self.f0, seed=self.seed,
                                     step_scale=scale)
            self.evaluations += cols.evaluations
            if cols.path == "loop" and self.batched is not None:
                # Remember: once vmap failed or disagreed, every later chunk uses the loop.
                self.batched = None
                self.path, self.fallback_reason = "loop", cols.fallback_reason
            levels.append(cols)
        return best_of_levels(levels)

    def jacobian(self) -> NumericalJacobian:
        """The whole numerical Jacobian (the truth when the reference cannot be trusted)."""
        blocks: Block = {}
        bars: Block = {}
        kinks: Block = {}
        for p in self.diff_positions:
            x = self.args[p]
            cols = self.columns(p, torch.arange(x.numel()))
            for o, out in zip(self.out_positions, self.f0):
                shape = (*out.shape, *x.shape)
                blocks[(o, p)] = cols.estimates[o].reshape(shape)
                bars[(o, p)] = cols.bars[o].reshape(shape)
                kinks[(o, p)] = cols.kinks[o].reshape(shape)
        dtype = next((a.dtype for a in self.args if isinstance(a, torch.Tensor)), torch.float64)
        return NumericalJacobian(blocks=blocks, error_bars=bars, kinks=kinks, dtype=dtype,
                                 evaluations=self.evaluations, path=self.path, fallback_reason=self.fallback_reason)

    def directional(self, directions: dict[int, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        self.evaluations += 4 * len(DIRECTIONAL_LEVELS)
        return directional_derivatives(self.evaluate, self.args, directions)
