"""Frozen settings for one run, resolved from flags, GRADVERIFY_* variables and pyproject.toml.

Every value is parsed by the one schema (gradverify.schema), whatever it came from; this
module knows where values come from and which wins.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from gradverify import schema
from gradverify.errors import GradverifyError, OptionError, SpecError, UsageError
from gradverify.schema import (  # noqa: F401 - re-exported: callers import these from here
    DEVICE_PATTERN,
    DTYPES,
    SEED_LIMIT,
    GradcheckMode,
    Invalid,
    Mode,
    OutputFormat,
    Shape,
    ShapeSet,
    did_you_mean,
    format_size,
)

# Used when neither the command line nor the spec gives a shape. Non-square on purpose: a
# transposed gradient or a sum over the wrong dim is invisible on a square input.
DEFAULT_SHAPE: Shape = (3, 4)

GRADCHECK_MODES = schema.values(GradcheckMode)
MODES = schema.values(Mode)
FORMATS = schema.STDOUT_FORMATS


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run checks and how strictly."""

    shapes: tuple[ShapeSet, ...] = ()
    dtypes: tuple[str, ...] = ("float64",)
    devices: tuple[str, ...] = ("cpu",)
    seed: int = 0
    domain: str | None = None
    atol: float | None = None
    rtol: float | None = None
    gradcheck: str = "fast"
    ops: tuple[str, ...] = ()
    max_entries: int = 20
    # How many mismatched entries a check keeps (JSON lists them all up to this cap).
    mismatch_cap: int = 10_000
    nondet_tol: float = 0.0
    order: int = 1
    retries: int = 2
    require_device: bool = False
    # Cap on the memory of Jacobian chunks, in bytes (and on a case's inputs: see check_input_memory).
    max_memory: int = 512 * 2**20
    # auto | full | fast: full Jacobians, projected checks with localisation, or by size.
    mode: str = "auto"
    # Worker processes for independent cases (1 = in this process).
    jobs: int = 1
    # Check the forward-mode jvp when the Function defines one.
    forward_ad: bool = True
    # --arg NAME=VALUE: plain values for the op's parameters, by name.
    args: tuple[tuple[str, Any], ...] = ()
    # --domain NAME=DOMAIN: one input's domain (beats `domain`, which applies to every input).
    input_domains: tuple[tuple[str, str], ...] = ()
    # The exact list of optional checks (pyproject's `checks`); None: each check's default.
    checks: tuple[str, ...] | None = None
    # --check NAME / --skip-check NAME: added to / removed from the checks that run.
    add_checks: tuple[str, ...] = ()
    skip_checks: tuple[str, ...] = ()
    # Warnings (findings the autograd engine repairs, entries not judged) fail the run.
    strict: bool = False
    # Seconds one case may run before it is stopped and reported (CLI runs only).
    timeout: float = 120.0
    # (dtype, atol, rtol) defaults for one dtype (pyproject's [tool.gradverify.tolerances]).
    dtype_tolerances: tuple[tuple[str, float | None, float | None], ...] = ()
    # Spec paths to check when the command line names none (pyproject's `paths`).
    paths: tuple[str, ...] = ()
    # rich | plain | json | junit | github | md (from --format, GRADVERIFY_FORMAT or pyproject).
    output_format: str = "rich"
    # Fields set on the command line or by GRADVERIFY_* variables, which beat an op's own spec
    # values. None (a Settings built in code): every field that differs from its default counts.
    explicit: frozenset[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def is_explicit(self, name: str) -> bool:
        """Whether `name` was chosen for this run (so it beats the spec's own value)."""
        if self.explicit is not None:
            return name in self.explicit
        for f in fields(self):
            if f.name == name:
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                return bool(getattr(self, name) != default)
        raise AttributeError(name)


def parse_value(name: str, raw: Any, label: str, error: type[GradverifyError] = UsageError, **where: Any) -> Any:
    """Setting `name` parsed from `raw` by the schema; `error` (at `where`) with the schema's
    message, under `label`, if the value is not accepted."""
    try:
        return schema.parse(name, raw)
    except Invalid as exc:
        raise error(exc.message(label), **where) from None


def parse_shape_set(text: str) -> ShapeSet:
    """'2,3,3' -> ((2,3,3),); '4,3;5,3;5' -> ((4,3),(5,3),(5,)); '()' -> a 0-d tensor."""
    try:
        return schema.shape_set(text)
    except Invalid as exc:
        raise UsageError(exc.message("--shape")) from None


def parse_dtype(text: str) -> str:
    return str(parse_value("dtypes", [text], "--dtype")[0])


def validate_tolerance(value: Any, label: str, error: type[Exception] = UsageError) -> float:
    """A tolerance: a finite, non-negative number (NaN or inf would silently switch a check off)."""
    try:
        return schema.tolerance(value)
    except Invalid as exc:
        raise error(exc.message(label)) from None


# --- where values come from: CLI flags > GRADVERIFY_* variables > pyproject.toml > defaults ---

PYPROJECT_SETTINGS = schema.keys_for(schema.PYPROJECT)
ENV_SETTINGS = schema.keys_for(schema.ENV)
CLI_SETTINGS = schema.keys_for(schema.CLI)
VERIFY_SETTINGS = schema.keys_for(schema.VERIFY)
# [tool.gradverify] keys -> what they hold (each is also GRADVERIFY_<KEY>, except tables).
CONFIG_KEYS: dict[str, str] = {key: setting.help for key, setting in PYPROJECT_SETTINGS.items()}
# verify(checks=[...]) adds optional checks (pyproject's `checks` is the exact list).
_VERIFY_ALIASES = {"checks": "add_checks"}


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above `start` (a file's folder, or a folder), as black
    does. A folder that cannot be looked at (a symlink loop, a name too long) is passed over:
    the spec path itself is checked, with a clear error, elsewhere."""
    try:
        here = start.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        here = Path(os.path.abspath(start))
    try:
        if not here.is_dir():
            here = here.parent
    except OSError:
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            continue
    return None


def _toml_line(text: str, key: str, table: str = "tool.gradverify") -> int | None:
    """Best-effort line of `key` inside `[table]` (tomllib keeps no positions)."""
    current = ""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[+\s*([^\]]+?)\s*\]+", line)
        if header:
            current = header.group(1).replace('"', "").replace("'", "").replace(" ", "")
            if current == f"{table}.{key}":
                return number
            continue
        if current == table and pattern.match(line):
            return number
    return None


def load_pyproject_config(path: Path) -> dict[str, Any] | None:
    """The values of `[tool.gradverify]` in `path` by Settings field (None if it has no such
    table); a bad value is a UsageError at its line (exit 2)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, as a package
        import tomli as tomllib

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"expected a UTF-8 text file, found a byte that is not UTF-8 at offset {exc.start}",
                         file=str(path)) from None
    except OSError as exc:
        raise UsageError(f"cannot be read: {exc.strerror or exc}", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        raise UsageError(f"invalid TOML: {str(exc).split(' (at line')[0]}", file=str(path),
                         line=int(found.group(1)) if found else None,
                         col=int(found.group(2)) if found else None) from None
    except RecursionError:
        raise UsageError("invalid TOML: nested too deeply", file=str(path)) from None
    tool = data.get("tool", {})
    table = tool.get("gradverify") if isinstance(tool, dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError("[tool.gradverify]: expected a table, found a value", file=str(path))
    values: dict[str, Any] = {}
    for raw_key, raw in table.items():
        key = raw_key.replace("-", "_")
        label = f"[tool.gradverify] {raw_key}"
        line = _toml_line(text, raw_key)
        setting = PYPROJECT_SETTINGS.get(key)
        if setting is None:
            raise UsageError(f"[tool.gradverify] unknown key {raw_key!r} (expected one of "
                             f"{', '.join(PYPROJECT_SETTINGS)})" + did_you_mean(key, PYPROJECT_SETTINGS),
                             file=str(path), line=line)
        value = parse_value(setting.name, raw, label, file=str(path), line=line)
        if setting.name == "paths":
            value = tuple(p if Path(p).is_absolute() else os.path.normpath(path.parent.resolve() / p) for p in value)
        values[setting.name] = value
    return values


def env_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from GRADVERIFY_<KEY> variables by Settings field (unset or empty ones are ignored)."""
    values: dict[str, Any] = {}
    for setting in ENV_SETTINGS.values():
        text = environ.get(setting.env, "").strip()
        if not text:
            continue
        raw: Any = text
        if setting.env_split == "pathsep":
            raw = [part for part in text.split(os.pathsep) if part.strip()]
        elif setting.env_split == "space":
            raw = text.split()
        elif setting.env_split:
            raw = [part for part in text.split(setting.env_split) if part.strip()]
        values[setting.name] = parse_value(setting.name, raw, setting.env)
    return values


def resolve_settings(cli: Mapping[str, Any], start: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for one run: CLI flags > GRADVERIFY_* variables > pyproject.toml > defaults.

    `cli` holds Settings field names (or pyproject keys such as `format`) with the raw values of
    the flags, None or an empty list for a flag that was not given. `start` is where the
    pyproject.toml search begins (the first spec path, or the working directory).
    """
    environ = os.environ if environ is None else environ
    pyproject = find_pyproject(start)
    configured = load_pyproject_config(pyproject) if pyproject is not None else None
    merged: dict[str, Any] = dict(configured or {})
    sources = {name: "pyproject.toml" for name in merged}
    from_env = env_config(environ)
    merged.update(from_env)
    sources.update({name: ENV_SETTINGS[schema.BY_NAME[name].config_key].env for name in from_env})
    explicit = set(from_env)
    for key, raw in cli.items():
        if raw is None or (isinstance(raw, (list, tuple)) and not raw):
            continue
        setting = CLI_SETTINGS.get(key) or CLI_SETTINGS.get(PYPROJECT_SETTINGS[key].name
                                                            if key in PYPROJECT_SETTINGS else "")
        if setting is None:
            raise TypeError(f"resolve_settings: unknown option {key!r}")
        merged[setting.name] = parse_value(setting.name, raw, setting.flag or f"--{key.replace('_', '-')}")
        sources[setting.name] = "command line"
        explicit.add(setting.name)
    extra: dict[str, Any] = {"sources": sources}
    if configured is not None:
        extra["config_file"] = str(pyproject)
    return Settings(**merged, explicit=frozenset(explicit), extra=extra)


def validate_options(options: Mapping[str, Any], where: str) -> Settings:
    """Settings from library keyword options (verify(), the pytest fixture), each parsed by the
    schema as its command-line flag is: the same value is accepted or rejected everywhere.
    None means "the default"."""
    values: dict[str, Any] = {}
    for key, raw in options.items():
        setting = VERIFY_SETTINGS.get(_VERIFY_ALIASES.get(key, key))
        if setting is None:
            known = [{v: k for k, v in _VERIFY_ALIASES.items()}.get(name, name) for name in VERIFY_SETTINGS]
            raise OptionError(f"{where}: unknown option {key!r} (expected one of {', '.join(known)})"
                              + did_you_mean(key, known))
        if raw is None:
            continue
        values[setting.name] = parse_value(setting.name, raw, f"{where}: {key}", OptionError)
    return Settings(**values)


# --- the memory budget, before anything is allocated ---------------------------------------

# Bytes one input value takes: floating inputs are drawn and kept as float64 (complex128) truth
# values, whatever the case's dtype; integer and bool tensors keep their own dtype.
_VALUE_BYTES = {"complex128": 16, "complex64": 16, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
                "bool": 1}


def _decimal_size(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} bytes"


def check_input_memory(cases: Iterable[Any], settings: Settings) -> None:
    """Refuse a case whose inputs alone exceed --max-memory, before any tensor is made: a shape
    of (100000, 100000) would otherwise ask the allocator for 80 GB (or fail inside torch)."""
    for case in cases:
        if case.skip_reason or case.problem:
            continue
        tensors = [p for p in case.tensor_inputs if p.shape is not None]
        needed = sum(math.prod(p.shape) * _VALUE_BYTES.get(case.tensor_dtype(p), 8) for p in tensors)
        if needed > settings.max_memory:
            shapes = ", ".join(str(tuple(p.shape)) for p in tensors)
            op = case.op
            raise SpecError(f"{op.name}: shape{'s' if len(tensors) > 1 else ''} {shapes} "
                            f"need{'' if len(tensors) > 1 else 's'} {_decimal_size(needed)} for its inputs alone; "
                            f"--max-memory is {format_size(settings.max_memory)}",
                            file=op.spec_file or op.file, line=op.spec_line or op.line)
