"""The command line through its entry point `main(argv)`: verdicts, exit codes, one-line errors,
the error handler, the help layout. In this process (a subprocess pays a torch import); the
real entry points are smoke-tested in test_cli_smoke.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import SPECS, run_cli

BUGGY = str(SPECS / "column_normalize_buggy.py")
FIXED = str(SPECS / "column_normalize.py")
SQUARE = '''\
import torch


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 2 * x * g
'''


def _jacobian(case: dict) -> dict:
    return next(c for c in case["checks"] if c["name"] == "jacobian")


def _one_line_error(stderr: str) -> str:
    """The whole of stderr, which must be one `gradverify: error:` line."""
    assert stderr.count("\n") == 1 and stderr.startswith("gradverify: error: "), stderr
    assert "Traceback" not in stderr and "╭" not in stderr and "\x1b" not in stderr, stderr
    return stderr.strip()


# --- verdicts ------------------------------------------------------------------------------

def test_diagonal_only_normalisation_names_exactly_the_off_diagonal_entries() -> None:
    result = run_cli("check", BUGGY, "--shape", "3,3", "--domain", "positive", "--format", "json")
    assert result.code == 1, result.stderr
    report = result.json()
    assert report["ok"] is False and report["schema_version"] == 2
    (case,) = report["cases"]
    assert case["status"] == "failed" and case["shapes"] == [[3, 3]]
    check = _jacobian(case)
    assert check["mismatch_count"] == 18 and check["total_entries"] == 81
    entries = {(tuple(m["out_index"]), tuple(m["in_index"])) for m in check["mismatches"]}
    expected = {((i, j), (k, j)) for i in range(3) for j in range(3) for k in range(3) if k != i}
    assert entries == expected  # off-diagonal within each column; no diagonal, nothing across columns
    assert [d["kind"] for d in check["diagnoses"]] == ["missing_offdiag"]
    assert "dim 0" in check["diagnoses"][0]["message"]
    assert "\x1b[" not in result.stdout


def test_fixed_normalisation_passes_and_terminal_report_is_readable() -> None:
    result = run_cli("check", FIXED, "--shape", "3,3", "--domain", "positive")
    assert result.code == 0, result.stdout + result.stderr
    assert "ColumnNormalize" in result.stdout and "PASS" in result.stdout
    assert "1 case: 1 passed" in result.stdout


def test_terminal_report_points_at_entries_and_gives_a_repro_line() -> None:
    result = run_cli("check", BUGGY, "--shape", "3,3", "--domain", "positive", "--max-entries", "5")
    assert result.code == 1
    out = result.stdout
    assert "18 / 81" in out
    assert "∂out[" in out and "/∂x[" in out
    assert "… 13 more: --format json lists all 18" in out
    assert "[missing_offdiag]" in out
    assert "reproduce: gradverify check" in out and "--seed 0" in out


@pytest.mark.parametrize("shape", ["4,3;5,3", "4,3;5,3;5"])
def test_tutorial_linear_function_passes_with_and_without_bias(shape: str) -> None:
    result = run_cli("check", str(SPECS / "linear.py"), "--shape", shape, "--format", "json")
    assert result.code == 0, result.stdout
    (case,) = result.json()["cases"]
    assert len(case["shapes"]) == len(shape.split(";"))
    assert {c["name"]: c["status"] for c in case["checks"]}["gradcheck"] == "passed"


def test_user_code_errors_are_failing_cases_not_crashes(write_spec) -> None:
    path = write_spec("errors.py", SQUARE + '''

class Raises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        raise ValueError("bad input")

    @staticmethod
    def backward(ctx, g):
        return g


class TooFewGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return x * w

    @staticmethod
    def backward(ctx, g):
        return g
''')
    result = run_cli("check", str(path), "--format", "json")
    assert result.code == 1, result.stderr
    cases = {c["op"]: c for c in result.json()["cases"]}
    forward = cases["Raises"]["checks"][0]
    assert cases["Raises"]["status"] == "error"
    line = next(k for k, text in enumerate(path.read_text().splitlines(), 1) if "bad input" in text)
    assert "ValueError: bad input" in forward["message"] and f"{path}:{line}" in forward["message"]
    contracts = next(c for c in cases["TooFewGrads"]["checks"] if c["name"] == "contracts")
    assert contracts["status"] == "failed" and contracts["summary"] == "failed: grad_count"
    assert cases["Square"]["status"] == "passed"


# --- exit codes ----------------------------------------------------------------------------

def test_every_case_skipped_exits_5_not_0() -> None:
    """Nothing checked must never read as green in CI (as pytest's exit 5)."""
    result = run_cli("check", FIXED, "--device", "cuda:7", "--format", "json")
    assert result.code == 5, result.stderr
    [case] = result.json()["cases"]
    assert case["status"] == "skipped" and "not available" in case["message"]
    mixed = run_cli("check", FIXED, "--device", "cpu", "--device", "cuda:7")
    assert mixed.code == 0  # something was checked and passed


def test_no_op_found_exits_5_with_the_reason(tmp_path: Path) -> None:
    """A file or folder with no op: nothing was checked (pytest's 5 for "no tests collected"),
    and the one line says why."""
    (tmp_path / "helpers.py").write_text("import torch\n\nSCALE = 2.0\n")
    (tmp_path / "empty").mkdir()
    for target, reason in ((tmp_path / "helpers.py", "no op is defined in this file"),
                           (tmp_path / "empty", "folder holds no .py or .yaml spec")):
        result = run_cli("check", str(target))
        assert result.code == 5 and result.stdout == "", result.stderr
        assert result.stderr.count("\n") == 1 and reason in result.stderr and str(target) in result.stderr


def test_empty_shape_reaches_the_runner_as_nothing_to_differentiate(write_spec) -> None:
    path = write_spec("square.py", SQUARE)
    result = run_cli("check", str(path), "--shape", "0,3", "--format", "json")
    assert result.code == 5, result.stderr
    [case] = result.json()["cases"]
    assert case["status"] == "skipped" and "nothing to differentiate" in case["message"]


@pytest.mark.parametrize("value", ["", " ", ";", "3;;3", "-1,3", "3,a"])
def test_a_shape_that_is_not_one_is_a_usage_error(write_spec, value: str) -> None:
    path = write_spec("square.py", SQUARE)
    result = run_cli("check", str(path), "--shape", value)
    assert result.code == 2
    assert "--shape: expected sizes like 2,3,3" in _one_line_error(result.stderr)


def test_an_arity_mismatch_skips_that_op_with_a_reason(write_spec) -> None:
    path = write_spec("two.py", SQUARE + '''

class Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x
''')
    result = run_cli("check", str(path), "--shape", "3;3", "--format", "json")
    assert result.code == 0, result.stderr
    cases = {c["op"]: c for c in result.json()["cases"]}
    assert cases["Mul"]["status"] == "passed"
    assert cases["Square"]["status"] == "skipped" and "gives 2 shapes but Square takes 1" in cases["Square"]["message"]


def test_exit_zero_turns_only_failures_green() -> None:
    assert run_cli("check", BUGGY, "--exit-zero").code == 0
    assert run_cli("check", BUGGY, "--exit-zero", "--order", "3").code == 2


# --- one-line errors, typer's included ------------------------------------------------------

def test_missing_file_is_a_one_line_usage_error() -> None:
    result = run_cli("check", "does/not/exist.py")
    assert result.code == 2
    line = _one_line_error(result.stderr)
    assert "does/not/exist.py" in line and "file not found" in line


def test_syntax_error_names_file_and_line_and_debug_shows_the_traceback(write_spec) -> None:
    path = write_spec("broken.py", "import torch\n\nclass Broken(torch.autograd.Function):\n"
                                   "    @staticmethod\n    def forward(ctx, x)\n        return x\n")
    result = run_cli("check", str(path))
    assert result.code == 2
    assert f"{path}:5" in _one_line_error(result.stderr) and "syntax" in result.stderr
    debug = run_cli("check", str(path), "--debug")
    assert debug.code == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("args, expected", [
    (["--no-such-flag"], "gradverify: error: no such option --no-such-flag (see 'gradverify check --help')"),
    (["--shap", "3"], "no such option --shap (did you mean --shape?)"),
    (["--seed"], "option '--seed' requires an argument"),
])
def test_typer_usage_errors_are_one_line_not_a_box(args: list[str], expected: str) -> None:
    result = run_cli("check", FIXED, *args)
    assert result.code == 2 and expected in _one_line_error(result.stderr)
    assert result.stdout == ""


def test_unknown_command_and_missing_argument_are_one_line() -> None:
    unknown = run_cli("chekc")
    assert unknown.code == 2 and "no such command 'chekc'" in _one_line_error(unknown.stderr)
    missing = run_cli("init")
    assert missing.code == 2 and "missing argument 'NAME'" in _one_line_error(missing.stderr)


@pytest.mark.parametrize("args, expected", [
    (("--atol", "nan"), "--atol: expected a finite non-negative number, found 'nan'"),
    (("--rtol", "inf"), "--rtol: expected a finite non-negative number, found 'inf'"),
    (("--device", "cdua"), "--device: expected cpu, cuda, cuda:N or mps, found 'cdua' (did you mean 'cuda'?)"),
    (("--dtype", "flaot32"), "--dtype: expected one of float64, float32, float16, bfloat16, complex128, "
                             "complex64, found 'flaot32' (did you mean 'float32'?)"),
    (("--domain", "postive"), "found 'postive' (did you mean 'positive'?)"),
    (("--gradcheck", "bogus"), "--gradcheck: expected one of fast, slow, off, found 'bogus'"),
    (("--gradcheck", "slwo"), "(did you mean 'slow'?)"),
    (("--mode", "fsat"), "--mode: expected one of auto, full, fast, found 'fsat' (did you mean 'fast'?)"),
    (("--check", "secnd_order"), "(did you mean 'second_order'?)"),
    (("--skip-check", "gradchek"), "(did you mean 'gradcheck'?)"),
    (("--format", "yaml"), "--format: expected one of rich, plain, json, junit, github, md, found 'yaml'"),
    (("--output", "foo:report.txt"), "unknown format 'foo'"),
    (("--order", "3"), "--order: expected 1 (gradients) or 2 (also the double backward), found '3'"),
    (("--seed", "-1"), "--seed: expected an integer from 0 to"),
    (("--seed", "99999999999999999999"), "--seed: expected an integer from 0 to"),
    (("--max-memory", "10"), "--max-memory: expected a size from 1M to 1P, like 512M or 2G, found '10'"),
    (("--timeout", "0"), "--timeout: expected a number of seconds above 0"),
    (("--jobs", "0"), "--jobs: expected an integer from 1 to 1024, found '0'"),
    (("--arg", "1x=2"), "--arg: expected NAME=VALUE"),
    (("-q", "-v"), "-q/--quiet and -v/--verbose: expected at most one of them"),
])
def test_bad_values_are_usage_errors_not_silent_passes(args: tuple[str, ...], expected: str, tmp_path: Path) -> None:
    result = run_cli("check", BUGGY, *args, cwd=tmp_path)
    assert result.code == 2, result.stdout + result.stderr
    assert expected in _one_line_error(result.stderr)
    assert not list(tmp_path.iterdir())  # nothing written


def test_spec_mistakes_in_declarations_exit_2_with_the_line(write_spec) -> None:
    path = write_spec("typo.py", """\
        import torch
        import gradverify as gv

        @gv.check(inputs={"x": gv.tensor(3, domain="posit")})
        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x

            @staticmethod
            def backward(ctx, g):
                return g
        """)
    result = run_cli("check", str(path))
    assert result.code == 2
    line = _one_line_error(result.stderr)
    assert f"{path}:4: gradverify.tensor: domain: expected one of any, positive" in line
    assert "found 'posit' (did you mean 'positive'?)" in line


def test_control_characters_from_user_text_never_reach_the_terminal(tmp_path: Path) -> None:
    """A path, an op name or a spec's text is shown escaped: no escape sequence acts."""
    name = "evil\x1b[2J\x07\r.py"
    (tmp_path / name).write_text(SQUARE)
    missing = run_cli("check", str(tmp_path / "gone\x1b[31m.py"))
    assert missing.code == 2 and "gone\\x1b[31m.py" in _one_line_error(missing.stderr)
    found = run_cli("check", str(tmp_path / name), "--op", "Nope\u202e\x1b]0;title\x07", cwd=tmp_path)
    assert found.code == 2
    line = _one_line_error(found.stderr)
    assert "evil\\x1b[2J\\x07\\r.py" in line and "Nope\\u202e\\x1b]0;title\\x07" in line


# --- the error handler: our own bugs, Ctrl-C ---------------------------------------------------

def test_an_internal_error_exits_3_with_a_log_it_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gradverify.supervise

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(gradverify.supervise, "run_supervised", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose
    result = run_cli("check", FIXED, "--shape", "3,3")
    assert result.code == 3
    line = _one_line_error(result.stderr)
    assert "internal error (a bug in gradverify, not in your code): ZeroDivisionError: a bug of ours" in line
    found = re.search(r"the log for a bug report is in (\S+)$", line)
    assert found, line
    log = Path(found.group(1))
    assert log.parent == tmp_path and log.name.startswith("gradverify-crash-")
    text = log.read_text()
    import platform
    import sys

    import torch

    import gradverify

    for fact in (f"gradverify: {gradverify.__version__}", f"torch: {torch.__version__}",
                 f"Python: {sys.version.split()[0]}", platform.platform(),
                 f"`gradverify check {FIXED} --shape 3,3`", "Traceback (most recent call last)",
                 "ZeroDivisionError: a bug of ours", "in broken"):
        assert fact in text, fact
    on_ci = run_cli("check", FIXED, env={"CI": "true", "TMPDIR": str(tmp_path)})
    assert on_ci.code == 3 and "### traceback" in on_ci.stderr  # the log also goes to the CI log


def test_ctrl_c_exits_130_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradverify.supervise

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradverify.supervise, "run_supervised", interrupted)
    result = run_cli("check", FIXED)
    assert result.code == 130
    assert result.stderr.strip() == "gradverify: interrupted" and "Traceback" not in result.stderr


def test_a_closed_stdout_is_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradverify.commands.check as check_command

    def closed(*args: object, **kwargs: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(check_command, "emit", closed)
    result = run_cli("check", FIXED)
    assert result.code == 1 and result.stderr == ""


# --- paths that cannot be looked at ---------------------------------------------------------

def test_file_name_too_long_and_symlink_loop_are_one_line_errors(tmp_path: Path) -> None:
    long_name = run_cli("check", "a" * 5000 + ".py")
    assert long_name.code == 2
    line = _one_line_error(long_name.stderr)
    assert "cannot read: File name too long" in line and len(line) < 300
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    loop = run_cli("check", str(tmp_path / "a"))
    assert loop.code == 2 and "Too many levels of symbolic links" in _one_line_error(loop.stderr)
    inside = run_cli("check", str(tmp_path / "a" / "spec.py"))
    assert inside.code == 2 and "Traceback" not in inside.stderr


def test_init_with_a_name_too_long_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("init", "x" * 300, cwd=tmp_path)
    assert result.code == 2 and "File name too long" in _one_line_error(result.stderr)


# --- help ----------------------------------------------------------------------------------

def test_check_help_is_grouped_and_has_no_type_metavars() -> None:
    result = run_cli("check", "--help", env={"COLUMNS": "100"})
    assert result.code == 0 and result.stderr == ""
    text = result.stdout
    panels = [re.sub(r"[─╭╮]", "", line).strip() for line in text.splitlines() if line.startswith("╭")]
    assert panels == ["Options", "What to check", "How to check", "Report", "Hooks (pre-commit)"], panels
    for flag in ("--shape", "--gradcheck", "--timeout", "--output", "--quiet", "--changed"):
        assert flag in text
    assert "<list" not in text and "<bool>" not in text and "<str>" not in text and "TEXT" not in text
    assert "fast|slow|off" in text and "auto|full|fast" in text  # choices from the enums
    assert max(len(line) for line in text.splitlines()) <= 100


def test_version_and_no_arguments() -> None:
    import gradverify

    result = run_cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"gradverify {gradverify.__version__}"
    bare = run_cli()
    assert bare.code == 0 and "check" in bare.stdout and "list" in bare.stdout and bare.stderr == ""
