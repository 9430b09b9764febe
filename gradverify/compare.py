"""Tolerances and the entry-by-entry comparison of an analytic Jacobian against the truth."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradverify.report import Heatmap, Mismatch, format_index

# Default (atol, rtol) per dtype of the analytic Jacobian; the truth is always float64.
#
# float64: both sides are exact up to rounding (~1e-15 relative, times the op's condition
#   number), so rtol 1e-6 leaves nine orders of magnitude for legitimate reformulations of
#   the same derivative while still catching any formula error above a part per million (of
#   entries of order 1 or more: the block scale max(1, max|truth|) makes atol an absolute floor
#   for Jacobians whose entries are all small, as gradcheck's atol is).
#   gradcheck uses rtol 1e-3 only because its own finite differences are that noisy.
# float32/float16/bfloat16: a backward evaluated in a lower dtype rounds every intermediate;
#   rtol is about 1000x the dtype's machine epsilon (2^-23, 2^-10, 2^-7) clipped so that a
#   wrong formula (an error of order 1) is still far outside it. atol covers entries that are
#   zero (or nearly) in the truth but carry the rounding of the terms that made them so: in
#   float32 it is as wide as rtol (1e-4 of the block's scale), because an ill-conditioned
#   intermediate (cos(2000 x) rounds 2000 x first) moves a near-zero entry by ~1e-4 x scale.
# Every atol is multiplied by the block's scale max(1, max|truth|): rounding errors are
# relative to the size of the numbers combined, not to the (maybe cancelled) result.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-6),
    "complex128": (1e-8, 1e-6),
    "float32": (1e-4, 1e-4),
    "complex64": (1e-4, 1e-4),
    "float16": (2e-3, 1e-2),
    "bfloat16": (1.6e-2, 5e-2),
}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float64"])
    return Tolerance(atol=default_atol if atol is None else atol,
                     rtol=default_rtol if rtol is None else rtol)


@dataclass
class BlockComparison:
    """One (output, input) Jacobian block compared entry by entry."""

    out_pos: int
    in_pos: int
    out_name: str
    in_name: str
    analytic: torch.Tensor
    truth: torch.Tensor
    allowed: torch.Tensor
    mismatch: torch.Tensor
    excused: torch.Tensor
    kinks: torch.Tensor
    secondary: torch.Tensor | None
    disputed: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]

    @property
    def error(self) -> torch.Tensor:
        return (self.analytic - self.truth).abs()

    @property
    def mismatch_count(self) -> int:
        return int(self.mismatch.sum())

    @property
    def max_abs_err(self) -> float:
        err = torch.where(torch.isfinite(self.analytic), self.error,
                          torch.full_like(self.error, math.inf))
        return float(err.max()) if err.numel() else 0.0


def compare_block(
    out_pos: int,
    in_pos: int,
    out_name: str,
    in_name: str,
    out_ndim: int,
    analytic: torch.Tensor,
    truth: torch.Tensor,
    truth_bars: torch.Tensor | None,
    tolerance: Tolerance,
    secondary: torch.Tensor | None = None,
    secondary_bars: torch.Tensor | None = None,
    kinks: torch.Tensor | None = None,
) -> BlockComparison:
    """Mismatch = outside atol*scale + rtol*|truth| + the truth's own error bar.

    When a second truth is given, an entry is only accused if the analytic value disagrees
    with both; where the two truths disagree with each other the entry is 'disputed' and
    excused, because accusing a correct backward costs more trust than missing one entry.
    """
    a = analytic.detach().to("cpu", torch.float64) if not analytic.is_complex() else analytic.detach().cpu()
    t = truth.detach().to("cpu", torch.float64) if not truth.is_complex() else truth.detach().cpu()
    scale = max(1.0, float(t.abs().max()) if t.numel() else 1.0)
    atol = tolerance.atol * scale
    bars = truth_bars.cpu() if truth_bars is not None else torch.zeros_like(t.real if t.is_complex() else t)
    allowed = atol + tolerance.rtol * t.abs() + bars
    finite_truth = torch.isfinite(t)
    bad = ((a - t).abs() > allowed) | (~torch.isfinite(a) & finite_truth)
    bad &= finite_truth
    disputed_mask = torch.zeros_like(bad)
    kink_mask = kinks.cpu() if kinks is not None else torch.zeros_like(bad)
    if secondary is not None:
        s = secondary.detach().cpu().to(t.dtype)
        s_bars = secondary_bars.cpu() if secondary_bars is not None else torch.zeros_like(bars)
        s_allowed = atol + tolerance.rtol * s.abs() + s_bars
        secondary_bad = ((a - s).abs() > s_allowed) | ~torch.isfinite(a)
        disputed_mask = bad & ~secondary_bad
        bad = bad & secondary_bad
    excused = disputed_mask | (bad & kink_mask)
    bad = bad & ~kink_mask
    comparison = BlockComparison(
        out_pos=out_pos, in_pos=in_pos, out_name=out_name, in_name=in_name, analytic=a, truth=t,
        allowed=allowed, mismatch=bad, excused=excused, kinks=kink_mask,
        secondary=secondary, disputed=int(disputed_mask.sum()),
        out_shape=tuple(t.shape[:out_ndim]), in_shape=tuple(t.shape[out_ndim:]),
    )
    return comparison


def unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_index % size if size else 0)
        flat_index = flat_index // size if size else 0
    return tuple(reversed(index))


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
    out_shape = block.out_shape
    in_shape = block.in_shape
    in_numel = max(1, math.prod(in_shape))
    result = []
    analytic = block.analytic.reshape(-1)
    truth = block.truth.reshape(-1)
    allowed = block.allowed.reshape(-1)
    for k in order.tolist():
        flat = int(flat_indices[k])
        out_flat, in_flat = divmod(flat, in_numel)
        result.append(Mismatch(
            output=block.out_name,
            input=block.in_name,
            out_index=unravel(out_flat, out_shape),
            in_index=unravel(in_flat, in_shape),
            expected=_real(truth[flat]),
            got=_real(analytic[flat]),
            tolerance=float(allowed[flat]),
        ))
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


def _real(value: torch.Tensor) -> float:
    return float(value.real) if value.is_complex() else float(value)


# Heatmaps are drawn one character per Jacobian entry up to this size, binned beyond it.
HEATMAP_MAX_ROWS = 36
HEATMAP_MAX_COLS = 72


def heatmap_of(block: BlockComparison) -> Heatmap:
    """Lay out the block as output rows x input columns, in each tensor's row-major order."""
    out_shape, in_shape = block.out_shape, block.in_shape
    rows_n = max(1, math.prod(out_shape))
    cols_n = max(1, math.prod(in_shape))
    scale = max(1.0, float(block.truth.abs().max()) if block.truth.numel() else 1.0)
    nonzero = (block.truth.abs() > 1e-12 * scale) | (block.analytic.abs() > 1e-12 * scale)
    codes = torch.zeros((rows_n, cols_n), dtype=torch.int8)
    codes[nonzero.reshape(rows_n, cols_n)] = 1
    codes[block.excused.reshape(rows_n, cols_n)] = 2
    codes[block.mismatch.reshape(rows_n, cols_n)] = 3
    glyph = {0: ".", 1: "o", 2: "?", 3: "X"}
    binned = rows_n > HEATMAP_MAX_ROWS or cols_n > HEATMAP_MAX_COLS
    if not binned:
        group = in_shape[-1] if len(in_shape) >= 2 else cols_n
        rows = []
        for r in range(rows_n):
            cells = [glyph[int(c)] for c in codes[r]]
            line = "|".join("".join(cells[g:g + group]) for g in range(0, cols_n, group))
            rows.append(line)
        labels = tuple(format_index(block.out_name, unravel(r, out_shape)) for r in range(rows_n))
        if len(in_shape) >= 2:
            lead = [f"{block.in_name}[{','.join(map(str, unravel(g, in_shape)[:-1]))},:]"
                    for g in range(0, cols_n, group)]
            header = f"columns: {block.in_name} in row-major order, groups of its last dim " \
                     f"split by '|' ({', '.join(lead[:4])}{', ...' if len(lead) > 4 else ''})"
        else:
            header = f"columns: {block.in_name}[0] ... {block.in_name}[{cols_n - 1}]"
        return Heatmap(output=block.out_name, input=block.in_name, out_shape=out_shape,
                       in_shape=in_shape, rows=tuple(rows), row_labels=labels, col_header=header)
    # Binned: each cell covers a rectangle of entries and shows its worst code.
    n_rows = min(rows_n, HEATMAP_MAX_ROWS)
    n_cols = min(cols_n, HEATMAP_MAX_COLS)
    row_edges = [round(i * rows_n / n_rows) for i in range(n_rows + 1)]
    col_edges = [round(j * cols_n / n_cols) for j in range(n_cols + 1)]
    col_max = torch.stack([codes[:, col_edges[j]:col_edges[j + 1]].amax(dim=1) for j in range(n_cols)], dim=1)
    rows = []
    labels = []
    for i in range(n_rows):
        cell = col_max[row_edges[i]:row_edges[i + 1]].amax(dim=0)
        rows.append("".join(glyph[int(c)] for c in cell))
        first, last = row_edges[i], row_edges[i + 1] - 1
        label = format_index(block.out_name, unravel(first, out_shape))
        if last > first:
            label += ".." + ",".join(map(str, unravel(last, out_shape))) if out_shape else ""
        labels.append(label)
    per_cell = math.ceil(cols_n / n_cols)
    header = f"binned: each cell covers ~{math.ceil(rows_n / n_rows)} x {per_cell} entries " \
             f"of the {rows_n} x {cols_n} block (row-major) and shows the worst of them"
    return Heatmap(output=block.out_name, input=block.in_name, out_shape=out_shape, in_shape=in_shape,
                   rows=tuple(rows), row_labels=tuple(labels), col_header=header, binned=True)
