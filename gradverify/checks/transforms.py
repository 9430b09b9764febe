"""torch.func transforms against the op called eagerly: vmap rules, vjp under vmap, jvp under vmap.

A transform runs other code than the eager call: the op's own vmap rule (a Function's `vmap`
staticmethod or `generate_vmap_rule`, a custom op's `register_vmap`), the backward batched
over many cotangents (torch.func.jacrev, `is_grads_batched`), the jvp batched over tangents
(torch.func.jacfwd). Each probe compares the transformed result with the same quantity
computed eagerly, one call at a time, which the jacobian and forward_mode checks judge against
the truth; so a transform that agrees with eager is right exactly where eager is, and one that
disagrees is named (`vmap_rule`) with the output and the layout that broke:

* vmap rule: vmap(op) over a batch of 3 inputs (each a perturbation of the case's input,
  x (1 + 0.25 u), u uniform in [-1, 1]) against a loop over the batch, with every input batched
  at dim 0, only the first input batched, and the batch dim last (a rule that assumes
  in_dims == 0 or that every input is batched fails one of them);
* vjp: torch.func.vjp with a random cotangent, then vmap over 3 random cotangents, against the
  eager backward with each cotangent (random, never ones);
* jvp: vmap of torch.func.jvp over 3 random tangents against forward AD with each.

A transform that does not apply is said so, with why: an op without a vmap rule, an old-style
Function (forward(ctx, ...): torch.func needs setup_context), a torch.library custom op
(torch.func cannot differentiate one in this torch), an op without jvp (see forward_mode).
A transform that raises is "not applicable" unless transforms are asked for by name
(--check transforms): then it is the op's error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad

from gradverify.checks.base import CaseContext
from gradverify.checks.common import first_line, quiet_torch, requested
from gradverify.numerics.forward import call_op, clone_args
from gradverify.numerics.tolerance import Tolerance
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, boundary, user_code, user_frame

NAME = "transforms"
# Batch elements / random cotangents per probe: enough for a rule that mixes, drops or reorders
# batch entries to show (it would have to be right by accident on every one).
BATCH = 3
# How far the batch elements lie from the case's input (relative): different enough that a
# rule mixing batch entries is off by O(0.25 |x|), far beyond any tolerance; small enough to
# keep each input's signs (domains such as x > 0 stay satisfied).
SPREAD = 0.25
# torch's words for "this transform is not supported by this op", as opposed to a failure in it.
_UNSUPPORTED = ("setup_context staticmethod", "does not have vmap support", "must implement the jvp",
                "generate_vmap_rule", "batching rule", "not implemented for")


@dataclass
class Probe:
    """The outcome of one transform on one case."""

    name: str
    status: str  # "ok" | "n/a" | "mismatch" | "error"
    text: str
    diagnoses: list[Diagnosis] = field(default_factory=list)


def claims_transforms(ctx: CaseContext) -> bool:
    return requested(ctx, NAME)


def close(got: torch.Tensor, want: torch.Tensor, tolerance: Tolerance) -> tuple[bool, float, tuple[int, ...]]:
    """Whether `got` matches `want` at the case's tolerance (allowed = atol * scale + rtol |want|,
    scale = the largest |want|): both compute the same formula, so they may differ by rounding
    (a batched kernel sums in another order) and by nothing else. Returns (ok, max error, index
    of the worst entry)."""
    if got.shape != want.shape:
        return False, float("inf"), ()
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not w.numel():
        return True, 0.0, ()
    both_nan = torch.isnan(g) & torch.isnan(w)
    finite = torch.isfinite(w)
    scale = float(w[finite].abs().max()) if bool(finite.any()) else 0.0
    scale = scale if scale > 0 else 1.0  # an all-zero truth: judge in absolute terms
    # Where the eager value is not finite only the same value (NaN for NaN, the same infinity) agrees.
    allowed = torch.where(finite, tolerance.atol * scale + tolerance.rtol * w.abs(), torch.zeros_like(w))
    err = (g - w).abs()
    err = torch.where(both_nan | (g == w), torch.zeros_like(err), err)  # equal infinities agree
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    bad = err > allowed
    worst = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))).item()) if bool(bad.any()) else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), w.shape)) if w.dim() else ()
    return not bool(bad.any()), float(err.max()), index


def diff_function(ctx: CaseContext, *, clone_inputs: bool = True
                  ) -> tuple[Callable[..., tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """The op as a function of its differentiable inputs (the rest bound), returning its
    differentiable outputs; every call works on fresh copies of the bound arguments.
    clone_inputs: hand the op copies of the differentiable inputs too (an op that writes into its
    input with mark_dirty needs them under a transform); off where the caller already passes
    copies, or where the op must see the transform's own inputs, as users write it."""
    base = clone_args(ctx.args)
    positions = list(ctx.diff_positions)
    outs = list(ctx.out_positions)

    @boundary
    def fn(*diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = clone_args(base)
        for pos, value in zip(positions, diff):
            call[pos] = value.clone() if clone_inputs else value
        outputs = call_op(ctx.op, ctx.signature, call)
        return tuple(outputs[o] for o in outs)

    return fn, tuple(base[p].detach().clone() for p in positions)


def _input_name(ctx: CaseContext, k: int) -> str:
    return ctx.input_names[ctx.diff_positions[k]]


def _output_name(ctx: CaseContext, k: int) -> str:
    return ctx.output_names.get(ctx.out_positions[k], f"out[{k}]")


def _unsupported(exc: BaseException) -> bool:
    text = str(exc)
    return any(marker in text for marker in _UNSUPPORTED)


def _raised(ctx: CaseContext, name: str, exc: UserCodeError, what: str) -> Probe:
    """A transform raised: not applicable unless transforms are claimed (then the op's error)."""
    original = exc.original
    text = f"{type(original).__name__}: {first_line(original)}"
    if not claims_transforms(ctx) or (_unsupported(original) and ctx.op.kind in ("custom_op", "torch.ops")):
        return Probe(name, "n/a", f"not applicable: {what} raised {text}")
    file, line = user_frame(original, prefer=ctx.case.op.file)
    where = f" at {file}:{line}" if file else ""
    message = f"{what} raised {text}{where}"
    return Probe(name, "error", message, [Diagnosis("backward_error", message,
                                                    hint="make the op work under torch.func (setup_context, a vmap "
                                                         "rule or generate_vmap_rule = True), or drop --check "
                                                         "transforms")])


# --- vmap: the op's own batching rule ------------------------------------------------------------


def vmap_rule_of(ctx: CaseContext) -> str | None:
    """What batching rule the op declares ('a vmap staticmethod', ...), or None."""
    op = ctx.case.op.op
    if op.kind == "Function":
        function = op.target
        if any("vmap" in klass.__dict__ for klass in function.__mro__ if klass.__module__.split(".")[0] != "torch"):
            return "its vmap staticmethod"
        if getattr(function, "generate_vmap_rule", False):
            return "generate_vmap_rule = True"
        return None
    opdef = getattr(op, "opdef", None)
    if opdef is not None and getattr(opdef, "_vmap_fn", None) is not None:
        return "its register_vmap rule"
    return None


def _batch_of(ctx: CaseContext, x: torch.Tensor, pos: int, salt: int) -> torch.Tensor:
    """(BATCH, *x.shape): x and BATCH - 1 perturbations of it (see SPREAD)."""
    gen = torch.Generator().manual_seed(ctx.case.seed * 7919 + salt)
    u = torch.rand((BATCH - 1, *x.shape), generator=gen, dtype=torch.float64) * 2 - 1
    moved = x.detach().double().cpu() * (1 + SPREAD * u)
    tangent = ctx.tangents.get(pos)
    if tangent is not None:
        base = x.detach().double().cpu()
        moved = base + tangent(base.expand_as(moved), moved - base)  # stay on the constraint set
    return torch.cat([x.detach().unsqueeze(0), moved.to(x.dtype).to(x.device)])


def _vmap_probe(ctx: CaseContext) -> Probe:
    name = "vmap rule"
    rule = vmap_rule_of(ctx)
    if rule is None:
        return Probe(name, "n/a", "not applicable: the op declares no vmap rule (torch batches it by a loop, or "
                                  "cannot)")
    fn, primals = diff_function(ctx)
    batches = [_batch_of(ctx, x, ctx.diff_positions[k], k) for k, x in enumerate(primals)]
    layouts: list[tuple[str, tuple[int | None, ...]]] = [
        ("every input batched at dim 0", tuple(0 for _ in primals))]
    if len(primals) > 1:
        layouts.append((f"only {_input_name(ctx, 0)} batched", (0,) + (None,) * (len(primals) - 1)))
    if any(x.dim() for x in primals):
        layouts.append(("the batch dim last", tuple(x.dim() for x in primals)))
    for label, in_dims in layouts:
        inputs = [batches[k].movedim(0, d) if d is not None else primals[k] for k, d in enumerate(in_dims)]
        try:
            with user_code("vmap"), torch.no_grad():
                batched = torch.func.vmap(fn, in_dims=in_dims)(*inputs)
                looped = [fn(*[batches[k][b] if d is not None else primals[k] for k, d in enumerate(in_dims)])
                          for b in range(BATCH)]
        except UserCodeError as exc:
            return _raised(ctx, name, exc, f"vmap with {label}")
        for o in range(len(looped[0])):
            want = torch.stack([row[o] for row in looped])
            ok, err, index = close(batched[o], want, ctx.tolerance)
            if ok:
                continue
            out = _output_name(ctx, o)
            if batched[o].shape != want.shape:
                detail = f"shape {tuple(batched[o].shape)} where the loop gives {tuple(want.shape)}"
            else:
                detail = (f"{out}[{','.join(map(str, index))}] (batch entry {index[0]}) is "
                          f"{float(batched[o][index]):.6g}, the loop gives {float(want[index]):.6g} "
                          f"(max error {err:.3g})")
            message = f"vmap through {rule}, with {label}, differs from a loop over the batch: {detail}"
            return Probe(name, "mismatch", message, [Diagnosis(
                "vmap_rule", message, output=out,
                hint="a vmap rule gets in_dims (the batch dim of each input, None if not batched): move each "
                     "batch dim where the kernel expects it (x.movedim(d, 0), or expand an unbatched input), and "
                     "return out_dims saying where the batch dim of each output is")])
    return Probe(name, "ok", f"ok: {rule} matches a loop over a batch of {BATCH} ({'; '.join(label for label, _ in layouts)})")


# --- reverse mode under torch.func ---------------------------------------------------------------


def random_like(ctx: CaseContext, tensors: Sequence[torch.Tensor], salt: int) -> list[torch.Tensor]:
    """(BATCH, *t.shape) random Gaussian directions per tensor (never ones)."""
    gen = torch.Generator().manual_seed(ctx.case.seed * 104729 + salt)
    return [torch.randn((BATCH, *t.shape), generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            for t in tensors]


def _eager_vjps(ctx: CaseContext, cotangents: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """[k][input] = the eager backward (autograd.grad on the case's kept graph) with cotangent k."""
    run = ctx.run
    outs = [o for _, o in run.diff_outputs]
    leaves = [leaf for _, leaf in run.leaves]
    rows = []
    for k in range(BATCH):
        with user_code("backward"):
            grads = torch.autograd.grad(outs, leaves, [u[k] for u in cotangents], retain_graph=True,
                                        allow_unused=True)
        rows.append([g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)])
    return rows


def _first_mismatch(ctx: CaseContext, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                    names: Callable[[int], str]) -> tuple[str, str] | None:
    for k, (g, w) in enumerate(zip(got, want)):
        g = g if g is not None else torch.zeros_like(w)
        ok, err, index = close(g, w, ctx.tolerance)
        if not ok:
            where = f"{names(k)}[{','.join(map(str, index))}]" if index else names(k)
            value = (f"{float(g[index]):.6g} where eager gives {float(w[index]):.6g} (max error {err:.3g})"
                     if g.shape == w.shape else f"shape {tuple(g.shape)} where eager gives {tuple(w.shape)}")
            return names(k), f"{where} is {value}"
    return None


def _vjp_probe(ctx: CaseContext) -> Probe:
    name = "vjp (torch.func)"
    fn, primals = diff_function(ctx)
    outs = [o for _, o in ctx.run.diff_outputs]
    cotangents = random_like(ctx, outs, 1)
    try:
        with user_code("torch.func.vjp"):
            _, vjp_fn = torch.func.vjp(fn, *primals)  # type: ignore[misc]  # torch's stub: the has_aux overload
            single = vjp_fn(tuple(u[0] for u in cotangents))
    except UserCodeError as exc:
        if "setup_context staticmethod" in str(exc.original) and ctx.op.kind in ("custom_op", "torch.ops"):
            return Probe(name, "n/a", "not applicable: torch.func cannot differentiate a torch.library custom op in "
                                      "this torch (its generated autograd.Function has no setup_context)")
        if "setup_context staticmethod" in str(exc.original) and not claims_transforms(ctx):
            return Probe(name, "n/a", "not applicable: an old-style Function (forward(ctx, ...)); torch.func needs "
                                      "forward(*args) with a separate setup_context")
        return _raised(ctx, name, exc, "torch.func.vjp")
    eager = _eager_vjps(ctx, cotangents)
    wrong = _first_mismatch(ctx, single, eager[0], lambda k: _input_name(ctx, k))
    if wrong is not None:
        message = f"torch.func.vjp gives other gradients than the eager backward: {wrong[1]}"
        return Probe(name, "mismatch", message, [Diagnosis("other", message, input=wrong[0],
                                                           hint="torch.func runs the forward and setup_context "
                                                                "again: keep them free of side effects")])
    try:
        with user_code("torch.func.vmap(vjp)"):
            batched = torch.func.vmap(vjp_fn)(tuple(cotangents))
    except UserCodeError as exc:
        probe = _raised(ctx, name, exc, "the backward under vmap (torch.func.jacrev)")
        if probe.status == "n/a":
            return Probe(name, "ok", f"ok: torch.func.vjp matches the eager backward; the backward does not run "
                                     f"under vmap (torch.func.jacrev): {probe.text.removeprefix('not applicable: ')}")
        return probe
    for k in range(BATCH):
        wrong = _first_mismatch(ctx, [b[k] for b in batched], eager[k], lambda j: _input_name(ctx, j))
        if wrong is not None:
            message = (f"the backward gives other values under vmap (torch.func.jacrev, is_grads_batched) than "
                       f"called with one cotangent at a time: for cotangent {k}, {wrong[1]}")
            return Probe(name, "mismatch", message, [Diagnosis(
                "vmap_rule", message, input=wrong[0],
                hint="under vmap every grad_output carries a hidden batch dim: no in-place writes into saved "
                     "tensors, no reshapes that assume the grad_output's size, no reads of .shape[0] as the batch")])
    return Probe(name, "ok", f"ok: torch.func.vjp and vmap over {BATCH} random cotangents match the eager backward")


# --- forward mode under vmap (torch.func.jacfwd) -------------------------------------------------


def _jvp_probe(ctx: CaseContext) -> Probe:
    name = "jvp under vmap (torch.func.jacfwd)"
    if not ctx.op.defines_jvp():
        return Probe(name, "n/a", "not applicable: the op has no forward-mode rule (see forward_mode)")
    if vmap_rule_of(ctx) is None:
        return Probe(name, "n/a", "not applicable: jacfwd batches the op's forward, and the op declares no vmap "
                                  "rule (generate_vmap_rule = True would do)")
    fn, primals = diff_function(ctx)
    tangents = random_like(ctx, primals, 2)
    for k, p in enumerate(ctx.diff_positions):
        projection = ctx.tangents.get(p)
        if projection is not None:
            tangents[k] = projection(primals[k].expand_as(tangents[k]), tangents[k])
    try:
        eager = []
        for b in range(BATCH):
            with user_code("jvp"), fwad.dual_level():
                outs = fn(*[fwad.make_dual(x, t[b]) for x, t in zip(primals, tangents)])
                eager.append([fwad.unpack_dual(o).tangent for o in outs])
        with user_code("torch.func.vmap(jvp)"):
            batched = torch.func.vmap(lambda *t: torch.func.jvp(fn, primals, t)[1])(*tangents)
    except UserCodeError as exc:
        return _raised(ctx, name, exc, "jvp under vmap")
    for b in range(BATCH):
        want = [t if t is not None else torch.zeros_like(o) for t, o in zip(eager[b], batched)]
        wrong = _first_mismatch(ctx, [o[b] for o in batched], want, lambda j: _output_name(ctx, j))
        if wrong is not None:
            message = (f"the jvp gives other values under vmap (torch.func.jacfwd) than with one tangent at a time: "
                       f"for tangent {b}, {wrong[1]}")
            return Probe(name, "mismatch", message, [Diagnosis("vmap_rule", message, output=wrong[0],
                                                               hint="compute the jvp with torch ops on the tangents "
                                                                    "as given (no in-place writes, no .item())")])
    return Probe(name, "ok", f"ok: vmap over {BATCH} random tangents matches forward AD one tangent at a time")


# --- the check ---------------------------------------------------------------------------------


class TransformsCheck:
    name = NAME
    default = True
    description = ("torch.func against eager: the op's vmap rule against a loop over a batch, vjp and vmap over "
                   "vjp (jacrev), vmap over jvp (jacfwd)")

    def applies(self, ctx: CaseContext) -> str | None:
        if ctx.op is not ctx.case.op.op:
            return "complex inputs (checked through real views, which torch.func would see as other ops)"
        if not ctx.run.diff_outputs:
            return "no differentiable output"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return [CheckResult(name=NAME, status=Status.SKIPPED, summary="not applicable",
                                message=f"not applicable: {reason}")]
        with quiet_torch():
            probes = [_vmap_probe(ctx), _vjp_probe(ctx), _jvp_probe(ctx)]
        details = tuple((p.name, p.text) for p in probes)
        diagnoses = tuple(d for p in probes for d in p.diagnoses)
        bad = [p for p in probes if p.status in ("mismatch", "error")]
        if any(p.status == "error" for p in probes):
            status = Status.ERROR
        elif bad:
            status = Status.FAILED
        elif all(p.status == "n/a" for p in probes):
            reasons = "; ".join(f"{p.name}: {p.text.removeprefix('not applicable: ')}" for p in probes)
            return [CheckResult(name=NAME, status=Status.SKIPPED, summary="not applicable", details=details,
                                message=f"not applicable: {reasons}")]
        else:
            ran = [p.name for p in probes if p.status == "ok"]
            return [CheckResult(name=NAME, status=Status.PASSED, summary=f"{len(ran)} ok", details=details,
                                message=f"{', '.join(ran)}: agree with the op called eagerly")]
        return [CheckResult(name=NAME, status=status, summary="failed: " + ", ".join(p.name for p in bad),
                            message="; ".join(p.text for p in bad), diagnoses=diagnoses, details=details)]


__all__ = ["TransformsCheck", "close", "claims_transforms", "diff_function", "random_like", "vmap_rule_of", "Any"]
