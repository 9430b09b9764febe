"""Rules about *where* the wrong entries sit: where a condition on an input holds (a wrong
branch), in a box of the block (blockwise), at a few entries or a few of the input's entries
(partial), with the sign flipped there (sign)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from gradverify.diagnose.view import BlockView, box_text, fits, listing
from gradverify.numerics.blocks import unravel
from gradverify.report import Diagnosis, format_index

# --- wrong branch ------------------------------------------------------------------------------

# A condition names a wrong branch only when the wrong entries falling exactly inside it would
# be this unlikely if the same number of wrong entries had been spread at random over the
# entries that matter (hypergeometric: C(in condition, k) / C(all, k)). 1 in 200 keeps a
# 4-of-12 confinement (1/495: every entry with label == 0 wrong, every other right) and rejects
# 2 of 12 (1/66) or 3 wrong among 5 that qualify out of 12 (1/22): coincidences at that size.
BRANCH_CHANCE = 5e-3
# A wrong branch is wrong nearly everywhere it is taken: at least this share of the entries
# where the condition holds must be wrong (a formula may agree by chance at an entry or two; a
# positional bug that merely overlaps a condition leaves many right entries inside it).
BRANCH_FILL = 0.75
# Float arguments used as thresholds ("x > margin") besides 0, at most this many (int arguments
# are dims and indices far more often than thresholds).
MAX_THRESHOLDS = 4


@dataclass
class Condition:
    """A condition on one tensor, evaluated per unit (an output or an input entry)."""

    name: str           # "x"
    op: str             # "< 0"
    complement: str     # ">= 0"
    side: str           # "out" or "in": which index of the block the tensor lines up with
    holds: torch.Tensor  # per unit

    @property
    def text(self) -> str:
        return f"{self.name} {self.op}"

    @property
    def at(self) -> str:
        return f"{self.name}[...] {self.op}"

    @property
    def otherwise(self) -> str:
        return f"{self.name} {self.complement}"


def _align(value: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    """value laid out over the units of one side (flattened), when its shape equals that side's
    or broadcasts to it."""
    if not isinstance(value, torch.Tensor) or value.numel() <= 1 or value.is_complex() or not shape:
        return None
    value = value.detach().cpu()
    if tuple(value.shape) != shape:
        try:
            if tuple(torch.broadcast_shapes(tuple(value.shape), shape)) != shape:
                return None
        except RuntimeError:
            return None
        value = value.expand(shape)
    return value.reshape(-1)


def _thresholds(v: BlockView) -> list[tuple[float, str]]:
    found = [(0.0, "0")]
    for name, value in (v.block.inputs or {}).items():
        if isinstance(value, float) and value != 0 and math.isfinite(value):
            found.append((float(value), f"{name} (= {value:g})"))
    return found[: 1 + MAX_THRESHOLDS]


def _conditions(v: BlockView, bad_units: dict[str, torch.Tensor]) -> Iterator[Condition]:
    tensors: list[tuple[str, Any]] = list((v.block.inputs or {}).items()) + list((v.block.outputs or {}).items())
    sides = {"in": v.in_shape, "out": v.out_shape}  # ties go to the input side: "x < 0" reads as x's entries
    thresholds = _thresholds(v)
    for name, value in tensors:
        for side, shape in sides.items():
            u = _align(value, shape)
            if u is None:
                continue
            if u.dtype == torch.bool:
                yield Condition(name, "= True", "= False", side, u.clone())
                yield Condition(name, "= False", "= True", side, ~u)
            elif not u.is_floating_point():
                bad_values = torch.unique(u[bad_units[side]])
                good_values = torch.unique(u[~bad_units[side]])
                if bad_values.numel() == 1:
                    k = int(bad_values[0])
                    yield Condition(name, f"== {k}", f"!= {k}", side, u == k)
                if good_values.numel() == 1:
                    k = int(good_values[0])
                    yield Condition(name, f"!= {k}", f"== {k}", side, u != k)
            else:
                u = u.double()
                for threshold, shown in thresholds:
                    yield Condition(name, f"< {shown}", f">= {shown}", side, u < threshold)
                    yield Condition(name, f"> {shown}", f"<= {shown}", side, u > threshold)


def _units(v: BlockView, mask: torch.Tensor, side: str) -> torch.Tensor:
    m = v.matrix(mask)
    return m.any(1) if side == "out" else m.any(0)


def _best_condition(v: BlockView, min_units: int = 2) -> tuple[Condition, float, int, int] | None:
    """The condition that confines every wrong unit with the least chance of a coincidence:
    (condition, chance, wrong units, units where it holds)."""
    bad_units = {side: _units(v, v.bad, side) for side in ("out", "in")}
    rel_units = {side: _units(v, v.relevant, side) for side in ("out", "in")}
    best: tuple[Condition, float, int, int] | None = None
    for cond in _conditions(v, bad_units):
        bad, rel = bad_units[cond.side], rel_units[cond.side]
        if bool((bad & ~cond.holds).any()) or not bool((rel & ~cond.holds).any()):
            continue
        k, n, inside = int(bad.sum()), int(rel.sum()), int((rel & cond.holds).sum())
        if k < min_units or k < BRANCH_FILL * inside:
            continue
        chance = _hypergeometric(inside, n, k)
        if best is None or chance < best[1]:
            best = (cond, chance, k, inside)
    return best


def _hypergeometric(inside: int, n: int, k: int) -> float:
    """C(inside, k) / C(n, k): the chance that k of n units drawn at random all fall among the
    `inside` ones (in logs: the binomials of a large block do not fit a float)."""
    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    return math.exp(log_comb(inside, k) - log_comb(n, k))


def condition_observation(v: BlockView) -> str:
    """'all 3 have x[...] < 0, the only such x entries' when a condition fits the wrong entries
    exactly but too few of them to name a branch (an observation, not a claim)."""
    found = _best_condition(v, min_units=1)
    if found is None or found[2] != found[3]:
        return ""
    cond, _, k, _ = found
    name = v.out_name if cond.side == "out" else v.in_name
    if k == 1:
        return f"that {name} entry has {cond.at}, the only one that has"
    return f"all {k} have {cond.at}, the only such {name} entries"


def wrong_branch(v: BlockView) -> Diagnosis | None:
    found = _best_condition(v)
    if found is None or found[1] > BRANCH_CHANCE:
        return None
    cond, chance, k, inside = found
    if k < inside and _exact_slice(v):
        return None  # a slice wrong at every entry explains it exactly; the condition leaves some right
    units = f"{v.out_name} entries" if cond.side == "out" else f"{v.in_name} entries"
    code, relation = v.relation(v.bad)
    cover = f"all {inside} such {units} are wrong" if k == inside else f"{k} of the {inside} such {units} are wrong"
    message = (f"{v.deriv}: errors confined to the entries where {cond.text}: all wrong entries have {cond.at} "
               f"({cover}); every entry with {cond.otherwise} matches")
    if relation:
        message += f"; {relation}"
    where = v.box_words()
    if where:
        message += f"; they sit in {where}"
    if code == "ignored":
        hint = (f"forward ignores the entries where {cond.text} (its output does not depend on them), but backward "
                "still sends them a gradient: apply the same mask/ignore condition in backward")
    elif code == "zero":
        hint = (f"the branch of backward for {cond.text} returns 0: a dropped slope or term in that branch (compare "
                "it with forward's branch)")
    else:
        hint = (f"the branch of backward taken where {cond.text} has the wrong formula (a factor, a sign or a term "
                "missing there): compare it with the derivative of forward's branch")
    return Diagnosis("wrong_branch", message, output=v.out_name, input=v.in_name,
                     evidence=f"{k} wrong {units}, all inside the condition; chance of that at random {chance:.1g}",
                     hint=hint)


# --- sign in a subset --------------------------------------------------------------------------

def sign_subset(v: BlockView) -> Diagnosis | None:
    """Every wrong entry is exactly the negated truth; the others match."""
    if not bool(fits(v.a, -v.t, v.allowed)[v.bad].all()):
        return None
    n_bad = v.n_bad
    where = _alignment(v)
    message = f"{v.deriv}: {n_bad} entries have the wrong sign (backward = -truth there); the others match"
    if where:
        message += f"; {where}"
    return Diagnosis("sign", message, output=v.out_name, input=v.in_name,
                     evidence=f"{n_bad}/{n_bad} wrong entries are the negated truth",
                     hint="a subtraction the wrong way round in one branch of the formula?")


# --- blockwise ---------------------------------------------------------------------------------

# A box of the block is "blockwise wrong" when at least this share of its relevant entries is
# wrong (a tile or a slice computed by the wrong code path is wrong nearly everywhere in it; an
# entry where the wrong formula happens to agree may be right) and it holds at most this share
# of the block's relevant entries (otherwise it is the whole block). Scattered wrong entries
# that merely span a box (repeated indices 3 and 4 of an embedding: 12 of 15) stay below it.
BOX_FILL = 0.9
BOX_MAX_SHARE = 0.75


@dataclass
class Box:
    """The box of the block the wrong entries span: per block dim an inclusive (lo, hi)."""

    ranges: list[tuple[int, int]]
    in_box: int     # relevant entries inside it
    fill: float     # share of those that are wrong


def _slab(shape: tuple[int, ...], ranges: list[tuple[int, int]], dims: range) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.bool)
    for d in dims:
        line = torch.zeros(shape[d], dtype=torch.bool)
        line[ranges[d][0]: ranges[d][1] + 1] = True
        mask &= line.reshape([shape[d] if k == d else 1 for k in range(len(shape))])
    return mask


def _box(v: BlockView) -> Box | None:
    """The box of wrong entries when it is a slice or tile along some dims: smaller than the
    block and than the relevant entries, a contiguous range along each dim it pins, not all dims
    of a side pinned (that is a few entries of a tensor), and every output (input) entry of a
    pinned slab that matters has wrong entries; every relevant entry outside it matches."""
    if v.n_bad < 4:
        return None
    idx = torch.nonzero(v.bad)
    ranges = list(zip(idx.min(0).values.tolist(), idx.max(0).values.tolist()))
    shape = (*v.out_shape, *v.in_shape)
    pinned = [ranges[d] != (0, shape[d] - 1) for d in range(len(shape))]
    if not any(pinned):
        return None
    no = len(v.out_shape)
    sides = (("out", range(no)), ("in", range(no, len(shape))))
    for _, dims in sides:
        if len(dims) and all(pinned[d] for d in dims):
            return None  # a few entries of a tensor, not a slice along a dim: partial's business
    for d in range(len(shape)):
        if pinned[d] and len(set(idx[:, d].tolist())) != ranges[d][1] - ranges[d][0] + 1:
            return None  # a gap inside the range: scattered entries that merely span a box
    box = _slab(tuple(v.bad.shape), ranges, range(len(shape)))
    in_box = int((v.relevant & box).sum())
    if in_box == 0 or in_box > BOX_MAX_SHARE * v.n_relevant or not bool((v.relevant & ~box).any()):
        return None
    # In a sparse block (a lookup: one entry per row) scattered wrong entries can fill a box by
    # themselves; a right row or column inside a pinned slab shows it is not a block computed wrong.
    bad_units = {side: _units(v, v.bad, side) for side, _ in sides}
    for side, dims in sides:
        if any(pinned[d] for d in dims):
            slab = _slab(tuple(v.bad.shape), ranges, dims)
            if bool((_units(v, v.relevant & slab, side) & ~bad_units[side]).any()):
                return None
    return Box(ranges=ranges, in_box=in_box, fill=v.n_bad / in_box)


def _exact_slice(v: BlockView) -> bool:
    """The wrong entries are exactly a slice: a box wrong at every entry that matters, or whole
    input (output) entries, wrong wherever they matter, filling a box smaller than the tensor."""
    box = _box(v)
    if box is not None and box.fill == 1.0:
        return True
    for side, shape in (("in", v.in_shape), ("out", v.out_shape)):
        bad = _units(v, v.bad, side)
        whole = v.matrix(v.relevant & ~v.bad)
        if bool((whole.any(1) if side == "out" else whole.any(0))[bad].any()):
            continue  # a wrong entry's row/column also has right entries
        idx = torch.tensor([unravel(f, shape) for f in torch.nonzero(bad).reshape(-1).tolist()])
        if not idx.numel():
            continue
        spans = [int(idx[:, d].max() - idx[:, d].min()) + 1 for d in range(len(shape))]
        if len(idx) == math.prod(spans) and spans != list(shape):  # a proper box, every entry of it wrong
            return True
    return False


def blockwise(v: BlockView) -> Diagnosis | None:
    """The wrong entries fill a box of the block (a slice or tile along some dims of the output
    and/or the input) and every relevant entry outside it matches."""
    box = _box(v)
    if box is None or box.fill < BOX_FILL:
        return None
    no = len(v.out_shape)
    shape = (*v.out_shape, *v.in_shape)
    pinned_dims = [d for d in range(len(shape)) if box.ranges[d] != (0, shape[d] - 1)]
    out_box = (box_text(v.out_name, box.ranges[:no], v.out_shape) if any(d < no for d in pinned_dims)
               else v.out_name)
    in_box = (box_text(v.in_name, box.ranges[no:], v.in_shape) if any(d >= no for d in pinned_dims)
              else v.in_name)
    relation = v.ratio_text(v.bad)
    message = (f"{v.deriv}: errors confined to the block ∂{out_box}/∂{in_box} ({v.n_bad} of its {box.in_box} "
               "non-zero entries wrong); every entry outside it matches")
    if relation:
        message += f"; {relation}"
    along = [f"{v.out_name}'s dim {d}" if d < no else f"{v.in_name}'s dim {d - no}" for d in pinned_dims]
    return Diagnosis("blockwise", message, output=v.out_name, input=v.in_name,
                     evidence=f"the wrong entries span a box along {', '.join(along)}; "
                              f"{v.n_relevant - box.in_box} non-zero entries outside it all match",
                     hint="a tile, slice or boundary handled by its own code path: a loop bound that stops early, an "
                          "offset, or a special case for the last block/row/channel")


# --- partial -----------------------------------------------------------------------------------

# A block with at most this share of its non-zero truth entries wrong is "partly" wrong.
PARTIAL_SHARE = 0.25
# ... and one whose wrong entries sit at no more than this share of the input's (or output's)
# entries that matter: the gradient of some entries is wrong, the rest right.
PARTIAL_UNIT_SHARE = 0.5


def partial_few(v: BlockView) -> Diagnosis | None:
    bad = v.bad
    n_bad = v.n_bad
    relevant = int((v.nz_t | bad).sum())
    if relevant == 0 or n_bad > max(3, PARTIAL_SHARE * relevant):
        return None
    entries = v.bad_entries()
    where = _alignment(v)
    listed = listing([v.entry(o, i) for o, i in entries])
    message = f"{n_bad} of {relevant} entries of {v.deriv} are wrong: {listed}"
    if where:
        message += f"; {where}"
    observation = condition_observation(v)
    if observation:
        message += f" ({observation})"
    return Diagnosis("partial", message, output=v.out_name, input=v.in_name,
                     evidence=f"{relevant - n_bad}/{relevant} non-zero entries match",
                     hint="a boundary case or one index of the formula is wrong" if not where else
                     f"look at the code path for {where.removeprefix('all in ').removeprefix('all at ')}")


def partial_units(v: BlockView) -> Diagnosis | None:
    """The gradient is wrong for a minority of the input's entries (columns), or for a minority
    of the output's entries (rows), and right for all the others."""
    for side in ("in", "out"):
        bad = _units(v, v.bad, side)
        rel = _units(v, v.relevant, side)
        k, n = int(bad.sum()), int(rel.sum())
        if k == 0 or k > PARTIAL_UNIT_SHARE * n or not bool((rel & ~bad).any()):
            continue
        shape, name = (v.in_shape, v.in_name) if side == "in" else (v.out_shape, v.out_name)
        positions = [format_index(name, unravel(f, shape)) for f in torch.nonzero(bad).reshape(-1).tolist()]
        relation = v.ratio_text(v.bad).removesuffix(" there")
        if side == "in":
            message = (f"the gradient for {name} is wrong at {k} of its {n} entries that matter: "
                       f"{listing(positions)}; right at every other entry")
        else:
            message = (f"the gradients of {k} of {n} {name} entries are wrong: {listing(positions)}; the other "
                       f"{name} entries' gradients are right")
        if relation:
            message += f"; at the {v.n_bad} wrong entries of {v.deriv} {relation}"
        hint = ("one index of the formula is wrong for some entries: an index map or offset (off by one at a "
                "boundary, a start/end credited to the wrong group), a term left out at special positions, or a "
                "loop that skips a remainder")
        repeated = _repeated_index(v, bad) if side == "in" else ""
        if repeated:
            message += f"; {repeated}"
            hint = ("where an index repeats, the contributions must be summed: index_add_ / scatter_add_ / "
                    "index_put_(accumulate=True), not an assignment or scatter_ that keeps one of them")
        return Diagnosis("partial", message, output=v.out_name, input=v.in_name,
                         evidence=f"{n - k} of {n} {name} entries have a right gradient ({v.n_bad} wrong entries in "
                                  f"{v.deriv})", hint=hint)
    return None


# Index arguments up to this size are scanned for repeats (a Python loop; an observation only).
MAX_INDEX_SCAN = 100_000


def _repeated_index(v: BlockView, bad_cols: torch.Tensor) -> str:
    """'they are exactly the entries that indices selects more than once' when the wrong input
    entries are the ones an integer argument addresses twice or more (an overwrite instead of an
    accumulation): for a lookup weight[index] (embedding), the rows it repeats; for an index of
    the input's rank (gather/scatter along dim d), the entries a line of it repeats."""
    wrong = {unravel(f, v.in_shape) for f in torch.nonzero(bad_cols).reshape(-1).tolist()}
    for name, value in (v.block.inputs or {}).items():
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool or not 2 <= value.numel() <= MAX_INDEX_SCAN:
            continue
        index = value.detach().cpu()
        for d, size in enumerate(v.in_shape):
            if index.dim() == len(v.in_shape) and all(index.shape[k] <= v.in_shape[k]
                                                      for k in range(index.dim()) if k != d):
                keys: Counter[tuple[int, ...]] = Counter()
                for position, target in zip(torch.cartesian_prod(*[torch.arange(n) for n in index.shape])
                                            .reshape(-1, index.dim()).tolist(), index.reshape(-1).tolist()):
                    position[d] = target
                    keys[tuple(position)] += 1
                repeated = {k for k, c in keys.items() if c >= 2 and 0 <= k[d] < size}
                if repeated and repeated == wrong:
                    return (f"they are exactly the entries that {name} selects more than once along dim {d} "
                            f"({listing([str(list(k)) for k in sorted(repeated)], 4)})")
            if d == 0 and tuple(v.out_shape) == tuple(index.shape) + tuple(v.in_shape[1:]):
                # weight[index] (an embedding lookup): rows selected by repeated values.
                values, counts = torch.unique(index.reshape(-1), return_counts=True)
                rows = {int(x) for x, c in zip(values.tolist(), counts.tolist()) if c >= 2 and 0 <= x < size}
                if rows and {p[d] for p in wrong} == rows:
                    which = ", ".join(map(str, sorted(rows)))
                    return (f"they are exactly the entries of {v.in_name}'s dim {d} that {name} selects more than "
                            f"once ({which})")
    return ""


def _alignment(v: BlockView) -> str:
    """'all in x[..., 0]' / 'all in out[1, :]' when the wrong entries line up along a dim."""
    entries = v.bad_entries(limit=20000)
    if len(entries) < 2:
        return ""
    for d in range(len(v.in_shape)):
        values = {i[d] for _, i in entries}
        if len(values) == 1:
            return f"all in {v.in_name}[{_pin(len(v.in_shape), d, values.pop(), v.in_shape[d])}]"
    for d in range(len(v.out_shape)):
        values = {o[d] for o, _ in entries}
        if len(values) == 1:
            return f"all in {v.out_name}[{_pin(len(v.out_shape), d, values.pop(), v.out_shape[d])}]"
    return ""


def _pin(ndim: int, dim: int, value: int, size: int) -> str:
    text = str(value) if value != size - 1 or size == 1 else f"{value} (the last)"
    parts = [":"] * ndim
    parts[dim] = text
    if dim == ndim - 1 and ndim > 1:
        return "..., " + text
    return ", ".join(parts)
