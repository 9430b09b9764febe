"""Output plumbing through the real entry point: --format, --output, --html, --exit-zero, CI, GitHub."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import SPECS, run_cli

BUGGY = str(SPECS / "column_normalize_buggy.py")
RAISES = '''\
import torch
import gradverify as gv


@gv.check(inputs={"x": gv.tensor(2)})
class Raises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        raise ValueError("forward is broken")

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output
'''


def _backward_lines(path: str) -> tuple[int, int]:
    """`def backward` and the `@staticmethod` above it (inspect reports the decorator's line)."""
    lines = Path(path).read_text().splitlines()
    line = next(k for k, text in enumerate(lines, 1) if "def backward" in text)
    return line - 1, line


def test_report_files_and_the_full_report_on_stdout(tmp_path: Path) -> None:
    raises = tmp_path / "raises.py"
    raises.write_text(RAISES)
    result = run_cli("check", BUGGY, str(SPECS / "column_normalize.py"), str(raises), "--device", "cpu",
                     "--device", "cuda:63", "--output", "junit:reports/junit.xml", "--output", "out.json",
                     "--html", "page.html", cwd=tmp_path)
    assert result.code == 1, result.stderr
    # stdout: the terminal report, whatever files are written (outputs are independent of it)
    assert "FAIL ColumnNormalize" in result.stdout and "ERROR Raises" in result.stdout
    assert "6 cases: 1 passed, 1 failed, 1 error, 3 skipped" in result.stdout
    assert "[missing_offdiag]" in result.stdout
    assert "wrote the junit report to reports/junit.xml" in result.stderr

    suite = ET.parse(tmp_path / "reports/junit.xml").getroot().find("testsuite")
    # one testcase per case
    assert suite is not None and suite.get("tests") == "6"
    assert suite.get("failures") == "1" and suite.get("errors") == "1"
    by_name = {(c.get("classname", "").rsplit(".", 1)[-1], c.get("name")): c for c in suite.iter("testcase")}
    assert len(by_name) == len(suite.findall("testcase"))  # unique even with two ColumnNormalize specs
    jac = by_name["column_normalize_buggy", "ColumnNormalize[x(3,3) float64 cpu]"]
    failure = jac.find("failure")
    assert failure is not None and "jacobian 18 / 81 [missing_offdiag]" in failure.get("message", "")
    assert int(jac.get("line", 0)) in _backward_lines(BUGGY)
    assert "forward is broken" in by_name["raises", "Raises[x(2) float64 cpu]"].find("error").get("message", "")
    assert by_name["column_normalize", "ColumnNormalize[x(3,3) float64 cuda:63]"].find("skipped") is not None

    report = json.loads((tmp_path / "out.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["failed", "skipped", "passed", "skipped", "error", "skipped"]
    page = (tmp_path / "page.html").read_text()
    assert "<html" in page and "missing_offdiag" in page
    # written whole via a temp file and a rename: nothing left behind, readable like any other file
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "junit.xml", "out.json", "page.html", "raises.py"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_on_ci_the_log_is_bounded_github_annotates_and_exit_zero_reports_without_failing(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = run_cli("check", BUGGY, "--max-entries", "2", "--output", "github:gh.txt", "--exit-zero", cwd=tmp_path,
                     env={"CI": "true", "GRADVERIFY_FORMAT": "plain", "GITHUB_STEP_SUMMARY": str(summary),
                          "GITHUB_WORKSPACE": str(SPECS.parent)})
    assert result.code == 0, result.stderr
    # GRADVERIFY_FORMAT asks for plain on stdout; CI keeps the log bounded and points at JSON for the rest
    assert "\x1b[" not in result.stdout and "[missing_offdiag]" in result.stdout
    assert result.stdout.count("  -0.0") == 2 and "… 16 more: --output json:FILE lists all 18" in result.stdout
    annotations = (tmp_path / "gh.txt").read_text()
    assert any(f"::error file=specs/column_normalize_buggy.py,line={line},"
               "title=gradverify%3A ColumnNormalize[x(3%2C3) float64 cpu] jacobian failed::" in annotations
               for line in _backward_lines(BUGGY))
    text = summary.read_text()
    assert text.startswith("earlier step\n## gradverify: 1 case: 1 failed")  # appended, not replaced
    assert "**jacobian** `missing_offdiag`" in text  # the Markdown report


def test_usage_errors_exit_2_in_one_line_even_with_exit_zero(tmp_path: Path) -> None:
    for args, env, needle in [
        (["--output", "report.bin", "--exit-zero"], {}, "--output 'report.bin': say the format as FORMAT:FILE"),
        (["--output", "junit:"], {}, "no file name after the format"),
        ([], {"GRADVERIFY_FORMAT": "xml"}, "GRADVERIFY_FORMAT"),
        (["--format", "yaml"], {}, "--format 'yaml'"),
    ]:
        result = run_cli("check", BUGGY, *args, cwd=tmp_path, env=env)
        assert result.code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_changed_files_with_nothing_to_check_exit_0_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "util.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("hello\n")
    plain = run_cli("check", "--changed", "util.py", "README.md", "missing.py", cwd=tmp_path)
    assert plain.code == 0 and "nothing to check" in plain.stdout, plain.stderr
    junit = run_cli("check", "--changed", "util.py", "--format", "junit", cwd=tmp_path)
    assert junit.code == 0 and ET.fromstring(junit.stdout).get("tests") == "0"
