"""Markdown renderer (`--output md:FILE`, the GitHub job summary) on hand-built reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_render_terminal import failing_case, passing_case, sample_report

from gradverify.render.markdown import code, md, render_github_summary, render_markdown
from gradverify.report import Report


def test_summary_table_then_one_section_per_finding() -> None:
    text = render_markdown(sample_report(), max_entries=2)
    lines = text.splitlines()
    assert lines[0] == "## gradverify: 4 cases: 1 passed, 1 failed, 1 error, 1 skipped"
    assert "| case | check | verdict | max \\|err\\| | result |" in lines
    assert "| **ColumnNormalize** x(3,3) float64 cpu | contracts | ✅ PASS |  | 7/7 ok |" in lines
    assert "|  | jacobian | ❌ FAIL | 0.09 | 18 / 81 |" in lines
    assert "### ❌ FAIL ColumnNormalize x(3,3) float64 cpu" in lines
    assert "### 💥 ERROR Broken x(2) float64 cpu" in lines
    assert sum(line.startswith("### ") for line in lines) == 2  # passing and skipped cases: table only
    assert "`specs/column_normalize_buggy.py:24`" in lines
    assert any(line.startswith("**jacobian** `missing_offdiag`: missing off-diagonal terms") for line in lines)
    assert "grad\\_output" in text  # '_' is escaped in prose
    assert "_hint_: each output depends on the other entries along dim 0" in text
    assert text.count("| `∂out[") == 2 and "… 16 more: \\-\\-output" not in text
    assert "… 16 more: --output json:FILE lists all 18" in text
    assert "<details><summary>heatmap ∂out (3,3) / ∂x (3,3)</summary>" in lines
    assert "out[0,0]  o..|X..|X.." in lines  # inside a fenced block: verbatim
    assert "```sh" in lines and "gradverify check specs/column_normalize_buggy.py --op ColumnNormalize --shape 3,3 " \
                                "--dtype float64 --device cpu --seed 0 --domain positive" in lines
    assert render_github_summary(sample_report(), max_entries=2) == text


def test_user_text_cannot_become_markup_or_break_a_table() -> None:
    case = failing_case(op="Norm[affine]|<b>*x*</b>")
    text = render_markdown(Report(cases=(case,)))
    assert "**Norm\\[affine\\]\\|&lt;b&gt;\\*x\\*&lt;/b&gt;**" in text
    assert "<b>" not in text
    assert md("# not a heading") == "\\# not a heading" and md("1. not a list") == "1\\. not a list"
    assert code("a`b") == "`` a`b ``" and code("x|y", cell=True) == "`x\\|y`"


def test_passing_report_is_a_table_and_notes() -> None:
    case = passing_case(notes=("used the default shape 3,4",))
    text = render_markdown(Report(cases=(case,)))
    assert text.startswith("## gradverify: 1 case: 1 passed\n") and "###" not in text
    assert "- _note_ (Linear input(4,3) weight(5,3) float32 cpu): used the default shape 3,4" in text


@pytest.mark.filterwarnings("ignore:Failed to initialize NumPy")
def test_cli_writes_markdown_files_beside_the_terminal_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output FILE.md` and `--output md:FILE` write Markdown (not workflow commands), and writing
    a file leaves the terminal report on stdout."""
    from test_readme import run_check

    by_suffix, by_name = tmp_path / "report.md", tmp_path / "summary.txt"
    code, out = run_check(f"specs/column_normalize_buggy.py --shape 3,3 --domain positive --output {by_suffix} "
                          f"--output md:{by_name}", monkeypatch)
    assert code == 1
    for path in (by_suffix, by_name):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("## gradverify: 1 case: 1 failed\n") and "::error" not in text
        assert "**jacobian** `missing_offdiag`" in text
    assert "FAIL ColumnNormalize x(3,3) float64 cpu" in out and "[missing_offdiag]" in out
