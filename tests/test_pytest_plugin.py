"""The pytest plugin, loaded through its pytest11 entry point: spec files collected as test items
(`pytest --gradverify`), and the `gradverify_check` fixture."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch  # noqa: F401  pytester's in-process runs drop modules they imported; torch cannot load twice

from conftest import REPO, SPECS

pytest_plugins = ["pytester"]

TEST_FILE = '''
import torch


class ColumnNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output / s - (grad_output * x).sum(0) / s**2


class DiagonalOnly(ColumnNormalize):
    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output * (1 / s - x / s**2)


def _x():
    return torch.rand(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5


def test_right_backward(gradverify_check):
    report = gradverify_check(ColumnNormalize, _x())
    assert report.ok


def test_wrong_backward(gradverify_check):
    gradverify_check(DiagonalOnly, _x())
'''

SUMMARY = "x(3,3) float64 cpu: jacobian FAIL: 18 / 81 Jacobian entries mismatched [missing_offdiag]"


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # On CI pytest prints whole messages in its short summary, and a narrow terminal cuts them:
    # these tests read that line as a user's wide local terminal shows it.
    for name in ("CI", "BUILD_NUMBER", "GITHUB_ACTIONS", "GRADVERIFY_FORMAT", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "400")


def _import_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses (and xdist's workers) import this checkout's gradverify, not an installed one."""
    current = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), current] if current else [str(REPO)]))


def _glob(text: str) -> str:
    """`text` for fnmatch_lines, where `[` and `]` would start a character class."""
    return "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in text)


def _failure_first_line(out: list[str], name: str) -> str:
    """The first line under a failure's `____ name ____` header."""
    header = next(k for k, line in enumerate(out) if line.startswith("_") and f" {name} " in line)
    return out[header + 1]


# --- the fixture ------------------------------------------------------------------------------


def test_fixture_fails_a_wrong_backward_with_the_summary_first_and_passes_a_right_one(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ops=TEST_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "test_wrong_backward" in out
    assert "18 / 81" in out and "[missing_offdiag]" in out
    assert "gradverify/api.py" not in out  # the report, not a traceback into gradverify
    first = _failure_first_line(result.stdout.lines, "test_wrong_backward")
    assert first == f"DiagonalOnly {SUMMARY} (also failing: gradcheck)"
    result.stdout.fnmatch_lines([_glob(f"FAILED test_ops.py::test_wrong_backward - Failed: {first}")])


def test_fixture_repro_says_how_to_reproduce_the_tests_own_tensors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ops=TEST_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "wrong")
    lines = result.stdout.lines
    header = next(k for k, line in enumerate(lines) if line.startswith("_") and " test_wrong_backward " in line)
    assert lines[header + 2] == (
        "reproduce: pytest 'test_ops.py::test_wrong_backward' (the inputs are the test's own tensors, not drawn "
        "by gradverify from a seed: seed the test's own random generator to make them reproducible)")
    # No gradverify command line: --seed would draw other values than the test's tensors.
    assert "--seed" not in result.stdout.str() and "reproduce: gradverify" not in result.stdout.str()


def test_bad_call_is_a_one_line_test_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="def test_not_a_function(gradverify_check):\n    gradverify_check(len, 1)\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    # len is a callable like any other: its forward raises, which is a failing case, said in one line.
    result.stdout.fnmatch_lines(["*forward raised TypeError: object of type 'int' has*"])


SCALED_TEST = '''
import torch

from gradverify.report import Status


class SlightlyOff(torch.autograd.Function):
    """exp(x) with a backward 0.3% too large: within rtol 1e-2, beyond gradcheck's default rtol 1e-3."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        y, = ctx.saved_tensors
        return grad_output * y * 1.003


def _x():
    return torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _gradcheck(report):
    return next(c for c in report.cases[0].checks if c.name == "gradcheck")


def test_loose_tolerances_reach_gradcheck(gradverify_check):
    report = gradverify_check(SlightlyOff, _x(), rtol=1e-2)
    assert _gradcheck(report).status is Status.PASSED, _gradcheck(report).message


def test_without_them_gradcheck_fails_on_its_own():
    import gradverify

    report = gradverify.verify(SlightlyOff, _x())
    assert _gradcheck(report).status is Status.FAILED, _gradcheck(report).message
'''


def test_fixture_tolerances_reach_torch_gradcheck(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tol=SCALED_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_loading_the_plugin_does_not_import_torch() -> None:
    # pytest loads the plugin in every session of an environment with gradverify installed.
    code = "import sys, gradverify.pytest_plugin; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr


# --- spec files as test items -------------------------------------------------------------------

# A Function defined elsewhere, subclassed and decorated in a spec in a subfolder.
OP_FILE = '''
import torch


class Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = x.sum(0)
        ctx.save_for_backward(x, s)
        return x / s

    @staticmethod
    def backward(ctx, grad_output):
        x, s = ctx.saved_tensors
        return grad_output * (1 / s - x / s**2)  # BUG: the diagonal only
'''
SUBCLASS_SPEC = '''
import gradverify as gv
from mypkg.normalize import Normalize


@gv.check(inputs={"x": gv.tensor(3, 3, domain="positive")})
class NormalizeSpec(Normalize):
    pass
'''
# A spec named by a YAML spec beside it: collected through the YAML only.
SOFTPLUS = '''
import torch
import gradverify as gv


class Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta=1.0):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return torch.nn.functional.softplus(x, beta=beta)

    @staticmethod
    def backward(ctx, grad_out):
        x, = ctx.saved_tensors
        return grad_out * torch.sigmoid(ctx.beta * x), None
'''
# Two ops that differ only in a plain value: their items are told apart by it.
SOFTPLUS_YAML = '''
ops:
  - function: softplus.py:Softplus
    inputs: {x: {shape: [3]}, beta: 1.0}
  - function: softplus.py:Softplus
    inputs: {x: {shape: [3]}, beta: 2.0}
'''


@pytest.fixture
def spec_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", pyproject="[tool.gradverify]\ngradcheck = 'fast'\n")
    for name in ("linear.py", "column_normalize_buggy.py", "matmul.yaml", "ops/matmul.py"):
        target = pytester.path / "specs" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((SPECS / name).read_text())
    files = {"mypkg/__init__.py": "", "mypkg/normalize.py": OP_FILE, "specs/sub/normalize_spec.py": SUBCLASS_SPEC,
             "specs/softplus.py": SOFTPLUS, "specs/softplus.yaml": SOFTPLUS_YAML,
             "specs/helpers.py": "import gradverify\n\ndef shapes():\n    return [(3, 3)]\n",
             "test_plain.py": "def test_plain():\n    pass\n"}
    for name, text in files.items():
        (pytester.path / name).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / name).write_text(text)
    return pytester


EXPECTED_ITEMS = [
    "specs/column_normalize_buggy.py::ColumnNormalize[x(3,3) float64 cpu]",
    "specs/linear.py::LinearFunction[input(4,3) weight(5,3) bias(5) float64 cpu]",
    "specs/linear.py::LinearFunction[input(4,3) weight(5,3) float64 cpu]",
    "specs/matmul.yaml::MatMul[a(2,3) b(3,4) float64 cpu]",
    "specs/matmul.yaml::MatMul[a(2,3) b(3,4) float32 cpu]",
    "specs/matmul.yaml::MatMul[a(1,5) b(5,2) float64 cpu]",
    "specs/matmul.yaml::MatMul[a(1,5) b(5,2) float32 cpu]",
    "specs/softplus.yaml::Softplus[x(3) float64 cpu beta=1.0]",
    "specs/softplus.yaml::Softplus[x(3) float64 cpu beta=2.0]",
    "specs/sub/normalize_spec.py::NormalizeSpec[x(3,3) float64 cpu]",
]


def _collected(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stdout.lines if "::" in line and not line.startswith(("FAILED", "ERROR"))]


def test_spec_files_are_collected_one_item_per_op_and_case(spec_project: pytest.Pytester) -> None:
    result = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs", "--collect-only", "-q")
    assert result.ret == 0, result.stdout.str()
    # Not the helper module, nor softplus.py on its own (its YAML spec is its spec), nor ops/.
    assert _collected(result) == EXPECTED_ITEMS
    # Marked: `-m gradverify` keeps the spec cases and nothing else.
    marked = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs", "test_plain.py",
                                    "--collect-only", "-q", "-m", "gradverify")
    assert _collected(marked) == EXPECTED_ITEMS


def test_without_the_option_specs_are_not_collected_and_torch_is_not_imported(
        spec_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_project.makeconftest("import sys\n\ndef pytest_sessionfinish(session):\n"
                              "    open('torch_loaded.txt', 'w').write(str('torch' in sys.modules))\n")
    _import_this_checkout(monkeypatch)
    result = spec_project.runpytest_subprocess("-p", "no:cacheprovider", "specs", "test_plain.py")
    result.assert_outcomes(passed=1)
    assert (spec_project.path / "torch_loaded.txt").read_text() == "False"


def test_items_run_with_k_selection_and_a_failure_starts_with_the_summary(spec_project: pytest.Pytester) -> None:
    result = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs", "-k",
                                    "(LinearFunction and not bias) or ColumnNormalize or NormalizeSpec")
    result.assert_outcomes(passed=1, failed=2)
    for name, op, path in (("ColumnNormalize[x(3,3) float64 cpu]", "ColumnNormalize", "specs/column_normalize_buggy.py"),
                           ("NormalizeSpec[x(3,3) float64 cpu]", "NormalizeSpec", "specs/sub/normalize_spec.py")):
        first = _failure_first_line(result.stdout.lines, name)
        assert first.startswith(f"{op} {SUMMARY}"), first
        result.stdout.fnmatch_lines([_glob(f"FAILED {path}::{name} - {op} {SUMMARY}") + "*"])
    # The plain report follows, with the command line that reproduces the case.
    result.stdout.fnmatch_lines(["*reproduce: gradverify check specs/column_normalize_buggy.py --op ColumnNormalize *"])


STATUSES = '''
import torch
import gradverify as gv


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad_output):
        return 2 * grad_output


@gv.check(inputs={"x": gv.tensor(4, domain="nonzero")}, surrogate="straight-through estimator")
class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


@gv.check(inputs={"x": gv.tensor(2, 3), "b": gv.tensor(3)})
class AddBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b):
        return x + b

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, grad_output  # b's gradient left for the engine to sum-reduce
'''


def test_case_statuses_become_pytest_outcomes_and_settings_come_from_pyproject(pytester: pytest.Pytester) -> None:
    # [tool.gradverify] shapes apply to the op that declares none: "3;3" gives it one shape too many.
    pytester.makefile(".toml", pyproject="[tool.gradverify]\nshapes = [\"3\", \"3;3\"]\ndtypes = [\"float64\", \"float32\"]\n")
    pytester.makepyfile(statuses=STATUSES)
    result = pytester.runpytest("-p", "no:cacheprovider", "--gradverify", "statuses.py", "-rsx", "-v")
    # Double: 2 shape sets x 2 dtypes; RoundSTE and AddBias declare their shapes: their 2 dtypes each.
    result.assert_outcomes(passed=4, skipped=2, xfailed=2, warnings=2)
    result.stdout.fnmatch_lines([
        "*statuses.py::Double[[]x(3) float32 cpu[]] PASSED*",
        "*statuses.py::Double[[]x(?) float64 cpu[]] SKIPPED (--shape 3;3 gives 2 shapes but Double takes 1 tensor*",
        "*GradverifyWarning: AddBias x(2,3) b(3) float64 cpu: contracts WARN: gradient for b has shape (2, 3)*"
        "[[]engine_reduced[]]",
        "SKIPPED [[]2[]] statuses.py: --shape 3;3 gives 2 shapes*",  # at the item, not inside the plugin
        "XFAIL statuses.py::RoundSTE[[]x(4) float64 cpu[]] - RoundSTE x(4) float64 cpu: jacobian XFAIL: 4 / 16 "
        "Jacobian entries mismatched (expected: straight-through estimator)*",
    ])


def test_last_failed_reruns_only_the_failing_cases(spec_project: pytest.Pytester) -> None:
    first = spec_project.runpytest("--gradverify", "specs")
    first.assert_outcomes(passed=8, failed=2)
    again = spec_project.runpytest("--gradverify", "specs", "--lf", "-v")
    again.assert_outcomes(failed=2)  # files without a failure are skipped, the rest deselected
    again.stdout.fnmatch_lines(["run-last-failure: rerun previous 2 failures*"])
    again.stdout.fnmatch_lines(["*" + _glob("specs/column_normalize_buggy.py::ColumnNormalize[x(3,3) float64 cpu] FAILED*")])


def test_junit_from_pytest_has_one_testcase_per_case(spec_project: pytest.Pytester) -> None:
    result = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs", "--junitxml=report.xml")
    result.assert_outcomes(passed=8, failed=2)
    cases = ET.parse(spec_project.path / "report.xml").getroot().iter("testcase")
    by_name = {(case.get("classname"), case.get("name")): case for case in cases}
    assert len(by_name) == len(EXPECTED_ITEMS)
    failing = by_name[("specs.column_normalize_buggy", "ColumnNormalize[x(3,3) float64 cpu]")]
    failure = failing.find("failure")
    assert failure is not None and failure.get("message", "").startswith(f"ColumnNormalize {SUMMARY}")
    assert "reproduce: gradverify check" in (failure.text or "")


def test_a_broken_spec_is_a_one_line_collection_error(spec_project: pytest.Pytester) -> None:
    (spec_project.path / "specs/broken.py").write_text("import torch\nimport gradverify\nclass F(torch.autograd.Function:\n")
    result = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs/broken.py")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # pytest stops on collection errors
    result.assert_outcomes(errors=1)  # gradverify's, not also pytest's own import of the file
    result.stdout.fnmatch_lines(["gradverify: *specs/broken.py:3:*: invalid Python syntax*"])
    assert "Traceback" not in result.stdout.str()


def test_a_spec_named_on_the_command_line_is_imported_once(spec_project: pytest.Pytester) -> None:
    # pytest's own Python collector takes any .py file named on the command line; importing a
    # spec as a test module too would run its code twice.
    (spec_project.path / "specs/counted.py").write_text(
        "import torch\nimport gradverify as gv\n\nwith open('imports.log', 'a') as log:\n    log.write('import\\n')\n\n\n"
        "@gv.check(inputs={'x': gv.tensor(4)})\nclass Twice(torch.autograd.Function):\n"
        "    @staticmethod\n    def forward(ctx, x):\n        return x * 2\n\n"
        "    @staticmethod\n    def backward(ctx, grad):\n        return grad * 2\n")
    result = spec_project.runpytest("-p", "no:cacheprovider", "--gradverify", "specs/counted.py", "specs/linear.py")
    result.assert_outcomes(passed=3)
    assert (spec_project.path / "imports.log").read_text() == "import\n"


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None,
                    reason="pytest-xdist is not installed (it is in the `test` extra)")
def test_xdist_spreads_the_cases_over_workers(spec_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _import_this_checkout(monkeypatch)
    result = spec_project.runpytest_subprocess("-p", "no:cacheprovider", "--gradverify", "specs", "-n", "2", "-v")
    result.assert_outcomes(passed=8, failed=2)
    # `[gw1] [ 10%] PASSED specs/linear.py::LinearFunction[...]`: every case once, on both workers.
    ran = [re.match(r"\[(gw\d)\] \[ *\d+%\] (?:PASSED|FAILED) (.+)$", line) for line in result.stdout.lines]
    assert {m.group(1) for m in ran if m} == {"gw0", "gw1"}
    assert sorted(m.group(2).strip() for m in ran if m) == sorted(EXPECTED_ITEMS)
