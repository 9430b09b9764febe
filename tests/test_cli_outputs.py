"""Output plumbing through the real entry point: --format, --output, --html, --exit-zero, CI, GitHub."""

from __future__ import annotations

import json
import os
import stat
import threading
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


def test_report_files_and_the_terminal_report_are_independent(tmp_path: Path) -> None:
    raises = tmp_path / "raises.py"
    raises.write_text(RAISES)
    result = run_cli("check", BUGGY, str(SPECS / "column_normalize.py"), str(raises), "--device", "cpu",
                     "--device", "cuda:63", "--output", "junit:reports/junit.xml", "--output", "out.json",
                     "--html", "page.html", "--output", "summary.md", cwd=tmp_path)
    assert result.code == 1, result.stderr
    # stdout: the whole terminal report, as without report files
    assert "18 / 81" in result.stdout and "[missing_offdiag]" in result.stdout and "forward is broken" in result.stdout
    assert "6 cases: 1 passed, 1 failed, 1 error, 3 skipped" in result.stdout
    assert "wrote the junit report to reports/junit.xml" in result.stderr

    suite = ET.parse(tmp_path / "reports/junit.xml").getroot().find("testsuite")
    # one testcase per case (the failing checks are in its message), so the counts are the report's
    assert suite is not None and suite.get("failures") == "1" and suite.get("errors") == "1"
    assert suite.get("skipped") == "3" and suite.get("tests") == "6"
    by_name = {(c.get("classname", "").rsplit(".", 1)[-1], c.get("name")): c for c in suite.iter("testcase")}
    assert len(by_name) == len(suite.findall("testcase"))  # unique even with two ColumnNormalize specs
    case = by_name["column_normalize_buggy", "ColumnNormalize[x(3,3) float64 cpu]"]
    failure = case.find("failure")
    assert failure is not None and "18 / 81" in (failure.text or "") and failure.get("type") == "missing_offdiag"
    assert "jacobian" in failure.get("message", "") and "gradcheck" in failure.get("message", "")
    assert int(case.get("line", 0)) in _backward_lines(BUGGY)
    assert "forward is broken" in by_name["raises", "Raises[x(2) float64 cpu]"].find("error").get("message", "")
    assert by_name["column_normalize", "ColumnNormalize[x(3,3) float64 cuda:63]"].find("skipped") is not None
    assert by_name["column_normalize", "ColumnNormalize[x(3,3) float64 cpu]"].find("failure") is None

    report = json.loads((tmp_path / "out.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["failed", "skipped", "passed", "skipped", "error", "skipped"]
    page = (tmp_path / "page.html").read_text()
    assert "<html" in page and "missing_offdiag" in page
    markdown = (tmp_path / "summary.md").read_text()  # Markdown, not GitHub workflow commands
    assert markdown.startswith("## gradverify") and "|" in markdown and "::error" not in markdown
    # written whole via a temp file and a rename: nothing left behind, readable like any other file
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "junit.xml", "out.json", "page.html", "raises.py", "summary.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_quiet_keeps_only_failing_cases_and_the_counts(tmp_path: Path) -> None:
    result = run_cli("check", BUGGY, "-q", "--output", "json:out.json", cwd=tmp_path)
    assert result.code == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    # the summary table of the failing case and the counts; no diagnosis, no entries, no heatmap
    assert lines[-1] == "1 case: 1 failed" and any(line.startswith("x(3,3)") and "FAIL" in line for line in lines)
    assert "missing_offdiag" not in result.stdout and "reproduce:" not in result.stdout and len(lines) <= 7
    assert json.loads((tmp_path / "out.json").read_text())["cases"][0]["status"] == "failed"


def test_json_through_a_symlink_leaves_the_symlink(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    target = tmp_path / "artifacts" / "gradverify.json"
    target.write_text("stale")
    (tmp_path / "LINK").symlink_to(target)
    result = run_cli("check", BUGGY, "--output", "json:LINK", cwd=tmp_path)
    assert result.code == 1, result.stderr
    assert (tmp_path / "LINK").is_symlink() and os.readlink(tmp_path / "LINK") == str(target)
    assert json.loads(target.read_text())["exit_code"] == 1


def test_json_to_dev_stdout_is_written_to_stdout_not_replaced(tmp_path: Path, no_replace_onto_devices: None) -> None:
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--output", "json:/dev/stdout", "--format", "json",
                     cwd=tmp_path)
    assert result.code == 0, result.stderr
    first, second = result.stdout.split("\n}\n", 1)
    assert json.loads(first + "}")["ok"] is True and json.loads(second)["ok"] is True  # the file, then --format
    assert not list(tmp_path.iterdir())


def test_a_fifo_output_is_written_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--output", f"junit:{fifo}", cwd=tmp_path)
    reader.join(timeout=60)
    assert result.code == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and ET.fromstring(received[0]).get("failures") == "0"


def test_an_unwritable_output_is_one_line_exit_2_after_the_terminal_report(tmp_path: Path,
                                                                          no_replace_onto_devices: None) -> None:
    try:
        os.mknod(tmp_path / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))  # our own /dev/full
        full = str(tmp_path / "full")
    except PermissionError:  # not root: the real /dev/full cannot be replaced by us anyway
        full = "/dev/full"
    result = run_cli("check", BUGGY, "--output", f"html:{full}", "--output", "json:ok.json", cwd=tmp_path)
    assert result.code == 2
    assert "18 / 81" in result.stdout  # the terminal report is still there
    assert result.stderr.splitlines()[-1] == (f"gradverify: error: cannot write the html report to {full}: "
                                              "No space left on device")
    assert (tmp_path / "ok.json").exists()  # the other report file is still written
    if full != "/dev/full":
        assert stat.S_ISCHR(os.stat(full).st_mode)
    (tmp_path / "file").write_text("x")
    early = run_cli("check", BUGGY, "--output", "json:file/out.json", cwd=tmp_path)
    assert early.code == 2 and early.stdout == ""  # refused before the run
    assert early.stderr == "gradverify: error: --output 'json:file/out.json': cannot write there: Not a directory\n"


def test_on_ci_nothing_is_cut_github_annotates_and_exit_zero_reports_without_failing(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = run_cli("check", BUGGY, "--max-entries", "2", "--output", "github:gh.txt", "--exit-zero", cwd=tmp_path,
                     env={"CI": "true", "GRADVERIFY_FORMAT": "plain", "GITHUB_STEP_SUMMARY": str(summary),
                          "GITHUB_WORKSPACE": str(SPECS.parent)})
    assert result.code == 0, result.stderr
    # GRADVERIFY_FORMAT asks for plain on stdout; on CI the log stays bounded by --max-entries and
    # says where the rest is (a report file), not "-v", which a CI log cannot be re-run with
    assert "\x1b[" not in result.stdout and "missing_offdiag" in result.stdout
    assert "… 16 more: --output json:FILE lists all 18" in result.stdout and "-v lists" not in result.stdout
    annotations = (tmp_path / "gh.txt").read_text()
    assert any(f"::error file=specs/column_normalize_buggy.py,line={line},"
               "title=gradverify%3A ColumnNormalize[x(3%2C3) float64 cpu] jacobian failed::" in annotations
               for line in _backward_lines(BUGGY))
    text = summary.read_text()
    assert text.startswith("earlier step\n## gradverify: 1 case: 1 failed")  # appended, not replaced
    assert "**jacobian** `missing_offdiag`" in text


def test_usage_errors_exit_2_in_one_line_even_with_exit_zero(tmp_path: Path) -> None:
    for args, env, needle in [
        (["--output", "report.bin", "--exit-zero"], {}, "--output 'report.bin': say the format as FORMAT:FILE"),
        (["--output", "junit:"], {}, "no file name after the format"),
        (["--output", "jsno:x"], {}, "unknown format 'jsno' (expected one of rich, plain, json, junit, github, md, "
                                     "html) (did you mean 'json'?)"),
        ([], {"GRADVERIFY_FORMAT": "xml"}, "GRADVERIFY_FORMAT: expected one of rich, plain, json"),
        (["--format", "yaml"], {}, "--format: expected one of rich, plain, json, junit, github, md, found 'yaml'"),
        (["--format", "html"], {}, "--format: expected one of rich, plain, json, junit, github, md, found 'html'"),
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
