"""Which specs to run for a set of changed files (`gradverify check --changed FILE...`).

pre-commit hands a hook the files a commit touches. gradverify runs the specs among them, and the
specs that *cover* a changed file: a Python spec covers the local modules it imports (directly or
through other local modules), a YAML spec the `file.py` it names. Everything else is ignored.

Deciding is cheap and never imports user code (that would import torch for every commit):

* a `.py` file is a spec when it imports gradverify and defines, at top level, a class that
  subclasses `torch.autograd.Function` (`autograd.Function`, or `Function` imported from
  torch.autograd) or is decorated with `@gradverify.check(...)`; pytest files (`test_*.py`,
  `*_test.py`, `conftest.py`) never are: they belong to the pytest plugin;
* a `.yaml`/`.yml` file is a spec when it names an op as `path/to/file.py:ClassName`.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

PY_SUFFIXES = (".py",)
YAML_SUFFIXES = (".yaml", ".yml")
# `ops/normalize.py:Normalize`: how a YAML spec names its op.
_YAML_OP = re.compile(r"""([\w./\\-]+\.py):[A-Za-z_]\w*""")
# Any `something.py` in a YAML spec: the files it depends on.
_YAML_FILE = re.compile(r"""([\w./\\-]+\.py)\b""")
_SKIP_DIRS = {"node_modules", "site-packages", "build", "dist"}
_MAX_BYTES = 2_000_000


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _dotted(node: ast.expr) -> str:
    """`torch.autograd.Function` for an attribute chain; '' for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_pytest_file(path: Path) -> bool:
    name = path.name
    return name == "conftest.py" or (name.startswith("test_") and name.endswith(".py")) or name.endswith("_test.py")


def _python_spec_tree(tree: ast.Module) -> bool:
    gv_modules: set[str] = set()
    check_names: set[str] = set()
    function_names: set[str] = set()
    imports_gradverify = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "gradverify" or alias.name.startswith("gradverify."):
                    imports_gradverify = True
                    if alias.name == "gradverify":
                        gv_modules.add(alias.asname or "gradverify")
                    elif alias.asname is None:
                        gv_modules.add("gradverify")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gradverify" or node.module.startswith("gradverify."):
                imports_gradverify = True
                check_names.update(a.asname or a.name for a in node.names if a.name == "check")
            if node.module in ("torch.autograd", "torch.autograd.function"):
                function_names.update(a.asname or a.name for a in node.names if a.name == "Function")
    if not imports_gradverify:
        return False
    decorators = {f"{m}.check" for m in gv_modules} | check_names
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            name = _dotted(base)
            if name.endswith("autograd.Function") or name in function_names:
                return True
        for decorator in node.decorator_list:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            if _dotted(target) in decorators:
                return True
    return False


def is_spec(path: Path, text: str | None = None) -> bool:
    """Whether `path` is a gradverify spec, decided from its text alone (see the module docstring)."""
    if path.suffix in YAML_SUFFIXES:
        text = _read(path) if text is None else text
        return bool(text and _YAML_OP.search(text))
    if path.suffix not in PY_SUFFIXES or _is_pytest_file(path):
        return False
    text = _read(path) if text is None else text
    if not text or "gradverify" not in text:
        return False
    try:
        tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError):
        # Broken but clearly meant as a spec: run it, so the syntax error blocks the commit.
        return bool(re.search(r"^\s*(import|from)\s+gradverify\b", text, re.M)) and "class " in text
    return _python_spec_tree(tree)


def _search_roots(folder: Path, root: Path) -> list[Path]:
    """The folder a spec sits in and every folder above it up to the repository root.

    A spec's `import ops.normalize` finds `ops/` beside it (gradverify puts the spec's folder on
    sys.path) or at the top of the repository (an installed or `python -m` importable package).
    """
    roots = [folder]
    try:
        folder.relative_to(root)
    except ValueError:
        return roots + [root]
    current = folder
    while current != root and current.parent != current:
        current = current.parent
        roots.append(current)
    return roots


def _module_files(module: str, roots: Iterable[Path]) -> list[Path]:
    """Files that `import module` might load from these roots: the module and its packages' __init__."""
    parts = module.split(".")
    found: list[Path] = []
    for base in roots:
        for k in range(1, len(parts) + 1):
            stem = base.joinpath(*parts[:k])
            for candidate in (stem.with_suffix(".py") if k == len(parts) else None, stem / "__init__.py"):
                if candidate is not None and candidate.is_file():
                    found.append(candidate)
    return found


def local_imports(path: Path, tree: ast.Module, root: Path) -> set[Path]:
    """The files of this repository that `path` imports directly (resolved without importing)."""
    roots = _search_roots(path.parent, root)
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_module_files(alias.name, roots))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                module_roots: list[Path] = [base]
                module = node.module or ""
            else:
                module_roots = roots
                module = node.module or ""
            if module:
                found.update(_module_files(module, module_roots))
            for alias in node.names:
                # `from ops import normalize` may name the submodule ops/normalize.py.
                name = f"{module}.{alias.name}" if module else alias.name
                found.update(_module_files(name, module_roots))
    return {p.resolve() for p in found}


def covered_files(spec: Path, root: Path, text: str | None = None) -> set[Path]:
    """Every local file a spec depends on, following local imports transitively."""
    text = _read(spec) if text is None else text
    if text is None:
        return set()
    pending: list[Path] = []
    if spec.suffix in YAML_SUFFIXES:
        for match in _YAML_FILE.finditer(text):
            name = match.group(1).replace("\\", "/")
            for base in (spec.parent, root):
                candidate = base / name
                if candidate.is_file():
                    pending.append(candidate.resolve())
    else:
        pending.append(spec.resolve())
    seen: set[Path] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.suffix not in PY_SUFFIXES:
            continue
        source = text if current == spec.resolve() else _read(current)
        if source is None:
            continue
        try:
            tree = ast.parse(source, filename=str(current))
        except (SyntaxError, ValueError):
            continue
        pending.extend(local_imports(current, tree, root) - seen)
    seen.discard(spec.resolve())
    return seen


def repository_files(root: Path) -> list[Path]:
    """Candidate spec files under root: git's view (tracked and untracked, not ignored) when it has one."""
    try:
        result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True, timeout=30)
        names = [n for n in result.stdout.decode("utf-8", "replace").split("\0") if n]
        return sorted({root / n for n in names if n.endswith(PY_SUFFIXES + YAML_SUFFIXES)})
    except (OSError, subprocess.SubprocessError):
        return walk_files(root)


def walk_files(folder: Path) -> list[Path]:
    """Spec-like files under a folder, skipping hidden, cache and virtual-environment folders."""
    found: list[Path] = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in _SKIP_DIRS
                         and not (Path(current) / d / "pyvenv.cfg").exists())
        found.extend(Path(current) / f for f in sorted(files) if f.endswith(PY_SUFFIXES + YAML_SUFFIXES))
    return found


def select_specs(changed: Sequence[Path | str], search: Sequence[Path | str] = (),
                 root: Path | None = None) -> list[Path]:
    """The specs to run for these changed files, in a stable order, as paths relative to root.

    changed: the files pre-commit passes (missing ones are ignored: deleted or renamed).
    search: where to look for specs covering a changed op file (files or folders); default the
        whole repository under root (the current folder).
    """
    root = (root or Path.cwd()).resolve()
    changed_files = [Path(p).resolve() for p in changed if Path(p).is_file()]
    selected: set[Path] = {p for p in changed_files if is_spec(p)}
    others = {p for p in changed_files if p.suffix in PY_SUFFIXES} - selected
    if others or any(p.suffix in PY_SUFFIXES for p in selected):
        targets = {p for p in changed_files if p.suffix in PY_SUFFIXES}
        candidates: list[Path] = []
        if search:
            for entry in search:
                entry = Path(entry)
                candidates.extend(walk_files(entry) if entry.is_dir() else [entry] if entry.is_file() else [])
        else:
            candidates = repository_files(root)
        for candidate in candidates:
            candidate = candidate.resolve()
            if candidate in selected:
                continue
            text = _read(candidate)
            if not text or not is_spec(candidate, text):
                continue
            if covered_files(candidate, root, text) & targets:
                selected.add(candidate)
    return sorted((_display(p, root) for p in selected), key=str)


def _display(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path
