"""Name the bug: mismatch patterns of a Jacobian block -> diagnoses with their evidence.

Every rule claims its pattern only when the evidence fits it (and says how well); rules are
tried from the most specific to the least and the first that fits a block wins, so a block
never gets two contradictory names (a case may get one per block). `other` is the honest
fallback, and says in words where the wrong entries sit.

Families (one module each): exact transformations of the truth (exact.py), couplings
(coupling.py), error sizes (magnitude.py), regions of the block (regions.py), the fallback
and located-entry descriptions (words.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

from gradverify.diagnose.coupling import missing_offdiag, zero_on_diagonal
from gradverify.diagnose.exact import all_zero, conj_error, negated, nonfinite, scaled, swapped_inputs, transposed
from gradverify.diagnose.magnitude import dropped_eps, nonconstant_factor, precision, smooth_proxy, straight_through
from gradverify.diagnose.regions import (blockwise, condition_observation, partial_few, partial_units, sign_subset,
                                         wrong_branch)
from gradverify.diagnose.view import BlockView
from gradverify.diagnose.words import describe_located, other
from gradverify.numerics.blocks import BlockComparison
from gradverify.report import Diagnosis

Rule = Callable[[BlockView], "Diagnosis | None"]


def _zero_on_diagonal(v: BlockView) -> Diagnosis | None:
    return zero_on_diagonal(v, condition_observation(v))


# Most specific first. Exact transformations of the truth fit every entry; coupling rules fit
# every zero; the error-size rules need errors far below a wrong formula's; region rules need
# the wrong entries confined with little chance of a coincidence; the rest describe what is left.
RULES: tuple[Rule, ...] = (
    nonfinite,          # NaN/Inf where the truth is finite
    all_zero,           # zero_grad: nothing computed
    negated,            # sign: -truth everywhere
    scaled,             # one constant factor everywhere
    straight_through,   # surrogate: truth 0 everywhere, backward not
    conj_error,         # sign: complex cross terms (on a real view also a transpose of each 2x2 block)
    transposed,         # transposed (layout, operand, whole J, wrong broadcast dim) / shape_mismatch
    missing_offdiag,    # cross terms 0 (element-wise backward of a coupled op)
    precision,          # rounding of a lower-precision intermediate
    dropped_eps,        # tiny structured errors of the size of an eps
    wrong_branch,       # confined to where a condition on an input holds
    _zero_on_diagonal,  # zero_grad at some diagonal entries
    sign_subset,        # sign: -truth at the wrong entries
    blockwise,          # a box of the block (a slice or tile), at least 4 entries
    partial_few,        # a few entries
    smooth_proxy,       # surrogate: a nearby function's derivative
    nonconstant_factor,  # element-wise formula, varying factor
    partial_units,      # a minority of the input's (or output's) entries
)


def diagnose_block(block: BlockComparison) -> Diagnosis | None:
    """The single pattern that best explains this block's mismatches, or None if it has none."""
    if block.mismatch_count == 0:
        return None
    view = BlockView(block)
    for rule in RULES:
        found = rule(view)
        if found is not None:
            return found
    return other(view)


def diagnose(blocks: Sequence[BlockComparison]) -> list[Diagnosis]:
    """Diagnoses for all blocks of one case; a swap explains both blocks it covers."""
    diagnoses = swapped_inputs(blocks)
    covered = set()
    for d in diagnoses:
        if d.input:
            covered.update(d.input.split(","))
    for block in blocks:
        if block.in_name in covered:
            continue
        try:
            found = diagnose_block(block)
        except Exception as exc:  # a naming rule must never cost the user the report itself
            found = Diagnosis("other", f"∂{block.out_name}/∂{block.in_name}: {block.mismatch_count} entries "
                                       f"differ; the pattern analysis failed ({type(exc).__name__}), so the worst "
                                       "entries are listed instead", output=block.out_name, input=block.in_name)
        if found is not None:
            diagnoses.append(found)
    return diagnoses


__all__ = ["diagnose", "diagnose_block", "swapped_inputs", "describe_located", "RULES"]
