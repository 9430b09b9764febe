"""Choosing specs for changed files, and the hooks under the real pre-commit in a real git repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import REPO, run_cli

from gradverify.precommit import covered_files, is_spec, select_specs

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

# Kept in specs/, a subfolder: `ops` is importable only because gradverify puts the project
# root (the folder with .git or pyproject.toml) on sys.path while importing the spec.
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
    # A custom op defined in the file, decorated or called.
    "import torch, gradverify\n@torch.library.custom_op('my::f', mutates_args=())\ndef f(x: torch.Tensor) -> torch.Tensor:\n"
    "    return x.sin()\n",
    "from torch.library import custom_op\nimport gradverify\n@custom_op('my::f', mutates_args=())\ndef f(x): ...\n",
    "import torch, gradverify\ndef _f(x): ...\nf = torch.library.custom_op('my::f', _f, mutates_args=())\n",
    "import torch, gradverify\ndef _f(x): ...\nf = torch.library.custom_op('my::f', mutates_args=())(_f)\n",
    # @gv.check on a plain function, on a custom op, and gv.check(...)(op) on an imported op.
    "import gradverify as gv\n@gv.check(inputs={'x': gv.tensor(3)})\ndef soft(x): return x.exp()\n",
    "import torch, gradverify as gv\n@gv.check()\n@torch.library.custom_op('my::g', mutates_args=())\ndef g(x): ...\n",
    "import gradverify as gv\nfrom mypkg.ops import scale\nscale_spec = gv.check(inputs={'x': gv.tensor(4)})(scale)\n",
    "import torch, gradverify as gv\nrelu = gv.check(inputs={})(torch.ops.aten.relu.default)\n",
    # Defined under a module-level `if`.
    "import torch, gradverify\nif True:\n    class F(torch.autograd.Function): pass\n",
    # A subclass of a Function from an installed package: cannot be followed, so it counts.
    "import gradverify\nfrom somepkg.ops import Normalize\nclass Spec(Normalize): pass\n",
])
def test_python_specs_are_recognised_from_their_text(tmp_path: Path, source: str) -> None:
    path = tmp_path / "spec.py"
    path.write_text(source)
    assert is_spec(path, root=tmp_path)


@pytest.mark.parametrize("name,source", [
    ("op.py", "import torch\nclass F(torch.autograd.Function): pass\n"),  # an op, not a spec
    ("tool.py", "import gradverify\nclass Helper: pass\n"),  # uses gradverify, defines no op
    ("tool.py", "import gradverify\nfrom typing import NamedTuple\nclass Row(NamedTuple): a: int\n"),
    ("tool.py", "import torch, gradverify\nclass Net(torch.nn.Module): pass\nclass E(ValueError): pass\n"),
    ("tool.py", "import gradverify\nclass Base: pass\nclass Helper(Base): pass\n"),
    ("tool.py", "import gradverify\nfrom typing import Generic, TypeVar\nT = TypeVar('T')\nclass Box(Generic[T]): pass\n"),
    ("tool.py", "import gradverify as gv\ndef helper(x): return gv.check\n"),
    ("test_ops.py", "import torch, gradverify\nclass F(torch.autograd.Function): pass\n"),  # pytest's
    ("notes.txt", "import gradverify\nclass F(torch.autograd.Function): pass\n"),
    ("ci.yml", "run: python scripts/build.py --fast\n"),
    ("old.yaml", "op: ../ops/normalize.py:Normalize\n"),  # `op:` is not a key of the YAML format
    ("workflow.yaml", "jobs:\n  test:\n    steps: [{run: echo function}]\n"),
])
def test_other_files_are_not_specs(tmp_path: Path, name: str, source: str) -> None:
    path = tmp_path / name
    path.write_text(source)
    assert not is_spec(path, root=tmp_path)


def test_a_subclass_is_a_spec_only_when_its_base_is_a_function_of_the_repository(tmp_path: Path) -> None:
    _write(tmp_path, {
        "ops/__init__.py": "from ops.normalize import Normalize\n",
        "ops/normalize.py": "import torch\nclass Base(torch.autograd.Function): pass\nclass Normalize(Base): pass\n",
        "ops/config.py": "class Config: pass\n",
        "specs/a.py": "import gradverify\nfrom ops.normalize import Normalize\nclass A(Normalize): pass\n",
        "specs/b.py": "import gradverify\nimport ops.normalize\nclass B(ops.normalize.Normalize): pass\n",
        "specs/c.py": "import gradverify\nfrom ops import Normalize\nclass C(Normalize): pass\n",  # re-exported
        "specs/d.py": "import gradverify\nfrom ops.config import Config\nclass D(Config): pass\n",
    })
    assert [is_spec(tmp_path / f"specs/{n}.py", root=tmp_path) for n in "abcd"] == [True, True, True, False]


@pytest.mark.parametrize("source", [
    "function: ops/normalize.py:Normalize\ninputs:\n  x: {shape: [3, 3]}\n",
    "function: mypkg.ops:normalize\n",
    "function: torch.ops.myns.scale.default\nimport: mypkg.register\n",
    "function: myns::scale\nload_library: build/libscale.so\n",
    "ops:\n  - function: ops/a.py:A\n  - function: torch.ops.aten.relu\n",
    "function: ops/normalize.py:Normalize\ninputs: [unclosed\n",  # broken: run it so the error blocks
])
def test_yaml_specs_are_recognised_in_every_form_the_loader_takes(tmp_path: Path, source: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(source)
    assert is_spec(path)


# --- which specs cover a changed file ---------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    _write(tmp_path, {
        "ops/__init__.py": "",
        "ops/normalize.py": "from ops.helpers import total\nimport torch\nclass Normalize(torch.autograd.Function): pass\n",
        "ops/helpers.py": "def total(x): return x.sum(0)\n",
        "ops/linear.py": "import torch\nclass Linear(torch.autograd.Function): pass\n",
        "ops/register.py": "import torch\nfrom ops.kernels import scale_kernel\n",
        "ops/kernels.py": "def scale_kernel(x): return 2 * x\n",
        "ops/domains.py": "def unit(generator, shape): ...\n",
        "ops/wrappers.py": "def smooth(x): return x\n",
        "specs/normalize_spec.py": "import gradverify as gv\nfrom ops.normalize import Normalize\n"
                                   "@gv.check()\nclass N(Normalize): pass\n",
        "specs/linear.yaml": "function: ../ops/linear.py:Linear\n",
        "specs/scale.yaml": "function: torch.ops.myns.scale\nimport: ops.register\n"
                            "inputs:\n  x: {shape: [3], domain: 'ops.domains:unit'}\n",
        "specs/smooth.py": "import gradverify as gv\nfrom ops.wrappers import smooth\n"
                           "smooth_spec = gv.check(inputs={'x': gv.tensor(3)})(smooth)\n",
        "pkg/__init__.py": "",
        "pkg/act.py": "import torch\nclass Act(torch.autograd.Function): pass\n",
        "pkg/act_spec.py": "import gradverify as gv\nfrom .act import Act\n@gv.check()\nclass A(Act): pass\n",
        "src/lib/__init__.py": "",
        "src/lib/fused.py": "import torch\nclass Fused(torch.autograd.Function): pass\n",
        "specs/fused.py": "import gradverify\nfrom lib.fused import Fused\nclass FusedSpec(Fused): pass\n",
        "README.md": "docs\n",
        "util.py": "x = 1\n",
    })
    return tmp_path


def _select(project: Path, *changed: str, search: tuple[str, ...] = ()) -> list[str]:
    return [str(p) for p in select_specs([project / c for c in changed], [project / s for s in search], root=project)]


def test_changed_specs_are_selected_and_other_files_ignored(project: Path) -> None:
    assert _select(project, "specs/normalize_spec.py", "README.md", "util.py") == ["specs/normalize_spec.py"]
    assert _select(project, "specs/scale.yaml", "specs/smooth.py") == ["specs/scale.yaml", "specs/smooth.py"]
    assert _select(project, "README.md", "util.py", "gone.py") == []


def test_a_changed_op_selects_the_specs_that_import_it(project: Path) -> None:
    assert _select(project, "ops/normalize.py") == ["specs/normalize_spec.py"]
    assert _select(project, "ops/helpers.py") == ["specs/normalize_spec.py"]  # imported through normalize.py
    assert _select(project, "pkg/act.py") == ["pkg/act_spec.py"]  # a relative import
    assert _select(project, "ops/linear.py") == ["specs/linear.yaml"]  # named by the YAML spec
    assert _select(project, "ops/wrappers.py") == ["specs/smooth.py"]  # declared with gv.check(...)(op)
    assert _select(project, "src/lib/fused.py") == ["specs/fused.py"]  # a src/ layout
    assert _select(project, "ops/linear.py", "ops/normalize.py") == ["specs/linear.yaml", "specs/normalize_spec.py"]


def test_a_yaml_spec_covers_the_modules_it_imports_and_their_imports(project: Path) -> None:
    # `import: ops.register` registers torch.ops.myns.scale; the custom domain's sampler is code too.
    assert _select(project, "ops/register.py") == ["specs/scale.yaml"]
    assert _select(project, "ops/kernels.py") == ["specs/scale.yaml"]
    assert _select(project, "ops/domains.py") == ["specs/scale.yaml"]
    covered = covered_files(project / "specs/scale.yaml", project)
    assert {p.relative_to(project).as_posix() for p in covered} == {
        "ops/__init__.py", "ops/register.py", "ops/kernels.py", "ops/domains.py"}


def test_the_search_for_covering_specs_can_be_narrowed(project: Path) -> None:
    assert _select(project, "ops/linear.py", "ops/normalize.py", search=("specs/normalize_spec.py",)) == [
        "specs/normalize_spec.py"]
    assert _select(project, "ops/normalize.py", search=("pkg",)) == []


def test_deciding_imports_neither_torch_nor_the_specs(project: Path) -> None:
    code = ("import sys; from pathlib import Path; from gradverify.precommit import select_specs; "
            f"found = select_specs([Path({str(project / 'ops/normalize.py')!r})], root=Path({str(project)!r})); "
            "assert [str(p) for p in found] == ['specs/normalize_spec.py'], found; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not [m for m in sys.modules if m.startswith(('ops', 'specs', '_gradverify_spec'))]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_a_commit_with_nothing_to_check_passes_without_importing_torch(project: Path) -> None:
    # The command line itself, as the hook runs it, on files no spec covers.
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else 'torch not imported'))\n"
            "from gradverify.cli import main\n"
            "sys.argv = ['gradverify', 'check', '--changed', 'README.md', 'util.py', 'ops/kernels_gone.py']\n"
            "main()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=project,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("torch not imported"), done.stdout + done.stderr


# --- ops defined elsewhere, as docs/ci.md tells ------------------------------------------------


def test_an_op_imported_into_a_spec_in_a_subfolder_is_checked_once_declared(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _write(project, {
        "pyproject.toml": "[project]\nname = 'demo'\n",
        "mypkg/__init__.py": "",
        "mypkg/ops.py": OP.format(grad=WRONG),
        # Only imported: not an op of this file, and the error says what to do.
        "specs/imported.py": "import gradverify as gv\nfrom mypkg.ops import Normalize\n",
        # Declared by calling the decorator on the imported op.
        "specs/declared.py": "import gradverify as gv\nfrom mypkg.ops import Normalize\n\n"
                             "normalize = gv.check(inputs={'x': gv.tensor(3, 3, domain='positive')})(Normalize)\n",
    })
    assert is_spec(project / "specs/declared.py", root=project) and not is_spec(project / "specs/imported.py")
    # Run from outside the project: `mypkg` is importable only through gradverify's project root.
    env = {"PYTHONPATH": str(REPO)}
    missing = run_cli("check", str(project / "specs/imported.py"), cwd=tmp_path, env=env)
    assert missing.code == 5, missing.stderr  # nothing checked, as pytest with no test
    assert "no op is defined in this file" in missing.stderr and "subclass and decorate it" in missing.stderr
    assert "gradverify.check(inputs=...)(imported_op)" in missing.stderr and "Traceback" not in missing.stderr
    declared = run_cli("check", str(project / "specs/declared.py"), "--format", "plain", cwd=tmp_path, env=env)
    assert declared.code == 1, declared.stdout + declared.stderr
    assert "[missing_offdiag]" in declared.stdout and "ModuleNotFoundError" not in declared.stdout + declared.stderr


# --- the hooks manifest -------------------------------------------------------------------------


def _manifest() -> dict[str, dict[str, object]]:
    return {hook["id"]: hook for hook in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}


def test_manifest_has_an_isolated_hook_and_one_in_the_users_environment() -> None:
    hooks = _manifest()
    assert hooks["gradverify"]["language"] == "python"
    # pre-commit >= 4.4 calls this language `unsupported` and still reads `system` as its alias;
    # pre-commit 3 knows only `system`: the manifest must say `system` to serve both.
    assert hooks["gradverify-system"]["language"] == "system"
    for hook in hooks.values():
        assert hook["entry"] == "gradverify check --changed" and hook["require_serial"] is True
        assert hook["minimum_pre_commit_version"] == "3.0.0"
    # The docs the manifest points at exist and describe both hooks.
    assert "docs/ci.md" in (REPO / ".pre-commit-hooks.yaml").read_text()
    ci = (REPO / "docs/ci.md").read_text()
    assert "id: gradverify-system" in ci and "id: gradverify\n" in ci and "language: system" in ci


# --- the real pre-commit ----------------------------------------------------------------------


@pytest.fixture
def tools(tmp_path: Path) -> dict[str, str]:
    """An environment for git and pre-commit in which `gradverify` is the code under test.

    pre-commit is found through this interpreter (it is in the `test` extra); a missing tool is
    a failure, never a silent skip. The `gradverify` on PATH is a console script like the one pip
    writes (sys.path[0] is its own folder, not the working directory), so a spec in a subfolder
    imports the project only through gradverify's own project-root handling.
    """
    if shutil.which("git") is None:
        pytest.fail("these tests need git on PATH")
    probe = subprocess.run([sys.executable, "-m", "pre_commit", "--version"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"pre-commit is not importable by {sys.executable} (install the `test` extra): {probe.stderr}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gradverify"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom gradverify.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "GITHUB_ACTIONS", "GRADVERIFY_FORMAT", "GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE")}
    pythonpath = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": os.pathsep.join(pythonpath),
                "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"), "NO_COLOR": "1", "PRE_COMMIT_COLOR": "never",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)})
    return env


Run = Callable[..., subprocess.CompletedProcess]


def _runner(cwd: Path, env: dict[str, str]) -> Run:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    return run


def test_manifest_is_valid_for_the_real_pre_commit(tools: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pre_commit", "validate-manifest",
                           str(REPO / ".pre-commit-hooks.yaml")], capture_output=True, text=True, env=tools, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _project(root: Path, config: str, run: Run) -> None:
    _write(root, {"ops/__init__.py": "", "ops/normalize.py": OP.format(grad=RIGHT), "specs/normalize_spec.py": SPEC,
                  ".pre-commit-config.yaml": config})
    assert run("git", "init", "-q").returncode == 0
    installed = run(sys.executable, "-m", "pre_commit", "install")
    assert installed.returncode == 0, installed.stdout + installed.stderr


def _documented_local_hook() -> str:
    """docs/ci.md's `repo: local` recipe, as a user copies it."""
    text = (REPO / "docs/ci.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("yaml") and "repo: local" in b]
    assert len(blocks) == 1, "docs/ci.md should show one `repo: local` recipe"
    return blocks[0]


def test_local_hook_blocks_a_broken_backward_and_lets_the_fix_through(tmp_path: Path, tools: dict[str, str]) -> None:
    repo = tmp_path / "project"
    run = _runner(repo, tools)
    _project(repo, _documented_local_hook(), run)
    run("git", "add", "-A")
    first = run("git", "commit", "-m", "correct op and its spec")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "gradverify...." in first.stderr and "Passed" in first.stderr  # git shows hook output on stderr

    # Only the op file changes: the spec in specs/ that imports it must run and block the commit.
    (repo / "ops/normalize.py").write_text(OP.format(grad=WRONG))
    run("git", "add", "ops/normalize.py")
    blocked = run("git", "commit", "-m", "diagonal-only backward")
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0, out
    assert "Failed" in out and "[missing_offdiag]" in out and "NormalizeSpec" in out
    assert "ModuleNotFoundError" not in out
    assert run("git", "rev-list", "--count", "HEAD").stdout.strip() == "1"

    (repo / "ops/normalize.py").write_text(OP.format(grad=RIGHT) + "\n# fixed\n")
    (repo / "NOTES.md").write_text("not python\n")
    run("git", "add", "-A")
    fixed = run("git", "commit", "-m", "fix the backward")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert run("git", "rev-list", "--count", "HEAD").stdout.strip() == "2"

    # A Python file no spec covers: the hook runs, finds nothing to check, and passes.
    (repo / "util.py").write_text("x = 1\n")
    run("git", "add", "util.py")
    quiet = run("git", "commit", "-m", "unrelated")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr


def test_remote_system_hook_runs_in_the_users_environment(tmp_path: Path, tools: dict[str, str]) -> None:
    # This repository's manifest, served from a git repository as pre-commit fetches a remote
    # hook; the `gradverify-system` hook installs nothing and runs the `gradverify` on PATH.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(REPO / ".pre-commit-hooks.yaml", hooks / ".pre-commit-hooks.yaml")
    in_hooks = _runner(hooks, tools)
    in_hooks("git", "init", "-q")
    in_hooks("git", "add", "-A")
    assert in_hooks("git", "commit", "-q", "-m", "hooks").returncode == 0
    rev = in_hooks("git", "rev-parse", "HEAD").stdout.strip()

    repo = tmp_path / "project"
    run = _runner(repo, tools)
    _project(repo, f"""\
        repos:
          - repo: {hooks}
            rev: {rev}
            hooks:
              - id: gradverify-system
        """, run)
    # One commit, wrong backward included: the hook runs the spec (which imports the project)
    # with the environment's gradverify and blocks it. (Passing commits: the test above.)
    (repo / "ops/normalize.py").write_text(OP.format(grad=WRONG))
    run("git", "add", "-A")
    blocked = run("git", "commit", "-m", "diagonal-only backward")
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0, out
    assert "gradverify (your environment)...." in out and "Failed" in out, out
    assert "[missing_offdiag]" in out and "NormalizeSpec" in out and "ModuleNotFoundError" not in out, out
    assert run("git", "rev-list", "--all").stdout.strip() == ""  # nothing was committed
