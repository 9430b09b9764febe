"""The command line through its real entry point: verdicts, exit codes, one-line errors."""

from __future__ import annotations

import shutil

import pytest

from conftest import SPECS, run_cli


def _jacobian(case: dict) -> dict:
    return next(c for c in case["checks"] if c["name"] == "jacobian")


def test_diagonal_only_normalisation_names_exactly_the_off_diagonal_entries() -> None:
    result = run_cli("check", str(SPECS / "column_normalize_buggy.py"), "--shape", "3,3", "--domain", "positive",
                     "--format", "json")
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
    kinds = [d["kind"] for d in check["diagnoses"]]
    assert kinds == ["missing_offdiag"]
    assert "dim 0" in check["diagnoses"][0]["message"]
    assert "\x1b[" not in result.stdout


def test_fixed_normalisation_passes_and_terminal_report_is_readable() -> None:
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--shape", "3,3", "--domain", "positive")
    assert result.code == 0, result.stdout + result.stderr
    assert "ColumnNormalize" in result.stdout and "PASS" in result.stdout
    assert "1 case: 1 passed" in result.stdout


def test_terminal_report_points_at_entries_and_gives_a_repro_line() -> None:
    result = run_cli("check", str(SPECS / "column_normalize_buggy.py"), "--shape", "3,3", "--domain", "positive",
                     "--max-entries", "5")
    assert result.code == 1
    out = result.stdout
    assert "18 / 81" in out
    assert "∂out[" in out and "/∂x[" in out
    assert "… 13 more: --format json lists all 18" in out
    assert "[missing_offdiag]" in out
    assert "reproduce: gradverify check" in out and "--seed 0" in out
    assert "X" in out and "o..|X..|X.." in out  # the heatmap's first row for a 3x3 column coupling


@pytest.mark.parametrize("shape", ["4,3;5,3", "4,3;5,3;5"])
def test_tutorial_linear_function_passes_with_and_without_bias(shape: str) -> None:
    result = run_cli("check", str(SPECS / "linear.py"), "--shape", shape, "--format", "json")
    assert result.code == 0, result.stdout
    (case,) = result.json()["cases"]
    assert len(case["shapes"]) == len(shape.split(";"))
    assert {c["name"]: c["status"] for c in case["checks"]}["gradcheck"] == "passed"


def test_console_script_and_module_behave_the_same() -> None:
    if shutil.which("gradverify") is None:
        pytest.skip("console script not installed")
    args = ("check", str(SPECS / "column_normalize_buggy.py"), "--shape", "3,3", "--domain", "positive",
            "--format", "json")
    via_module = run_cli(*args)
    via_script = run_cli(*args, module=False)
    assert via_module.code == via_script.code == 1

    def timeless(report: dict) -> dict:  # type: ignore[type-arg]
        for case in report["cases"]:
            case.pop("duration_s")
        return report

    assert timeless(via_module.json()) == timeless(via_script.json())


def test_missing_file_is_a_one_line_usage_error() -> None:
    result = run_cli("check", "does/not/exist.py")
    assert result.code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "does/not/exist.py" in result.stderr and "file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_syntax_error_names_file_and_line(write_spec) -> None:
    path = write_spec("broken.py", """\
        import torch

        class Broken(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x)
                return x
        """)
    result = run_cli("check", str(path))
    assert result.code == 2
    assert f"{path}:5" in result.stderr and "syntax" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("check", str(path), "--debug")
    assert debug.code == 2 and "Traceback" in debug.stderr


def test_file_without_function_and_unknown_option(write_spec) -> None:
    path = write_spec("empty.py", "import torch\nfrom torch.autograd import Function\n")
    result = run_cli("check", str(path))
    assert result.code == 2 and "no torch.autograd.Function subclass" in result.stderr
    assert run_cli("check", str(path), "--no-such-flag").code == 2


def test_user_code_errors_are_failing_cases_not_crashes(write_spec) -> None:
    path = write_spec("errors.py", """\
        import torch

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

        class Fine(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * x

            @staticmethod
            def backward(ctx, g):
                x, = ctx.saved_tensors
                return 2 * x * g
        """)
    result = run_cli("check", str(path), "--format", "json")
    assert result.code == 1, result.stderr
    cases = {c["op"]: c for c in result.json()["cases"]}
    raises = cases["Raises"]
    assert raises["status"] == "error"
    forward = raises["checks"][0]
    assert "ValueError: bad input" in forward["message"] and f"{path}:6" in forward["message"]
    too_few = cases["TooFewGrads"]
    contracts = next(c for c in too_few["checks"] if c["name"] == "contracts")
    assert contracts["status"] == "failed" and contracts["summary"] == "failed: grad_count"
    assert "returned 1 gradient, forward takes 2 inputs" in contracts["message"]
    assert cases["Fine"]["status"] == "passed"
    terminal = run_cli("check", str(path))
    assert terminal.code == 1 and "Traceback" not in terminal.stdout + terminal.stderr


def test_unavailable_device_is_a_skipped_row() -> None:
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--device", "cpu", "--device", "cuda:7",
                     "--format", "json")
    assert result.code == 0
    statuses = {c["device"]: (c["status"], c["message"]) for c in result.json()["cases"]}
    assert statuses["cpu"][0] == "passed"
    assert statuses["cuda:7"][0] == "skipped" and "not available" in statuses["cuda:7"][1]


@pytest.mark.parametrize("args, expected", [
    (("--atol", "nan"), "--atol: expected a finite non-negative number"),
    (("--device", "cdua"), "--device: expected cpu, cuda, cuda:N or mps, found 'cdua'"),
    (("--output", "foo:report.txt"), "unknown format 'foo'"),
    (("--order", "3"), "--order 3"),
])
def test_bad_values_are_usage_errors_not_silent_passes(args: tuple[str, ...], expected: str, tmp_path) -> None:
    result = run_cli("check", str(SPECS / "column_normalize_buggy.py"), *args, cwd=tmp_path)
    assert result.code == 2, result.stdout + result.stderr
    assert expected in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "foo:report.txt").exists()


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
    assert f"{path}:4" in result.stderr and "domain 'posit'" in result.stderr


def test_version() -> None:
    import gradverify

    result = run_cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"gradverify {gradverify.__version__}"
