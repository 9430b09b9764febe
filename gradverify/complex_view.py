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

from typing import Any, Callable, Sequence

import torch

from gradverify.ops.base import Op, RawBackward, as_tuple
from gradverify.spec.model import InputSpec
from gradverify.usercode import boundary

REAL_OF = {"complex128": "float64", "complex64": "float32"}


def _to_complex(value: Any) -> Any:
    return torch.view_as_complex(value.contiguous()) if isinstance(value, torch.Tensor) and \
        value.dim() and value.shape[-1] == 2 and value.is_floating_point() else value


def _to_real(outputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(torch.view_as_real(o) if isinstance(o, torch.Tensor) and o.is_complex() else o for o in outputs)


class RealViewOp:
    """Any op, with the complex tensors among its arguments and outputs seen as real views."""

    def __init__(self, inner: Op, positional: frozenset[int], keywords: frozenset[str]) -> None:
        self.inner = inner
        self.positional = positional
        self.keywords = keywords
        self.name = inner.name
        self.kind = inner.kind
        self.target = inner.target
        self.file = inner.file
        self.line = inner.line
        self.backward_line = inner.backward_line
        self.body_description = inner.body_description

    def _convert(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        return ([_to_complex(a) if k in self.positional else a for k, a in enumerate(args)],
                {k: _to_complex(v) if k in self.keywords else v for k, v in kwargs.items()})

    def params(self) -> tuple[InputSpec, ...]:
        return self.inner.params()

    @boundary
    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        a, k = self._convert(args, kwargs)
        return _to_real(as_tuple(self.inner.call(a, k)))

    def body(self, device: str = "cpu") -> Callable[..., Any] | None:
        body = self.inner.body(device)
        if body is None:
            return None

        @boundary
        def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            a, k = self._convert(args, kwargs)
            return _to_real(as_tuple(body(*a, **k)))

        return run

    def raw_backward(self, outputs: Sequence[Any], n_inputs: int) -> RawBackward | None:
        return None

    def defines_jvp(self) -> bool:
        return False

    def once_differentiable(self) -> bool:
        return self.inner.once_differentiable()

    def has_backward(self) -> bool:
        return self.inner.has_backward()


def complex_positions(args: Sequence[Any]) -> frozenset[int]:
    return frozenset(k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_complex())


def real_view(values: Sequence[Any], positions: frozenset[int]) -> list[Any]:
    return [torch.view_as_real(v.detach().clone()).clone() if k in positions else v for k, v in enumerate(values)]
