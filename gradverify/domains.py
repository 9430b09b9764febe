"""Value domains for tensor inputs: how to draw values, and which perturbations stay inside.

Most domains are open sets (positive numbers, say): any small perturbation stays inside, and
the Jacobian is compared everywhere. Some are constraint sets: symmetric (and SPD) matrices,
the probability simplex, unit vectors. An op on such inputs is only defined (or its backward
only valid) for perturbations that stay in the set: a matrix square root's backward that
returns the symmetric part of the gradient is right for every symmetric perturbation and
"wrong" for an asymmetric one that never happens. For those domains `tangent` projects a
perturbation onto the set's tangent space, and every Jacobian (analytic, reference, finite
differences) is compared along projected directions only: entry (i, j) then reads as the
derivative of out[i] along the projection of the unit vector e_j.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

Sampler = Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]
Tangent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DomainError(ValueError):
    """A domain cannot produce values of this shape, or a user sampler cannot be loaded."""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    sample: Sampler
    # Projects a perturbation v (same shape as x) onto the tangent space at x; None: open set.
    tangent: Tangent | None = None
    # Inputs of this domain are not differentiated unless the spec says so (one-hot targets).
    differentiable: bool = True
    tangent_text: str = ""


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _sign(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1


def _square(shape: tuple[int, ...], name: str) -> int:
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise DomainError(f"domain {name!r} needs square matrices (shape (..., n, n)), got {shape}")
    return shape[-1]


def _spd(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Q diag(lambda) Q^T with eigenvalues spread evenly in [0.5, 2]: condition number <= 4, and
    eigenvalues at least 1.5/n apart, so eigh-based backwards (which divide by eigenvalue gaps)
    are well conditioned and a finite-difference step never swaps two eigenvalues."""
    n = _square(shape, "spd")
    batch = shape[:-2]
    q, _ = torch.linalg.qr(torch.randn((*batch, n, n), generator=gen, dtype=torch.float64))
    base = torch.linspace(0.5, 2.0, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    jitter = (torch.rand((*batch, n), generator=gen, dtype=torch.float64) - 0.5) * (0.5 / max(n, 2))
    lam = base + jitter
    return (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2)


def _symmetric(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    _square(shape, "symmetric")
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (a + a.transpose(-1, -2)) / 2


def _symmetric_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v + v.transpose(-1, -2)) / 2


def _simplex(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Points well inside the simplex (every entry >= ~0.1/n), so a step stays positive."""
    if not shape:
        raise DomainError("domain 'simplex' needs at least one dimension (the one that sums to 1)")
    w = _uniform(gen, shape, 0.5, 2.0)
    return w / w.sum(-1, keepdim=True)


def _simplex_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(-1, keepdim=True)


def _unit_norm(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    if not shape:
        raise DomainError("domain 'unit_norm' needs at least one dimension (the one normalised)")
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)


def _unit_norm_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v - (v * x).sum(-1, keepdim=True) * x


def _distinct(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """A random permutation of evenly spaced values in [-2, 2] (spacing 4/n, jittered by 10% of
    it): no ties, so sort/max/rank ops are differentiable and small steps keep the order."""
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(shape, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen).to(torch.float64)
    jitter = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.2
    spacing = 4.0 / n
    return ((perm - (n - 1) / 2 + jitter) * spacing).reshape(shape)


def _one_hot(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    if not shape:
        raise DomainError("domain 'one_hot' needs at least one dimension (the classes)")
    index = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return torch.nn.functional.one_hot(index, shape[-1]).to(torch.float64)


# Value domains, with why each range was chosen. Open ranges stay away from the points where
# common ops lose differentiability or conditioning (0 for 1/x, log, abs; +-1 for asin), so a
# finite-difference step never crosses them.
DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("any", "standard normal values", lambda g, s: torch.randn(s, generator=g, dtype=torch.float64)),
    Domain("positive", "uniform in [0.5, 2): for log, sqrt, 1/x, x / x.sum()",
           lambda g, s: _uniform(g, s, 0.5, 2.0)),
    Domain("negative", "uniform in (-2, -0.5]", lambda g, s: -_uniform(g, s, 0.5, 2.0)),
    Domain("nonzero", "+-[0.5, 2): for abs, relu, sign-dependent ops away from their kink",
           lambda g, s: _sign(g, s) * _uniform(g, s, 0.5, 2.0)),
    Domain("unit", "uniform in (-0.9, 0.9): for asin, acos, atanh", lambda g, s: _uniform(g, s, -0.9, 0.9)),
    Domain("probability", "uniform in [0.05, 0.95]: for logit, binary cross-entropy",
           lambda g, s: _uniform(g, s, 0.05, 0.95)),
    Domain("spd", "symmetric positive definite matrices (..., n, n), eigenvalues in [0.5, 2]", _spd,
           _symmetric_tangent, tangent_text="symmetric perturbations"),
    Domain("symmetric", "symmetric matrices (..., n, n)", _symmetric, _symmetric_tangent,
           tangent_text="symmetric perturbations"),
    Domain("simplex", "positive entries whose last dim sums to 1", _simplex, _simplex_tangent,
           tangent_text="zero-sum perturbations along the last dim"),
    Domain("unit_norm", "vectors of norm 1 along the last dim", _unit_norm, _unit_norm_tangent,
           tangent_text="perturbations tangent to the unit sphere"),
    Domain("distinct", "values well apart (a shuffled grid in [-2, 2]): for sort, max, rank ops", _distinct),
    Domain("one_hot", "one-hot vectors along the last dim (targets: not differentiated by default)", _one_hot,
           differentiable=False),
)}


def domain_names() -> list[str]:
    return list(DOMAINS)


def is_user_sampler(name: str) -> bool:
    return ":" in name and name not in DOMAINS


def load_user_sampler(name: str, folder: Path | None = None) -> Domain:
    """`module:function` (or `file.py:function`), called as function(shape, dtype, generator)."""
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise DomainError(f"expected a domain name ({', '.join(DOMAINS)}) or 'module:function', found {name!r}")
    if where.endswith(".py"):
        from gradverify.spec.python import import_spec_module

        path = Path(where)
        if not path.is_absolute() and folder is not None:
            path = folder / path
        module = import_spec_module(path)
    else:
        added = [str(p) for p in (folder, Path.cwd()) if p is not None and str(p) not in sys.path]
        sys.path[:0] = added
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise DomainError(f"domain {name!r}: cannot import {where!r} ({exc})") from None
        finally:
            for p in added:
                if p in sys.path:
                    sys.path.remove(p)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DomainError(f"domain {name!r}: {where} has no function {attr!r}")

    def sample(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        value = fn(shape, torch.float64, gen)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DomainError(f"domain {name!r}: {attr}(shape, dtype, generator) must return a tensor of shape "
                              f"{tuple(shape)}, returned {got}")
        return value.detach().to(torch.float64)

    return Domain(name, f"values from {name}", sample)


def get_domain(name: str, folder: Path | None = None) -> Domain:
    if name in DOMAINS:
        return DOMAINS[name]
    if is_user_sampler(name):
        return load_user_sampler(name, folder)
    raise DomainError(f"expected one of {', '.join(DOMAINS)} or 'module:function', found {name!r}")
