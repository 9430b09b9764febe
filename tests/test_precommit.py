"""Choosing specs for changed files, and the hook under the real pre-commit in a real git repository."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

from gradverify.precommit import is_spec, select_specs

OP = '''\
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
        return {grad}
'''
RIGHT = "grad_output / s - (grad_output * x).sum(0) / s**2"
WRONG = "grad_output * (1 / s - x / s**2)  # diagonal only"

SPEC = '''\
import gradverify as gv
from ops.normalize import Normalize


@gv.check(inputs={"x": gv.tensor(3, 3, domain="positive")})
class NormalizeSpec(Normalize):
    pass
'''


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


# --- which files are specs --------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "import torch\nimport gradverify as gv\nclass F(torch.autograd.Function): pass\n",
    "from torch.autograd import Function as Fn\nimport gradverify\nclass F(Fn): pass\n",
    "from torch import autograd\nfrom gradverify import tensor\nclass F(autograd.Function): pass\n",
    "import gradverify as g\nfrom ops import Base\n@g.check(inputs={})\nclass F(Base): pass\n",
    "from gradverify import check as chk\nfrom ops import Base\n@chk()\nclass F(Base): pass\n",
    "import gradverify\nclass F(torch.autograd.Function:\n",  # broken: run it so the error blocks
])
def test_python_specs_are_recognised_from_their_text(tmp_path: Path, source: str) -> None:
    path = tmp_path / "spec.py"
    path.write_text(source)
    assert is_spec(path)


@pytest.mark.parametrize("name,source", [
    ("op.py", "import torch\nclass F(torch.autograd.Function): pass\n"),  # an op, not a spec
    ("tool.py", "import gradverify\nclass Helper: pass\n"),  # uses gradverify, defines no Function
    ("test_ops.py", "import torch, gradverify\nclass F(torch.autograd.Function): pass\n"),  # pytest's
    ("notes.txt", "import gradverify\nclass F(torch.autograd.Function): pass\n"),
    ("ci.yml", "run: python scripts/build.py --fast\n"),
])
def test_other_files_are_not_specs(tmp_path: Path, name: str, source: str) -> None:
    path = tmp_path / name
    path.write_text(source)
    assert not is_spec(path)


def test_yaml_spec_names_its_op_as_file_colon_class(tmp_path: Path) -> None:
    path = tmp_path / "normalize.yaml"
    path.write_text("op: ../ops/normalize.py:Normalize\ninputs:\n  x: [3, 3]\n")
    assert is_spec(path)


# --- which specs cover a changed file ---------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    _write(tmp_path, {
        "ops/__init__.py": "",
        "ops/normalize.py": "from ops.helpers import total\nimport torch\nclass Normalize(torch.autograd.Function): pass\n",
        "ops/helpers.py": "def total(x): return x.sum(0)\n",
        "ops/linear.py": "import torch\nclass Linear(torch.autograd.Function): pass\n",
        "specs/normalize_spec.py": "import gradverify as gv\nfrom ops.normalize import Normalize\n"
                                   "@gv.check()\nclass N(Normalize): pass\n",
        "specs/linear.yaml": "op: ../ops/linear.py:Linear\n",
        "pkg/__init__.py": "",
        "pkg/act.py": "import torch\nclass Act(torch.autograd.Function): pass\n",
        "pkg/act_spec.py": "import gradverify as gv\nfrom .act import Act\n@gv.check()\nclass A(Act): pass\n",
        "README.md": "docs\n",
        "util.py": "x = 1\n",
    })
    return tmp_path


def _select(project: Path, *changed: str, search: tuple[str, ...] = ()) -> list[str]:
    return [str(p) for p in select_specs([project / c for c in changed], [project / s for s in search], root=project)]


def test_changed_specs_are_selected_and_other_files_ignored(project: Path) -> None:
    assert _select(project, "specs/normalize_spec.py", "README.md", "util.py") == ["specs/normalize_spec.py"]
    assert _select(project, "README.md", "util.py", "gone.py") == []


def test_a_changed_op_selects_the_specs_that_import_it(project: Path) -> None:
    assert _select(project, "ops/normalize.py") == ["specs/normalize_spec.py"]
    assert _select(project, "ops/helpers.py") == ["specs/normalize_spec.py"]  # imported through normalize.py
    assert _select(project, "pkg/act.py") == ["pkg/act_spec.py"]  # a relative import
    assert _select(project, "ops/linear.py") == ["specs/linear.yaml"]  # named by the YAML spec
    assert _select(project, "ops/linear.py", "ops/normalize.py") == ["specs/linear.yaml", "specs/normalize_spec.py"]


def test_the_search_for_covering_specs_can_be_narrowed(project: Path) -> None:
    assert _select(project, "ops/linear.py", "ops/normalize.py", search=("specs/normalize_spec.py",)) == [
        "specs/normalize_spec.py"]
    assert _select(project, "ops/normalize.py", search=("pkg",)) == []


# --- the real pre-commit ----------------------------------------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("git") is None or shutil.which("pre-commit") is None,
                                 reason="needs git and pre-commit on PATH")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "GRADVERIFY_FORMAT", "GIT_DIR", "GIT_INDEX_FILE")}
    env.update({"PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"), "NO_COLOR": "1", "PRE_COMMIT_COLOR": "never",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)})
    return env


@needs_tools
def test_manifest_is_valid_for_pre_commit(tmp_path: Path) -> None:
    done = subprocess.run(["pre-commit", "validate-manifest", str(REPO / ".pre-commit-hooks.yaml")],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (REPO / ".pre-commit-hooks.yaml").read_text()
    assert "require_serial: true" in text and "entry: gradverify check --changed" in text


@needs_tools
def test_real_pre_commit_blocks_a_broken_backward_and_lets_the_fix_through(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    env = _env(tmp_path)
    # The README's `repo: local` recipe; the entry runs the gradverify under test.
    entry = f"{shlex.quote(sys.executable)} -m gradverify check --changed"
    _write(repo, {
        "ops/__init__.py": "",
        "ops/normalize.py": OP.format(grad=RIGHT),
        "normalize_spec.py": SPEC,
        ".pre-commit-config.yaml": f"""\
            repos:
              - repo: local
                hooks:
                  - id: gradverify
                    name: gradverify
                    entry: {entry}
                    language: system
                    files: \\.(py|ya?ml)$
                    require_serial: true
            """,
    })

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=300)

    assert git("init", "-q").returncode == 0
    installed = subprocess.run(["pre-commit", "install"], cwd=repo, capture_output=True, text=True, env=env,
                               timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    git("add", "-A")
    first = git("commit", "-m", "correct op and its spec")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "gradverify" in first.stdout + first.stderr and "Passed" in first.stdout + first.stderr

    # Only the op file changes: the spec that imports it must run and block the commit.
    (repo / "ops/normalize.py").write_text(OP.format(grad=WRONG))
    git("add", "ops/normalize.py")
    blocked = git("commit", "-m", "diagonal-only backward")
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0, out
    assert "Failed" in out and "[missing_offdiag]" in out and "NormalizeSpec" in out
    assert git("rev-list", "--count", "HEAD").stdout.strip() == "1"

    (repo / "ops/normalize.py").write_text(OP.format(grad=RIGHT) + "\n# fixed\n")
    (repo / "NOTES.md").write_text("not python\n")
    git("add", "-A")
    fixed = git("commit", "-m", "fix the backward")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert git("rev-list", "--count", "HEAD").stdout.strip() == "2"

    # A Python file no spec covers: the hook runs, finds nothing to check, and passes.
    (repo / "util.py").write_text("x = 1\n")
    git("add", "util.py")
    quiet = git("commit", "-m", "unrelated")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
