"""Rules about which entries the backward couples: cross terms missing (a coupled op treated as
element-wise, with or without its own diagonal right), and zeros on the diagonal."""

from __future__ import annotations

import torch

from gradverify.diagnose.view import LETTERS, BlockView
from gradverify.numerics.blocks import unravel
from gradverify.report import Diagnosis


def _full_diagonal(v: BlockView) -> torch.Tensor:
    """Block-shaped mask of the entries whose out index equals their in index (equal shapes)."""
    return torch.eye(v.rows, dtype=torch.bool).reshape(v.a.shape)


def _coupling_dims(v: BlockView, mask: torch.Tensor) -> list[int]:
    """The dims along which the masked entries' out and in indices differ."""
    dims: set[int] = set()
    for o, i in _entries(v, mask):
        dims |= {d for d in range(len(v.out_shape)) if o[d] != i[d]}
    return sorted(dims)


def _entries(v: BlockView, mask: torch.Tensor, limit: int = 20000) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    flat = torch.nonzero(mask.reshape(-1)).reshape(-1)[:limit].tolist()
    return [(unravel(f // v.cols, v.out_shape), unravel(f % v.cols, v.in_shape)) for f in flat]


def _pattern(v: BlockView, dims: list[int]) -> tuple[str, str]:
    out_letters = list(LETTERS[: len(v.out_shape)])
    in_letters = list(out_letters)
    fresh = iter(LETTERS[len(v.out_shape):])
    for d in dims:
        in_letters[d] = next(fresh)
    conditions = " or ".join(f"{in_letters[d]}≠{out_letters[d]}" for d in dims)
    pattern = f"∂{v.out_name}[{','.join(out_letters)}]/∂{v.in_name}[{','.join(in_letters)}] for {conditions}"
    return pattern, ", ".join(map(str, dims))


def missing_offdiag(v: BlockView) -> Diagnosis | None:
    """The backward is 0 where the truth couples an output to *other* input entries; where it is
    non-zero it is right (a term through a reduction is missing), or it is element-wise
    altogether (non-zero on the diagonal only) while the truth is not."""
    if v.out_shape == v.in_shape and v.out_shape:
        return _offdiag_equal_shapes(v)
    return _cross_terms(v)


def _offdiag_equal_shapes(v: BlockView) -> Diagnosis | None:
    diagonal = _full_diagonal(v)
    off = ~diagonal
    missing = v.nz_t & off & ~v.nz_a
    if not bool(missing.any()):
        return None
    if bool((v.nz_a & off).any()):
        # The backward couples off the diagonal: only a clean "zeros where the truth couples,
        # right elsewhere" counts.
        if not (bool((v.bad & v.nz_a).sum() == 0) and bool((v.bad & diagonal).sum() == 0)):
            return None
        if not bool(v.nz_a.any()):
            return None
        element_wise = False
    else:
        element_wise = True  # the backward is diagonal: the op treated as element-wise
    wrong_diagonal = int((v.bad & diagonal).sum())
    if element_wise and not bool(v.nz_a.any()):
        return None  # all zero: another rule's business
    if int(missing.sum()) * 2 < v.n_bad:
        return None  # the missing cross terms are not most of what is wrong
    dims = _coupling_dims(v, missing)
    if not dims:
        return None
    pattern, dim_text = _pattern(v, dims)
    n_missing = int(missing.sum())
    # Said once each: the count is in the evidence (and the summary table), so the message is
    # the pattern and where it couples; a one-failure report must fit a screen (issue 13).
    message = (f"missing off-diagonal terms: {pattern} is 0 in the backward, non-zero in the truth; "
               f"outputs couple along dim {dim_text}")
    if element_wise and wrong_diagonal:
        message += (f"; the backward is element-wise (non-zero only on the diagonal) and its {wrong_diagonal} "
                    "diagonal entries are off too")
        hint = (f"the statistics forward computes over dim {dim_text} (a mean, variance, norm or sum) are treated as "
                f"constants in backward: differentiate through them too, e.g. add the "
                f"(grad_output * ...).mean(dim={dims[0]}, keepdim=True) terms of the full formula")
    else:
        hint = (f"each output depends on the other entries along dim {dim_text}: add the term through that "
                f"reduction, e.g. (grad_output * ...).sum(dim={dims[0]}, keepdim=True)")
    kept = int((v.nz_a & ~v.bad).sum())
    evidence = f"{n_missing} wrong entries are 0 in the backward off the diagonal; " + (
        "the backward is non-zero only on the diagonal" if element_wise and wrong_diagonal else
        f"{kept} non-zero backward entries match the truth")
    return Diagnosis("missing_offdiag", message, output=v.out_name, input=v.in_name, evidence=evidence, hint=hint)


def _cross_terms(v: BlockView) -> Diagnosis | None:
    """Different shapes: the backward is non-zero only where the truth is, and 0 at some of the
    truth's couplings, with every output and input entry it touches keeping another coupling (not
    a whole gradient dropped). The kept entries may be off too (the dropped terms fed them)."""
    missing = v.nz_t & ~v.nz_a
    if not bool(missing.any()) or not bool(v.nz_a.any()) or bool((v.nz_a & ~v.nz_t).any()):
        return None
    if int(missing.sum()) * 2 < v.n_bad:
        return None  # the missing couplings are not most of what is wrong
    miss = v.matrix(missing)
    kept = v.matrix(v.nz_a)
    if not bool(kept.any(1)[miss.any(1)].all()) or not bool(kept.any(0)[miss.any(0)].all()):
        return None
    n_missing = int(missing.sum())
    wrong_kept = int((v.bad & v.nz_a).sum())
    message = (f"missing cross terms: {v.deriv} is 0 in the backward at {n_missing} entries where the truth couples "
               "the output to them")
    message += (f"; the {wrong_kept} entries it keeps are off too" if wrong_kept else "; right everywhere else")
    return Diagnosis("missing_offdiag", message, output=v.out_name, input=v.in_name,
                     evidence=f"{n_missing} wrong entries are 0 in the backward; the backward is non-zero only where "
                              "the truth is; every output and input entry they touch keeps another coupling",
                     hint="a term of the chain rule is missing (a reduction or broadcast in forward, a statistic "
                          "treated as a constant?)")


def zero_on_diagonal(v: BlockView, observation: str = "") -> Diagnosis | None:
    """The backward is 0 at some of its own diagonal entries (equal shapes) and right elsewhere."""
    if v.out_shape != v.in_shape or not v.out_shape:
        return None
    bad = v.bad
    if not bool((~v.nz_a)[bad].all()) or bool((bad & ~_full_diagonal(v)).any()):
        return None
    n_bad = v.n_bad
    message = (f"{v.deriv} is 0 in the backward at {n_bad} diagonal entries where the truth is not; every other "
               "entry matches")
    if observation:
        message += f" ({observation})"
    return Diagnosis("zero_grad", message, output=v.out_name, input=v.in_name,
                     evidence=f"{n_bad}/{n_bad} wrong entries are 0 in the backward, all on the diagonal",
                     hint="a branch of a piecewise derivative returns 0 (a dropped slope such as leaky_relu's, a mask "
                          "that is too strict)")
