"""Spec loading: a path (Python file, YAML file, or a folder of them) -> op specs."""

from __future__ import annotations

from pathlib import Path

from gradverify.errors import NoFunctionError, SpecError
from gradverify.spec.model import CaseDecl, InputSpec, OpSpec

SPEC_SUFFIXES = (".py", ".yaml", ".yml")


def spec_files(path: Path) -> list[Path]:
    """The spec files a path names: itself, or every spec in a folder (sorted, not recursive
    into hidden or cache folders)."""
    if not path.exists():
        raise SpecError("file not found", file=str(path))
    if path.is_dir():
        found = sorted(p for p in path.rglob("*")
                       if p.suffix in SPEC_SUFFIXES and p.is_file()
                       and not any(part.startswith((".", "__")) for part in p.relative_to(path).parts))
        if not found:
            raise NoFunctionError("folder holds no .py or .yaml spec", file=str(path))
        return found
    return [path]


def load_spec(path: Path) -> list[OpSpec]:
    """The ops one spec file describes."""
    if path.suffix == ".py":
        from gradverify.spec.python import load_python_spec

        return load_python_spec(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            from gradverify.spec.yaml_spec import load_yaml_spec
        except ImportError:
            raise SpecError("YAML specs are not supported by this version of gradverify", file=str(path)) from None
        return load_yaml_spec(path)
    raise SpecError("expected a Python (.py) or YAML (.yaml/.yml) spec", file=str(path))


def load_path(path: Path) -> list[tuple[Path, list[OpSpec]]]:
    """The ops of a spec file, or of every spec in a folder, file by file in sorted order.

    Folder mode is lenient where a single file is not: a .py that defines no autograd
    Function is a helper module and is skipped, and so is a .py that a YAML spec in the same
    folder names as its op's file (the YAML is its spec; checking it with default shapes
    would be wrong). Every other error still stops the run with exit 2.
    """
    files = spec_files(path)
    if not path.is_dir():
        return [(files[0], load_spec(files[0]))]
    from gradverify.spec.yaml_spec import python_files_used

    loaded: dict[Path, list[OpSpec]] = {}
    used: set[Path] = set()
    for file in files:
        if file.suffix in (".yaml", ".yml"):
            loaded[file] = load_spec(file)
            used |= python_files_used(loaded[file])
    result: list[tuple[Path, list[OpSpec]]] = []
    for file in files:
        if file.suffix == ".py":
            if file.resolve() in used:
                continue
            try:
                loaded[file] = load_spec(file)
            except NoFunctionError:
                continue  # a helper module, not a spec
        result.append((file, loaded[file]))
    if not result:
        raise SpecError("folder holds no spec: its .py files define no autograd Function", file=str(path))
    return result


__all__ = ["CaseDecl", "InputSpec", "OpSpec", "load_path", "load_spec", "spec_files", "SPEC_SUFFIXES"]
