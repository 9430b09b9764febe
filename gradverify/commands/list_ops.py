"""`gradverify list PATH`: the ops a spec path holds, their inputs, and what `check` would run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gradverify.config import Settings
from gradverify.spec.model import InputSpec, OpSpec


def _input_text(param: InputSpec) -> str:
    if not param.is_tensor:
        return f"{param.name}={param.value!r}"
    parts = [f"{param.name}: tensor"]
    if param.domain:
        parts.append(f"domain {param.domain}")
    if not param.requires_grad:
        parts.append("no grad")
    return " ".join(parts)


def _shapes_text(inputs: Sequence[InputSpec]) -> str:
    tensors = [p for p in inputs if p.is_tensor]
    if not tensors:
        return "(no tensor inputs)"
    return " ".join(f"{p.name}({','.join(map(str, p.shape or ()))})" for p in tensors)


def _checks_text(case: Any, settings: Settings) -> list[str]:
    from gradverify.cases import case_settings

    effective = case_settings(case, settings)
    checks = ["contracts", "jacobian"]
    if effective.gradcheck == "off":
        checks.append("gradcheck off")
    elif case.dtype in ("float64", "complex128"):
        checks.append(f"gradcheck ({effective.gradcheck})")
    else:
        checks.append(f"gradcheck skipped in {case.dtype}")
    if effective.order >= 2:
        checks.append("second order")
    if case.op.checks and "forward_mode" in case.op.checks:
        checks.append("forward mode")
    if case.device.split(":")[0] != "cpu":
        checks.append("agreement with cpu")
    tol = []
    if effective.atol is not None:
        tol.append(f"atol {effective.atol:g}")
    if effective.rtol is not None:
        tol.append(f"rtol {effective.rtol:g}")
    if tol:
        checks.append(", ".join(tol))
    return checks


def describe_op(op: OpSpec, settings: Settings) -> tuple[list[str], int]:
    """Lines describing one op (where it is, its inputs, its cases with their checks), and its case count."""
    from gradverify.cases import expand_cases
    from gradverify.runner import device_unavailable

    lines = [f"{op.name}  ({op.file}{':' + str(op.line) if op.line else ''})"]
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
        where = case.device
        unavailable = device_unavailable(case.device)
        if unavailable:
            where += f" ({'fails' if settings.require_device else 'skipped'}: {unavailable})"
        lines.append(f"    {_shapes_text(case.inputs)}  {case.dtype}  {where}  seed {case.seed}"
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
