"""layout: the backward with grad_outputs and inputs that are not contiguous.

gradcheck, opcheck and the Jacobian check all feed contiguous grad_outputs. The autograd engine
does not promise that: torch.cat/split hand each branch a narrow view of a wider gradient,
.sum()/.expand give stride-0 expansions, a transpose or channels_last downstream gives permuted
strides (pytorch/pytorch#194719, #195210, ROCm/TransformerEngine#623,
fla-org/flash-linear-attention#871). A backward, or the kernel it launches, that indexes
grad_output as if it were contiguous, or with the input's strides, is right under every
checker and silently wrong in a real model.

Layout is not maths: the same values in another memory layout must give the same gradient, up
to rounding, whatever the truth is. So each probe runs the backward on the same random values
laid out differently and compares with the contiguous run; a difference beyond the case's
tolerance is a bug (after one cross-check: the contiguous run must reproduce itself, or the
difference is nondeterminism, which that check reports). The Jacobian check says which of the
two is right: when it passed, the contiguous result is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.probes import (Gradients, describe_difference, difference, differences, engine_vjp, first_line,
                                      random_cotangents)
from gradverify.complex_view import RealViewOp
from gradverify.numerics.forward import ForwardRun, call_op, clone_args, is_differentiable_output, run_forward
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.usercode import UserCodeError, user_code, user_frame

NAME = "layout"

GRAD_HINT = ("call grad_output.contiguous() at the top of backward (free when it already is), or pass the "
             "kernel grad_output's own strides, not the input's or the output's")
INPUT_HINT = "call x.contiguous() in forward before the kernel reads it, or pass the kernel x's own strides"


@dataclass(frozen=True)
class Layout:
    """One way of laying out the same values: `apply(t)` returns a tensor equal to t in another
    layout (differentiably, for inputs); `kind` is its short name, `what` the layout and
    `origin` where a real model produces it."""

    kind: str
    what: str
    origin: str
    apply: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    fits: Callable[[torch.Tensor], bool]


def _narrow(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t's values as a slice of a wider tensor: the second half of the last dim of a tensor twice
    as wide (as torch.cat along the last dim or .split give each part), or for 1-D every second
    entry; the rest is random, so reading the wrong elements never happens to give t's values."""
    if t.dim() == 1:
        wide = torch.randn(2 * t.shape[0], generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
        return _place(wide, t, lambda w: w[1::2])
    shape = (*t.shape[:-1], 2 * t.shape[-1])
    wide = torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
    return _place(wide, t, lambda w: w.narrow(-1, t.shape[-1], t.shape[-1]))


def _place(wide: torch.Tensor, t: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """view(wide) holding t's values. When t requires grad (an input), the copy is recorded by
    autograd, so the result is a non-leaf with the view's strides, differentiable in t (the wide
    filler is a constant)."""
    view(wide).copy_(t)
    return view(wide)


def _transposed(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t's values with its last two dims stored the other way round (strides (..., 1, rows))."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _channels_last(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _expanded(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A stride-0 expansion of a smaller random tensor to t's shape: the leading dims broadcast
    (strides (0, ..., 0, 1)), as the gradient of a .sum() over them is; 1-D: one value repeated,
    as the gradient of .sum() is (random, not one)."""
    small_shape = (1,) * (t.dim() - 1) + ((t.shape[-1],) if t.dim() >= 2 else (1,))
    small = torch.randn(small_shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
    return small.expand(t.shape)


def _big(t: torch.Tensor) -> bool:
    return t.dim() >= 1 and t.numel() > 1


def _square_ish(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1


GRAD_LAYOUTS = (
    Layout("narrow", "a strided slice of a wider tensor", "as torch.cat and split hand each part its gradient",
           _narrow, _big),
    Layout("expanded", "a stride-0 expansion", "as the gradient of .sum() or .expand is", _expanded, _big),
    Layout("transposed", "a transposed view", "as a transpose or permute downstream gives", _transposed, _square_ish),
    Layout("channels_last", "channels_last", "as a channels_last model gives", _channels_last,
           lambda t: t.dim() == 4 and t.numel() > 1),
)
INPUT_LAYOUTS = (
    Layout("strided", "a strided slice of a wider tensor", "as torch.split, chunk or narrow give", _narrow, _big),
    Layout("transposed", "a transposed view", "as .t(), transpose or permute give", _transposed, _square_ish),
    Layout("channels_last", "channels_last", "as a channels_last model gives", _channels_last,
           lambda t: t.dim() == 4 and t.numel() > 1),
)


@dataclass
class _Finding:
    message: str
    raised: bool = False
    on_input: bool = False
    severity: Severity = Severity.ERROR


class LayoutCheck:
    name = NAME
    default = True
    description = ("the backward with non-contiguous grad_outputs (a slice of a wider tensor, a stride-0 expansion, "
                   "transposed, channels_last) and non-contiguous inputs, against the contiguous run")

    def applies(self, ctx: CaseContext) -> str | None:
        if isinstance(ctx.op, RealViewOp):
            return "complex inputs are checked through real views, whose layouts gradverify makes"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason or not ctx.diff_positions:
            return []
        try:
            run = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
        except UserCodeError:
            return []  # the forward check reports it
        if not run.diff_outputs:
            return []
        gen = torch.Generator().manual_seed(ctx.case.seed + 505)
        cotangents = random_cotangents(run, gen)
        try:
            base = engine_vjp(run, cotangents)
        except UserCodeError:
            return []  # a backward that raises on contiguous grad_outputs: the other checks report it
        findings: list[_Finding] = []
        tried: list[str] = []
        for o, out in run.diff_outputs:
            for layout in GRAD_LAYOUTS:
                if not layout.fits(out):
                    continue
                strided = layout.apply(cotangents[o], gen)
                if strided.is_contiguous():
                    continue  # the same layout as the contiguous run: nothing to learn
                tried.append(f"{layout.kind} grad_output for {ctx.output_names[o]}")
                finding = self._grad_probe(ctx, run, cotangents, base, o, layout, strided)
                if finding:
                    findings.append(finding)
        for layout in INPUT_LAYOUTS:
            positions = [p for p in ctx.diff_positions if layout.fits(ctx.args[p])]
            if not positions:
                continue
            tried.append(f"{layout.kind} inputs")
            findings.extend(self._input_probe(ctx, run, cotangents, base, layout, positions, gen))
        return [_result(ctx, findings, tried)]

    # --- grad_outputs -------------------------------------------------------------------------

    def _grad_probe(self, ctx: CaseContext, run: ForwardRun, cotangents: dict[int, torch.Tensor], base: Gradients,
                    o: int, layout: Layout, strided: torch.Tensor) -> _Finding | None:
        contiguous = dict(cotangents)
        contiguous[o] = strided.contiguous()
        probe = dict(cotangents)
        probe[o] = strided
        what = (f"with the grad_output for {ctx.output_names[o]} as {layout.what} (strides "
                f"{tuple(strided.stride())} instead of {tuple(strided.contiguous().stride())}, {layout.origin})")
        try:
            want = base if layout.kind != "expanded" else engine_vjp(run, contiguous)
        except UserCodeError:
            return None  # raises on contiguous values as well: not a layout problem
        try:
            got = engine_vjp(run, probe)
        except UserCodeError as exc:
            return _Finding(f"{what}, backward raised {first_line(exc.original)}{_where(ctx, exc)}: it assumes "
                            "grad_output is contiguous", raised=True)
        wrong = differences(got, want, ctx.tolerance, leaves=run.leaves)
        if not wrong:
            return None
        if not _reproducible(ctx, run, contiguous, want):
            return None
        first_pos, first = next(iter(wrong.items()))
        message = (f"{what}, {describe_difference(ctx.input_names[first_pos], first)}: backward reads grad_output as "
                   "if it were contiguous (or laid out like another tensor)")
        others = [ctx.input_names[p] for p in wrong if p != first_pos]
        if others:
            message += f"; the gradients for {', '.join(others)} differ too"
        return _Finding(message + _which_is_right(ctx), raised=False)

    # --- inputs -------------------------------------------------------------------------------

    def _input_probe(self, ctx: CaseContext, run: ForwardRun, cotangents: dict[int, torch.Tensor], base: Gradients,
                     layout: Layout, positions: list[int], gen: torch.Generator) -> list[_Finding]:
        outcome = _input_outcome(ctx, run, cotangents, base, layout, positions, gen)
        if outcome is None or len(positions) == 1 or outcome.severity is not Severity.ERROR:
            return [outcome] if outcome else []
        # Several inputs were laid out at once: name the ones that matter, one at a time.
        named = [f for f in (_input_outcome(ctx, run, cotangents, base, layout, [p], gen) for p in positions) if f]
        return named or [outcome]


def _laid_out(layout: Layout, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: layout.apply(t, gen)


def _input_outcome(ctx: CaseContext, run: ForwardRun, cotangents: dict[int, torch.Tensor], base: Gradients,
                   layout: Layout, positions: list[int], gen: torch.Generator) -> _Finding | None:
    names = ", ".join(ctx.input_names[p] for p in positions)
    shown = {p: layout.apply(ctx.args[p].detach(), gen) for p in positions}
    detail = "; ".join((f"{ctx.input_names[p]} " if len(positions) > 1 else "") + f"strides {tuple(shown[p].stride())}"
                       for p in positions)
    what = f"with {names} as {layout.what} ({detail}, {layout.origin})"
    try:
        strided_run = _strided_forward(ctx, {p: _laid_out(layout, gen) for p in positions})
    except UserCodeError as exc:
        return _Finding(f"forward rejects {names} as {layout.what} ({first_line(exc.original)}): that layout was "
                        "not checked", on_input=True, severity=Severity.NOTE)
    # The forward's values first: a forward that reads its input as if contiguous is wrong already.
    for o, out in run.diff_outputs:
        other = dict(strided_run.diff_outputs).get(o)
        d = difference(other, out, ctx.tolerance) if other is not None else None
        if d:
            if not _forward_reproducible(ctx, run):
                return None
            return _Finding(f"{what}, forward's {ctx.output_names[o]} differs at {d.count} of {d.total} entries "
                            f"(max difference {d.worst:.3g}): forward reads {names} as if it were contiguous",
                            on_input=True)
    try:
        got = engine_vjp(strided_run, cotangents)
    except UserCodeError as exc:
        return _Finding(f"{what}, backward raised {first_line(exc.original)}{_where(ctx, exc)}: it assumes its saved "
                        "inputs are contiguous", raised=True, on_input=True)
    wrong = differences(got, base, ctx.tolerance, leaves=run.leaves)
    if not wrong or not _reproducible(ctx, run, cotangents, base):
        return None
    first_pos, first = next(iter(wrong.items()))
    return _Finding(f"{what}, {describe_difference(ctx.input_names[first_pos], first)}: backward reads a saved input "
                    "as if it were contiguous" + _which_is_right(ctx), on_input=True)


def _strided_forward(ctx: CaseContext, transforms: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> ForwardRun:
    """The op on contiguous leaves handed to it in another layout: forward gets a non-leaf with
    the same values (differentiable in the leaf), as an activation that arrives transposed."""
    call_args = clone_args(ctx.args)
    leaves: list[tuple[int, torch.Tensor]] = []
    for pos in ctx.diff_positions:
        leaf = call_args[pos].requires_grad_(True)
        leaves.append((pos, leaf))
        with torch.enable_grad():
            call_args[pos] = transforms[pos](leaf) if pos in transforms else leaf.clone()
    with user_code("forward"), torch.enable_grad():
        outputs = call_op(ctx.op, ctx.signature, call_args)
    diff_outputs = [(i, o) for i, o in enumerate(outputs) if is_differentiable_output(o)]
    return ForwardRun(leaves=leaves, args=call_args, outputs=outputs, diff_outputs=diff_outputs)


def _reproducible(ctx: CaseContext, run: ForwardRun, cotangents: dict[int, torch.Tensor], want: Gradients) -> bool:
    """Cross-check before accusing: the contiguous run gives the same gradient again (if not,
    the difference is nondeterminism or state the backward changes, which other checks report)."""
    try:
        again = engine_vjp(run, cotangents)
    except UserCodeError:
        return False
    return not differences(again, want, ctx.tolerance, leaves=run.leaves)


def _forward_reproducible(ctx: CaseContext, run: ForwardRun) -> bool:
    try:
        again = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
    except UserCodeError:
        return False
    mine = dict(again.diff_outputs)
    return all(o in mine and not difference(mine[o], out, ctx.tolerance) for o, out in run.diff_outputs)


def _which_is_right(ctx: CaseContext) -> str:
    jac = ctx.result("jacobian")
    if jac is not None and jac.status is Status.PASSED:
        return " (the contiguous result is right: the Jacobian check judged it)"
    return ""


def _where(ctx: CaseContext, exc: UserCodeError) -> str:
    file, line = user_frame(exc.original, prefer=ctx.case.op.file)
    return f" at {file}:{line}" if file and not file.startswith("<") else ""


def _result(ctx: CaseContext, findings: list[_Finding], tried: list[str]) -> CheckResult:
    n = len(tried)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    notes = [f.message for f in findings if f.severity is not Severity.ERROR]
    details = (("layouts", "; ".join(tried) or "none apply (every tensor has one element or fewer)"),)
    if not errors:
        message = (f"the gradients match the contiguous run with each of {n} layouts" if n else
                   "no layout to try: every grad_output and input has at most one element")
        return CheckResult(name=NAME, status=Status.PASSED, message=message,
                           summary=f"{n}/{n} layouts ok" if n else "nothing to vary", details=details,
                           notes=tuple(notes))
    diagnoses = tuple(Diagnosis("layout_assumption", f.message, hint=INPUT_HINT if f.on_input else GRAD_HINT)
                      for f in errors)
    message = errors[0].message + (f" (and {len(errors) - 1} more layout{'s' if len(errors) > 2 else ''})"
                                   if len(errors) > 1 else "")
    return CheckResult(name=NAME, status=Status.FAILED, message=message,
                       summary=f"{len(errors)} of {n} layouts wrong", diagnoses=diagnoses, details=details,
                       notes=tuple(notes))


__all__ = ["GRAD_LAYOUTS", "INPUT_LAYOUTS", "LayoutCheck", "NAME"]

