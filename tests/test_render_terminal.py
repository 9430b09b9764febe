"""Terminal and JSON renderers on hand-built reports (no torch, no computation)."""

from __future__ import annotations

import json

from gradverify.render import render_json, render_plain, render_rich
from gradverify.report import (DIAGNOSIS_KINDS, CaseResult, CheckResult, Diagnosis, Heatmap, Mismatch, Report,
                               Status)


def _mismatches(n: int) -> tuple[Mismatch, ...]:
    return tuple(Mismatch(output="out", input="x", out_index=(k, 0), in_index=(0, 0), expected=-0.1906 + k * 0.01,
                          got=0.0, tolerance=1e-7) for k in range(n))


def failing_report(n: int = 3) -> Report:
    heat = Heatmap(output="out", input="x", out_shape=(2, 2), in_shape=(2, 2), rows=("oX|..", "Xo|..", "..|oX",
                                                                                        "..|Xo"),
                   row_labels=("out[0,0]", "out[0,1]", "out[1,0]", "out[1,1]"), col_header="columns: x")
    jac = CheckResult(name="jacobian", status=Status.FAILED, message=f"{n} / 16 Jacobian entries mismatched",
                      max_abs_err=0.1906, mismatch_count=n, total_entries=16, mismatches=_mismatches(n),
                      diagnoses=(Diagnosis("missing_offdiag", "missing off-diagonal terms: coupling along dim 0",
                                           evidence="4/4", hint="add the reduction term"),),
                      heatmaps=(heat,), details=(("analytic", "batched"), ("truth", "reference")))
    bad = CaseResult(op="Norm", file="ops.py", line=3, shapes=((2, 2),), dtype="float64", device="cpu", seed=0,
                     status=Status.FAILED, checks=(CheckResult("inplace", Status.PASSED), jac),
                     repro="gradverify check ops.py --op Norm --shape 2,2 --seed 0", input_names=("x",))
    skipped = CaseResult(op="Norm", file="ops.py", shapes=((2, 2),), dtype="float64", device="cuda",
                         seed=0, status=Status.SKIPPED, message="skipped: cuda not available", input_names=("x",))
    return Report(cases=(bad, skipped))


def test_plain_report_shows_summary_diff_heatmap_diagnosis_and_repro() -> None:
    text = render_plain(failing_report())
    assert "\x1b[" not in text
    assert "Norm" in text and "x(2,2)" in text and "FAIL" in text and "SKIP" in text
    assert "skipped: cuda not available" in text
    assert "Mismatched elements: 3 / 16 (18.8%)" in text
    assert "Greatest absolute difference: 0.1906 at ∂out[0,0] / ∂x[0,0]" in text
    assert "∂out[1,0] / ∂x[0,0]" in text and "-0.1806" in text
    assert "oX|.." in text and "out[1,1]" in text
    assert "[missing_offdiag] missing off-diagonal terms" in text and "hint: add the reduction term" in text
    assert "reproduce: gradverify check ops.py --op Norm" in text
    assert "2 cases: 1 failed, 1 skipped" in text


def test_diff_table_is_cut_at_max_entries_with_the_count_of_the_rest() -> None:
    text = render_plain(failing_report(30), max_entries=5)
    assert "... and 25 more mismatched entries" in text
    full = render_plain(failing_report(30), max_entries=None)
    assert "more mismatched" not in full and "∂out[29,0]" in full


def test_colour_only_when_asked() -> None:
    assert "\x1b[" in render_rich(failing_report(), color=True)
    no_color = render_rich(failing_report(), color=False)
    assert "\x1b[" not in no_color and "oX|.." in no_color


def test_json_has_the_documented_schema_and_no_markup() -> None:
    doc = json.loads(render_json(failing_report()))
    assert doc["schema_version"] == 2 and doc["ok"] is False and doc["exit_code"] == 1
    case = doc["cases"][0]
    for key in ("op", "file", "shapes", "dtype", "device", "seed", "ok", "status", "checks"):
        assert key in case
    check = case["checks"][1]
    for key in ("name", "ok", "max_abs_err", "mismatch_count", "mismatches", "diagnoses"):
        assert key in check
    assert check["mismatches"][0] == {"output": "out", "input": "x", "out_index": [0, 0], "in_index": [0, 0],
                                      "expected": -0.1906, "got": 0.0, "abs_err": 0.1906, "tolerance": 1e-7, "second": None}
    assert check["diagnoses"][0]["kind"] in DIAGNOSIS_KINDS
    assert doc["cases"][1]["status"] == "skipped"
    assert "\x1b" not in render_json(failing_report())


def test_non_finite_numbers_stay_valid_json() -> None:
    check = CheckResult(name="jacobian", status=Status.FAILED, max_abs_err=float("inf"))
    case = CaseResult(op="F", file="f.py", shapes=((1,),), dtype="float64", device="cpu", seed=0,
                      status=Status.FAILED, checks=(check,))
    doc = json.loads(render_json(Report(cases=(case,))))
    assert doc["cases"][0]["checks"][0]["max_abs_err"] == "inf"
