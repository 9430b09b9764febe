"""Terminal renderer on hand-built reports (no torch, no computation): layout at 80 columns,
escaping, numbers, -q/-v, CI bounds, sweeps said once, honest projected checks.

The builders here are shared with the other test_render_* modules.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

from rich.cells import cell_len
from rich.text import Text

from gradverify.render import render_json, render_plain, render_rich, render_terminal
from gradverify.render.terminal import wrap
from gradverify.render.text import num, num_pair, one_line
from gradverify.report import (DIAGNOSIS_KINDS, CaseResult, CheckResult, Diagnosis, Heatmap, InputInfo, Mismatch,
                               Report, Severity, Status)

HINT = ("each output depends on the other entries along dim 0: add the term through that reduction, "
        "e.g. (grad_output * ...).sum(dim=0, keepdim=True)")
MESSAGE = ("missing off-diagonal terms: ∂out[i,j]/∂x[k,j] for k≠i is 0 in the backward, non-zero in the truth; "
           "outputs couple along dim 0")
REPRO = ("gradverify check specs/column_normalize_buggy.py --op ColumnNormalize --shape 3,3 --dtype float64 "
         "--device cpu --seed 0 --domain positive")
HEAT_ROWS = ("o..|X..|X..", ".o.|.X.|.X.", "..o|..X|..X", "X..|o..|X..", ".X.|.o.|.X.", "..X|..o|..X",
             "X..|X..|o..", ".X.|.X.|.o.", "..X|..X|..o")


def tensor(name: str, *shape: int) -> InputInfo:
    return InputInfo(name=name, kind="tensor", shape=shape, dtype="float64", requires_grad=True)


def mismatches(n: int, scale: float = 0.09) -> tuple[Mismatch, ...]:
    """n entries, worst first; expected values of the given scale, the backward returns 0."""
    return tuple(Mismatch("out", "x", (k // 3 % 3, k % 3), ((k + 1) % 3, k % 3), expected=-scale * (1 - k / 100),
                          got=0.0, tolerance=3.7e-9, second=-scale * (1 - k / 100)) for k in range(n))


def heatmap(rows: tuple[str, ...] = HEAT_ROWS) -> Heatmap:
    labels = tuple(f"out[{r // 3},{r % 3}]" for r in range(len(rows)))
    return Heatmap(output="out", input="x", out_shape=(3, 3), in_shape=(3, 3), rows=rows, row_labels=labels,
                   col_header="columns: x row-major, '|' between x[0,:], x[1,:], x[2,:]")


def jacobian_failure(n: int = 18, **changes: object) -> CheckResult:
    check = CheckResult(
        name="jacobian", status=Status.FAILED, message=f"{n} / 81 Jacobian entries mismatched", summary=f"{n} / 81",
        max_abs_err=0.09, mismatch_count=n, total_entries=81, compared_entries=81, mismatches=mismatches(n),
        diagnoses=(Diagnosis("missing_offdiag", MESSAGE, output="out", input="x",
                             evidence="18/18 wrong entries are 0 in the backward; 9/9 non-zero backward entries "
                                      "match the truth", hint=HINT),),
        heatmaps=(heatmap(),),
        details=(("mode", "full: every entry, whole blocks in memory"), ("analytic", "batched")))
    return replace(check, **changes)


def failing_case(op: str = "ColumnNormalize", **changes: object) -> CaseResult:
    """The README's column normalisation: contracts pass, jacobian fails, gradcheck confirms."""
    checks = (CheckResult("contracts", Status.PASSED, message="7/7 contracts hold", summary="7/7 ok"),
              jacobian_failure(),
              CheckResult("gradcheck", Status.FAILED, summary="(fast) failed",
                          message="torch gradcheck (fast) failed: Jacobian mismatch for output 0 with respect to "
                                  "input 0"))
    case = CaseResult(op=op, file="specs/column_normalize_buggy.py", shapes=((3, 3),), dtype="float64", device="cpu",
                      seed=0, status=Status.FAILED, checks=checks, message="18 / 81 Jacobian entries mismatched",
                      repro=REPRO, line=16, backward_line=24, input_names=("x",), inputs=(tensor("x", 3, 3),),
                      domain="positive")
    return replace(case, **changes)


def passing_case(op: str = "Linear", **changes: object) -> CaseResult:
    case = CaseResult(op=op, file="specs/linear.py", shapes=((4, 3), (5, 3)), dtype="float32", device="cpu", seed=0,
                      status=Status.PASSED, line=14, backward_line=22, input_names=("input", "weight"),
                      inputs=(tensor("input", 4, 3), tensor("weight", 5, 3)),
                      checks=(CheckResult("contracts", Status.PASSED, summary="7/7 ok"),
                              CheckResult("jacobian", Status.PASSED, summary="0 / 240", max_abs_err=3e-7,
                                          total_entries=240, compared_entries=240),
                              CheckResult("gradcheck", Status.SKIPPED, summary="not run",
                                          message="not run: gradcheck runs in float64 only")))
    return replace(case, **changes)


def skipped_case() -> CaseResult:
    return CaseResult(op="ColumnNormalize", file="specs/column_normalize.py", shapes=((3, 3),), dtype="float64",
                      device="cuda", seed=0, status=Status.SKIPPED, message="skipped: cuda not available",
                      input_names=("x",), inputs=(tensor("x", 3, 3),), line=5, backward_line=12)


def error_case() -> CaseResult:
    message = "backward raised ValueError: bad [bold]value[/bold] at specs/broken.py:15"
    check = CheckResult("contracts", Status.ERROR, message=message, summary="backward raised",
                        diagnoses=(Diagnosis("backward_error", message, hint="fix the exception; the other cases "
                                                                             "still ran"),))
    return CaseResult(op="Broken", file="specs/broken.py", shapes=((2,),), dtype="float64", device="cpu", seed=0,
                      status=Status.ERROR, input_names=("x",), inputs=(tensor("x", 2),), line=8, backward_line=15,
                      checks=(check,), message=message, repro="gradverify check specs/broken.py --op Broken",
                      output="debug: x=1\ndebug: x=2\n")


def sample_report() -> Report:
    return Report(cases=(failing_case(), passing_case(), skipped_case(), error_case()), notes=("a report note",))


def lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def flat(text: str) -> str:
    """The text with its wrapping undone: words as one stream."""
    return " ".join(line.strip() for line in lines(text) if line.strip())


def entry_rows(text: str) -> int:
    """How many mismatched entries are listed (the diagnosis' `∂out[i,j]/∂x[k,j]` is not one)."""
    return sum(bool(re.search(r"∂out\[\d+(,\d+)*\]/∂x\[\d", line)) for line in lines(text))


def repro_lines(text: str) -> list[str]:
    return [line for line in lines(text) if line.lstrip().startswith("reproduce:")]


# -- layout ------------------------------------------------------------------------------------------

def test_readme_case_fits_80_columns_and_30_lines_with_the_repro_line_whole() -> None:
    text = render_terminal(Report(cases=(failing_case(),)), width=80)
    out = lines(text)
    assert len(out) <= 30, text
    too_long = [line for line in out if cell_len(line) > 80 and not line.lstrip().startswith("reproduce:")]
    assert not too_long, too_long
    (repro,) = repro_lines(text)
    assert repro == f"  reproduce: {REPRO}"  # one line, never hard-wrapped: the terminal wraps it
    assert "\x1b[" not in text and not any(line != line.rstrip() for line in out)


def test_default_block_says_each_fact_once() -> None:
    text = render_terminal(Report(cases=(failing_case(),)), width=80)
    assert text.count("18 / 81") == 1  # the summary cell; no "Mismatched elements" restatement
    assert "Mismatched elements" not in text and "Jacobian entries mismatched" not in text
    assert text.count("couple along") == 1 and text.count("hint:") == 1 and text.count("evidence:") == 1
    # gradcheck only confirms the jacobian failure: its row in the table, no second paragraph
    assert "with respect to input 0" not in flat(text) and "(fast) failed" in text
    # method internals are for --verbose
    assert "whole blocks in memory" not in text and "analytic" not in text


def test_prose_wraps_between_words_with_an_indented_continuation() -> None:
    out = lines(render_terminal(Report(cases=(failing_case(),)), width=80))
    start = next(k for k, line in enumerate(out) if line.startswith("    hint: "))
    hint = [out[start]] + [line for line in out[start + 1:start + 4] if line.startswith("      ")]
    assert len(hint) == 2 and all(line.startswith("      ") for line in hint[1:])
    words = " ".join(line.strip() for line in hint).removeprefix("hint: ")
    assert words == HINT  # nothing lost or split inside a word
    diagnosis = next(line for line in out if "[missing_offdiag]" in line)
    assert diagnosis.startswith("  jacobian: [missing_offdiag] missing off-diagonal terms")


def test_wrap_keeps_words_whole_and_cuts_only_a_word_longer_than_a_line() -> None:
    wrapped = [t.plain for t in wrap(Text("aaa bbb ccc " + "x" * 30), 12, 2, 4)]
    assert wrapped[:2] == ["  aaa bbb", "    ccc"]
    assert all(len(line) <= 12 for line in wrapped) and "".join(w.strip() for w in wrapped[2:]) == "x" * 30


def test_tables_are_indented_inside_the_block_and_heatmap_sits_beside_the_entries() -> None:
    out = lines(render_terminal(Report(cases=(failing_case(),)), width=80))
    legend = next(line for line in out if "∂out (3,3) / ∂x (3,3)" in line)
    assert legend.startswith("    ∂out (3,3) / ∂x (3,3)  X mismatch  o agrees  . zero")
    assert "∂out[3, 3]" not in "\n".join(out)  # no shapes inside index brackets
    header = next(line for line in out if "expected" in line)
    assert re.match(r"^    out\[0,0\]  o\.\.\|X\.\.\|X\.\.\s+entry\s+expected\s+got\s+\|err\|$", header)
    assert entry_rows("\n".join(out)) == 5  # the top 5 entries, beside the heatmap rows
    assert any(line.strip().endswith("… 13 more: -v lists all 18") for line in out)


def test_narrow_width_stacks_the_entries_above_the_heatmap() -> None:
    text = render_terminal(Report(cases=(failing_case(),)), width=60)
    out = lines(text)
    assert all(cell_len(line) <= 60 for line in out if "reproduce:" not in line)
    first_entry = next(k for k, line in enumerate(out) if line.startswith("    entry"))
    first_row = next(k for k, line in enumerate(out) if line.startswith("    out[0,0]"))
    assert first_entry < first_row


def test_max_entries_zero_prints_no_empty_table_header() -> None:
    text = render_terminal(Report(cases=(failing_case(),)), max_entries=0)
    assert "expected" not in text and "more:" not in text and "o..|X..|X.." in text


def test_verbose_shows_method_internals_and_up_to_max_entries() -> None:
    text = render_terminal(Report(cases=(failing_case(),)), verbosity=1, max_entries=20, width=100)
    assert "mode: full: every entry, whole blocks in memory" in text and "analytic: batched" in text
    assert entry_rows(text) == 18 and "more:" not in text
    assert "allowed" in text and "2nd truth" in text
    # the confirming gradcheck is written out with -v
    assert "with respect to input 0" in flat(text)


def test_quiet_is_the_table_and_the_footer() -> None:
    text = render_terminal(sample_report(), verbosity=-1)
    assert "missing_offdiag" not in text and "reproduce" not in text and "a report note" not in text
    assert "ColumnNormalize" in text and "18 / 81" in text
    assert lines(text)[-1] == "4 cases: 1 passed, 1 failed, 1 error, 1 skipped"


def test_ci_keeps_the_log_bounded_with_the_true_count() -> None:
    case = failing_case(checks=(jacobian_failure(n=500, mismatch_count=3600, mismatch_count_is_lower_bound=False),))
    report = Report(cases=(case,))
    text = render_terminal(report, ci=True, max_entries=None, width=80)
    assert entry_rows(text) == 5
    assert "… 3595 more: --output json:FILE lists all 3600" in flat(text)
    verbose = render_terminal(report, ci=True, verbosity=1, max_entries=20, width=100)
    assert entry_rows(verbose) == 20 and "lists all 3600" in verbose
    assert len(render_terminal(report, ci=True, verbosity=1, max_entries=None)) < 6000  # never unbounded


# -- numbers -----------------------------------------------------------------------------------------

def test_numbers_in_significant_digits() -> None:
    assert [num(v) for v in (1e-6, -0.0949348, 123456.0, 0.0, float("inf"), float("nan"), 2.5e-12)] == [
        "1e-6", "-0.09493", "1.235e5", "0", "inf", "nan", "2.5e-12"]
    assert num_pair(1.0000012, 1.0000034) == ("1.000001", "1.000003")  # digits until they differ
    case = failing_case(checks=(jacobian_failure(n=1, mismatches=(
        Mismatch("out", "x", (0,), (0,), expected=1e-6, got=3e-6, tolerance=1e-9),), heatmaps=()),))
    text = render_terminal(Report(cases=(case,)))
    assert "0.0000" not in text and re.search(r"∂out\[0\]/∂x\[0\]\s+1e-6\s+3e-6\s+2e-6", text)


# -- escaping ----------------------------------------------------------------------------------------

def test_user_text_is_never_markup() -> None:
    case = failing_case(op="LayerNorm[affine]", message="[red]boom[/red]")
    checks = list(case.checks)
    checks[1] = replace(checks[1], diagnoses=(Diagnosis("other", "a [bold]message[/bold] with :smile: and [x]",
                                                        hint="see [link=http://x]here[/link]"),))
    report = Report(cases=(replace(case, checks=tuple(checks)), error_case()))
    for text in (render_terminal(report), render_rich(report, color=True)):
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        assert lines(plain)[2].startswith("LayerNorm[affine] ")  # the table's cell
        assert "FAIL LayerNorm[affine] x(3,3)" in plain  # the block's heading
        words = flat(plain)
        assert "a [bold]message[/bold] with :smile: and [x]" in words
        assert "see [link=http://x]here[/link]" in words
        assert "bad [bold]value[/bold]" in words


# -- statuses, sweeps, notes ---------------------------------------------------------------------------

def test_summary_cells_use_the_check_summary_and_show_overruled_and_not_judged() -> None:
    projected = CheckResult("jacobian", Status.PASSED, summary="4 projections agree", max_abs_err=0.0,
                            total_entries=81_000_000_000_000,
                            message="4 random projections agree; a single wrong entry off by more than 5.7e-07 "
                                    "would be detected with probability > 1 - 1e-06",
                            guarantee="4 random projections agree; a single wrong entry off by more than 5.7e-07 "
                                      "would be detected with probability > 1 - 1e-06")
    overruled = CheckResult("gradcheck", Status.FAILED, summary="(fast) failed (overruled)", counts=False,
                            message="torch gradcheck (fast) failed -- not counted: the input is near a kink")
    big = passing_case(op="Big", checks=(projected, overruled))
    warned = CheckResult("jacobian", Status.WARNED, summary="0 / 81, 12 not judged", unverifiable_count=12,
                         total_entries=81, compared_entries=81, max_abs_err=1e-9,
                         diagnoses=(Diagnosis("unverifiable", "12 entries not judged: finite differences did not "
                                                              "converge there", severity=Severity.WARNING,
                                              hint="try another --seed or smaller values (--domain)"),))
    unjudged = passing_case(op="Unjudged", status=Status.WARNED, checks=(warned,))
    bare = passing_case(op="Bare", status=Status.WARNED, checks=(
        CheckResult("jacobian", Status.WARNED, summary="0 / 64", unverifiable_count=3, total_entries=64),))
    assert "0 / 64, 3 not judged" in render_terminal(Report(cases=(bare,)))  # even when the summary omits it
    text = render_terminal(Report(cases=(big, unjudged)), width=80)
    assert "4 projections agree" in text and "81000000000000" not in text
    assert "(FAIL)" in text and "(overruled)" in text  # visibly not counted
    assert "0 / 81, 12 not judged" in text and "WARN" in text
    row = next(line for line in lines(text) if "4 projections agree" in line)
    assert not re.search(r"\b0\b", row.split("PASS")[1].split("4 projections")[0])  # no max |err| claim of 0
    # the projected pass says what it guarantees
    words = flat(text)
    assert "would be detected with probability > 1 - 1e-06" in words
    # the warned case has a block with its diagnosis and hint
    assert "warning [unverifiable]" in text and "try another --seed" in words
    assert lines(text)[-1] == "2 cases: 1 passed, 1 warned"


def test_warn_is_yellow_and_fail_red_in_colour() -> None:
    warned = passing_case(status=Status.WARNED, checks=(CheckResult("jacobian", Status.WARNED, summary="w"),))
    text = render_rich(Report(cases=(warned, failing_case())), color=True)
    assert "\x1b[33mWARN" in text and re.search(r"\x1b\[1;31mFAIL", text)


def test_nonfinite_output_next_to_a_pass_shows_the_domain_hint() -> None:
    finite = Diagnosis("nonfinite", "out has 2 non-finite value(s), first at out[1]; the inputs may be outside the "
                                    "op's domain: try --domain positive (or another domain)",
                       severity=Severity.WARNING, hint="sample inputs inside the op's domain: --domain positive")
    checks = (CheckResult("contracts", Status.WARNED, summary="warning: nonfinite", diagnoses=(finite,),
                          message=finite.message),
              CheckResult("jacobian", Status.PASSED, summary="0 / 16", max_abs_err=float("inf"), total_entries=16))
    case = passing_case(op="Sqrt", status=Status.WARNED, checks=checks)
    words = flat(render_terminal(Report(cases=(case,))))
    assert "try --domain positive" in words and "hint: sample inputs inside the op's domain" in words
    assert words.count("non-finite value(s)") == 1  # the contract's message once


def test_error_case_prints_its_message_once_and_counts_printed_output() -> None:
    text = render_terminal(Report(cases=(error_case(),)))
    assert text.count("backward raised ValueError") == 1
    assert "your code printed 2 lines (-v shows them)" in text
    verbose = render_terminal(Report(cases=(error_case(),)), verbosity=1)
    assert "debug: x=2" in verbose


def test_a_sweep_with_the_same_diagnosis_says_it_once_and_lists_the_cases() -> None:
    cases = []
    for shape in ((2, 3), (4, 5)):
        for dtype in ("float64", "float32"):
            n = shape[0] * shape[1]
            check = jacobian_failure(n=n, summary=f"{n} / {n * n}",
                                     diagnoses=(Diagnosis("missing_offdiag", f"missing off-diagonal terms ({n} "
                                                          "entries); coupling along dim 0", hint=HINT),))
            cases.append(failing_case(op="LayerNorm[affine]", dtype=dtype, inputs=(tensor("x", *shape),),
                                      shapes=(shape,), checks=(check,)))
    text = render_terminal(Report(cases=tuple(cases)), width=80)
    assert flat(text).count("coupling along dim 0") == 1 and text.count("hint:") == 1
    assert ("the same finding in 3 more cases: x(2,3) float32 cpu; x(4,5) float64 cpu; x(4,5) float32 cpu"
            in flat(text))
    assert text.count("LayerNorm[affine]") == 4 + 1  # a table row per case, one block
    # a different finding in the same op is its own block
    other = replace(cases[3], checks=(jacobian_failure(diagnoses=(Diagnosis("scaled", "off by a factor 2"),)),))
    text = render_terminal(Report(cases=(*cases[:3], other)), width=80)
    assert "off by a factor 2" in text and "the same finding in 2 more cases" in flat(text)


def test_passing_cases_notes_are_said_once_and_report_notes_printed() -> None:
    note = "no shape given on the command line or in the spec: used the default shape 3,4"
    report = Report(cases=(passing_case(notes=(note,)), passing_case(dtype="float64", notes=(note,))),
                    notes=("a report note",))
    text = render_terminal(report, width=80)
    assert flat(text).count("used the default shape") == 1 and "(Linear, 2 cases)" in text
    assert "note: a report note" in text
    assert lines(text)[-1] == "2 cases: 2 passed"


def test_skipped_case_shows_its_reason_and_nothing_checked_is_said() -> None:
    text = render_terminal(Report(cases=(skipped_case(),)))
    assert "cuda not available" in text and "SKIP" in text
    assert lines(text)[-1] == "1 case: 1 skipped (nothing was checked)"


def test_yaml_declared_op_names_both_places() -> None:
    case = failing_case(file="specs/ops/ln.py", spec_file="specs/ln.yaml", spec_line=7)
    text = render_terminal(Report(cases=(case,)), width=100)
    assert "specs/ln.yaml:7, op at specs/ops/ln.py:24" in text


def test_one_line_summary_names_op_inputs_dtype_check_counts_and_kind() -> None:
    assert one_line(failing_case()) == ("ColumnNormalize x(3,3) float64 cpu: jacobian 18 / 81 [missing_offdiag]; "
                                        "gradcheck (fast) failed")
    assert one_line(error_case()).startswith("Broken x(2) float64 cpu: contracts: backward raised ValueError")


def test_plain_wrapper_lists_up_to_max_entries_for_logs() -> None:
    text = render_plain(Report(cases=(failing_case(checks=(jacobian_failure(n=30, mismatch_count=30),)),)),
                        max_entries=8)
    assert entry_rows(text) == 8
    assert "… 22 more: --output json:FILE lists all 30" in flat(text)


# -- json --------------------------------------------------------------------------------------------

def test_json_has_the_documented_schema_and_no_markup() -> None:
    doc = json.loads(render_json(sample_report()))
    assert doc["schema_version"] == 2 and doc["ok"] is False and doc["exit_code"] == 1
    case = doc["cases"][0]
    for key in ("op", "file", "line", "backward_line", "spec_file", "inputs", "shapes", "dtype", "device", "seed",
                "ok", "status", "checks", "inputs_from", "output"):
        assert key in case
    check = case["checks"][1]
    for key in ("name", "ok", "status", "counts", "summary", "guarantee", "max_abs_err", "mismatch_count",
                "mismatches", "diagnoses", "notes", "details"):
        assert key in check
    assert check["diagnoses"][0]["kind"] in DIAGNOSIS_KINDS and check["diagnoses"][0]["severity"] == "error"
    assert "\x1b" not in render_json(sample_report())


def test_non_finite_numbers_stay_valid_json() -> None:
    check = CheckResult(name="jacobian", status=Status.FAILED, max_abs_err=float("inf"))
    case = failing_case(checks=(check,))
    doc = json.loads(render_json(Report(cases=(case,))))
    assert doc["cases"][0]["checks"][0]["max_abs_err"] == "inf"


def test_long_names_and_messages_still_fit_the_width() -> None:
    long_entries = tuple(Mismatch("attention_output", "query_projection_weight", (11, 22, 33), (44, 55, 66),
                                  expected=-1.234567e-5 * (k + 1), got=7.5e3, tolerance=1e-9) for k in range(3))
    binned = Heatmap(output="attention_output", input="query_projection_weight", out_shape=(64, 128, 8),
                     in_shape=(512, 512), rows=tuple("X.o?" * 12 for _ in range(24)),
                     row_labels=tuple(f"attention_output[{k},0,0]" for k in range(24)),
                     col_header="binned: each cell ~2731 x 5462 entries of 65536 x 262144, worst shown", binned=True)
    check = jacobian_failure(n=3, mismatches=long_entries, heatmaps=(binned,),
                             message="x" * 30 + " " + "a-very-long-unbreakable-path/" * 6 + " tail")
    case = failing_case(op="FusedMultiHeadAttentionWithRotaryEmbeddingsAndALiBi" * 2, checks=(check,),
                        inputs=tuple(tensor(f"input_number_{k}", 64, 128, 8) for k in range(6)),
                        notes=("a note " * 40,), output="printed " * 50)
    report = Report(cases=(case, skipped_case(), error_case()), notes=("report note " * 30,))
    for width in (80, 100):
        for verbosity in (-1, 0, 1):
            text = render_terminal(report, width=width, verbosity=verbosity)
            wide = [line for line in lines(text) if cell_len(line) > width and "reproduce:" not in line]
            assert not wide, (width, verbosity, wide)
    text = render_terminal(report, width=80)
    assert "∂attention_output[11,22,33]/∂query_projection_weight[44,55,66]" in text  # stacked, not cut
    assert "expected -1.235e-5  got 7500  |err| 7500" in flat(text)


def test_passing_and_not_applicable_checks_beyond_the_core_share_a_row_unless_verbose() -> None:
    extra = (CheckResult("layout", Status.PASSED, summary="5/5 layouts ok"),
             CheckResult("ctx_hygiene", Status.PASSED, summary="nothing on ctx"),
             CheckResult("transforms", Status.SKIPPED, summary="not applicable"),
             CheckResult("forward_mode", Status.SKIPPED, summary="no jvp"),
             CheckResult("registration", Status.WARNED, summary="missing_fake"))
    case = failing_case()
    case = replace(case, checks=case.checks + extra)
    text = render_terminal(Report(cases=(case,)), width=80)
    table = text.split("\n\n")[0]
    assert "contracts" in table and "jacobian" in table and "gradcheck" in table  # core and failing: own rows
    assert "registration" in table and "WARN" in table  # a warning is never folded away
    assert "layout" not in table and "ctx_hygiene" not in table and "transforms" not in table
    assert re.search(r"4 more\s+PASS\s+ok, 2 n/a \(-v\)", table)
    verbose = render_terminal(Report(cases=(case,)), width=80, verbosity=1).split("\n\n")[0]
    assert all(name in verbose for name in ("layout", "ctx_hygiene", "transforms", "forward_mode"))
    assert "more" not in verbose
    one = render_terminal(Report(cases=(replace(case, checks=failing_case().checks + extra[:1]),)), width=80)
    assert "layout" in one.split("\n\n")[0]  # folding a single check saves nothing
    only_na = render_terminal(Report(cases=(replace(case, checks=failing_case().checks + extra[2:4]),)), width=80)
    assert re.search(r"2 more\s+SKIP\s+2 n/a \(-v\)", only_na)
