"""Rows of a Jacobian from vector-Jacobian products on a kept autograd graph.

The analytic Jacobian (the user's backward) and the reference (autograd through the forward
body) are both graphs from leaves to outputs; `VjpSource` reads either one row chunk at a time
with batched VJPs (`torch.autograd.grad(..., is_grads_batched=True)`), falling back to one
backward per row when vmap cannot run the backward. A Jacobian of 16,384 x 16,384 float64
entries is 2 GiB: chunks let a check hold one at a time.

For an input on a constraint set (symmetric matrices, the simplex) every row is projected
onto the set's tangent space: the rows of J P are P(J^T u) for the (self-adjoint) projector P.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch

from gradverify.usercode import UserCodeError, user_code

Tangent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Size target of one chunk of Jacobian rows, counting one row of the gradients and one of the
# grad_outputs. Small chunks stay in the CPU caches: measured on a 2-core machine, a 32-row
# chunk of a 16,384-column Jacobian ran a batched backward in ~2 ms, while 512 rows took
# ~400 ms (past the cache every element-wise pass goes to memory). Below MIN_ROWS the per-call
# overhead (vmap setup, the autograd engine, Python) dominates instead. A full check of a
# 4,096 x 4,096 Jacobian measured the same CPU time (0.45-0.5 s) with 4, 8 and 16 MiB chunks
# and 20% more with 2 MiB; 4 MiB holds the least memory of those.
CHUNK_TARGET_BYTES = 4 * 2**20
MIN_ROWS = 32

# A chunk's temporaries: the grad_outputs, the gradients, and the autograd/vmap intermediates
# of one batched backward, each about the size of a row; 4 is a measured-safe factor. Only the
# memory budget (--max-memory) uses it: it bounds chunks from above.
WORKSPACE_FACTOR = 4


def rows_per_chunk(out_numel: int, in_numel: int, itemsize: int, max_bytes: int) -> int:
    per_row = max(1, in_numel + out_numel) * itemsize
    rows = max(MIN_ROWS, CHUNK_TARGET_BYTES // per_row)
    rows = min(rows, max(1, max_bytes // (per_row * WORKSPACE_FACTOR)))
    return max(1, min(max(1, out_numel), rows))


class BatchedDisagrees(Exception):
    """A vmapped computation ran but did not compute what the plain call computes."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0][:160]}"


class VjpSource:
    """Rows of d outputs / d leaves on demand, by batched VJPs on a kept graph.

    The batched path is cross-checked on the first chunk of each output against one plain
    backward with a random grad_output restricted to that chunk, because a vmap that runs is
    not proof that it ran the same maths (a backward that mixes batch entries runs fine).
    """

    def __init__(self, outputs: Sequence[tuple[int, torch.Tensor]], leaves: Sequence[tuple[int, torch.Tensor]],
                 *, phase: str, max_bytes: int, tangents: dict[int, Tangent] | None = None,
                 allow_batched: bool = True, check_seed: int = 0) -> None:
        self.outputs = {o: out for o, out in outputs}
        self.leaves = list(leaves)
        self.phase = phase
        self.max_bytes = max_bytes
        self.tangents = tangents or {}
        self.batched = allow_batched
        self.fallback_reason = ""
        self.check_seed = check_seed
        self.backward_calls = 0
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
        return rows_per_chunk(out.numel(), max(1, self.in_numel()), out.element_size(), self.max_bytes)

    # --- the projection onto constraint sets ---------------------------------------------------

    def _project(self, p: int, leaf: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """(B, n) gradient rows -> their tangent-space projection (the rows of J P)."""
        tangent = self.tangents.get(p)
        if tangent is None:
            return flat
        batch = flat.shape[0]
        x = leaf.detach()
        projected = tangent(x.expand(batch, *x.shape), flat.reshape(batch, *x.shape))
        return projected.reshape(batch, -1)

    def _grads(self, outs: list[torch.Tensor], grad_outputs: list[torch.Tensor], batched: bool) -> tuple[Any, ...]:
        leaves = [leaf for _, leaf in self.leaves]
        self.backward_calls += 1
        with user_code(self.phase), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.autograd.grad(outs, leaves, grad_outputs, retain_graph=True, allow_unused=True,
                                       is_grads_batched=batched)

    def _assemble(self, grads: Sequence[Any], batch: int) -> dict[int, torch.Tensor]:
        result = {}
        for (p, leaf), g in zip(self.leaves, grads):
            flat = (g.reshape(batch, -1) if g is not None else
                    torch.zeros((batch, leaf.numel()), dtype=leaf.dtype, device=leaf.device))
            result[p] = self._project(p, leaf, flat)
        return result

    # --- rows -------------------------------------------------------------------------------

    def rows(self, o: int, start: int, stop: int) -> dict[int, torch.Tensor]:
        """{in_pos: (stop - start, leaf.numel())}: rows start..stop-1 of every block of output o."""
        out = self.outputs[o]
        if self.batched:
            try:
                grad_outputs = self._unit_rows(o, start, stop)
                result = self._assemble(self._grads([out], [grad_outputs], True), stop - start)
                if o not in self._verified:
                    self._verify(o, start, stop, result)
                    self._verified.add(o)
                return result
            except BatchedDisagrees as exc:
                self.batched = False
                self.fallback_reason = str(exc)
            except UserCodeError as exc:  # vmap cannot run this backward: fall back, say why
                self.batched = False
                self.fallback_reason = _first_line(exc.original)
        rows: dict[int, list[torch.Tensor]] = {p: [] for p, _ in self.leaves}
        unit = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
        for r in range(start, stop):
            unit.zero_()
            unit[r] = 1
            grads = self._grads([out], [unit.reshape(out.shape).clone()], False)
            for p, row in self._assemble(grads, 1).items():
                rows[p].append(row)
        return {p: (torch.cat(v) if v else torch.zeros((0, leaf.numel()), dtype=leaf.dtype))
                for (p, leaf), v in zip(self.leaves, rows.values())}

    def _unit_rows(self, o: int, start: int, stop: int) -> torch.Tensor:
        """Unit grad_outputs e_start..e_{stop-1} in a buffer kept per output: fresh memory
        page-faults on every chunk (that cost more than the backward itself in a VM), and
        zeroing the whole buffer each time also undoes a backward that writes into its grad_output."""
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

    def _tolerance(self, dtype: torch.dtype, scale: float, length: int) -> float:
        # Same maths in another summation order: a few hundred eps relative, times sqrt(length)
        # for the length of the sums; 1e3 eps leaves room and is still ~1e-12 in float64.
        eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
        return 1e3 * eps * scale * math.sqrt(max(1, length))

    def _verify(self, o: int, start: int, stop: int, rows: dict[int, torch.Tensor]) -> None:
        out = self.outputs[o]
        gen = torch.Generator().manual_seed(self.check_seed + 17 + o)
        probe = torch.zeros(out.numel(), dtype=torch.float64)
        probe[start:stop] = torch.randn(stop - start, generator=gen, dtype=torch.float64)
        probe = probe.to(out.dtype).to(out.device)
        plain = self._assemble(self._grads([out], [probe.reshape(out.shape)], False), 1)
        for p, _ in self.leaves:
            jac = rows[p]
            from_batched = probe[start:stop].reshape(1, -1).to(jac.dtype) @ jac
            ref = plain[p].reshape(-1).to(jac.dtype)
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            if ref.numel() and float((from_batched.reshape(-1) - ref).abs().max()) > \
                    self._tolerance(jac.dtype, max(scale, float(jac.abs().max()) if jac.numel() else 0.0),
                                    stop - start):
                raise BatchedDisagrees("the batched backward disagreed with a plain backward call")

    # --- products ---------------------------------------------------------------------------

    def vjp(self, cotangents: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{in_pos: (B, leaf.numel())} = J^T u for a batch of cotangents {out: (B, *out.shape)}."""
        keys = list(cotangents)
        outs = [self.outputs[o] for o in keys]
        grads_in = [cotangents[o].to(self.outputs[o].dtype).to(self.outputs[o].device) for o in keys]
        batch = grads_in[0].shape[0]
        if self.batched:
            try:
                result = self._assemble(self._grads(outs, grads_in, True), batch)
                if not self._vjp_verified:
                    plain = self._assemble(self._grads(outs, [g[0] for g in grads_in], False), 1)
                    for p, _ in self.leaves:
                        ref = plain[p].reshape(-1)
                        scale = float(ref.abs().max()) if ref.numel() else 0.0
                        if ref.numel() and float((result[p][0] - ref).abs().max()) > \
                                self._tolerance(ref.dtype, scale, 1):
                            raise BatchedDisagrees("the batched backward disagreed with a plain backward call")
                    self._vjp_verified = True
                return result
            except BatchedDisagrees as exc:
                self.batched = False
                self.fallback_reason = str(exc)
            except UserCodeError as exc:
                self.batched = False
                self.fallback_reason = _first_line(exc.original)
        parts: dict[int, list[torch.Tensor]] = {p: [] for p, _ in self.leaves}
        for b in range(batch):
            for p, row in self._assemble(self._grads(outs, [g[b] for g in grads_in], False), 1).items():
                parts[p].append(row)
        return {p: torch.cat(v) for p, v in parts.items()}

    def block(self, o: int, p: int) -> torch.Tensor:
        """The whole (o, p) block, out.shape + leaf.shape (only where it fits in memory)."""
        return self.blocks(o)[p]

    def blocks(self, o: int) -> dict[int, torch.Tensor]:
        """Every block of output o at once (one pass over its rows)."""
        out = self.outputs[o]
        m = out.numel()
        step = self.rows_per_chunk(o)
        parts: dict[int, list[torch.Tensor]] = {p: [] for p, _ in self.leaves}
        for s in range(0, m, step):
            for p, rows in self.rows(o, s, min(m, s + step)).items():
                parts[p].append(rows)
        result = {}
        for p, leaf in self.leaves:
            flat = torch.cat(parts[p]) if parts[p] else torch.zeros((0, leaf.numel()), dtype=leaf.dtype)
            result[p] = flat.reshape((*out.shape, *leaf.shape)).detach()
        return result

    def jvp(self, directions: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """J v for every output without forming J: u -> J^T u is linear in u, so the VJP of that
        VJP with cotangent v is J v (two backward passes). None if the graph cannot do it (a
        backward that is not itself differentiable)."""
        result: dict[int, torch.Tensor] = {}
        leaves = [leaf for _, leaf in self.leaves]
        for o, out in self.outputs.items():
            u = torch.zeros_like(out, requires_grad=True)
            try:
                with user_code(self.phase), torch.enable_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    grads = torch.autograd.grad(out, leaves, u, create_graph=True, retain_graph=True,
                                                allow_unused=True)
                    pairs = []
                    for (p, leaf), g in zip(self.leaves, grads):
                        if g is None:
                            continue  # the output does not depend on this input
                        if not g.requires_grad:
                            return None  # a backward that is not differentiable: J v is out of reach
                        v = directions[p].to(g.dtype).to(g.device)
                        tangent = self.tangents.get(p)
                        pairs.append((g, tangent(leaf.detach(), v) if tangent is not None else v))
                    if not pairs:
                        result[o] = torch.zeros_like(out).detach()
                        continue
                    (jv,) = torch.autograd.grad([g for g, _ in pairs], [u], [v for _, v in pairs],
                                                retain_graph=True, allow_unused=True)
            except UserCodeError:
                return None
            result[o] = torch.zeros_like(out).detach() if jv is None else jv.detach()
        return result
