"""Registration: what torch.compile, export and functionalization take on trust from a custom op.

A custom op is opaque to the compiler: it plans memory and traces graphs from the op's
registrations, never from its kernel. Each registration can be wrong while eager gradients are
right, and then the compiled model is silently wrong or does not compile. On every case of the
sweep (torch.library.opcheck looks at one sample) this check runs:

* the fake (meta) kernel on fake copies of the inputs under FakeTensorMode, against the real
  kernel's outputs: number of outputs, shape, strides (of the dims longer than 1: a size-1 dim's
  stride is never read), dtype, device, storage offset (`fake_kernel_mismatch`), or no fake
  kernel at all (`missing_fake`, a warning: eager use is unaffected);
* the real kernel on fresh copies: an argument written to (its version counter moved, or its
  values changed: a compiled kernel writing through data_ptr moves no counter) that the schema
  does not declare mutable (`undeclared_mutation`; where the contracts check already named it
  for the same argument, it is not repeated here), an output sharing storage with an input or
  another output (`output_alias`);
* an op without a kernel at an Autograd key whose outputs still require grad: autograd lives
  in the backend kernel (an autograd.Function called from the CPU kernel), which tracing and
  functionalization bypass (`autograd_backend_key`);
* the registered backward on fake tensors, as AOTAutograd traces it: `.item()`, `bool()` on a
  tensor, data_ptr, numpy, or a call into an op without a fake kernel cannot be traced
  (`untraceable_backward`, a warning: compile fails or falls back loudly, eager is right).

Ops other than custom ops and torch.ops overloads register nothing: not applicable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_map_only

from gradverify.checks.base import CaseContext
from gradverify.checks.common import first_line, not_applicable_result, quiet_torch, requested
from gradverify.numerics.forward import call_op, clone_args
from gradverify.ops.base import StandInCtx, as_tuple
from gradverify.report import CheckResult, Diagnosis, Severity, Status
from gradverify.usercode import UserCodeError, boundary, user_code, user_frame

NAME = "registration"


@dataclass
class Findings:
    diagnoses: list[Diagnosis] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_judged: int = 0

    def add(self, probe: str, diagnosis: Diagnosis) -> None:
        self.diagnoses.append(diagnosis)
        self.details.append((probe, diagnosis.message))


def registered_op(ctx: CaseContext) -> Any:
    """The custom-op / torch.ops adapter of the case, or None for other kinds of op."""
    op = ctx.case.op.op
    return op if getattr(op, "kind", "") in ("custom_op", "torch.ops") and hasattr(op, "schema") else None


def not_applicable(ctx: CaseContext) -> str | None:
    if registered_op(ctx) is None:
        return "not a custom op or torch.ops overload (Functions and plain callables register nothing)"
    if ctx.op is not ctx.case.op.op:
        return "complex inputs (checked through real views, which the op's registrations do not describe)"
    return None


class RegistrationCheck:
    name = NAME
    default = True
    description = ("custom ops: fake kernel vs real kernel metadata, missing fake kernel, undeclared mutations, "
                   "outputs aliasing inputs, autograd on a backend key, a backward that cannot be traced")

    def applies(self, ctx: CaseContext) -> str | None:
        return not_applicable(ctx)

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return [not_applicable_result(NAME, reason)] if requested(ctx, NAME) else []
        op = registered_op(ctx)
        found = Findings()
        try:
            with quiet_torch():
                real = _real_call(ctx, op, found)
                _fake_kernel(ctx, op, real, found)
                _autograd_key(ctx, op, found)
                _backward_trace(ctx, op, real, found)
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        return [_result(found)]


def _result(found: Findings) -> CheckResult:
    errors = [d for d in found.diagnoses if d.severity is Severity.ERROR]
    kinds = sorted({d.kind for d in found.diagnoses})
    common: dict[str, Any] = dict(diagnoses=tuple(found.diagnoses), details=tuple(found.details),
                                  notes=tuple(found.notes), unverifiable_count=found.not_judged)
    if errors:
        return CheckResult(name=NAME, status=Status.FAILED, message="; ".join(d.message for d in errors),
                           summary="failed: " + ", ".join(kinds), **common)
    if found.diagnoses:
        return CheckResult(name=NAME, status=Status.WARNED, message="; ".join(d.message for d in found.diagnoses),
                           summary="warning: " + ", ".join(kinds), **common)
    probes = len(found.details)
    text = f"{probes - found.not_judged}/{probes} registration probes agree"
    if found.not_judged:
        text += f" ({found.not_judged} not judged)"
    if found.notes:
        text += "; " + "; ".join(found.notes)
    return CheckResult(name=NAME, status=Status.PASSED, message=text,
                       summary="ok" if not found.notes else "ok (see contracts)", **common)


# --- the real kernel: mutations and aliasing ---------------------------------------------------


def _real_call(ctx: CaseContext, op: Any, found: Findings) -> tuple[Any, ...]:
    """The op on fresh copies (no grad): which arguments it wrote to, which outputs alias; returns
    its outputs."""
    args = clone_args(ctx.args)
    versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
    with user_code("forward"), torch.no_grad():
        outputs = call_op(ctx.op, ctx.signature, args)
    schema = op.schema
    declared = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    contract = ctx.result("contracts")
    named_by_contracts = " ".join(d.message for d in (contract.diagnoses if contract else ())
                                  if d.kind in ("undeclared_mutation", "inplace_forward"))
    mutated = []
    for arg, before, version, name in zip(args, ctx.args, versions, ctx.input_names):
        if not isinstance(arg, torch.Tensor) or name in declared:
            continue
        bumped = version is not None and arg._version != version
        changed = arg.numel() > 0 and not _same(arg, before)
        if not (bumped or changed):
            continue
        mutated.append(name)
        if f"modified {name} in place" in named_by_contracts:
            found.details.append(("mutation", f"{name}: reported by the contracts check (not repeated here)"))
            found.notes.append(f"the undeclared mutation of {name} is reported by contracts")
            continue
        how = ("its values changed" if changed else
               "its version counter moved although its values did not change on these inputs (an in-place "
               "clamp_/copy_ that happened to be a no-op here)")
        found.add("mutation", Diagnosis(
            "undeclared_mutation",
            f"the op writes into {name} ({how}) but mutates_args does not declare it: torch.compile and "
            "functionalization assume it is untouched and may reorder or drop the write",
            input=name, hint=f'declare it: mutates_args=("{name}",), or write into a clone of {name}'))
    if not mutated:
        found.details.append(("mutation", "ok: no argument written to" + (
            f" except the declared {', '.join(sorted(declared))}" if declared else "")))
    _aliasing(ctx, schema, args, outputs, found)
    return outputs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a NaN in the input is no evidence of a write)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata if t.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


def _aliasing(ctx: CaseContext, schema: Any, args: Sequence[Any], outputs: tuple[Any, ...], found: Findings) -> None:
    declared_views = {k for k, r in enumerate(schema.returns) if r.alias_info is not None}
    inputs = {_storage(a): name for a, name in zip(args, ctx.input_names) if isinstance(a, torch.Tensor)}
    seen: dict[int, str] = {}
    names = _output_names(outputs)
    before = len(found.diagnoses)
    for k, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or k in declared_views:
            continue
        key = _storage(out)
        if key is None:
            continue
        if key in inputs:
            found.add("aliasing", Diagnosis(
                "output_alias", f"{names[k]} shares storage with the input {inputs[key]} (returned as is, or a view "
                                f"of it): a custom op's outputs must be new tensors",
                output=names[k], input=inputs[key], hint=f"return {inputs[key]}.clone() (or a clone of the view)"))
        elif key in seen:
            found.add("aliasing", Diagnosis(
                "output_alias", f"{names[k]} shares storage with {seen[key]}: a custom op's outputs must not alias "
                                "each other", output=names[k], hint="return a clone of one of them"))
        seen.setdefault(key, names[k])
    if len(found.diagnoses) == before:
        found.details.append(("aliasing", "ok: every output is a new tensor"))


def _output_names(outputs: Sequence[Any]) -> dict[int, str]:
    return {0: "out"} if len(outputs) == 1 else {k: f"out[{k}]" for k in range(len(outputs))}


# --- the fake kernel -------------------------------------------------------------------------


def _fake_mode(shape_env: bool) -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not shape_env:
        return FakeTensorMode()
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # Scalars read from tensors stay errors, as in torch.compile's default (capture_scalar_outputs
    # off); data-dependent output shapes become symbols, as AOTAutograd traces them.
    return FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=False))


def _missing_fake(exc: BaseException) -> str | None:
    """The op name when `exc` says an op has no fake (meta) kernel, else None."""
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    if isinstance(exc, UnsupportedOperatorException):
        return str(getattr(exc, "func", "") or exc)
    text = str(exc)
    if "no fake impl" in text.lower() or "fake impl registered" in text.lower():
        marker = text.split("registered for ", 1)[-1].split(".")[0] if "registered for " in text else ""
        return marker.strip("<>").replace("CustomOpDef(", "").rstrip(")") or "the op"
    return None


def _needs_shape_env(exc: BaseException) -> bool:
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    text = str(exc).lower()
    return isinstance(exc, DynamicOutputShapeException) or "shapeenv" in text or "shape_env" in text


def _faker(mode: Any) -> Callable[[torch.Tensor], Any]:
    """t -> a fake copy of t in `mode` (a function per mode, not a closure over the loop variable)."""
    return lambda t: mode.from_tensor(t, static_shapes=True)


def _run_fake(ctx: CaseContext, fn: Any, args: Sequence[Any], phase: str) -> tuple[Any, Any, list[Any]]:
    """fn(mode, fake_args) under a FakeTensorMode (retried with a ShapeEnv where the kernel needs
    symbolic sizes); returns (mode, result, fake args). Raises UserCodeError."""
    last: UserCodeError | None = None
    for shape_env in (False, True):
        mode = _fake_mode(shape_env)
        # Every tensor, lists of tensors (Tensor[] arguments) included: a real tensor inside a
        # FakeTensorMode is an error of ours, never of the fake kernel.
        fake_args = tree_map_only(torch.Tensor, _faker(mode), list(args))
        try:
            with user_code(phase), mode:
                return mode, fn(mode, fake_args), fake_args
        except UserCodeError as exc:
            last = exc
            if shape_env or not _needs_shape_env(exc.original):
                raise
    assert last is not None
    raise last


def _fake_kernel(ctx: CaseContext, op: Any, real: tuple[Any, ...], found: Findings) -> None:
    probe = "fake kernel"
    try:
        _, fake_outputs, _ = _run_fake(ctx, lambda mode, a: call_op(ctx.op, ctx.signature, a), clone_args(ctx.args),
                                       "fake kernel")
    except UserCodeError as exc:
        missing = _missing_fake(exc.original)
        if missing is not None:
            found.add(probe, Diagnosis(
                "missing_fake", f"no fake kernel is registered for {op.name} ({first_line(exc.original)}): "
                                "torch.compile, torch.export and opcheck cannot trace it",
                hint=f"add one: @{op.name.split('.')[-1]}.register_fake returning empty tensors of the output "
                     "shapes/strides/dtypes", severity=Severity.WARNING))
            return
        file, line = user_frame(exc.original)
        where = f" at {file}:{line}" if file else ""
        found.add(probe, Diagnosis(
            "fake_kernel_mismatch", f"the fake kernel raised {type(exc.original).__name__}: "
                                    f"{first_line(exc.original)}{where}, where the real kernel returns",
            hint="the fake kernel may only use shapes, strides and dtypes of its inputs, never their values"))
        return
    _compare_outputs(real, as_tuple(fake_outputs), found)


def _concrete(values: Sequence[Any]) -> list[int | None]:
    """Sizes/strides as ints; None where the fake kernel gave a symbolic (data-dependent) one."""
    return [v if isinstance(v, int) else None for v in values]


def _layout_text(strides: Sequence[int | None], shape: Sequence[int]) -> str:
    expected: list[int | None] = []
    acc = 1
    for size in reversed(shape):
        expected.insert(0, acc)
        acc *= max(int(size), 1)
    significant = [(s, e) for s, e, n in zip(strides, expected, shape) if n > 1]
    contiguous = all(s == e for s, e in significant)
    return f"strides {tuple(strides)}" + (" (contiguous)" if contiguous else " (not contiguous)")


def _compare_outputs(real: tuple[Any, ...], fake: tuple[Any, ...], found: Findings) -> None:
    probe = "fake kernel"
    names = _output_names(real)
    if len(real) != len(fake):
        found.add(probe, Diagnosis("fake_kernel_mismatch", f"the fake kernel returns {len(fake)} outputs, the real "
                                                           f"kernel {len(real)}",
                                   hint="return the same structure from the fake kernel as from the kernel"))
        return
    before = len(found.diagnoses)
    for k, (r, f) in enumerate(zip(real, fake)):
        name = names[k]
        if isinstance(r, torch.Tensor) != isinstance(f, torch.Tensor):
            found.add(probe, Diagnosis("fake_kernel_mismatch", f"{name}: the real kernel returns "
                                                               f"{type(r).__name__}, the fake kernel "
                                                               f"{type(f).__name__}", output=name))
            continue
        if not isinstance(r, torch.Tensor):
            continue
        problems: list[tuple[str, str]] = []
        shape = _concrete(f.shape)
        if len(shape) != r.dim() or any(s is not None and s != n for s, n in zip(shape, r.shape)):
            problems.append((f"shape {tuple(f.shape)} where the real kernel returns {tuple(r.shape)}",
                             "compute the output shape in the fake kernel exactly as the kernel does"))
        else:
            stride = _concrete(f.stride())
            # Strides of size-1 dims are never used to address memory: not compared.
            if r.numel() and any(s is not None and n > 1 and s != rs
                                 for s, rs, n in zip(stride, r.stride(), r.shape)):
                problems.append((f"{_layout_text(stride, list(r.shape))} where the real kernel returns "
                                 f"{_layout_text(list(r.stride()), list(r.shape))}",
                                 "make both agree: return .contiguous() from the kernel, or build the fake output "
                                 "with the kernel's layout (torch.empty_strided, or new_empty(...).t())"))
            offset = f.storage_offset()
            if isinstance(offset, int) and r.numel() and offset != r.storage_offset():
                problems.append((f"storage offset {offset} where the real kernel returns {r.storage_offset()}",
                                 "return a tensor that starts at its storage (a clone) from the kernel"))
        if f.dtype != r.dtype:
            problems.append((f"dtype {str(f.dtype).removeprefix('torch.')} where the real kernel returns "
                             f"{str(r.dtype).removeprefix('torch.')}", "use the kernel's output dtype"))
        if f.device != r.device:
            problems.append((f"device {f.device} where the real kernel returns {r.device}",
                             "create the fake output on the input's device"))
        for text, hint in problems:
            found.add(probe, Diagnosis("fake_kernel_mismatch", f"the fake kernel says {name} has {text}: torch.compile "
                                                               "plans memory and later ops from the fake kernel",
                                       output=name, hint=hint))
    if len(found.diagnoses) == before:
        found.details.append((probe, f"ok: {len(real)} output{'s' if len(real) != 1 else ''} with the real kernel's "
                                     "shape, strides, dtype and device"))


# --- autograd registration ---------------------------------------------------------------------


def _autograd_key(ctx: CaseContext, op: Any, found: Findings) -> None:
    probe = "autograd key"
    overload = op.target
    name = overload.name() if hasattr(overload, "name") else str(op.schema.name)
    device = ctx.case.device.split(":")[0]
    keys = ("Autograd", f"Autograd{device.upper()}" if device != "cpu" else "AutogradCPU", "CompositeImplicitAutograd")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    if any(has_kernel(name, key) for key in keys):
        found.details.append((probe, "ok: autograd is registered at an Autograd key"))
        return
    set_mode = getattr(torch._C, "_set_autograd_fallback_mode", None)
    get_mode = getattr(torch._C, "_get_autograd_fallback_mode", None)
    if set_mode is None or get_mode is None or not ctx.diff_positions:
        found.details.append((probe, "not judged: no Autograd kernel, and this torch cannot tell what the backend "
                                     "kernel does"))
        found.not_judged += 1
        return
    args = clone_args(ctx.args)
    for pos in ctx.diff_positions:
        args[pos].requires_grad_(True)
    previous = get_mode()
    try:
        # "nothing": the fallback leaves outputs alone, so an output that requires grad got it
        # from autograd running inside the backend kernel.
        set_mode("nothing")
        with user_code("forward"), torch.enable_grad():
            outputs = call_op(ctx.op, ctx.signature, args)
    finally:
        set_mode(previous)
    input_ids = {id(a) for a in args}
    tracked = [k for k, o in enumerate(outputs) if isinstance(o, torch.Tensor) and o.requires_grad
               and id(o) not in input_ids]
    if not tracked:
        found.details.append((probe, "ok: no Autograd kernel and no autograd inside the backend kernel"))
        return
    out = _output_names(outputs)[tracked[0]]
    found.add(probe, Diagnosis(
        "autograd_backend_key",
        f"{name} has no kernel at the Autograd key, yet {out} requires grad: autograd runs inside the {device} "
        "kernel (an autograd.Function or differentiable torch code registered on a backend key), which "
        "torch.compile, export and functionalization bypass: gradients there are silently wrong",
        output=out, hint="register the backward with torch.library.register_autograd (or lib.impl(..., 'Autograd')) "
                         "and keep the backend kernel free of autograd"))


# --- the backward under tracing ----------------------------------------------------------------


def _untraceable_reason(exc: BaseException) -> str | None:
    from torch._subclasses.fake_tensor import DataDependentOutputException

    text = str(exc).lower()
    name = type(exc).__name__
    missing = _missing_fake(exc)
    if missing is not None:
        return f"it calls {missing}, which has no fake kernel"
    if isinstance(exc, DataDependentOutputException) or "datadependent" in name.lower() or "data-dependent" in text \
            or "data dependent" in text:
        return "it reads a tensor's value in Python (.item(), bool(), .tolist(), an if on a tensor)"
    if "data pointer" in text or "data_ptr" in text or "numpy" in text or ("storage" in text and "access" in text):
        return "it reads raw memory (data_ptr, .numpy())"
    return None


@boundary
def _call_registered_backward(opdef: Any, schema: Any, stand_in: StandInCtx, inputs: tuple[Any, ...],
                              kw_inputs: dict[str, Any], output: Any, grads: Sequence[Any]) -> Any:
    if any(a.kwarg_only for a in schema.arguments):
        opdef._setup_context_fn(ctx=stand_in, inputs=inputs, keyword_only_inputs=kw_inputs, output=output)
    else:
        opdef._setup_context_fn(ctx=stand_in, inputs=inputs, output=output)
    return opdef._backward_fn(stand_in, *grads)


def _random_grads(outputs: Sequence[Any], seed: int) -> list[Any]:
    gen = torch.Generator().manual_seed(seed)
    grads: list[torch.Tensor | None] = []
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            grads.append(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device))
        elif isinstance(out, torch.Tensor):
            grads.append(torch.zeros_like(out))
        else:
            grads.append(None)
    return grads


def _backward_trace(ctx: CaseContext, op: Any, real: tuple[Any, ...], found: Findings) -> None:
    probe, opdef = "backward tracing", getattr(op, "opdef", None)
    grads = _random_grads(real, ctx.case.seed + 404)
    if opdef is not None and opdef._backward_fn is not None and opdef._setup_context_fn is not None:
        needs = tuple(pos in ctx.diff_positions for pos, is_kw in enumerate(ctx.signature.keyword) if not is_kw)

        def trace(mode: Any, fake: list[Any]) -> Any:
            fake_positional, fake_keywords = ctx.signature.split(fake)
            fake_outputs = [mode.from_tensor(o) if isinstance(o, torch.Tensor) else o for o in real]
            fake_grads = [mode.from_tensor(g) if isinstance(g, torch.Tensor) else g for g in grads]
            output = fake_outputs[0] if len(op.schema.returns) == 1 else tuple(fake_outputs)
            return _call_registered_backward(opdef, op.schema, StandInCtx(needs), tuple(fake_positional),
                                             fake_keywords, output, fake_grads)

        how = "the registered backward (setup_context + backward) on fake tensors"
    else:
        def trace(mode: Any, fake: list[Any]) -> Any:
            leaves = [fake[p].requires_grad_(True) for p in ctx.diff_positions]
            with torch.enable_grad():
                outs = call_op(ctx.op, ctx.signature, fake)
                pairs = [(o, mode.from_tensor(g)) for o, g in zip(outs, grads)
                         if isinstance(o, torch.Tensor) and o.requires_grad and isinstance(g, torch.Tensor)]
                if not pairs:
                    return None
                return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)

        how = "forward and backward through autograd on fake tensors"
    try:
        with warnings.catch_warnings():
            # torch only warns (deprecated, "will error") when code reads a FakeTensor's data_ptr,
            # and returns 0; under torch.compile the same read raises. Make it the error it is.
            warnings.filterwarnings("error", message=".*data pointer of FakeTensor")
            _run_fake(ctx, trace, clone_args(ctx.args), "backward")
    except UserCodeError as exc:
        reason = _untraceable_reason(exc.original)
        if reason is None or (opdef is None and _missing_fake(exc.original) is not None):
            # Not a tracing limit we can name (or the op itself has no fake kernel, reported
            # above): never guess.
            found.details.append((probe, f"not judged: {how} raised {type(exc.original).__name__}: "
                                         f"{first_line(exc.original)}"))
            found.not_judged += 1
            return
        file, line = user_frame(exc.original, prefer=op.file)
        where = f" ({file}:{line})" if file else ""
        found.add(probe, Diagnosis(
            "untraceable_backward",
            f"the backward cannot be traced{where}: {reason}; torch.compile and torch.export fail or fall back to "
            f"eager on it ({type(exc.original).__name__}: {first_line(exc.original)})",
            hint="compute with torch ops on tensors only (torch.where instead of an if on a value), or wrap the "
                 "raw kernel in its own custom op with a fake kernel", severity=Severity.WARNING))
        return
    found.details.append((probe, f"ok: {how} traced"))


__all__ = ["RegistrationCheck", "not_applicable", "registered_op"]
