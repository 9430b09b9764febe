"""Sweep expansion (ops x shapes x dtypes x devices) and seeded input construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from gradverify.config import DEFAULT_SHAPE, Settings, ShapeSet
from gradverify.domains import DOMAINS, Domain, DomainError, get_domain
from gradverify.errors import SpecError
from gradverify.spec.model import INT_DTYPES, InputSpec, OpSpec


@dataclass(frozen=True)
class Case:
    """One op called with one set of inputs, in one dtype, on one device.

    problem: a spec problem found while expanding (a value parameter without a value): the case
        is reported as a spec error without running anything.
    skip_reason: the case does not apply (an arity that does not match --shape).
    guesses: what gradverify had to guess for this case (a tensor for an unannotated parameter,
        the range of an index tensor): reported, and a forward that raises on them is a spec
        problem rather than the user's bug.
    cli_args: the --arg values applied (for the repro line).
    """

    op: OpSpec
    inputs: tuple[InputSpec, ...]
    dtype: str
    device: str
    seed: int
    domain_override: str | None = None
    shape_source: str = "command line"
    problem: str | None = None
    skip_reason: str | None = None
    guesses: tuple[str, ...] = ()
    input_domains: tuple[tuple[str, str], ...] = ()
    cli_args: tuple[tuple[str, str], ...] = ()

    @property
    def tensor_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(p for p in self.inputs if p.is_tensor)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p.shape or () for p in self.tensor_inputs)

    def domain_of(self, param: InputSpec) -> str:
        for name, domain in self.input_domains:
            if name == param.name:
                return domain
        if self.domain_override and param.is_float_tensor:
            return self.domain_override
        return param.domain or "any"

    @property
    def domain_label(self) -> str:
        domains = sorted({self.domain_of(p) for p in self.tensor_inputs if p.is_float_tensor})
        return ",".join(domains) if domains else "any"

    def tensor_dtype(self, param: InputSpec) -> str:
        """The dtype of one tensor argument: fixed by the spec, else the case's dtype."""
        return param.dtype or self.dtype

    def differentiable(self, param: InputSpec) -> bool:
        if not param.is_tensor or not param.requires_grad or not param.is_float_tensor:
            return False
        domain = self.domain_of(param)
        return DOMAINS[domain].differentiable if domain in DOMAINS else True

    def split(self, values: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional arguments and keyword arguments for the op's call."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for param, value in zip(self.inputs, values):
            if param.keyword:
                kwargs[param.name] = value
            else:
                args.append(value)
        return args, kwargs


def check_domain(name: str) -> str:
    """`--domain NAME` for every input (one of DOMAINS or a `module:function` sampler)."""
    from gradverify.errors import UsageError

    if name not in DOMAINS and ":" not in name:
        from gradverify.config import did_you_mean

        raise UsageError(f"--domain {name!r}: expected one of {', '.join(DOMAINS)} or 'module:function'"
                         + did_you_mean(name, DOMAINS))
    return name


def _shape_text(shape_set: ShapeSet) -> str:
    return ";".join(",".join(map(str, s)) for s in shape_set)


def _apply_args(template: tuple[InputSpec, ...], args: dict[str, Any]) -> tuple[InputSpec, ...]:
    """--arg name=value: a plain value for that parameter (a guessed tensor becomes a value)."""
    if not args:
        return template
    out = []
    for param in template:
        if param.name in args:
            out.append(replace(param, is_tensor=False, value=args[param.name], has_value=True, guessed=False,
                               optional=False, shape=None))
        else:
            out.append(param)
    return tuple(out)


def _with_shapes(template: tuple[InputSpec, ...], shape_set: ShapeSet, op: OpSpec) -> tuple[tuple[InputSpec, ...], str]:
    """Apply a command-line shape set to a template; returns (inputs, skip reason or '')."""
    tensors = [p for p in template if p.is_tensor]
    required = [p for p in tensors if not p.optional]
    if len(shape_set) == 1:
        shapes = {p.name: shape_set[0] for p in required}
    else:
        # One shape per tensor input, in the op's order; optional inputs (bias=None) are passed
        # only when the set names a shape for them.
        if not len(required) <= len(shape_set) <= len(tensors):
            expected = (f"{len(required)}" if len(required) == len(tensors)
                        else f"{len(required)} to {len(tensors)}")
            return template, (f"--shape {_shape_text(shape_set)} gives {len(shape_set)} shapes but {op.name} takes "
                              f"{expected} tensor inputs ({', '.join(p.name for p in tensors) or 'none'})")
        shapes = {p.name: s for p, s in zip(tensors, shape_set)}
    resolved: list[InputSpec] = []
    for param in template:
        if param.is_tensor and param.name in shapes:
            resolved.append(replace(param, shape=shapes[param.name], optional=False))
        elif param.is_tensor and param.variadic:
            continue  # an *args slot without a shape is simply not passed
        elif param.is_tensor and param.optional:
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None, has_value=True,
                                      keyword=param.keyword))
        else:
            resolved.append(param)
    return tuple(resolved), ""


def _fill_default_shapes(inputs: tuple[InputSpec, ...]) -> tuple[tuple[InputSpec, ...], bool]:
    used_default = False
    resolved: list[InputSpec] = []
    for param in inputs:
        if param.is_tensor and param.optional and param.shape is None:
            if param.variadic:
                continue  # an *args slot without a shape is simply not passed
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None, has_value=True,
                                      keyword=param.keyword))
        elif param.is_tensor and param.shape is None:
            used_default = True
            resolved.append(replace(param, shape=DEFAULT_SHAPE))
        else:
            resolved.append(param)
    return tuple(resolved), used_default


def _complete(template: tuple[InputSpec, ...]) -> bool:
    return all(p.shape is not None for p in template if p.is_tensor and not p.optional)


def _guesses_and_problem(inputs: tuple[InputSpec, ...], op: OpSpec) -> tuple[tuple[str, ...], str | None]:
    guesses: list[str] = []
    first_tensor = next((p.name for p in inputs if p.is_tensor), None)
    for p in inputs:
        # The first parameter of an op is its tensor input in practice; later unannotated ones
        # without defaults (dim, k, smoothing) are where guessing a tensor goes wrong.
        if p.is_tensor and p.guessed and p.name != first_tensor:
            guesses.append(f"{p.name}: passed a tensor because the parameter has no annotation and no default")
        if p.is_tensor and not p.is_float_tensor and p.dtype in INT_DTYPES and p.high is None:
            guesses.append(f"{p.name}: values drawn from [0, n) with n guessed from the first floating input "
                           "(declare a range)")
    missing = [p for p in inputs if p.needs_value]
    if missing:
        p = missing[0]
        kind = f"`{p.name}: {p.annotation}`" if p.annotation else f"`{p.name}`"
        return tuple(guesses), (f"{op.name}'s parameter {kind} has no default and no value was given: pass "
                                f"--arg {p.name}=VALUE, or give it in the spec ({p.name}: VALUE)")
    return tuple(guesses), None


def expand_cases(op: OpSpec, settings: Settings) -> list[Case]:
    """Every case of `op` the settings ask for: shape sets x dtypes x devices.

    The op's own dtypes, devices and seed (a YAML spec's) are used unless the run chose them on
    the command line or in GRADVERIFY_* variables; likewise shapes from pyproject.toml do not
    replace shapes the spec declares for every input.
    """
    args = dict(settings.args)
    templates = [_apply_args(decl.inputs, args) for decl in op.declared] or [_apply_args(op.params, args)]
    input_sets: list[tuple[tuple[InputSpec, ...], str, str]] = []
    use_run_shapes = bool(settings.shapes) and (
        settings.is_explicit("shapes") or not op.declared or not all(_complete(t) for t in templates))
    if use_run_shapes:
        source = "command line" if settings.is_explicit("shapes") else "configuration"
        for shape_set in settings.shapes:
            template = templates[0]
            if len(shape_set) > 1:
                matching = [t for t in templates if sum(p.is_tensor for p in t) == len(shape_set)]
                template = matching[0] if matching else _apply_args(op.params, args)
            inputs, skip = _with_shapes(template, shape_set, op)
            input_sets.append((inputs, source, skip))
    else:
        for template in templates:
            resolved, used_default = _fill_default_shapes(template)
            source = "default" if used_default else ("spec" if op.declared else "default")
            input_sets.append((resolved, source, ""))
    dtypes = op.dtypes if op.dtypes and not settings.is_explicit("dtypes") else settings.dtypes
    devices = op.devices if op.devices and not settings.is_explicit("devices") else settings.devices
    seed = op.seed if op.seed is not None and not settings.is_explicit("seed") else settings.seed
    applied = tuple((name, repr(value)) for name, value in settings.args
                    if any(p.name == name for p in op.params))
    cases: list[Case] = []
    for inputs, source, skip in input_sets:
        guesses, problem = _guesses_and_problem(inputs, op)
        for dtype in dtypes:
            for device in devices:
                cases.append(Case(op=op, inputs=inputs, dtype=dtype, device=device, seed=seed,
                                  domain_override=settings.domain, shape_source=source, problem=problem,
                                  skip_reason=skip or None, guesses=guesses,
                                  input_domains=tuple(settings.input_domains), cli_args=applied))
    return cases


def _lookup(rows: tuple[tuple[str, float | None, float | None], ...], dtype: str) -> tuple[float | None, float | None]:
    for name, atol, rtol in rows:
        if name == dtype:
            return atol, rtol
    return None, None


def case_settings(case: Case, settings: Settings) -> Settings:
    """The settings one case runs under, once the op's own spec values are applied.

    Tolerance, most specific first: command line / GRADVERIFY_* > the op's per-dtype value >
    the op's overall value > pyproject's per-dtype value > pyproject's overall value > the
    built-in per-dtype default (numerics.tolerance, applied later). An op's `checks` select
    its optional checks unless the run chose them.
    """
    changes: dict[str, Any] = {}
    op = case.op
    op_atol, op_rtol = _lookup(op.dtype_tolerances, case.dtype)
    cfg_atol, cfg_rtol = _lookup(settings.dtype_tolerances, case.dtype)
    for name, op_dtype, op_all, cfg_dtype in (("atol", op_atol, op.atol, cfg_atol),
                                               ("rtol", op_rtol, op.rtol, cfg_rtol)):
        current = getattr(settings, name)
        if settings.is_explicit(name) and current is not None:
            continue
        value = current
        for candidate in (op_dtype, op_all, cfg_dtype, current):
            if candidate is not None:
                value = candidate
                break
        if value != current:
            changes[name] = value
    if op.checks and not settings.is_explicit("checks"):
        changes["checks"] = tuple(op.checks)
        if "gradcheck" not in op.checks and not settings.is_explicit("gradcheck"):
            changes["gradcheck"] = "off"
        if "second_order" in op.checks and not settings.is_explicit("order"):
            changes["order"] = 2
    for name, value in op.settings:
        if not settings.is_explicit(name):
            changes[name] = value
    return settings.with_(**changes) if changes else settings


@lru_cache(maxsize=64)
def _domain(name: str, folder: str | None) -> Domain:
    return get_domain(name, Path(folder) if folder else None)


def input_values(case: Case) -> list[Any]:
    """The case's arguments (floating tensors as float64 CPU values rounded once to the dtype
    the op will see, integer/bool tensors in their dtype, plain values as given), reproducible
    by seed. The float64 truth of a low-precision case is computed at exactly these values."""
    values: list[Any] = []
    first_float = next((p for p in case.inputs if p.is_tensor and p.is_float_tensor), None)
    folder = str(Path(case.op.spec_file or case.op.file).resolve().parent) if (case.op.spec_file or case.op.file) \
        else None
    for position, param in enumerate(case.inputs):
        if not param.is_tensor:
            values.append(param.value)
            continue
        gen = torch.Generator().manual_seed(case.seed * 1_000_003 + position)
        shape = tuple(param.shape or ())
        dtype_name = case.tensor_dtype(param)
        if dtype_name == "bool":
            values.append(torch.rand(shape, generator=gen) < 0.5)
            continue
        if dtype_name in INT_DTYPES:
            low = int(param.low) if param.low is not None else 0
            if param.high is not None:
                high = int(param.high)
            else:
                high = max(1, (first_float.shape or (2,))[-1] if first_float is not None and first_float.shape else 2)
            if high <= low:
                raise SpecError(f"{case.op.name}: input {param.name!r} has an empty range [{low}, {high})",
                                file=case.op.spec_file or case.op.file)
            values.append(torch.randint(low, high, shape, generator=gen, dtype=getattr(torch, dtype_name)))
            continue
        try:
            domain = _domain(case.domain_of(param), folder)
            sample = domain.sample(gen, shape)
        except DomainError as exc:
            raise SpecError(f"{case.op.name}: input {param.name!r}: {exc}",
                            file=case.op.spec_file or case.op.file) from None
        if param.low is not None or param.high is not None:
            low = param.low if param.low is not None else float(sample.min()) if sample.numel() else 0.0
            high = param.high if param.high is not None else low + 1.0
            sample = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
        dtype = getattr(torch, dtype_name)
        if dtype.is_complex:
            imag = domain.sample(gen, shape)
            values.append(torch.complex(sample, imag).to(dtype).to(torch.complex128))
        else:
            values.append(sample.to(dtype).to(torch.float64))
    return values


def numel_of(case: Case) -> int:
    return sum(math.prod(p.shape or ()) for p in case.tensor_inputs)
