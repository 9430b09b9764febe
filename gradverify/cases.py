"""Sweep expansion (ops x shapes x dtypes x devices) and seeded input construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gradverify.config import DEFAULT_SHAPE, Settings, ShapeSet
from gradverify.errors import UsageError
from gradverify.spec.model import InputSpec, OpSpec


def _magnitude(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return 0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64)


def _sign(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1


# Value domains, with why each range was chosen. Ranges stay away from the points where
# common ops lose differentiability or conditioning (0 for 1/x, log, abs; +-1 for asin), so
# a finite-difference step of ~1e-3 never crosses them.
DOMAINS: dict[str, tuple[str, Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]]] = {
    "any": ("standard normal values", lambda g, s: torch.randn(s, generator=g, dtype=torch.float64)),
    "positive": ("uniform in [0.5, 2): for log, sqrt, 1/x, x / x.sum()", _magnitude),
    "negative": ("uniform in (-2, -0.5]", lambda g, s: -_magnitude(g, s)),
    "nonzero": ("+-[0.5, 2): for abs, relu, sign-dependent ops away from their kink",
                lambda g, s: _sign(g, s) * _magnitude(g, s)),
    "unit": ("uniform in (-0.9, 0.9): for asin, acos, atanh",
             lambda g, s: (torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1) * 0.9),
    "probability": ("uniform in [0.05, 0.95]: for logit, binary cross-entropy",
                    lambda g, s: 0.05 + 0.9 * torch.rand(s, generator=g, dtype=torch.float64)),
}


@dataclass(frozen=True)
class Case:
    """One op called with one set of input shapes, in one dtype, on one device."""

    op: OpSpec
    inputs: tuple[InputSpec, ...]
    dtype: str
    device: str
    seed: int
    domain_override: str | None = None
    shape_source: str = "command line"

    @property
    def tensor_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(p for p in self.inputs if p.is_tensor)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p.shape or () for p in self.tensor_inputs)

    def domain_of(self, param: InputSpec) -> str:
        return self.domain_override or param.domain or "any"

    @property
    def domain_label(self) -> str:
        domains = sorted({self.domain_of(p) for p in self.tensor_inputs})
        return ",".join(domains) if domains else "any"


def check_domain(name: str) -> str:
    if name not in DOMAINS:
        raise UsageError(f"--domain {name!r}: expected one of {', '.join(DOMAINS)}")
    return name


def _with_shapes(template: tuple[InputSpec, ...], shape_set: ShapeSet, op: OpSpec) -> tuple[InputSpec, ...]:
    """Apply a command-line shape set to a template of forward's arguments."""
    tensors = [p for p in template if p.is_tensor]
    required = [p for p in tensors if not p.optional]
    if len(shape_set) == 1:
        shapes = {p.name: shape_set[0] for p in required}
    else:
        # One shape per tensor input, in forward's order; optional inputs (bias=None) are
        # passed only when the set names a shape for them.
        if not len(required) <= len(shape_set) <= len(tensors):
            expected = (f"{len(required)}" if len(required) == len(tensors)
                        else f"{len(required)} to {len(tensors)}")
            raise UsageError(
                f"--shape {';'.join(','.join(map(str, s)) for s in shape_set)}: {op.name} takes "
                f"{expected} tensor inputs ({', '.join(p.name for p in tensors)}), "
                f"got {len(shape_set)} shapes"
            )
        shapes = {p.name: s for p, s in zip(tensors, shape_set)}
    resolved: list[InputSpec] = []
    for param in template:
        if param.is_tensor and param.name in shapes:
            resolved.append(InputSpec(name=param.name, shape=shapes[param.name], domain=param.domain,
                                      requires_grad=param.requires_grad))
        elif param.is_tensor and param.variadic:
            continue  # an *args slot without a shape is simply not passed
        elif param.is_tensor:
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None, has_value=True))
        else:
            resolved.append(param)
    return tuple(resolved)


def _fill_default_shapes(inputs: tuple[InputSpec, ...]) -> tuple[tuple[InputSpec, ...], bool]:
    used_default = False
    resolved: list[InputSpec] = []
    for param in inputs:
        if param.is_tensor and param.optional and param.shape is None:
            if param.variadic:
                continue  # an *args slot without a shape is simply not passed
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None, has_value=True))
        elif param.is_tensor and param.shape is None:
            used_default = True
            resolved.append(InputSpec(name=param.name, shape=DEFAULT_SHAPE, domain=param.domain,
                                      requires_grad=param.requires_grad))
        else:
            resolved.append(param)
    return tuple(resolved), used_default


def _complete(template: tuple[InputSpec, ...]) -> bool:
    return all(p.shape is not None for p in template if p.is_tensor and not p.optional)


def expand_cases(op: OpSpec, settings: Settings) -> list[Case]:
    """Every case of `op` the settings ask for: shape sets x dtypes x devices.

    The op's own dtypes, devices and seed (a YAML spec's) are used unless the run chose them
    on the command line or in GRADVERIFY_* variables; likewise shapes from pyproject.toml do
    not replace shapes the spec declares for every input.
    """
    templates = [decl.inputs for decl in op.declared] or [op.params]
    input_sets: list[tuple[tuple[InputSpec, ...], str]] = []
    use_run_shapes = bool(settings.shapes) and (
        settings.is_explicit("shapes") or not op.declared or not all(_complete(t) for t in templates))
    if use_run_shapes:
        source = "command line" if settings.is_explicit("shapes") else "configuration"
        for shape_set in settings.shapes:
            template = templates[0]
            if len(shape_set) > 1:
                matching = [t for t in templates if sum(p.is_tensor for p in t) == len(shape_set)]
                template = matching[0] if matching else op.params
            input_sets.append((_with_shapes(template, shape_set, op), source))
    else:
        for template in templates:
            resolved, used_default = _fill_default_shapes(template)
            source = "default" if used_default else ("spec" if op.declared else "default")
            input_sets.append((resolved, source))
    dtypes = op.dtypes if op.dtypes and not settings.is_explicit("dtypes") else settings.dtypes
    devices = op.devices if op.devices and not settings.is_explicit("devices") else settings.devices
    seed = op.seed if op.seed is not None and not settings.is_explicit("seed") else settings.seed
    cases: list[Case] = []
    for inputs, source in input_sets:
        for dtype in dtypes:
            for device in devices:
                cases.append(Case(op=op, inputs=inputs, dtype=dtype, device=device,
                                  seed=seed, domain_override=settings.domain,
                                  shape_source=source))
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
    built-in per-dtype default (compare.DEFAULT_TOLERANCES, applied later). An op's `checks`
    turn gradcheck off (unless chosen explicitly), second order and forward mode on or off.
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
        for value in (op_dtype, op_all, cfg_dtype, current):
            if value is not None:
                break
        if value != current:
            changes[name] = value
    if op.checks:
        if "gradcheck" not in op.checks and not settings.is_explicit("gradcheck"):
            changes["gradcheck"] = "off"
        if not settings.is_explicit("order"):
            changes["order"] = 2 if "second_order" in op.checks else 1
        if not settings.is_explicit("forward_ad"):
            changes["forward_ad"] = "forward_mode" in op.checks
    return settings.with_(**changes) if changes else settings


def input_values(case: Case) -> list[Any]:
    """The case's arguments as float64 CPU tensors (non-tensors as given), reproducible by seed.

    Values are drawn in float64 and rounded once to the case's dtype, so the float64 truth of a
    low-precision case is computed at exactly the values the op sees.
    """
    dtype = getattr(torch, case.dtype)
    values: list[Any] = []
    for position, param in enumerate(case.inputs):
        if not param.is_tensor:
            values.append(param.value)
            continue
        gen = torch.Generator().manual_seed(case.seed * 1_000_003 + position)
        sampler = DOMAINS[case.domain_of(param)][1]
        shape = tuple(param.shape or ())
        if dtype.is_complex:
            real, imag = sampler(gen, shape), sampler(gen, shape)
            values.append(torch.complex(real, imag).to(dtype).to(torch.complex128))
        else:
            values.append(sampler(gen, shape).to(dtype).to(torch.float64))
    return values
