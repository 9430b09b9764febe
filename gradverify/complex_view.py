"""Complex inputs through their real view, which is how torch's Wirtinger convention is checked.

torch's backward of a complex op returns, for a real loss L, dL/da + i dL/db for z = a + ib (the
conjugate Wirtinger derivative, scaled by 2). Viewing every complex tensor as a real tensor with
a trailing dimension of 2 (torch.view_as_real) turns the op into a real function of real inputs;
autograd through view_as_complex/view_as_real then produces exactly the real Jacobian
d(Re y, Im y)/d(Re z, Im z) from the user's backward, and finite differences and the reference
see the same real function. So the whole real machinery applies unchanged, and a backward that
drops a conj() (the commonest complex bug) shows up as wrong entries like any other.

In reports the last index of such an entry is 0 for the real part and 1 for the imaginary part.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from gradverify.cases import Case
from gradverify.jacobian import StandInCtx, as_tuple
from gradverify.spec.model import InputSpec
from gradverify.spec.python import uses_setup_context

REAL_OF = {"complex128": "float64", "complex64": "float32"}


def _to_complex(args: Sequence[Any], positions: frozenset[int]) -> list[Any]:
    return [torch.view_as_complex(a.contiguous()) if k in positions else a for k, a in enumerate(args)]


def _to_real(outputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(torch.view_as_real(o) if isinstance(o, torch.Tensor) and o.is_complex() else o for o in outputs)


def real_view_function(function: type, positions: frozenset[int]) -> type:
    """An object with `apply` and `forward` like the Function, over real views of complex args."""

    def apply(*args: Any) -> tuple[Any, ...]:
        return _to_real(as_tuple(function.apply(*_to_complex(args, positions))))

    def forward(*args: Any) -> tuple[Any, ...]:
        call = _to_complex(args, positions)
        if uses_setup_context(function):
            return _to_real(as_tuple(function.forward(*call)))
        needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in call)
        return _to_real(as_tuple(function.forward(StandInCtx(needs), *call)))

    # Plain staticmethods: uses_setup_context() reads "no ctx", so the reference calls forward(*args).
    return type(f"{function.__name__}RealView", (), {"apply": staticmethod(apply), "forward": staticmethod(forward),
                                                     "__module__": function.__module__})


def _real_view_reference(reference: Callable[..., Any] | None,
                         positions: frozenset[int]) -> Callable[..., Any] | None:
    if reference is None:
        return None

    def wrapped(*args: Any) -> tuple[Any, ...]:
        return _to_real(as_tuple(reference(*_to_complex(args, positions))))

    return wrapped


def complex_positions(args: Sequence[Any]) -> frozenset[int]:
    return frozenset(k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_complex())


def real_view_case(case: Case, values64: Sequence[Any], args: Sequence[Any],
                   positions: frozenset[int]) -> tuple[Case, list[Any], list[Any]]:
    """The same case as a real function: the adapter op, real dtype, shapes with a trailing 2."""
    op = replace(case.op, function=real_view_function(case.op.function, positions),
                 reference=_real_view_reference(case.op.reference, positions))
    inputs = tuple(replace(p, shape=(*(p.shape or ()), 2)) if k in positions else p
                   for k, p in enumerate(case.inputs))
    real_case = replace(case, op=op, inputs=inputs, dtype=REAL_OF.get(case.dtype, case.dtype))

    def view(values: Sequence[Any]) -> list[Any]:
        return [torch.view_as_real(v.detach().clone()).clone() if k in positions else v
                for k, v in enumerate(values)]

    return real_case, view(values64), view(args)


__all__ = ["complex_positions", "real_view_case", "real_view_function", "InputSpec"]
