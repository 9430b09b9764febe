"""Shared helpers: write spec files into tmp folders and run the real command line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The suite runs on pytest-xdist workers, one per core (pyproject addopts): torch's own intra-op
# threads on top of that only fight over the same cores (measured on 2 cores: 100 s with torch's
# default threads against 67 s with one). Set before any test imports torch; the command lines
# and workers the tests start inherit it. A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            module: bool = True, in_process: bool = True) -> CliResult:
    """Run gradverify through its entry point, as a user would: by default the entry point
    function `gradverify.cli.main(argv)` in this process (as pre-commit's tests call its main;
    a subprocess pays a torch import, seconds each); `in_process=False` runs
    `python -m gradverify` (or, with `module=False`, the console script next to this
    interpreter) as a real subprocess."""
    # A CI variable from the machine running the suite would change truncation; tests set it explicitly.
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CI", "GITHUB_ACTIONS", "GRADVERIFY_FORMAT") and not k.startswith("GRADVERIFY_")}
    full_env.update({"NO_COLOR": "1", "COLUMNS": "120", **(env or {})})
    # GRADVERIFY_TEST_SUBPROCESS=1 runs every call as a subprocess (e.g. to run these tests
    # against an older gradverify whose main() takes no argv).
    if in_process and module and not os.environ.get("GRADVERIFY_TEST_SUBPROCESS"):
        return _run_main(list(args), cwd or REPO, full_env)
    if module:
        command = [sys.executable, "-m", "gradverify", *args]
    else:
        script = Path(sysconfig.get_path("scripts")) / ("gradverify.exe" if os.name == "nt" else "gradverify")
        assert script.is_file(), f"the console script is not installed next to {sys.executable}: pip install -e ."
        command = [str(script), *args]
    # This checkout's gradverify, whatever the cwd: an editable install may point at another one.
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, env=full_env, timeout=300)
    return CliResult(done.returncode, done.stdout, done.stderr)


def _run_main(argv: list[str], cwd: Path, env: dict[str, str]) -> CliResult:
    """`main(argv)` with this environment and working directory, stdout and stderr captured."""
    from gradverify.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec('name.py', source) -> path of a spec file holding the dedented source."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def no_replace_onto_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the code under test does, it must never rename a file over /dev or /proc (run
    as root, that would replace the machine's own /dev/stdout or /dev/full): fail instead."""
    real_replace, real_rename = os.replace, os.rename

    def guarded(real):  # type: ignore[no-untyped-def]
        def move(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if str(os.path.abspath(dst)).startswith(("/dev/", "/proc/")):
                raise AssertionError(f"renamed a file over {dst}")
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(os, "rename", guarded(real_rename))
