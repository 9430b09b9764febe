"""`gradverify list PATH`: the ops a spec path holds, their inputs, and what `check` would run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gradverify.config import Settings
from gradverify.spec.model import InputSpec, OpSpec


def _input_text(param: InputSpec) -> str:
    if not param.is_tensor:
        if param.needs_value:
            return f"{param.name}: {param.annotation or 'value'} (needs --arg {param.name}=VALUE)"
        return f"{param.name}={param.value!r}"
    parts = [f"{param.name}: tensor" + (f" {param.dtype}" if param.dtype else "")]
    if param.domain:
        parts.append(f"domain {param.domain}")
    if param.low is not None or param.high is not None:
        parts.append(f"range [{param.low}, {param.high})")
    if not param.requires_grad:
        parts.append("no grad")
    if param.optional:
        parts.append("optional")
    if param.guessed:
        parts.append("(guessed: no annotation, no default)")
    return " ".join(parts)


def _shapes_text(inputs: Sequence[InputSpec]) -> str:
    tensors = [p for p in inputs if p.is_tensor]
    if not tensors:
        return "(no tensor inputs)"
    return " ".join(f"{p.name}({','.join(map(str, p.shape or ()))})" for p in tensors)


def _checks_text(case: Any, settings: Settings) -> list[str]:
    """The checks that would run on this case (optional ones that do not apply to every op are
    shown as they are selected; the case decides at run time)."""
    from gradverify.cases import case_settings
    from gradverify.checks import selected

    effective = case_settings(case, settings)
    names = []
    chosen = selected(effective.checks, effective.add_checks, effective.skip_checks)
    if not any(check.name == "gradcheck" for check in chosen):
        names.append("gradcheck off")
    for check in chosen:
        if check.name == "gradcheck":
            if effective.gradcheck == "off":
                names.append("gradcheck off")
            elif case.dtype in ("float64", "complex128"):
                names.append(f"gradcheck ({effective.gradcheck})")
            else:
                names.append(f"gradcheck skipped in {case.dtype}")
        elif check.name == "second_order":
            if effective.order >= 2:
                names.append("second order")
        elif check.name == "device":
            if case.device.split(":")[0] != "cpu":
                names.append("agreement with cpu")
        elif check.name in ("registration", "opcheck"):
            if getattr(case.op.op, "kind", "") in ("custom_op", "torch.ops"):
                names.append(check.name)  # custom ops and torch.ops overloads only
        elif check.name in ("forward_mode", "needs_input_grad", "multi_output", "transforms"):
            continue  # only where they apply (a defined jvp; two or more differentiable inputs or outputs; torch.func)
        else:
            names.append(check.name)
    names.sort(key=lambda name: name.startswith("gradcheck"))
    tol = []
    if effective.atol is not None:
        tol.append(f"atol {effective.atol:g}")
    if effective.rtol is not None:
        tol.append(f"rtol {effective.rtol:g}")
    if tol:
        names.append(", ".join(tol))
    if effective.strict:
        names.append("strict")
    return names


def describe_op(op: OpSpec, settings: Settings) -> tuple[list[str], int]:
    """Lines describing one op (its kind, where it is, its inputs, its cases with their checks)."""
    from gradverify.cases import expand_cases
    from gradverify.runner import device_unavailable

    where = f"{op.file}{':' + str(op.line) if op.line else ''}"
    if op.spec_file:
        where += f", declared in {op.spec_file}{':' + str(op.spec_line) if op.spec_line else ''}"
    lines = [f"{op.name}  [{op.kind}]  ({where})"]
    template = op.declared[0].inputs if op.declared else op.params
    lines.append("  inputs:   " + (", ".join(_input_text(p) for p in template) or "none"))
    if op.reference is not None:
        lines.append(f"  reference: {getattr(op.reference, '__qualname__', repr(op.reference))}")
    if op.surrogate:
        lines.append(f"  expected: surrogate gradient ({op.surrogate})")
    if op.expect_failure:
        lines.append(f"  expected: failure ({op.expect_failure})")
    cases = expand_cases(op, settings)
    lines.append(f"  cases:    {len(cases)}")
    for case in cases:
        device = case.device
        unavailable = device_unavailable(case.device)
        if unavailable:
            device += f" ({'fails' if settings.require_device else 'skipped'}: {unavailable})"
        if case.skip_reason:
            lines.append(f"    skipped: {case.skip_reason}")
            continue
        if case.problem:
            lines.append(f"    spec problem: {case.problem}")
            continue
        lines.append(f"    {_shapes_text(case.inputs)}  {case.dtype}  {device}  seed {case.seed}"
                     f"  [{case.shape_source}]: {'; '.join(_checks_text(case, settings))}")
    return lines, len(cases)


def list_ops(paths: Sequence[Path], settings: Settings) -> str:
    """The text `gradverify list` prints (spec errors raise SpecError, exit 2)."""
    from gradverify.spec import load_path

    out: list[str] = []
    total = 0
    for path in paths:
        for file, ops in load_path(Path(path)):
            if settings.ops:
                ops = [op for op in ops if op.name in settings.ops]
            if not ops:
                continue
            out.append(str(file))
            for op in ops:
                lines, count = describe_op(op, settings)
                total += count
                out.extend("  " + line for line in lines)
    config = settings.extra.get("config_file")
    out.append(f"{total} case{'s' if total != 1 else ''} would run"
               + (f" (configuration: {config})" if config else ""))
    return "\n".join(out) + "\n"


def run_list(paths: Sequence[str], ops: Sequence[str], shapes: Sequence[str], dtypes: Sequence[str],
             devices: Sequence[str], seed: str | None, require_device: bool | None) -> int:
    """What `gradverify list` does (flags parsed by the settings schema, as for `check`)."""
    import sys

    from gradverify.commands.check import check_readable
    from gradverify.config import resolve_settings
    from gradverify.errors import UsageError

    targets = [Path(p) for p in paths]
    check_readable(targets)
    settings = resolve_settings({"shapes": shapes, "dtypes": dtypes, "devices": devices, "seed": seed, "ops": ops,
                                 "require_device": require_device}, targets[0] if targets else Path.cwd())
    targets = targets or [Path(p) for p in settings.paths]
    if not targets:
        raise UsageError("no spec path given: pass PATH or set `paths` in [tool.gradverify] of pyproject.toml")
    sys.stdout.write(list_ops(targets, settings))
    return 0
