"""pytest plugin (entry point `pytest11`): gradient checks in a test suite, two ways.

`pytest --gradverify specs/` collects spec files (Python and YAML, recognised from their text as
`gradverify check --changed` does) as test items, one per op and case:

    specs/linear.py::LinearFunction[input(4,3) weight(5,3) float64 cpu] PASSED

so `-k`, `--lf`, `-m gradverify`, pytest's JUnit XML and pytest-xdist (`-n auto`, spreading the
cases over cores and machines) work as for any test. Settings come from `[tool.gradverify]` in
pyproject.toml and GRADVERIFY_* variables, as for the command line.

The `gradverify_check` fixture checks an op at the test's own tensors:

    def test_normalize_backward(gradverify_check):
        gradverify_check(Normalize, torch.rand(3, 4, dtype=torch.float64) + 0.1)

A failure's first line is the one-line summary (op, shapes, dtype, check, counts, diagnosis
kind); the plain gradverify report follows. pytest loads this module in every session of an
environment where gradverify is installed, so it imports neither torch nor the engine unless
`--gradverify` is given or a check runs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pytest

if TYPE_CHECKING:
    from gradverify.cases import Case
    from gradverify.config import Settings
    from gradverify.report import CaseResult, Report

CheckFn = Callable[..., "Report"]
SPEC_SUFFIXES = (".py", ".yaml", ".yml")
# The longest a check's message may run in the one-line summary before it is cut.
_SUMMARY_MESSAGE_CHARS = 160


class GradverifyWarning(UserWarning):
    """A case that passed with a finding worth reading (a warning, or a declared mismatch that no longer happens)."""


class CaseFailed(Exception):
    """Raised by a spec item whose case failed: carries the result for the failure's text."""

    def __init__(self, result: CaseResult) -> None:
        super().__init__(summary_line(result))
        self.result = result


# --- the one-line summary ---------------------------------------------------------------------


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= _SUMMARY_MESSAGE_CHARS else line[:_SUMMARY_MESSAGE_CHARS - 1] + "…"


def summary_line(case: CaseResult) -> str:
    """`ColumnNormalize x(3,3) float64 cpu: jacobian FAIL: 18 / 81 Jacobian entries mismatched [missing_offdiag]`.

    The check shown is the first failing one with mismatch counts (else the first failing one);
    the others are named after it.
    """
    from gradverify.report import Severity, Status

    failing = [check for check in case.checks if not check.ok]
    if not failing:
        # An expected failure, a warning, a declared mismatch that no longer happens: those checks.
        failing = [check for check in case.checks if check.counts and check.status is case.status
                   and case.status is not Status.PASSED]
    head = f"{case.title}: "
    if not failing:
        return head + (_first_line(case.message) or case.status.label)
    shown = next((c for c in failing if c.mismatch_count), failing[0])
    kinds = [d.kind for d in shown.diagnoses if d.severity is Severity.ERROR] or [d.kind for d in shown.diagnoses]
    line = f"{head}{shown.name} {shown.status.label}: {_first_line(shown.message) or shown.status.value}"
    if kinds:
        line += " [" + ", ".join(dict.fromkeys(kinds)) + "]"
    others = [c.name for c in failing if c is not shown]
    if others:
        line += f" (also failing: {', '.join(others)})"
    return line


def failure_text(result: CaseResult, reproduce: str | None = None) -> str:
    """What a failing item or fixture call shows: the summary line, then the plain report."""
    from gradverify.api import explain
    from gradverify.report import Report

    lines = [summary_line(result)]
    if reproduce:
        lines.append(reproduce)
    return "\n".join(lines) + "\n\n" + explain(Report(cases=(result,)))


# --- the fixture --------------------------------------------------------------------------------


def _caller_reproduce(nodeid: str | None) -> str:
    """How to reproduce a check on the test's own tensors: re-run the test (no seed reproduces them)."""
    how = f"pytest '{nodeid}'" if nodeid else "re-run this test"
    return (f"reproduce: {how} (the inputs are the test's own tensors, not drawn by gradverify from a seed: "
            "seed the test's own random generator to make them reproducible)")


def _check(fn: Any, inputs: tuple[Any, ...], options: dict[str, Any], nodeid: str | None) -> Report:
    from gradverify.api import verify
    from gradverify.errors import GradverifyError

    try:
        report = verify(fn, *inputs, **options)
    except GradverifyError as exc:
        pytest.fail(f"gradverify: {exc}", pytrace=False)
    if not report.ok:
        failing = report.failing_cases()
        texts = [failure_text(case, _caller_reproduce(nodeid) if case.inputs_from == "caller" else None)
                 for case in failing]
        pytest.fail("\n".join(texts), pytrace=False)
    return report


def check_backward(fn: Any, *inputs: Any, **options: Any) -> Report:
    """Run `gradverify.verify(fn, *inputs, **options)`; fail the current test if it finds a problem.

    Returns the Report, so a test can assert more (e.g. on a diagnosis kind) when it passes.
    `pytrace=False` keeps pytest's output to the report itself: a traceback into gradverify
    says nothing about the user's backward.
    """
    return _check(fn, inputs, options, None)


@pytest.fixture
def gradverify_check(request: pytest.FixtureRequest) -> CheckFn:
    """`gradverify_check(op, *inputs, **options)`: verify the backward at these inputs, fail the test on a problem.

    Options as for gradverify.verify (atol=, rtol=, gradcheck=, order=, ...); atol/rtol looser
    than torch.autograd.gradcheck's defaults are passed on to it, stricter ones apply to
    gradverify's own checks (gradcheck's plain finite differences are not more accurate).
    """
    nodeid = request.node.nodeid

    def check(fn: Any, *inputs: Any, **options: Any) -> Report:
        return _check(fn, inputs, options, nodeid)

    return check


# --- spec files as test items -----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradverify", "gradverify (autograd backward checks)")
    group.addoption("--gradverify", action="store_true", default=False,
                    help="collect gradverify spec files (.py, .yaml) as tests: one item per op and case. "
                         "Settings from [tool.gradverify] in pyproject.toml and GRADVERIFY_* variables.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gradverify: a case collected from a gradverify spec file (--gradverify)")
    # torch without numpy warns once per process at import (every xdist worker would repeat it);
    # gradverify needs no numpy. The command line ignores the same line.
    config.addinivalue_line("filterwarnings", "ignore:Failed to initialize NumPy:UserWarning")


def _relative(path: Path) -> Path:
    """`specs/linear.py` rather than an absolute path, for repro lines and report headers."""
    try:
        return Path(os.path.relpath(path))
    except ValueError:  # another drive (Windows)
        return path


def _named_by_yaml(path: Path, stop: Path, cache: dict[Path, set[Path]]) -> bool:
    """Whether a YAML spec in this folder or one above it (up to `stop`) names this Python file:
    then the YAML is its spec, and checking the file on its own with default shapes would be
    wrong (as `gradverify check FOLDER` does)."""
    from gradverify.precommit import YAML_SUFFIXES, is_spec, yaml_named_files

    target = path.resolve()
    folder = target.parent
    stop = stop.resolve()
    while True:
        if folder not in cache:
            named: set[Path] = set()
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                entries = []
            for entry in entries:
                if entry.suffix in YAML_SUFFIXES and entry.is_file() and is_spec(entry):
                    named |= yaml_named_files(entry, stop)
            cache[folder] = named
        if target in cache[folder]:
            return True
        if folder == stop or folder.parent == folder:
            return False
        folder = folder.parent


_SPEC_DECISIONS = pytest.StashKey[dict[Path, bool]]()
_YAML_NAMED = pytest.StashKey[dict[Path, set[Path]]]()


def _collects_as_spec(file_path: Path, parent: pytest.Collector) -> bool:
    """With --gradverify: whether this file is a spec to collect (decided from its text, once)."""
    config = parent.config
    if not config.getoption("gradverify", False) or file_path.suffix not in SPEC_SUFFIXES:
        return False
    decisions = config.stash.setdefault(_SPEC_DECISIONS, {})
    if file_path not in decisions:
        from gradverify.precommit import is_spec

        rootpath = config.rootpath
        decision = is_spec(file_path, root=rootpath)
        # A .py file that a YAML spec names is checked through that YAML, unless named itself.
        if decision and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
            stop = rootpath if rootpath in file_path.parents else file_path.parent
            decision = not _named_by_yaml(file_path, stop, config.stash.setdefault(_YAML_NAMED, {}))
        decisions[file_path] = decision
    return decisions[file_path]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _collects_as_spec(file_path, parent):
        return SpecFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """pytest's Python collector also takes a .py file named on the command line (or matching
    python_files); importing a spec as a test module too would run its code twice (every
    side effect and registration twice). SpecFile collects it; this empty node stands in for
    the test module."""
    if _collects_as_spec(module_path, parent):
        return _SpecPlaceholder.from_parent(parent, path=module_path)
    return None


class _SpecPlaceholder(pytest.File):
    """Stands in for the test module of a spec file that SpecFile collects: no tests of its own."""

    def collect(self) -> Iterable[pytest.Item]:
        return []


def case_id(case: Case) -> str:
    """`input(4,3) weight(5,3) float64 cpu`: the tensors a case passes, its dtype and device."""
    parts = []
    for param in case.tensor_inputs:
        # `x(?)`: no shape applies (a case skipped because --shape gives another number of shapes).
        shape = "?" if param.shape is None else ",".join(map(str, param.shape))
        text = f"{param.name}({shape})"
        if param.dtype and not param.is_float_tensor:
            text += f" {param.dtype}"
        parts.append(text)
    return " ".join([*parts, case.dtype, case.device])


def _unique_names(op_cases: list[tuple[str, Case]]) -> list[str]:
    """`Op[case id]` for every case of a file, told apart by their plain values (`beta=2.0`)
    where op, tensors, dtype and device are the same, then by number (node ids must be unique)."""
    base = [f"{name}[{case_id(case)}" for name, case in op_cases]
    names = []
    for (_, case), text in zip(op_cases, base):
        values = [f"{p.name}={p.value!r}" for p in case.inputs if not p.is_tensor and p.has_value]
        names.append(f"{text} {' '.join(values)}" if base.count(text) > 1 and values else text)
    seen: dict[str, int] = {}
    for k, text in enumerate(list(names)):
        if names.count(text) > 1:
            seen[text] = seen.get(text, 0) + 1
            names[k] = f"{text} #{seen[text]}"
    return [name + "]" for name in names]


class SpecFile(pytest.File):
    """One spec file: its ops' cases, expanded as `gradverify check FILE` would."""

    def collect(self) -> Iterable[pytest.Item]:
        from gradverify.api import collect_ops
        from gradverify.cases import expand_cases
        from gradverify.config import resolve_settings
        from gradverify.errors import GradverifyError, NoFunctionError
        from gradverify.runner import device_unavailable

        try:
            settings = resolve_settings({}, self.path.parent)
            ops = collect_ops([_relative(self.path)], settings)
            op_cases = [(op.name, case) for op in ops for case in expand_cases(op, settings)]
        except NoFunctionError:
            return []  # its text looked like a spec, but it defines no op: a helper module
        except GradverifyError as exc:
            raise self.CollectError(f"gradverify: {exc}") from None
        items: list[pytest.Item] = []
        for (_, case), name in zip(op_cases, _unique_names(op_cases)):
            # The id as a string, as a cache file holds it: pytest 9 parses `Op[case]` into a name
            # and parameters, and an id built from the name alone would never match it (--lf).
            item = CaseItem.from_parent(self, name=name, nodeid=f"{self.nodeid}::{name}", case=case,
                                        settings=settings)
            item.add_marker("gradverify")
            # Known before running: a skip marker, so pytest reports it at the item (`-rs`).
            reason = case.skip_reason or (None if settings.require_device else device_unavailable(case.device))
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
            items.append(item)
        return items


def _skip_here(reason: str) -> None:
    """pytest.skip, reported at the item rather than at this line of the plugin (pytest >= 7)."""
    try:
        exc = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # an older pytest
        exc = pytest.skip.Exception(reason)
    raise exc


class CaseItem(pytest.Item):
    """One op x case of a spec file, run in this process by the same runner as the command line."""

    def __init__(self, *, case: Case, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.settings = settings
        self.result: CaseResult | None = None

    def runtest(self) -> None:
        from gradverify.report import Status
        from gradverify.runner import run_case

        result = run_case(self.case, self.settings)
        self.result = result
        if result.status is Status.SKIPPED:
            _skip_here(result.message.removeprefix("skipped: ") or "skipped")
        if result.status is Status.XFAIL:
            pytest.xfail(summary_line(result))
        if not result.ok:
            raise CaseFailed(result)
        if result.status in (Status.WARNED, Status.XPASS):
            file, line, _ = self.reportinfo()
            warnings.warn_explicit(GradverifyWarning(summary_line(result)), GradverifyWarning, str(file),
                                   (line or 0) + 1)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str | Any:
        if isinstance(excinfo.value, CaseFailed):
            return failure_text(excinfo.value.result)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path | str, int | None, str]:
        """Where the op lives (its backward's line): what JUnit's file/line attributes point at."""
        op = self.case.op
        line = op.backward_line or op.line
        file = Path(op.file) if op.file and Path(op.file).is_file() else self.path
        return file, (line - 1) if line else None, self.name
