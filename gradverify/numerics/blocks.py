"""Whole Jacobian blocks compared entry by entry: the shape the diagnosis rules and heatmaps read.

A block is one (output, input) pair, shaped out.shape + in.shape, so entries are addressed by
tensor index, never by a flat row number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gradverify.numerics.judge import Verdict
from gradverify.report import Heatmap, Mismatch, format_index


@dataclass
class BlockComparison:
    """One (output, input) Jacobian block with a verdict per entry.

    truth: the reference where there is one, else finite differences; second: finite
    differences at the columns where they were computed (NaN elsewhere); allowed: the
    tolerance at each entry; verdict: numerics.judge.Verdict codes.

    The optional context lets the diagnosis say *where* a bug sits (gradverify.diagnose):
    inputs: every argument of the case by name, at the values the truth was computed at
    (tensors detached, plain values such as eps as given), so that a condition on an input or
    a label ("x < 0", "label == -1") can name a wrong branch; outputs: forward's outputs by
    name; tangent: the projection of this block's input onto its constraint set's tangent
    space (None when unconstrained), so that gradients of constrained inputs compare along
    it; dtype: the dtype the backward ran in (how large its rounding may be).
    """

    out_pos: int
    in_pos: int
    out_name: str
    in_name: str
    analytic: torch.Tensor
    truth: torch.Tensor
    allowed: torch.Tensor
    verdict: torch.Tensor
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    second: torch.Tensor | None = None
    inputs: dict[str, Any] | None = None
    outputs: dict[str, torch.Tensor] | None = None
    tangent: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    dtype: str = "float64"

    @property
    def mismatch(self) -> torch.Tensor:
        return self.verdict == int(Verdict.MISMATCH)

    @property
    def excused(self) -> torch.Tensor:
        return self.verdict >= int(Verdict.EXCUSED)

    @property
    def kinks(self) -> torch.Tensor:
        return self.verdict == int(Verdict.KINK)

    @property
    def unjudged(self) -> torch.Tensor:
        return (self.verdict == int(Verdict.UNVERIFIABLE)) | (self.verdict == int(Verdict.KINK))

    @property
    def error(self) -> torch.Tensor:
        return (self.analytic - self.truth).abs()

    @property
    def mismatch_count(self) -> int:
        return int(self.mismatch.sum())

    @property
    def max_abs_err(self) -> float:
        finite_truth = torch.isfinite(self.truth)
        err = torch.where(torch.isfinite(self.analytic), self.error, torch.full_like(self.error, math.inf))
        err = torch.where(finite_truth, err, torch.zeros_like(err))
        return float(err.max()) if err.numel() else 0.0


def named_values(args: list[Any] | tuple[Any, ...], in_names: Any, outputs: dict[int, torch.Tensor],
                 out_names: dict[int, str]) -> dict[str, Any]:
    """A BlockComparison's `inputs` and `outputs` (its docstring says why the diagnosis wants
    them): every argument by name, tensors detached; None for the inputs when the names do not
    line up with the arguments."""
    inputs = ({name: value.detach() if isinstance(value, torch.Tensor) else value
               for name, value in zip(in_names, args)} if len(in_names) == len(args) else None)
    return {"inputs": inputs, "outputs": {out_names[k]: out.detach() for k, out in outputs.items()}}


def unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_index % size if size else 0)
        flat_index = flat_index // size if size else 0
    return tuple(reversed(index))


def _real(value: torch.Tensor) -> float:
    return float(value.real) if value.is_complex() else float(value)


def mismatches_of(block: BlockComparison, cap: int) -> tuple[list[Mismatch], int]:
    """The block's mismatched entries, worst first, at most `cap` of them; and their count."""
    mask = block.mismatch.reshape(-1)
    count = int(mask.sum())
    if count == 0:
        return [], 0
    err = block.error.reshape(-1).clone()
    err[~torch.isfinite(err)] = math.inf
    flat_indices = torch.nonzero(mask).reshape(-1)
    order = torch.argsort(err[flat_indices], descending=True, stable=True)[:cap]
    in_numel = max(1, math.prod(block.in_shape))
    analytic = block.analytic.reshape(-1)
    truth = block.truth.reshape(-1)
    allowed = block.allowed.reshape(-1)
    second = block.second.reshape(-1) if block.second is not None else None
    result = []
    for k in order.tolist():
        flat = int(flat_indices[k])
        out_flat, in_flat = divmod(flat, in_numel)
        s = float(second[flat]) if second is not None else math.nan
        result.append(Mismatch(output=block.out_name, input=block.in_name,
                               out_index=unravel(out_flat, block.out_shape), in_index=unravel(in_flat, block.in_shape),
                               expected=_real(truth[flat]), got=_real(analytic[flat]), tolerance=float(allowed[flat]),
                               second=s if math.isfinite(s) else None))
    return result, count


def all_mismatches(blocks: list[BlockComparison], cap: int) -> tuple[list[Mismatch], int]:
    """Every block's mismatched entries, worst first over all blocks (at most `cap`), and their count."""
    found: list[Mismatch] = []
    count = 0
    for block in blocks:
        entries, n = mismatches_of(block, cap)
        found.extend(entries)
        count += n
    found.sort(key=lambda m: -m.abs_err if m.abs_err == m.abs_err else float("-inf"))
    return found[:cap], count


# Heatmaps are drawn one character per Jacobian entry up to this size, binned beyond it. 60
# columns plus group separators and a row label still fit an 80-column terminal.
HEATMAP_MAX_ROWS = 24
HEATMAP_MAX_COLS = 48

GLYPHS = {0: ".", 1: "o", 2: "?", 3: "X"}


def heatmap_of(block: BlockComparison) -> Heatmap:
    """Lay out the block as output rows x input columns, in each tensor's row-major order."""
    out_shape, in_shape = block.out_shape, block.in_shape
    rows_n = max(1, math.prod(out_shape))
    cols_n = max(1, math.prod(in_shape))
    finite_truth = torch.where(torch.isfinite(block.truth), block.truth.abs(), torch.zeros_like(block.truth.abs()))
    scale = float(finite_truth.max()) if finite_truth.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    nonzero = (finite_truth > 1e-12 * scale) | (block.analytic.abs() > 1e-12 * scale)
    codes = torch.zeros((rows_n, cols_n), dtype=torch.int8)
    codes[nonzero.reshape(rows_n, cols_n)] = 1
    codes[block.excused.reshape(rows_n, cols_n)] = 2
    codes[block.mismatch.reshape(rows_n, cols_n)] = 3
    return heatmap_from_codes(block.out_name, block.in_name, out_shape, in_shape, codes)


def heatmap_from_codes(out_name: str, in_name: str, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
                       codes: torch.Tensor, note: str = "") -> Heatmap:
    """A heatmap from a (rows, cols) grid of codes (0 zero, 1 agrees, 2 not judged, 3 mismatch)."""
    rows_n = max(1, math.prod(out_shape))
    cols_n = max(1, math.prod(in_shape))
    binned = rows_n > HEATMAP_MAX_ROWS or cols_n > HEATMAP_MAX_COLS or codes.shape != (rows_n, cols_n)
    if not binned:
        group = in_shape[-1] if len(in_shape) >= 2 else cols_n
        rows = []
        for r in range(rows_n):
            cells = [GLYPHS[int(c)] for c in codes[r]]
            rows.append("|".join("".join(cells[g:g + group]) for g in range(0, cols_n, group)))
        labels = tuple(format_index(out_name, unravel(r, out_shape)) for r in range(rows_n))
        if len(in_shape) >= 2:
            lead = [f"{in_name}[{','.join(map(str, unravel(g, in_shape)[:-1]))},:]" for g in range(0, cols_n, group)]
            header = (f"columns: {in_name} row-major, '|' between {', '.join(lead[:3])}"
                      f"{', ...' if len(lead) > 3 else ''}")
        else:
            header = f"columns: {format_index(in_name, (0,))} ... {format_index(in_name, (cols_n - 1,))}"
        return Heatmap(output=out_name, input=in_name, out_shape=out_shape, in_shape=in_shape, rows=tuple(rows),
                       row_labels=labels, col_header=header + note)
    n_rows, n_cols = min(codes.shape[0], HEATMAP_MAX_ROWS), min(codes.shape[1], HEATMAP_MAX_COLS)
    grid_rows, grid_cols = codes.shape
    row_edges = [round(i * grid_rows / n_rows) for i in range(n_rows + 1)]
    col_edges = [round(j * grid_cols / n_cols) for j in range(n_cols + 1)]
    col_max = torch.stack([codes[:, col_edges[j]:col_edges[j + 1]].amax(dim=1) for j in range(n_cols)], dim=1)
    rows, labels = [], []
    per_row = rows_n / grid_rows
    for i in range(n_rows):
        cell = col_max[row_edges[i]:row_edges[i + 1]].amax(dim=0)
        rows.append("".join(GLYPHS[int(c)] for c in cell))
        first = int(row_edges[i] * per_row)
        labels.append(format_index(out_name, unravel(min(first, rows_n - 1), out_shape)))
    header = (f"binned: each cell ~{math.ceil(rows_n / n_rows)} x {math.ceil(cols_n / n_cols)} entries of "
              f"{rows_n} x {cols_n}, worst shown")
    return Heatmap(output=out_name, input=in_name, out_shape=out_shape, in_shape=in_shape, rows=tuple(rows),
                   row_labels=tuple(labels), col_header=header + note, binned=True)
