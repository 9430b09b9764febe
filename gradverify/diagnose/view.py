"""What every diagnosis rule reads off one Jacobian block, computed once.

A block is shaped out.shape + in.shape. Its *rows* are the output entries (one gradient each),
its *columns* the input entries. An entry is *relevant* when the truth or the backward is
non-zero there (beyond the entry's tolerance) or it is wrong: the zeros both agree on say
nothing about a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from gradverify.numerics.blocks import BlockComparison, unravel
from gradverify.report import format_index

LETTERS = "ijklmnpqrstuvw"


def fits(values: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Entry by entry: values agree with target within the allowed error."""
    return (values - target).abs() <= allowed


@dataclass
class BlockView:
    """One block with the masks and scales the rules share."""

    block: BlockComparison
    a: torch.Tensor = field(init=False)
    t: torch.Tensor = field(init=False)
    allowed: torch.Tensor = field(init=False)
    bad: torch.Tensor = field(init=False)
    nz_t: torch.Tensor = field(init=False)
    nz_a: torch.Tensor = field(init=False)
    relevant: torch.Tensor = field(init=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        b = self.block
        self.a = b.analytic.double()
        self.t = b.truth.double()
        self.allowed = b.allowed.double()
        self.bad = b.mismatch
        self.nz_t = self.t.abs() > self.allowed
        self.nz_a = self.a.abs() > self.allowed
        self.relevant = self.nz_t | self.nz_a | self.bad
        finite = self.t[torch.isfinite(self.t)].abs()
        # The block's scale: its largest true entry, or (an all-zero truth) its largest analytic
        # one, so that "relative to the block" is defined for every block with a mismatch.
        scale = float(finite.max()) if finite.numel() else 0.0
        if scale == 0.0:
            finite_a = self.a[torch.isfinite(self.a)].abs()
            scale = float(finite_a.max()) if finite_a.numel() else 0.0
        self.scale = scale if scale > 0 else 1.0

    # --- names and sizes -------------------------------------------------------------------

    @property
    def out_name(self) -> str:
        return self.block.out_name

    @property
    def in_name(self) -> str:
        return self.block.in_name

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.block.out_shape

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.block.in_shape

    @property
    def deriv(self) -> str:
        return f"∂{self.out_name}/∂{self.in_name}"

    @property
    def rows(self) -> int:
        return max(1, math.prod(self.out_shape))

    @property
    def cols(self) -> int:
        return max(1, math.prod(self.in_shape))

    @property
    def n_bad(self) -> int:
        return int(self.bad.sum())

    @property
    def n_relevant(self) -> int:
        return int(self.relevant.sum())

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """The block as a (rows, cols) matrix."""
        return tensor.reshape(self.rows, self.cols)

    def bad_entries(self, limit: int | None = None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(out index, in index) of the wrong entries, in row-major order."""
        flat = torch.nonzero(self.bad.reshape(-1)).reshape(-1)
        if limit is not None:
            flat = flat[:limit]
        out = []
        for f in flat.tolist():
            o_flat, i_flat = divmod(f, self.cols)
            out.append((unravel(o_flat, self.out_shape), unravel(i_flat, self.in_shape)))
        return out

    def entry(self, out_index: Sequence[int], in_index: Sequence[int]) -> str:
        return f"∂{format_index(self.out_name, tuple(out_index))}/∂{format_index(self.in_name, tuple(in_index))}"

    # --- context from the case --------------------------------------------------------------

    def value(self, name: str) -> Any:
        inputs = self.block.inputs or {}
        return inputs.get(name)

    @property
    def in_value(self) -> torch.Tensor | None:
        value = self.value(self.in_name)
        return value.detach().cpu() if isinstance(value, torch.Tensor) else None

    def relation(self, mask: torch.Tensor) -> tuple[str, str]:
        """How the backward relates to the truth at the masked entries: (code, words). Codes:
        zero (backward 0), ignored (truth 0, backward not), misplaced (each entry has exactly
        one of the two 0), negated, factor (one constant), range (anything else)."""
        if not bool(mask.any()):
            return "", ""
        a, t, allowed = self.a[mask], self.t[mask], self.allowed[mask]
        zero_a = a.abs() <= allowed
        zero_t = t.abs() <= allowed
        if bool(zero_a.all()):
            return "zero", "the backward is 0 there"
        if bool(zero_t.all()):
            return "ignored", "the truth is 0 there but the backward is not"
        if bool((zero_a ^ zero_t).all()):
            return "misplaced", (f"at each of them one side is 0: the backward misses {int(zero_a.sum())} values and "
                                 f"puts {int(zero_t.sum())} where the truth is 0 (values credited to the wrong "
                                 "entries)")
        if bool(((a + t).abs() <= allowed).all()):
            return "negated", "the backward is the negated truth there"
        ratio = a[~zero_t] / t[~zero_t]
        lo, hi = float(ratio.min()), float(ratio.max())
        if hi - lo <= 1e-6 * max(1.0, abs(hi)) and not bool(zero_t.any()):
            return "factor", f"the backward is {lo:.4g} x the truth there"
        return "range", f"backward/truth ranges from {lo:.3g} to {hi:.3g} there"

    def ratio_text(self, mask: torch.Tensor) -> str:
        return self.relation(mask)[1]

    def box(self) -> tuple[list[tuple[int, int]], bool]:
        """Per block dim, the (lo, hi) range the wrong entries span, and whether that box is
        smaller than the block."""
        idx = torch.nonzero(self.bad)
        shape = (*self.out_shape, *self.in_shape)
        if not idx.numel():
            return [(0, s - 1) for s in shape], False
        lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
        ranges = list(zip(lo, hi))
        return ranges, any(r != (0, s - 1) for r, s in zip(ranges, shape))

    def box_words(self) -> str:
        """'∂out[0, 2]/∂x[0, 2]' for the box the wrong entries span when every entry that matters
        inside it is wrong, or '' (the whole block, or a box that says nothing)."""
        ranges, proper = self.box()
        if not proper:
            return ""
        box = torch.ones(self.bad.shape, dtype=torch.bool)
        for d, (lo, hi) in enumerate(ranges):
            size = self.bad.shape[d]
            line = torch.zeros(size, dtype=torch.bool)
            line[lo: hi + 1] = True
            box &= line.reshape([size if k == d else 1 for k in range(self.bad.dim())])
        if bool((self.relevant & box & ~self.bad).any()):
            return ""
        no = len(self.out_shape)
        return (f"∂{box_text(self.out_name, ranges[:no], self.out_shape)}/"
                f"∂{box_text(self.in_name, ranges[no:], self.in_shape)}")


def box_text(name: str, ranges: Sequence[tuple[int, int]], shape: Sequence[int]) -> str:
    """x[:, 4:6] for per-dim inclusive ranges (a full range is ':')."""
    if not shape:
        return name
    parts = []
    for (lo, hi), size in zip(ranges, shape):
        if lo == 0 and hi == size - 1:
            parts.append(":")
        elif lo == hi:
            parts.append(str(lo))
        else:
            parts.append(f"{lo}:{hi + 1}")
    while len(parts) > 1 and parts[-1] == ":":
        parts.pop()
    return f"{name}[{', '.join(parts)}]"


def listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
