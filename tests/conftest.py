"""Shared helpers: write spec files into tmp folders and run the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
            module: bool = True) -> CliResult:
    """Run gradverify through its real entry point, as a user would."""
    command = [sys.executable, "-m", "gradverify", *args] if module else ["gradverify", *args]
    # A CI variable from the machine running the suite would change truncation; tests set it explicitly.
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "GITHUB_ACTIONS", "GRADVERIFY_FORMAT")}
    full_env.update({"NO_COLOR": "1", "COLUMNS": "120", **(env or {})})
    # This checkout's gradverify, whatever the cwd: an editable install may point at another one.
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, env=full_env, timeout=300)
    return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec('name.py', source) -> path of a spec file holding the dedented source."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write
