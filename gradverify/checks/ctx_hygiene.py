"""ctx_hygiene: tensors a Function keeps on ctx as attributes (ctx.foo = t) that its backward uses.

save_for_backward is more than storage: autograd checks that a saved tensor was not modified in
place before backward ("one of the variables needed for gradient computation has been modified
by an inplace operation"), applies saved-tensor hooks (checkpointing, offloading) and, for
double backward, reconnects saved inputs and outputs to the graph. A tensor kept as an
attribute gets none of that. First derivatives stay right; but an intermediate forward
computed (under no_grad) and stashed on ctx is a constant to double backward, whose result then
silently misses that tensor's dependence on the inputs (pytorch/pytorch#58509, #76185, #99523).

Found dynamically, on a fresh forward: every floating tensor among the ctx attributes of the
Python Function nodes in the graph (inside tuples, lists and dicts too); used by the backward
if replacing it with a perturbed copy changes the gradient; an intermediate (no autograd
graph) depends on the inputs if a forward at perturbed inputs stashes other values. Only a used
intermediate that depends on the inputs makes double backward wrong: at --order 2 that is a
warning (and the second-order check names it when it fails), at order 1 a note, like every
other finding here (first-order gradients are right; the in-place check is bypassed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.probes import differences, engine_vjp, python_nodes, random_cotangents
from gradverify.numerics.forward import ForwardRun, run_forward
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.usercode import UserCodeError

NAME = "ctx_hygiene"
# How far into tuples/lists/dicts kept on ctx to look (ctx.vars = (x, eps) is one level).
MAX_DEPTH = 3
# The relative size of the perturbation that tells whether backward uses a stashed tensor:
# t * (1 + PERTURB * r), r uniform in [-1, 1]. Large enough that a backward reading t changes
# far beyond the case's tolerance (sqrt(eps)), small enough to keep t's signs and the op's
# domain (a positive rstd stays positive).
PERTURB = 0.25
INTERMEDIATE_HINT = ("return it as an extra output of forward (and save it with ctx.save_for_backward), or recompute "
                     "it in backward from saved inputs; if backward is never to be differentiated, decorate it with "
                     "@once_differentiable so that double backward raises instead of silently dropping the term")
SAVED_HINT = "keep tensors for backward with ctx.save_for_backward(...) and read them from ctx.saved_tensors"


@dataclass
class Stash:
    """One floating tensor kept on a ctx: where (`ctx.vars[0]` of which Function), its role."""

    node_index: int
    function: str
    path: tuple[Any, ...]
    tensor: torch.Tensor
    role: str = ""          # "input" | "output" | "intermediate"
    depends: bool | None = None

    @property
    def label(self) -> str:
        text = "ctx." + str(self.path[0])
        for key in self.path[1:]:
            text += f"[{key!r}]"
        return text


def _walk(value: Any, path: tuple[Any, ...], depth: int) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            yield path, value
        return
    if depth >= MAX_DEPTH:
        return
    if isinstance(value, (tuple, list)):
        for k, item in enumerate(value):
            yield from _walk(item, (*path, k), depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*path, key), depth + 1)


def stashes(run: ForwardRun) -> list[Stash]:
    found = []
    for k, node in enumerate(python_nodes(run)):
        attributes = getattr(node, "__dict__", {})
        name = getattr(node, "_forward_cls", type(node)).__name__
        for attr, value in list(attributes.items()):
            for path, tensor in _walk(value, (attr,), 0):
                found.append(Stash(k, name, path, tensor))
    return found


def _replaced(value: Any, path: tuple[Any, ...], new: torch.Tensor) -> Any:
    """`value` with the tensor at `path` (below the attribute) replaced by `new`; containers are
    rebuilt, never changed in place."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(value, tuple):
        return tuple(_replaced(v, rest, new) if k == key else v for k, v in enumerate(value))
    if isinstance(value, list):
        return [_replaced(v, rest, new) if k == key else v for k, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: (_replaced(v, rest, new) if k == key else v) for k, v in value.items()}
    return value


def _lookup(node: Any, path: tuple[Any, ...]) -> Any:
    value: Any = getattr(node, "__dict__", {}).get(path[0])
    for key in path[1:]:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


class CtxHygieneCheck:
    name = NAME
    default = True
    description = ("tensors kept on ctx as attributes instead of save_for_backward that the backward uses (no in-place "
                   "check; intermediates are constants to double backward)")

    def applies(self, ctx: CaseContext) -> str | None:
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        if not ctx.diff_positions:
            return []
        try:
            run = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
        except UserCodeError:
            return []
        if not run.diff_outputs:
            return []
        found = stashes(run)
        if not python_nodes(run):
            return []  # no Python Function in the graph: nothing keeps a ctx
        if not found:
            return [CheckResult(name=NAME, status=Status.PASSED, summary="nothing on ctx",
                                message="no tensor is kept on ctx as an attribute")]
        gen = torch.Generator().manual_seed(ctx.case.seed + 808)
        cotangents = random_cotangents(run, gen)
        try:
            base = engine_vjp(run, cotangents)
        except UserCodeError:
            return []  # the other checks report a backward that raises
        nodes = python_nodes(run)
        used = [s for s in found if _used(ctx, run, nodes[s.node_index], s, cotangents, base, gen)]
        if not used:
            return [CheckResult(name=NAME, status=Status.PASSED, summary="ok",
                                message=f"{len(found)} tensor{'s' if len(found) != 1 else ''} kept on ctx, none used "
                                        "by backward")]
        self._classify(ctx, run, used)
        return [_result(ctx, used)]

    def _classify(self, ctx: CaseContext, run: ForwardRun, used: list[Stash]) -> None:
        """input / output / intermediate; for intermediates, whether they depend on the inputs."""
        ids_in = {id(a) for a in run.args if isinstance(a, torch.Tensor)} | {id(leaf) for _, leaf in run.leaves}
        ids_out = {id(o) for o in run.outputs if isinstance(o, torch.Tensor)}
        for s in used:
            if id(s.tensor) in ids_in or (s.tensor.requires_grad and s.tensor.grad_fn is None):
                s.role = "input"
            elif id(s.tensor) in ids_out or s.tensor.requires_grad:
                # A tensor with an autograd history is reconnected to the graph in double backward.
                s.role = "output" if id(s.tensor) in ids_out else "input"
            else:
                s.role = "intermediate"
        intermediates = [s for s in used if s.role == "intermediate"]
        if not intermediates:
            return
        moved = list(ctx.args)
        gen = torch.Generator().manual_seed(ctx.case.seed + 809)
        for p in ctx.diff_positions:
            x = ctx.args[p]
            moved[p] = (x.double() * (1 + 0.01 * (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1)
                                      .to(x.device))).to(x.dtype)
        try:
            other = run_forward(ctx.op, ctx.signature, moved, ctx.diff_positions)
            # The same inputs again: a tensor that changes there too is random (a dropout mask),
            # not a function of the inputs, and is left undecided.
            same = run_forward(ctx.op, ctx.signature, ctx.args, ctx.diff_positions)
        except UserCodeError:
            return
        other_nodes, same_nodes = python_nodes(other), python_nodes(same)
        for s in intermediates:
            if s.node_index >= min(len(other_nodes), len(same_nodes)):
                continue
            value = _lookup(other_nodes[s.node_index], s.path)
            again = _lookup(same_nodes[s.node_index], s.path)
            if not (isinstance(value, torch.Tensor) and isinstance(again, torch.Tensor)
                    and value.shape == again.shape == s.tensor.shape):
                continue
            if torch.equal(again.detach(), s.tensor.detach()):
                s.depends = not torch.equal(value.detach(), s.tensor.detach())


def _used(ctx: CaseContext, run: ForwardRun, node: Any, stash: Stash, cotangents: dict[int, torch.Tensor],
          base: dict[int, torch.Tensor | None], gen: torch.Generator) -> bool:
    """Whether the backward reads the stashed tensor: the gradient changes (or backward raises)
    when the attribute holds a perturbed copy instead. The original object is put back."""
    attr = stash.path[0]
    original = node.__dict__[attr]
    t = stash.tensor.detach()
    noise = (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(t.device)
    if t.is_complex():
        perturbed = t * (1 + PERTURB * noise.to(t.dtype))
    else:
        perturbed = (t.double() * (1 + PERTURB * noise) + PERTURB * noise * (t.double() == 0)).to(t.dtype)
    setattr(node, attr, _replaced(original, stash.path[1:], perturbed))
    try:
        again = engine_vjp(run, cotangents)
    except UserCodeError:
        return True
    finally:
        setattr(node, attr, original)
    return bool(differences(again, base, ctx.tolerance, leaves=run.leaves))


def _names(group: list[Stash]) -> str:
    return ", ".join(s.label for s in group)


def _result(ctx: CaseContext, used: list[Stash]) -> CheckResult:
    order2 = ctx.settings.order >= 2
    breaking = [s for s in used if s.role == "intermediate" and s.depends]
    diagnoses = []
    # One sentence per Function and kind of tensor, naming every attribute of that kind.
    groups: dict[tuple[str, str], list[Stash]] = {}
    for s in used:
        kind = "breaking" if s in breaking else s.role + ("-constant" if s.depends is False else "")
        groups.setdefault((s.function, kind), []).append(s)
    for (function, kind), group in groups.items():
        plural = len(group) > 1
        if kind == "breaking":
            message = (f"{function} keeps {_names(group)} on ctx, {'tensors' if plural else 'a tensor'} forward "
                       "computed from the inputs (not an input or output), and backward uses "
                       f"{'them' if plural else 'it'}: first-order gradients are right, but double backward treats "
                       f"{'them as constants' if plural else 'it as a constant'} and silently drops the dependence on "
                       "the inputs")
            # evidence: which attributes, for the second-order check's explanation.
            diagnoses.append(Diagnosis("ctx_attribute", message, hint=INTERMEDIATE_HINT, evidence=f"{function}'s "
                                       f"{_names(group)}", severity=Severity.WARNING if order2 else Severity.NOTE))
            continue
        role = kind.split("-")[0]
        what = {"input": "inputs" if plural else "an input", "output": "outputs" if plural else "an output",
                "intermediate": "tensors forward computed" if plural else "a tensor forward computed"}[role]
        extra = (" (independent of the differentiable inputs, so double backward is unaffected)"
                 if kind.endswith("-constant") else "")
        leak = "; an output kept on its own ctx is also a reference cycle (a memory leak)" if role == "output" else ""
        message = (f"{function} keeps {_names(group)}, {what}, on ctx instead of save_for_backward, and backward "
                   f"uses {'them' if plural else 'it'}: autograd cannot check that "
                   f"{'they were' if plural else 'it was'} not modified in place before backward{extra}{leak}")
        diagnoses.append(Diagnosis("ctx_attribute", message, hint=SAVED_HINT, severity=Severity.NOTE))
    diagnoses.sort(key=lambda d: d.severity is not Severity.WARNING and d.hint != INTERMEDIATE_HINT)
    by_function: dict[str, list[str]] = {}
    for s in used:
        by_function.setdefault(s.function, []).append(s.label)
    labels = "; ".join(f"{function}: {', '.join(found)}" for function, found in by_function.items())
    details = (("on ctx", labels),)
    if order2 and breaking:
        # The user asked about double backward: the finding that breaks it is a warning (the
        # second-order check says whether, and names it when it fails).
        return CheckResult(name=NAME, status=Status.WARNED, message=diagnoses[0].message,
                           summary="warning: ctx_attribute", diagnoses=tuple(diagnoses), details=details)
    # First-order gradients are right whatever is on ctx: notes, never a finding against a
    # correct backward.
    notes = tuple(d.message for d in diagnoses)
    if breaking:
        notes = notes[:1] + ("--order 2 checks the double backward (and makes this a warning)",) + notes[1:]
    return CheckResult(name=NAME, status=Status.PASSED, summary=f"note: {len(used)} on ctx",
                       message=f"backward uses tensor{'s' if len(used) != 1 else ''} kept on ctx as attributes "
                               f"({labels}): first-order gradients are unaffected", notes=notes, details=details)


__all__ = ["CtxHygieneCheck", "NAME", "Stash", "python_nodes", "stashes"]
