"""gradverify on the corpus of real-world ops (tests/corpus: re-typed from public code, sources named
there): no correct op refused or falsely failed, in float64 and float32; every one-bug twin caught,
and named with its kind where gradverify has a name for it.

Entries whose check or name does not exist yet are marked xfail(strict=True): when the check
lands, the test starts passing and the mark must go.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gradverify
from gradverify.report import Report, Status

CORPUS = Path(__file__).resolve().parent / "corpus"
sys.path.insert(0, str(CORPUS))
import inputs as corpus_inputs  # noqa: E402
import manifest  # noqa: E402

sys.path.remove(str(CORPUS))

_MODULES: dict[str, Any] = {}


def _module(name: str) -> Any:
    if name not in _MODULES:
        path = CORPUS / name
        spec = importlib.util.spec_from_file_location(f"corpus_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def _op(entry: manifest.Entry) -> Any:
    if entry.kind == "torch.ops":
        _module(entry.module)
        obj: Any = torch
        for part in entry.op.split(".")[1:]:
            obj = getattr(obj, part)
        return obj
    return getattr(_module(entry.module), entry.op)


CONSTRAINED = ("spd", "symmetric", "simplex", "unit_norm")
# Ops whose double backward is built to be right (the corpus checks them at second order).
SECOND_ORDER = {"my_cube", "MyCube", "my_tanh", "fused_lrelu", "MishFunction"}


def verify(entry: manifest.Entry, dtype: torch.dtype = torch.float64, **options: Any) -> Report:
    args, kwargs = corpus_inputs.make_inputs(entry, dtype=dtype)
    domains = {name: v.domain for name, v in entry.inputs.items() if getattr(v, "domain", None) in CONSTRAINED}
    if entry.bug == "second_order" or entry.op in SECOND_ORDER:
        options.setdefault("order", 2)
    return gradverify.verify(_op(entry), *args, domains=domains, **kwargs, **options)


def kinds(report: Report) -> set[str]:
    return {d.kind for c in report.cases[0].checks if c.counts for d in c.diagnoses}


def ident(entry: manifest.Entry) -> str:
    return entry.key.removeprefix("ops/").replace(".py:", ":")


CORRECT = [e for e in manifest.ENTRIES if e.expect == "pass" and e.bug is None]
WARN = [e for e in manifest.ENTRIES if e.expect == "warn"]
TWINS = [e for e in manifest.ENTRIES if e.bug is not None and e.expect != "warn"]

# The corpus twin kinds -> the diagnosis kinds gradverify may name them with. None: the corpus
# kind says how the bug arose, not a pattern of the Jacobian (any diagnosis will do).
NAMES: dict[str, set[str] | None] = {
    "missing_offdiag": {"missing_offdiag"}, "scaled": {"scaled"}, "sign": {"sign"},
    "transposed": {"transposed"}, "swapped_inputs": {"swapped_inputs"}, "zero_grad": {"zero_grad"},
    "none_grad": {"none_grad"}, "shape_mismatch": {"shape_mismatch"}, "partial": {"partial"},
    "wrong_branch": {"wrong_branch"}, "precision": {"precision"}, "dropped_eps": {"dropped_eps"},
    "surrogate": {"surrogate"}, "needs_input_grad": {"needs_input_grad"},
    "ignores_grad_output": {"ignores_grad_output"}, "inplace_forward": {"inplace_forward"},
    "inplace_grad_output": {"grad_output_inplace"}, "undeclared_mutation": {"undeclared_mutation"},
    "fake_kernel_mismatch": {"fake_kernel_mismatch"}, "second_order": {"second_order", "ctx_attribute"},
    "multi_output": {"multi_output"}, "undefined_grad": {"undefined_grad"}, "layout": {"layout_assumption"},
    "missing_autograd": {"no_backward"}, "dropped_output_grad": {"zero_grad", "multi_output"},
    "duplicate_index": {"partial", "missing_offdiag"}, "inplace_backward": None, "nonsymmetric": None,
    "wrong_dim": None,
}

# Twins whose bug no check catches yet (the issue that adds the check removes the entry).
NOT_CAUGHT_YET = {
}
# Twins caught but not (yet) named with their kind, and why.
NOT_NAMED_YET = {
    # The Jacobian alone cannot tell these from any other wrong dense formula (named `other`, with
    # where the wrong entries sit and how backward/truth is spread):
    "matrix:InvSqrtm_bug_missing_offdiag",  # eigen-basis terms dropped: dense block, same sparsity
    "matrix:CholeskyFactor_bug_partial",  # a 2x in Phi's diagonal spreads through two solves
    "triton_style:FlashAttention_bug_missing_offdiag",  # delta term dropped: dense rows, same sparsity
    "classics:GELUFunction_bug_sign",  # one term's sign: named nonconstant_factor (element-wise, ratio varies)
    # Named by a check other than the Jacobian's diagnosis:
    "linear:LinearFunction_bug_transposed",  # the contract sees the (in, out) shape first: shape_mismatch
}
# Correct ops whose backward gradverify finds imprecise in float32 (a true finding): 1 - sigmoid(x)
# for x ~ 15 cancels in float32 (values ~3e-7 with errors ~6e-8); float64 is fine.
FLOAT32_FINDINGS = {"losses:SigmoidContrastiveLoss": "precision"}
# Correct ops (right for contiguous tensors) in which the layout check finds a true layout bug:
# TritonLayerNorm's forward runs its kernel on weight.contiguous() but saves `weight` itself,
# and the backward kernel reads the saved weight as if contiguous, so a weight that arrives as
# a strided slice gets a wrong dx (the Triton tutorial it follows assumes a contiguous weight).
LAYOUT_FINDINGS = {"triton_style:TritonLayerNorm"}


def _only_layout_fails(report: Report) -> bool:
    failing = [c for c in report.cases[0].checks if c.counts and not c.ok]
    return bool(failing) and all(c.name == "layout" for c in failing) and "layout_assumption" in kinds(report)


def _mark(entries: list[manifest.Entry], table: dict[str, str] | set[str]) -> list[Any]:
    return [pytest.param(e, id=ident(e), marks=pytest.mark.xfail(strict=True, reason="not yet"))
            if ident(e) in table else pytest.param(e, id=ident(e)) for e in entries]


@pytest.mark.parametrize("entry", [pytest.param(e, id=ident(e)) for e in CORRECT])
def test_correct_op_passes_in_float64(entry: manifest.Entry) -> None:
    report = verify(entry)
    if ident(entry) in LAYOUT_FINDINGS:
        assert _only_layout_fails(report), gradverify.explain(report)
        report = verify(entry, skip_checks=("layout",))
    assert report.cases[0].status is Status.PASSED, gradverify.explain(report)


@pytest.mark.parametrize("entry", [pytest.param(e, id=ident(e)) for e in CORRECT])
def test_correct_op_passes_in_float32_or_gets_a_true_finding(entry: manifest.Entry) -> None:
    report = verify(entry, torch.float32)
    finding = FLOAT32_FINDINGS.get(ident(entry))
    if ident(entry) in LAYOUT_FINDINGS:
        assert _only_layout_fails(report), gradverify.explain(report)
    elif finding:
        assert not report.ok and finding in kinds(report), gradverify.explain(report)
    else:
        assert report.ok, gradverify.explain(report)


@pytest.mark.parametrize("entry", [pytest.param(e, id=ident(e)) for e in WARN])
def test_engine_repaired_pattern_is_a_warning_and_fails_only_under_strict(entry: manifest.Entry) -> None:
    report = verify(entry)
    assert report.cases[0].status is Status.WARNED and report.exit_code == 0, gradverify.explain(report)
    assert kinds(report) & {"engine_reduced", "engine_cast"}
    assert verify(entry, strict=True).exit_code == 1


@pytest.mark.parametrize("entry", _mark(TWINS, NOT_CAUGHT_YET))
def test_twin_is_caught(entry: manifest.Entry) -> None:
    report = verify(entry)
    assert not report.ok, gradverify.explain(report)


@pytest.mark.parametrize("entry", _mark([e for e in TWINS if ident(e) not in NOT_CAUGHT_YET
                                         and NAMES.get(e.bug or "") is not None], NOT_NAMED_YET))
def test_twin_is_named_with_its_kind(entry: manifest.Entry) -> None:
    report = verify(entry)
    expected = NAMES[entry.bug or ""]
    assert expected is not None and kinds(report) & expected, (entry.bug, kinds(report), gradverify.explain(report))


def test_every_corpus_kind_has_a_name_entry() -> None:
    assert {e.bug for e in TWINS} <= set(NAMES)
