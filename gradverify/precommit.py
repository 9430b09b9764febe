"""Which specs to run for a set of changed files (`gradverify check --changed FILE...`).

pre-commit hands a hook the files a commit touches. gradverify runs the specs among them, and the
specs that *cover* a changed file: a Python spec covers the local modules it imports (directly or
through other local modules), a YAML spec the files and modules it names. Everything else is ignored.

Deciding is cheap and never imports user code (that would import torch for every commit): files
are read as text and parsed with `ast` (Python) or PyYAML's safe loader. A spec the text cannot
rule out is run rather than skipped: a spec that silently stops being checked is worse than a
commit that runs one spec too many.

* a `.py` file is a spec when it imports gradverify and, at module level, defines or declares an
  op: a class deriving from `torch.autograd.Function` (directly, or through a class of this
  repository or of an installed package), a `torch.library.custom_op`, anything decorated with
  `@gradverify.check(...)`, or `name = gradverify.check(...)(op)`. pytest files (`test_*.py`,
  `*_test.py`, `conftest.py`) never are: they belong to the pytest plugin;
* a `.yaml`/`.yml` file is a spec when it has a `function:` (one op) or an `ops:` list of them, in
  any of the forms the YAML loader takes (`file.py:Name`, `package.module:Name`, `torch.ops.ns.op`,
  `ns::op`).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

PY_SUFFIXES = (".py",)
YAML_SUFFIXES = (".yaml", ".yml")
# `function:` as a YAML key, top level or in an `ops:` list: how a YAML spec that does not
# parse is still recognised (so its error blocks the commit instead of being ignored).
_YAML_FUNCTION_KEY = re.compile(r"^\s*(?:-\s+)?function\s*:", re.M)
# `path/to/file.py` or `path/to/file.py:Name`: a Python file a YAML spec names.
_YAML_FILE = re.compile(r"""^([\w./\\-]+\.py)(?::[A-Za-z_][\w.]*)?$""")
# `package.module:Name`: an object a YAML spec imports by module path (not `ns::op`).
_YAML_MODULE = re.compile(r"""^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):[A-Za-z_][\w.]*$""")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_SKIP_DIRS = {"node_modules", "site-packages", "build", "dist"}
_MAX_BYTES = 2_000_000
# How deep a chain of local base classes is followed to reach torch.autograd.Function.
_MAX_BASE_DEPTH = 8
# Modules whose classes are certainly not autograd Functions (besides torch outside
# torch.autograd), so a helper class deriving from one does not make a file a spec.
_NOT_FUNCTION_MODULES = ("typing", "typing_extensions", "enum", "abc", "dataclasses", "collections", "builtins",
                         "unittest", "pytest", "gradverify")
_BUILTIN_BASES = {"object", "Exception", "ValueError", "TypeError", "RuntimeError", "dict", "list", "tuple", "str",
                  "int", "float", "set", "NamedTuple", "TypedDict", "Protocol", "Generic", "Enum", "IntEnum"}


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _parse(path: Path, text: str | None = None) -> ast.Module | None:
    text = _read(path) if text is None else text
    if text is None:
        return None
    try:
        return ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError):
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


def _module_level(statements: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import time: the module's own, and those inside top-level
    `if`/`try`/`with` blocks (an op defined under `if torch.cuda.is_available():` still counts)."""
    for node in statements:
        yield node
        if isinstance(node, (ast.If, ast.With, ast.AsyncWith)):
            yield from _module_level(node.body)
            yield from _module_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)


class _Names:
    """What a module's imports bind: gradverify's `check`, torch's Function and custom_op, and
    every other imported name with the module it comes from."""

    def __init__(self, tree: ast.Module) -> None:
        self.imports_gradverify = False
        self.gv_modules: set[str] = set()
        self.check: set[str] = set()
        self.function: set[str] = set()
        self.custom_op: set[str] = set()
        # local name -> (module, attribute or None for `import module`, relative level)
        self.origin: dict[str, tuple[str, str | None, int]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    self.origin[bound] = (alias.name if alias.asname else bound, None, 0)
                    if alias.name == "gradverify" or alias.name.startswith("gradverify."):
                        self.imports_gradverify = True
                        if alias.name == "gradverify" or alias.asname is None:
                            self.gv_modules.add(bound)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                for alias in node.names:
                    bound = alias.asname or alias.name
                    self.origin[bound] = (module, alias.name, node.level)
                if node.level:
                    continue
                if module == "gradverify" or module.startswith("gradverify."):
                    self.imports_gradverify = True
                    self.check.update(a.asname or a.name for a in node.names if a.name == "check")
                if module in ("torch.autograd", "torch.autograd.function"):
                    self.function.update(a.asname or a.name for a in node.names if a.name == "Function")
                if module in ("torch.library", "torch._library.custom_ops", "torch._library.triton"):
                    self.custom_op.update(a.asname or a.name for a in node.names
                                          if a.name in ("custom_op", "triton_op"))

    def is_check(self, node: ast.expr) -> bool:
        """`gv.check` / `gradverify.check` / an imported `check`, called or not."""
        target = node.func if isinstance(node, ast.Call) else node
        name = _dotted(target)
        return name in self.check or any(name == f"{m}.check" for m in self.gv_modules)

    def is_custom_op(self, node: ast.expr) -> bool:
        """`torch.library.custom_op(...)` (or triton_op), called or not."""
        target = node.func if isinstance(node, ast.Call) else node
        name = _dotted(target)
        return name in self.custom_op or name.endswith(("library.custom_op", "library.triton_op"))

    def is_function_base(self, base: ast.expr) -> bool:
        name = _dotted(base)
        return name in self.function or name.endswith(("autograd.Function", "autograd.function.Function"))


class _Resolver:
    """Answers "is this class an autograd Function?" from source text alone, following base
    classes through this repository's modules. None: a base that cannot be followed (one from
    an installed package, or computed at run time)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees: dict[Path, tuple[ast.Module, _Names] | None] = {}

    def load(self, path: Path) -> tuple[ast.Module, _Names] | None:
        if path not in self.trees:
            tree = _parse(path)
            self.trees[path] = (tree, _Names(tree)) if tree is not None else None
        return self.trees[path]

    def class_is_function(self, path: Path, name: str, depth: int) -> bool | None:
        """Whether `name`, as module `path` binds it, is a Function class."""
        loaded = self.load(path)
        if loaded is None or depth > _MAX_BASE_DEPTH:
            return None
        tree, names = loaded
        for node in _module_level(tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return self.bases_are_function(path, node, names, depth + 1)
        if name in names.origin:
            return self.imported_is_function(path, names.origin[name], depth + 1)
        if path.name == "__init__.py" and _module_file(name, [path.parent]) is not None:
            return False  # a submodule, not a class
        return None  # bound some other way (a star import, an assignment): cannot tell

    def bases_are_function(self, path: Path, node: ast.ClassDef, names: _Names, depth: int) -> bool | None:
        unknown = False
        for base in node.bases:
            verdict = True if names.is_function_base(base) else self.base_is_function(path, base, names, depth)
            if verdict:
                return True
            unknown = unknown or verdict is None
        return None if unknown else False

    def base_is_function(self, path: Path, base: ast.expr, names: _Names, depth: int) -> bool | None:
        if isinstance(base, ast.Subscript):
            base = base.value  # `Generic[T]`: the class is `Generic`
        dotted = _dotted(base)
        if not dotted:
            return None  # a computed base (`make_base()`)
        head, _, rest = dotted.partition(".")
        if not rest:
            if head in _BUILTIN_BASES:
                return False
            return self.class_is_function(path, head, depth)
        if head not in names.origin:
            return None
        module, attr, level = names.origin[head]
        # `ops.normalize.Normalize` after `import ops.normalize` / `from ops import normalize`.
        qualified = ".".join(p for p in (module, attr, *rest.split(".")[:-1]) if p)
        return self.imported_is_function(path, (qualified, rest.split(".")[-1], level), depth)

    def imported_is_function(self, path: Path, origin: tuple[str, str | None, int], depth: int) -> bool | None:
        module, attr, level = origin
        if attr is None:
            return False  # `import x` binds a module, never a class
        top = module.split(".")[0]
        if not level and (top in _NOT_FUNCTION_MODULES or (top == "torch" and not module.startswith("torch.autograd"))):
            return False
        source = _module_file(module, _import_roots(path, self.root, level))
        if source is None:
            return None  # an installed package (or a namespace package): cannot follow
        return self.class_is_function(source.resolve(), attr, depth)


def _declares_op(tree: ast.Module, names: _Names, path: Path, root: Path) -> bool:
    """Whether the module, run, would define or declare an op that gradverify checks."""
    resolver: _Resolver | None = None
    for node in _module_level(tree.body):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(names.is_check(d) or names.is_custom_op(d) for d in node.decorator_list):
                return True
            if isinstance(node, ast.ClassDef) and node.bases:
                resolver = resolver or _Resolver(root)
                resolver.trees[path] = (tree, names)
                # None (a base from an installed package): assume a Function; see the module docstring.
                if resolver.bases_are_function(path, node, names, 0) is not False:
                    return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr)) and node.value is not None:
            value = node.value
            # `op = gv.check(inputs=...)(imported_op)`, `op = torch.library.custom_op("ns::op", fn, ...)`
            # or `op = torch.library.custom_op("ns::op", mutates_args=())(fn)`.
            if isinstance(value, ast.Call) and (
                    (isinstance(value.func, ast.Call) and (names.is_check(value.func) or names.is_custom_op(value.func)))
                    or (names.is_custom_op(value) and len(value.args) >= 2)):
                return True
    return False


def _python_is_spec(path: Path, text: str, root: Path) -> bool:
    try:
        tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError):
        # Broken but clearly meant as a spec: run it, so the syntax error blocks the commit.
        return bool(re.search(r"^\s*(import|from)\s+gradverify\b", text, re.M))
    names = _Names(tree)
    return names.imports_gradverify and _declares_op(tree, names, path.resolve(), root)


def _yaml_data(text: str) -> tuple[bool, Any]:
    """(parsed, data): PyYAML's safe loader, never constructing objects."""
    import yaml

    try:
        return True, yaml.safe_load(text)
    except yaml.YAMLError:
        return False, None


def _yaml_ops(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        return []
    if "function" in data:
        return [data]
    ops = data.get("ops")
    return [op for op in ops if isinstance(op, dict) and "function" in op] if isinstance(ops, list) else []


def is_spec(path: Path, text: str | None = None, root: Path | None = None) -> bool:
    """Whether `path` is a gradverify spec, decided from its text alone (see the module docstring).

    root: the repository root, where base classes imported by a Python spec are looked up
    (default: the current folder)."""
    if path.suffix in YAML_SUFFIXES:
        text = _read(path) if text is None else text
        if not text or "function" not in text:
            return False
        parsed, data = _yaml_data(text)
        return bool(_yaml_ops(data)) if parsed else bool(_YAML_FUNCTION_KEY.search(text))
    if path.suffix not in PY_SUFFIXES or _is_pytest_file(path):
        return False
    text = _read(path) if text is None else text
    if not text or "gradverify" not in text:
        return False
    return _python_is_spec(path, text, (root or Path.cwd()).resolve())


def _search_roots(folder: Path, root: Path) -> list[Path]:
    """Where a spec's absolute imports may be found: its own folder and every folder above it up
    to the repository root (gradverify puts the spec's folder and its project root, the nearest
    folder with pyproject.toml, setup.py or .git, on sys.path), each with its `src/` layout."""
    roots = [folder]
    try:
        folder.relative_to(root)
    except ValueError:
        roots.append(root)
    else:
        current = folder
        while current != root and current.parent != current:
            current = current.parent
            roots.append(current)
    return roots + [r / "src" for r in roots if (r / "src").is_dir()]


def _import_roots(path: Path, root: Path, level: int) -> list[Path]:
    """Roots for an import in `path`: the search roots, or the package folder of a relative import."""
    if not level:
        return _search_roots(path.parent, root)
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    return [base]


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


def _module_file(module: str, roots: Iterable[Path]) -> Path | None:
    """The file `import module` runs last (the module itself, or its package's __init__), from
    the first root that has it; `module` '' is the package at the root itself."""
    parts = [p for p in module.split(".") if p]
    for base in roots:
        stem = base.joinpath(*parts)
        for candidate in ((stem.with_suffix(".py"),) if parts else ()) + (stem / "__init__.py",):
            if candidate.is_file():
                return candidate
    return None


def local_imports(path: Path, tree: ast.Module, root: Path) -> set[Path]:
    """The files of this repository that `path` imports directly (resolved without importing)."""
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = _import_roots(path, root, 0)
            for alias in node.names:
                found.update(_module_files(alias.name, roots))
        elif isinstance(node, ast.ImportFrom):
            roots = _import_roots(path, root, node.level)
            module = node.module or ""
            if module:
                found.update(_module_files(module, roots))
            for alias in node.names:
                # `from ops import normalize` may name the submodule ops/normalize.py.
                name = f"{module}.{alias.name}" if module else alias.name
                found.update(_module_files(name, roots))
    return {p.resolve() for p in found}


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data.strip()
    elif isinstance(data, dict):
        for value in data.values():
            yield from _strings(value)
    elif isinstance(data, list):
        for item in data:
            yield from _strings(item)


def yaml_named_files(spec: Path, root: Path, text: str | None = None) -> set[Path]:
    """The repository's Python files a YAML spec names directly: `file.py:Name` and `file.py`
    (relative to the spec), and the modules of `package.module:Name` and `import: package.module`
    (an op, a reference, a custom domain's sampler, a module registering torch.ops)."""
    text = _read(spec) if text is None else text
    if text is None:
        return set()
    parsed, data = _yaml_data(text)
    if parsed:
        candidates = list(_strings(data))
        modules = [s for s in _strings([op.get("import") for op in _yaml_ops(data)] + [
            data.get("import") if isinstance(data, dict) else None]) if _DOTTED.match(s)]
    else:
        candidates = re.findall(r"""[\w./\\-]+\.py(?::[\w.]+)?|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*""", text)
        modules = []
    roots = _search_roots(spec.parent.resolve(), root)
    found: set[Path] = set()
    for value in candidates:
        file_match = _YAML_FILE.match(value)
        if file_match:
            name = file_match.group(1).replace("\\", "/")
            for base in (spec.parent, root):
                candidate = base / name
                if candidate.is_file():
                    found.add(candidate.resolve())
            continue
        module_match = _YAML_MODULE.match(value)
        if module_match:
            modules.append(module_match.group(1))
    for module in modules:
        found.update(p.resolve() for p in _module_files(module, roots))
    return found


def covered_files(spec: Path, root: Path, text: str | None = None) -> set[Path]:
    """Every local file a spec depends on, following local imports transitively."""
    text = _read(spec) if text is None else text
    if text is None:
        return set()
    pending: list[Path] = []
    if spec.suffix in YAML_SUFFIXES:
        pending.extend(yaml_named_files(spec, root, text))
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
        tree = _parse(current, text if current == spec.resolve() else None)
        if tree is not None:
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
    selected: set[Path] = {p for p in changed_files if is_spec(p, root=root)}
    targets = {p for p in changed_files if p.suffix in PY_SUFFIXES}
    if targets:
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
            if not text or not is_spec(candidate, text, root=root):
                continue
            if covered_files(candidate, root, text) & targets:
                selected.add(candidate)
    return sorted((_display(p, root) for p in selected), key=str)


def _display(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path
