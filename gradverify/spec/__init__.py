"""Spec loading: a path (Python file, YAML file, or a folder of them) -> op specs."""

from __future__ import annotations

from pathlib import Path

from gradverify.errors import SpecError
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
            raise SpecError("folder holds no .py or .yaml spec", file=str(path))
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


__all__ = ["CaseDecl", "InputSpec", "OpSpec", "load_spec", "spec_files", "SPEC_SUFFIXES"]
