"""nondeterminism: the same backward, on the same graph and grad_output, a few times.

Backwards with atomic adds (scatter_add/index_add on a GPU, most deformable-convolution and
embedding kernels) sum in a different order on every call and differ at rounding level;
gradcheck then says "Backward is not reentrant" with a tolerance of 0 and users cannot tell
"nondeterministic but right" from "wrong" (pytorch/pytorch#56202, CharlesShang/DCNv2#8). Here
the per-entry spread of REPEATS calls is compared with the case's tolerance -- the allowance the
Jacobian check grants the backward, so a spread within it can never change a verdict -- plus
--nondet-tol: within it is a pass with a note, beyond it a failure. Where the spread is not
zero the calls are repeated under torch.use_deterministic_algorithms(True) (the flag restored
afterwards), which tells a kernel's summation order from state or randomness in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.probes import Gradients, engine_vjp, first_line, random_cotangents
from gradverify.config import Settings
from gradverify.numerics.forward import ForwardRun, run_forward
from gradverify.numerics.tolerance import Tolerance
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError

NAME = "nondeterminism"
# Backward calls per probe. Four make three comparisons with the first call, enough to see an
# order that varies (atomic adds differ on most calls) and to tell a first call that changes
# state (the later calls agree with each other, not with it) from noise; each is one backward.
REPEATS = 4


def selected_in(settings: Settings) -> bool:
    """Whether this check runs under `settings` (checks.selected's rule for a default check)."""
    if NAME in settings.add_checks:
        return True
    if NAME in settings.skip_checks:
        return False
    return settings.checks is None or NAME in settings.checks


@dataclass(frozen=True)
class Spread:
    """How far repeated results of one backward spread, over all gradients.

    beyond: entries whose spread exceeds the allowance; total: entries compared; worst: the
    largest spread; relative: the largest spread over the scale of its gradient (its largest
    entry); first_only: every call after the first agrees with the others, not with the first
    (the first call changed state the backward reads); where: the input with the worst spread."""

    beyond: int
    total: int
    worst: float
    relative: float
    first_only: bool = False
    where: str = ""


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.complex128) if t.is_complex() else t.detach().double()


def measure_spread(calls: Sequence[Sequence[torch.Tensor | None]], tolerance: Tolerance, floor: float = 0.0,
                   names: Sequence[str] = ()) -> Spread:
    """The spread of aligned results of identical backward calls (one sequence of gradients per
    call; None is a gradient that was not computed).

    Per entry, the spread max - min over the calls is allowed atol * s + rtol * |mean| + floor,
    with s the gradient's largest |mean| entry: rounding (another summation order) is relative
    to the size of the numbers summed, which that entry bounds from below; atol = rtol =
    sqrt(eps) of the case dtype is the Jacobian check's own allowance; floor is --nondet-tol."""
    beyond = total = 0
    worst = relative = 0.0
    where = ""
    first_only = len(calls) > 2
    any_beyond_later = False
    for k, column in enumerate(zip(*calls)):
        tensors = [t for t in column if isinstance(t, torch.Tensor)]
        if not tensors or len(tensors) != len(column) or len({tuple(t.shape) for t in tensors}) != 1:
            continue
        stack = torch.stack([_wide(t) for t in tensors])
        if stack.is_complex():
            stack = torch.view_as_real(stack)
        if not stack[0].numel():
            continue
        finite = torch.isfinite(stack).all(dim=0)
        hi = torch.where(finite, stack.amax(dim=0), torch.zeros_like(stack[0]))
        lo = torch.where(finite, stack.amin(dim=0), torch.zeros_like(stack[0]))
        mean = torch.where(finite, stack.mean(dim=0), torch.zeros_like(stack[0]))
        spread = hi - lo
        scale = float(mean.abs().max())
        allowed = tolerance.atol * scale + tolerance.rtol * mean.abs() + floor
        # A value finite in one call and not in another spreads beyond any allowance.
        mixed = ~finite & torch.isfinite(stack).any(dim=0)
        bad = (spread > allowed) | mixed
        beyond += int(bad.sum())
        total += int(spread.numel())
        w = float("inf") if bool(mixed.any()) else float(spread.max())
        if w > worst or not where:
            worst = max(worst, w)
            where = names[k] if k < len(names) and (w > 0) else where
        if scale > 0:
            relative = max(relative, w / scale)
        elif w > 0:
            relative = float("inf")
        later = stack[1:]
        later_spread = (later.amax(dim=0) - later.amin(dim=0)) if later.shape[0] > 1 else torch.zeros_like(spread)
        any_beyond_later |= bool((later_spread > allowed).any())
    first_only = first_only and beyond > 0 and not any_beyond_later
    return Spread(beyond=beyond, total=total, worst=worst, relative=relative, first_only=first_only, where=where)


class NondeterminismCheck:
    name = NAME
    default = True
    description = (f"{REPEATS} identical backward calls: their spread against the case's tolerance, and again under "
                   "torch.use_deterministic_algorithms(True)")

    def applies(self, ctx: CaseContext) -> str | None:
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        if not ctx.diff_positions:
            return []
        floor = ctx.settings.nondet_tol
        try:
            spread, calls = self._repeats(ctx)
        except UserCodeError:
            return []  # forward or backward raises: the other checks report it
        if spread is None:
            return []
        if spread.worst == 0:
            return [CheckResult(name=NAME, status=Status.PASSED, summary=f"{calls}/{calls} identical",
                                message=f"{calls} identical backward calls gave identical gradients")]
        again, note = self._deterministic_rerun(ctx)
        tol = f"rtol {ctx.tolerance.rtol:.2g}" + (f", --nondet-tol {floor:g}" if floor else "")
        where = f" (worst in the gradient for {spread.where})" if spread.where else ""
        if not spread.beyond:
            text = (f"nondeterministic at rounding level -- correct: {calls} identical backward calls spread by up to "
                    f"{spread.worst:.3g} ({spread.relative:.2g} of the gradient's scale){where}, within the case's "
                    f"tolerance ({tol}): the summation order varies between calls (atomic adds), the gradient is "
                    "not wrong")
            notes = (text,) + ((note,) if note else ())
            return [CheckResult(name=NAME, status=Status.PASSED, summary="rounding-level spread",
                                message=text, notes=notes)]
        stateful = spread.first_only or self._fresh_graphs_agree(ctx)
        if stateful:
            cause = ("the first call on a graph is reproducible (each fresh forward gives it again) but later calls on "
                     "the same graph differ: the backward changes state it reads (it writes into a saved tensor or a "
                     "ctx attribute), so a second backward through the same graph (retain_graph=True) is wrong")
            hint = "compute out of place in backward: never write into ctx.saved_tensors or tensors kept on ctx"
        else:
            cause = "beyond a change of summation order"
            hint = ("a backward that depends on state or randomness; if the spread is expected (low-precision atomic "
                    "adds), pass --nondet-tol")
        if again is not None and again.worst == 0:
            cause += ("; under torch.use_deterministic_algorithms(True) the calls agree: a nondeterministic kernel "
                      "whose error exceeds the tolerance")
            hint = "use a deterministic kernel (or accumulate in a higher precision)"
        elif again is not None and not stateful:
            cause += "; under torch.use_deterministic_algorithms(True) they still differ"
        message = (f"{calls} identical backward calls differ beyond the case's tolerance ({tol}) at {spread.beyond} of "
                   f"{spread.total} entries (spread up to {spread.worst:.3g}, {spread.relative:.2g} of the gradient's "
                   f"scale){where}: {cause}")
        jac = ctx.result("jacobian")
        if jac is not None and jac.status is Status.FAILED:
            message += "; the Jacobian mismatch may follow from it"
        return [CheckResult(name=NAME, status=Status.FAILED, summary=f"{spread.beyond} / {spread.total} spread",
                            message=message, notes=(note,) if note else (),
                            diagnoses=(Diagnosis("nondeterministic", message, hint=hint),))]

    def _repeats(self, ctx: CaseContext) -> tuple[Spread | None, int]:
        """REPEATS backward calls with one random grad_output on a fresh graph (the first call on
        it is the first call, as in training); the RNG is forked so the user's stream is untouched."""
        devices = [torch.device(a.device).index or 0 for a in ctx.args
                   if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
        with torch.random.fork_rng(devices=devices):
            run = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
            if not run.diff_outputs:
                return None, 0
            gen = torch.Generator().manual_seed(ctx.case.seed + 707)
            cotangents = random_cotangents(run, gen)
            results = [_aligned(run, engine_vjp(run, {o: g.clone() for o, g in cotangents.items()}))
                       for _ in range(REPEATS)]
        names = [ctx.input_names[p] for p, _ in run.leaves]
        return measure_spread(results, ctx.tolerance, ctx.settings.nondet_tol, names), REPEATS

    def _fresh_graphs_agree(self, ctx: CaseContext) -> bool:
        """Whether first calls on fresh graphs agree with each other (two forwards, one backward
        each): then the spread comes from state the backward changes on its graph."""
        devices = [torch.device(a.device).index or 0 for a in ctx.args
                   if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
        firsts = []
        try:
            with torch.random.fork_rng(devices=devices):
                for _ in range(2):
                    run = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
                    gen = torch.Generator().manual_seed(ctx.case.seed + 707)
                    firsts.append(_aligned(run, engine_vjp(run, random_cotangents(run, gen))))
        except UserCodeError:
            return False
        return not measure_spread(firsts, ctx.tolerance, ctx.settings.nondet_tol).beyond

    def _deterministic_rerun(self, ctx: CaseContext) -> tuple[Spread | None, str]:
        """The repeats under torch.use_deterministic_algorithms(True), the flag restored after."""
        enabled = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            torch.use_deterministic_algorithms(True)
            spread, _ = self._repeats(ctx)
        except UserCodeError as exc:
            return None, (f"under torch.use_deterministic_algorithms(True) the op raised {first_line(exc.original)} "
                          "(no deterministic implementation of something it calls)")
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if spread is None:
            return None, ""
        if spread.worst == 0:
            return spread, "under torch.use_deterministic_algorithms(True) the calls agree exactly"
        return spread, "under torch.use_deterministic_algorithms(True) the calls still differ"


def _aligned(run: ForwardRun, grads: Gradients) -> list[torch.Tensor | None]:
    return [grads.get(p) for p, _ in run.leaves]


__all__ = ["NAME", "REPEATS", "NondeterminismCheck", "Spread", "measure_spread", "selected_in"]
