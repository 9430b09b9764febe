"""Frozen settings for one run, and parsing of the values users type for them."""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from gradverify.errors import UsageError

Shape = tuple[int, ...]
ShapeSet = tuple[Shape, ...]

# Used when neither the command line nor the spec gives a shape. Non-square on purpose: a
# transposed gradient or a sum over the wrong dim is invisible on a square input.
DEFAULT_SHAPE: Shape = (3, 4)

DTYPES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64")
GRADCHECK_MODES = ("fast", "slow", "off")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")


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
    # Cap on the memory of Jacobian chunks, in bytes.
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
    # rich | plain | json (from --format, GRADVERIFY_FORMAT or pyproject).
    output_format: str = "rich"
    # Fields set on the command line or by GRADVERIFY_* variables, which beat an op's own spec
    # values. None (a Settings built in code): every field that differs from its default counts.
    explicit: frozenset[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    def is_explicit(self, name: str) -> bool:
        """Whether `name` was chosen for this run (so it beats the spec's own value)."""
        if self.explicit is not None:
            return name in self.explicit
        for f in fields(self):
            if f.name == name:
                default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
                return bool(getattr(self, name) != default)
        raise AttributeError(name)


def parse_shape_set(text: str) -> ShapeSet:
    """'2,3,3' -> ((2,3,3),); '4,3;5,3;5' -> ((4,3),(5,3),(5,)); '' or '()' -> a 0-d tensor."""
    parts = [part.strip() for part in text.split(";")]
    shapes: list[Shape] = []
    for part in parts:
        cleaned = part.strip("()[] ").rstrip(",")
        if cleaned == "":
            shapes.append(())
            continue
        try:
            # '2,3,3' and '2x3x3' both work; every token must be a size (no empty ones: '2,,3').
            tokens = [size.strip() for size in cleaned.replace("x", ",").split(",")]
            sizes = tuple(int(size) for size in tokens)
        except ValueError:
            raise UsageError(
                f"--shape {text!r}: expected comma-separated sizes like 2,3,3 "
                "(one shape for every input) or shapes separated by ';' like '4,3;5,3;5'"
            ) from None
        if any(size < 0 for size in sizes):
            raise UsageError(f"--shape {text!r}: sizes must not be negative")
        shapes.append(sizes)
    return tuple(shapes)


def validate_tolerance(value: Any, label: str, error: type[Exception] = UsageError) -> float:
    """A tolerance: a finite, non-negative number (NaN or inf would silently switch a check off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise error(f"{label}: expected a finite non-negative number, found {value!r}")
    return float(value)


def did_you_mean(text: str, choices: Any) -> str:
    """' (did you mean 'float32'?)' for a near miss among `choices`, else ''."""
    import difflib

    close = difflib.get_close_matches(str(text).lower(), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_dtype(text: str) -> str:
    aliases = {"double": "float64", "float": "float32", "half": "float16", "f64": "float64",
               "f32": "float32", "f16": "float16", "bf16": "bfloat16", "cdouble": "complex128",
               "cfloat": "complex64"}
    name = aliases.get(text.strip().lower(), text.strip().lower())
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise UsageError(f"--dtype {text!r}: expected one of {', '.join(DTYPES)}" + did_you_mean(name, DTYPES))
    return name


# --- project configuration: CLI flags > GRADVERIFY_* variables > pyproject.toml > defaults ---

# Report formats on stdout (the CLI checks the final choice against its own list again).
FORMATS = ("rich", "plain", "json", "junit", "github")

# [tool.gradverify] keys -> what they hold. Each is also GRADVERIFY_<KEY> (upper case) in the
# environment, except `tolerances` (a table); list values there are separated as listed.
CONFIG_KEYS: dict[str, str] = {
    "paths": "spec paths to check when none is given (relative to pyproject.toml)",
    "shapes": "shape sets to sweep, each like '2,3,3' or '4,3;5,3' (env: separated by spaces)",
    "dtypes": "dtypes to sweep (env: comma-separated)",
    "devices": "devices to sweep (env: comma-separated)",
    "seed": "seed for every input",
    "domain": "value domain of every tensor input",
    "atol": "absolute tolerance",
    "rtol": "relative tolerance",
    "tolerances": "per-dtype tolerances: {float32 = {atol = ..., rtol = ...}}",
    "format": "output format: rich, plain or json",
    "gradcheck": "torch gradcheck mode: fast, slow or off",
    "max_entries": "mismatched entries shown per failing check",
    "nondet_tol": "allowed difference between two identical backward calls",
    "require_device": "an unavailable device fails instead of being skipped",
}

# Config key -> Settings field, where the names differ.
_FIELD_OF = {"tolerances": "dtype_tolerances", "format": "output_format"}
_LIST_SEPARATORS = {"paths": os.pathsep, "shapes": None, "dtypes": ",", "devices": ","}


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above `start` (a file's folder, or a folder), as black does."""
    here = start.resolve()
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _toml_line(text: str, key: str, table: str = "tool.gradverify") -> int | None:
    """Best-effort line of `key` inside `[table]` (tomllib keeps no positions)."""
    current = ""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[+\s*([^\]]+?)\s*\]+", line)
        if header:
            current = header.group(1).replace('"', "").replace("'", "").replace(" ", "")
            continue
        if current == table and pattern.match(line):
            return number
    return None


def load_pyproject_config(path: Path) -> dict[str, Any] | None:
    """The parsed values of `[tool.gradverify]` in `path` (None if it has no such table); errors exit 2."""
    import tomllib

    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        raise UsageError(f"invalid TOML: {str(exc).split(' (at line')[0]}", file=str(path),
                         line=int(found.group(1)) if found else None,
                         col=int(found.group(2)) if found else None) from None
    table = data.get("tool", {}).get("gradverify")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError("[tool.gradverify]: expected a table, found a value", file=str(path))
    values: dict[str, Any] = {}
    for raw_key, raw in table.items():
        key = raw_key.replace("-", "_")
        label = f"[tool.gradverify] {raw_key}"
        line = _toml_line(text, raw_key)
        if key not in CONFIG_KEYS:
            raise UsageError(f"[tool.gradverify] unknown key {raw_key!r} (expected one of "
                             f"{', '.join(CONFIG_KEYS)})", file=str(path), line=line)
        try:
            if key == "paths":
                items = _as_list(raw, label)
                values[key] = tuple(str((path.parent / str(p)).resolve()) if not Path(str(p)).is_absolute()
                                    else str(p) for p in items)
            else:
                values[key] = _parse_value(key, raw, label)
        except UsageError as exc:
            raise UsageError(exc.message, file=str(path), line=line) from None
    return values


def _found(raw: Any) -> str:
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, (list, tuple)):
        return "a list"
    if isinstance(raw, dict):
        return "a table"
    return f"{type(raw).__name__} {raw!r}"


def _as_list(raw: Any, label: str) -> list[Any]:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        return [raw]
    raise UsageError(f"{label}: expected a list of strings, found {_found(raw)}")


def _parse_value(key: str, raw: Any, label: str) -> Any:
    """One config value (as TOML, the command line or an env var after splitting gives it)."""
    if key == "shapes":
        sets: list[ShapeSet] = []
        for item in _as_list(raw, label):
            if isinstance(item, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool)
                                                        for n in item):
                text = ",".join(str(n) for n in item)
            elif isinstance(item, str):
                text = item
            else:
                raise UsageError(f"{label}: expected shapes like '2,3,3' or [2, 3, 3], found {_found(item)}")
            try:
                sets.append(parse_shape_set(text))
            except UsageError:
                raise UsageError(f"{label}: expected comma-separated sizes like '2,3,3' (one shape for every "
                                 f"input) or '4,3;5,3' (one per input), found {text!r}") from None
        return tuple(sets)
    if key in ("dtypes", "devices", "paths"):
        items = _as_list(raw, label)
        if not all(isinstance(i, str) and i.strip() for i in items):
            raise UsageError(f"{label}: expected a list of strings, found {_found(raw)}")
        if key == "devices":
            for item in items:
                if not DEVICE_PATTERN.fullmatch(item.strip()):
                    raise UsageError(f"{label}: expected cpu, cuda, cuda:N or mps, found {item!r}")
        if key == "dtypes":
            out = []
            for item in items:
                try:
                    out.append(parse_dtype(item))
                except UsageError:
                    raise UsageError(f"{label}: expected one of {', '.join(DTYPES)}, found {item!r}") from None
            return tuple(out)
        return tuple(i.strip() for i in items)
    if key in ("seed", "max_entries"):
        if isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                pass
        # Seeds feed torch.Generator.manual_seed, which takes 64-bit values.
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0 or raw >= 2**63 // 1_000_003:
            raise UsageError(f"{label}: expected a non-negative integer below {2**63 // 1_000_003}, "
                             f"found {_found(raw)}")
        return raw
    if key in ("atol", "rtol", "nondet_tol"):
        return _parse_float(raw, label)
    if key == "require_device":
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if not isinstance(raw, bool):
            raise UsageError(f"{label}: expected true or false, found {_found(raw)}")
        return raw
    if key == "domain":
        from gradverify.cases import DOMAINS

        if not isinstance(raw, str) or raw not in DOMAINS:
            raise UsageError(f"{label}: expected one of {', '.join(DOMAINS)}, found {_found(raw)}")
        return raw
    if key == "format":
        if not isinstance(raw, str) or raw.lower() not in FORMATS:
            raise UsageError(f"{label}: expected one of {', '.join(FORMATS)}, found {_found(raw)}")
        return raw.lower()
    if key == "gradcheck":
        if not isinstance(raw, str) or raw not in GRADCHECK_MODES:
            raise UsageError(f"{label}: expected one of {', '.join(GRADCHECK_MODES)}, found {_found(raw)}")
        return raw
    if key == "tolerances":
        if not isinstance(raw, dict):
            raise UsageError(f"{label}: expected a table like {{float32 = {{atol = 1e-4, rtol = 1e-3}}}}, "
                             f"found {_found(raw)}")
        rows: list[tuple[str, float | None, float | None]] = []
        for dtype, tol in raw.items():
            if dtype not in DTYPES:
                raise UsageError(f"{label}.{dtype}: expected a dtype ({', '.join(DTYPES)}), found {dtype!r}")
            if not isinstance(tol, dict) or not tol or set(tol) - {"atol", "rtol"}:
                raise UsageError(f"{label}.{dtype}: expected a table with atol and/or rtol, found {_found(tol)}"
                                 if not isinstance(tol, dict) or not tol else
                                 f"{label}.{dtype}: expected keys atol, rtol, found "
                                 f"{sorted(set(tol) - {'atol', 'rtol'})[0]!r}")
            atol = _parse_float(tol["atol"], f"{label}.{dtype}.atol") if "atol" in tol else None
            rtol = _parse_float(tol["rtol"], f"{label}.{dtype}.rtol") if "rtol" in tol else None
            rows.append((dtype, atol, rtol))
        return tuple(rows)
    raise KeyError(key)


def _parse_float(raw: Any, label: str) -> float:
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            pass
    # NaN compares false with everything: a NaN tolerance would silently switch a check off.
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise UsageError(f"{label}: expected a finite non-negative number, found {_found(raw)}")
    return float(raw)


def env_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from GRADVERIFY_<KEY> variables (unset or empty ones are ignored)."""
    values: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        if key == "tolerances":
            continue
        name = f"GRADVERIFY_{key.upper()}"
        text = environ.get(name, "").strip()
        if not text:
            continue
        raw: Any = text
        if key in _LIST_SEPARATORS:
            raw = [part for part in text.split(_LIST_SEPARATORS[key]) if part.strip()]
        values[key] = _parse_value(key, raw, name)
    return values


_CLI_FLAGS = {"shapes": "--shape", "dtypes": "--dtype", "devices": "--device", "format": "--format",
              "max_entries": "--max-entries", "nondet_tol": "--nondet-tol",
              "require_device": "--require-device"}


def resolve_settings(cli: Mapping[str, Any], start: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for one run: CLI flags > GRADVERIFY_* variables > pyproject.toml > defaults.

    `cli` holds config keys (CONFIG_KEYS, plus `ops` and any other Settings field) with None or
    an empty list for a flag that was not given. `start` is where the pyproject.toml search
    begins (the first spec path, or the working directory).
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    pyproject = find_pyproject(start)
    configured = load_pyproject_config(pyproject) if pyproject is not None else None
    if configured is not None:
        merged.update(configured)
    from_env = env_config(environ)
    merged.update(from_env)
    explicit = set(from_env)
    passthrough: dict[str, Any] = {}
    setting_names = {f.name for f in fields(Settings)}
    for key, raw in cli.items():
        if raw is None or (isinstance(raw, (list, tuple)) and not raw):
            continue
        if key in CONFIG_KEYS:
            merged[key] = _parse_value(key, raw, _CLI_FLAGS.get(key, f"--{key.replace('_', '-')}"))
            explicit.add(key)
        elif key in setting_names:
            passthrough[key] = tuple(raw) if isinstance(raw, list) else raw
            explicit.add(key)
        else:
            raise TypeError(f"resolve_settings: unknown option {key!r}")
    values = {_FIELD_OF.get(k, k): v for k, v in merged.items()}
    values.update(passthrough)
    sources = {_FIELD_OF.get(k, k): ("command line" if k in cli and cli[k] not in (None, [], ()) else
                                     f"GRADVERIFY_{k.upper()}" if k in from_env else "pyproject.toml")
               for k in merged}
    sources.update({k: "command line" for k in passthrough})
    extra: dict[str, Any] = {"sources": sources}
    if configured is not None:
        extra["config_file"] = str(pyproject)
    return Settings(**values, explicit=frozenset(_FIELD_OF.get(k, k) for k in explicit), extra=extra)


MODES = ("auto", "full", "fast")
SEED_LIMIT = 2**63 // 1_000_003


def validate_options(options: Mapping[str, Any], where: str) -> Settings:
    """Settings from library keyword options (verify(), the pytest fixture), each validated as
    its command-line flag is: the same value is accepted or rejected everywhere."""
    from gradverify.checks import check_names

    values: dict[str, Any] = {}
    for name, value in options.items():
        label = f"{where}: {name}"
        if name in ("atol", "rtol", "nondet_tol"):
            values[name] = validate_tolerance(value, label)
        elif name == "gradcheck":
            if value not in GRADCHECK_MODES:
                raise UsageError(f"{label}: expected one of {', '.join(GRADCHECK_MODES)}, found {value!r}"
                                 + did_you_mean(str(value), GRADCHECK_MODES))
            values[name] = value
        elif name == "mode":
            if value not in MODES:
                raise UsageError(f"{label}: expected one of {', '.join(MODES)}, found {value!r}"
                                 + did_you_mean(str(value), MODES))
            values[name] = value
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
                raise UsageError(f"{label}: expected an integer in [0, {SEED_LIMIT}), found {value!r}")
            values[name] = value
        elif name == "order":
            if value not in (1, 2) or isinstance(value, bool):
                raise UsageError(f"{label}: expected 1 (gradients) or 2 (also the double backward), found {value!r}")
            values[name] = value
        elif name in ("max_entries", "mismatch_cap"):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_entries" else 1):
                raise UsageError(f"{label}: expected a non-negative integer, found {value!r}")
            values[name] = value
        elif name == "max_memory":
            if isinstance(value, bool) or not isinstance(value, int) or value < 2**20:
                raise UsageError(f"{label}: expected a number of bytes of at least 1 MiB, found {value!r}")
            values[name] = value
        elif name in ("forward_ad", "strict"):
            if not isinstance(value, bool):
                raise UsageError(f"{label}: expected True or False, found {value!r}")
            values[name] = value
        elif name in ("checks", "skip_checks"):
            items = (value,) if isinstance(value, str) else tuple(value or ())
            for item in items:
                if item not in check_names():
                    raise UsageError(f"{label}: expected check names ({', '.join(check_names())}), found {item!r}"
                                     + did_you_mean(str(item), check_names()))
            values["add_checks" if name == "checks" else "skip_checks"] = items
        else:
            raise UsageError(f"{where}: unknown option {name!r}")
    return Settings(**values)
