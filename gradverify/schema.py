"""One schema for every setting a user can give: its type, range, choices and message.

The command line, GRADVERIFY_* variables, `[tool.gradverify]` in pyproject.toml, a YAML op's
keys, `gv.check(...)` and `verify(**options)` all parse values through `SETTINGS`, so the same
value is accepted or rejected everywhere, in the same words: `<where>: expected <what>, found
<value>`. Only `<where>` differs (`--gradcheck`, `GRADVERIFY_GRADCHECK`, `[tool.gradverify]
gradcheck`, `ops[0].gradcheck`, `verify(): gradcheck`). Choices are enums (or, for check
names, the checks registry itself), so no list of names is kept in sync by hand.

Importing this module imports neither torch nor the engine: the command line validates its
flags before deciding whether it needs torch at all (`--changed` often does not).
"""

from __future__ import annotations

import ast
import enum
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

Shape = tuple[int, ...]
ShapeSet = tuple[Shape, ...]

# Where a value comes from (a Setting accepts it only from the sources it lists).
CLI, ENV, PYPROJECT, YAML, DECLARE, VERIFY = "cli", "env", "pyproject", "yaml", "declare", "verify"


class Invalid(ValueError):
    """A value a setting does not accept: what was expected, what was found (and, for a list,
    which item; for a choice, the names a near miss is compared with)."""

    def __init__(self, expected: str, found: Any, choices: Iterable[str] = (), index: int | None = None,
                 at: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.found = found
        self.choices = tuple(choices)
        # For a list: the bad item's position; for a table: the bad key's path (".float32.atol").
        self.index = index
        self.at = at

    def message(self, label: str) -> str:
        """`label: expected ..., found ...` (+ `(did you mean 'x'?)`): the one wording of a bad value."""
        return f"{label}{self.at}: {self.detail}"

    @property
    def detail(self) -> str:
        """`expected ..., found ...`: the part that is the same wherever the value came from."""
        hint = did_you_mean(self.found, self.choices) if isinstance(self.found, str) and self.choices else ""
        return f"expected {self.expected}, found {describe(self.found)}{hint}"


def describe(value: Any) -> str:
    """How a message shows a value it did not expect: strings quoted (and cut, and escaped by
    repr), numbers as written, containers by kind."""
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        text = str(abs(value)) if abs(value) < 10**40 else ""
        return (("-" if value < 0 else "") + text) if text else "an integer of more than 40 digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def did_you_mean(text: Any, choices: Iterable[Any]) -> str:
    """' (did you mean 'float32'?)' for a near miss among `choices`, else ''."""
    import difflib

    close = difflib.get_close_matches(str(text).strip().lower()[:100], [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- choices -----------------------------------------------------------------------------

class GradcheckMode(str, enum.Enum):
    """torch.autograd.gradcheck as a second opinion: fast mode, slow (full) mode, or not at all."""

    FAST = "fast"
    SLOW = "slow"
    OFF = "off"


class Mode(str, enum.Enum):
    """How the Jacobian check compares: every entry (full), random projections (fast), by size (auto)."""

    AUTO = "auto"
    FULL = "full"
    FAST = "fast"


class OutputFormat(str, enum.Enum):
    """A report format: on stdout (`--format`) or in a file (`--output FORMAT:FILE`)."""

    RICH = "rich"
    PLAIN = "plain"
    JSON = "json"
    JUNIT = "junit"
    GITHUB = "github"
    MD = "md"
    HTML = "html"

    @property
    def on_stdout(self) -> bool:
        """A page of HTML is only useful in a file (`--html FILE`)."""
        return self is not OutputFormat.HTML

    @classmethod
    def from_suffix(cls, suffix: str) -> OutputFormat | None:
        """`--output report.xml`: the format a file name's suffix implies."""
        return _SUFFIXES.get(suffix.lower())


_SUFFIXES = {".xml": OutputFormat.JUNIT, ".json": OutputFormat.JSON, ".html": OutputFormat.HTML,
             ".htm": OutputFormat.HTML, ".txt": OutputFormat.PLAIN, ".log": OutputFormat.PLAIN,
             ".md": OutputFormat.MD}
STDOUT_FORMATS = tuple(f.value for f in OutputFormat if f.on_stdout)


def values(choices: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(str(member.value) for member in choices)


DTYPES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64")
DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "f64": "float64", "f32": "float32",
                 "f16": "float16", "bf16": "bfloat16", "cdouble": "complex128", "cfloat": "complex64"}
# cuda:N with at most 4 digits: a device index that large does not exist, and a longer one
# would overflow torch's int parsing.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,4})?|mps")
# Inputs are seeded with seed * 1_000_003 + position, which must fit torch's 64-bit seed.
SEED_LIMIT = 2**63 // 1_000_003
# One size of one dim: torch takes 64-bit sizes, but a dim past 2^31 - 1 cannot fit any memory
# budget (the budget check multiplies sizes; a zero elsewhere in the shape would hide it).
MAX_SIZE = 2**31 - 1
MAX_DIMS = 64
# --max-memory: below 1M even one Jacobian row of a small op does not fit; 1P is past any machine.
MIN_MEMORY, MAX_MEMORY = 2**20, 2**50
# --timeout: seconds one case may run; a day is past any sensible single case (and keeps the
# value far from the limits of the clocks and timers it is added to).
MAX_TIMEOUT = 86_400.0
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


# --- parsers: raw value (a string from the command line or the environment, or a TOML, YAML
# or Python value) -> the setting's value, or Invalid ------------------------------------------

def _number(raw: Any, expected: str) -> float:
    value = raw
    if isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise Invalid(expected, raw) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(expected, raw)
    try:
        return float(value)
    except OverflowError:  # an int past the float range
        raise Invalid(expected, raw) from None


def tolerance(raw: Any) -> float:
    """A tolerance: finite and non-negative (NaN compares false with everything and inf accepts
    anything: either would silently switch a check off)."""
    expected = "a finite non-negative number"
    value = _number(raw, expected)
    if not math.isfinite(value) or value < 0:
        raise Invalid(expected, raw)
    return value


def _integer(raw: Any, low: int, high: int, expected: str | None = None) -> int:
    expected = expected or f"an integer from {low} to {high}"
    value = raw
    if isinstance(raw, str):
        # At most 40 digits: int() of a longer string is slow, and no setting goes that far.
        if not re.fullmatch(r"\s*[+-]?\d{1,40}\s*", raw):
            raise Invalid(expected, raw)
        value = int(raw)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(expected, raw)
    return value


def integer(low: int, high: int, expected: str | None = None) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        return _integer(raw, low, high, expected)

    return parse


def seed(raw: Any) -> int:
    return _integer(raw, 0, SEED_LIMIT - 1)


def order(raw: Any) -> int:
    return _integer(raw, 1, 2, "1 (gradients) or 2 (also the double backward)")


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    raise Invalid("true or false", raw)


def choice(choices: type[enum.Enum], allowed: Iterable[str] | None = None) -> Callable[[Any], str]:
    names = tuple(allowed) if allowed is not None else values(choices)

    def parse(raw: Any) -> str:
        if isinstance(raw, enum.Enum):
            raw = raw.value
        if not isinstance(raw, str) or raw.strip().lower() not in names:
            raise Invalid(f"one of {', '.join(names)}", raw, names)
        return raw.strip().lower()

    return parse


def size(raw: Any) -> int:
    """A memory size: bytes, or a number with K/M/G/T/P (binary: 512M is 512 MiB)."""
    expected = "a size from 1M to 1P, like 512M or 2G"
    if isinstance(raw, str):
        found = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,6})?)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*", raw)
        if not found:
            raise Invalid(expected, raw)
        value = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        raise Invalid(expected, raw)
    if not MIN_MEMORY <= value <= MAX_MEMORY:
        raise Invalid(expected, raw)
    return value


def format_size(value: int) -> str:
    """Bytes as the flag takes them: 512M, 1.5G."""
    for unit in ("P", "T", "G", "M", "K"):
        if value >= _UNITS[unit]:
            return f"{value / _UNITS[unit]:.3g}{unit}"
    return f"{value}B"


def timeout(raw: Any) -> float:
    expected = f"a number of seconds above 0 and at most {MAX_TIMEOUT:g}"
    value = _number(raw, expected)
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise Invalid(expected, raw)
    return value


def _items(raw: Any, expected: str) -> list[Any]:
    """A list setting's items: a list, or one string (the command line repeats the flag; the
    environment splits before this)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise Invalid(f"a non-empty list of {expected}", raw)
        return list(raw)
    raise Invalid(f"a list of {expected}", raw)


def _each(raw: Any, what: str, one: Callable[[Any], Any], unique: bool = True) -> tuple[Any, ...]:
    """Parse every item of a list setting (repeats dropped if `unique`); an item's Invalid says
    which item it was."""
    out = []
    for index, item in enumerate(_items(raw, what)):
        try:
            out.append(one(item))
        except Invalid as exc:
            raise Invalid(exc.expected, exc.found, exc.choices, index) from None
    return tuple(dict.fromkeys(out)) if unique else tuple(out)


def dtype(raw: Any) -> str:
    """One dtype name (aliases: double, float, half, f32, bf16, torch.float32, ...)."""
    if not isinstance(raw, str):
        raise Invalid(f"one of {', '.join(DTYPES)}", raw, DTYPES)
    name = raw.strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise Invalid(f"one of {', '.join(DTYPES)}", raw, DTYPES)
    return name


def dtypes(raw: Any) -> tuple[str, ...]:
    return _each(raw, "dtype names", dtype)


def device(raw: Any) -> str:
    if not isinstance(raw, str) or not DEVICE_PATTERN.fullmatch(raw.strip()):
        raise Invalid("cpu, cuda, cuda:N or mps", raw, ("cpu", "cuda", "mps"))
    return raw.strip()


def devices(raw: Any) -> tuple[str, ...]:
    return _each(raw, "devices", device)


SHAPE_EXPECTED = ("sizes like 2,3,3 (every tensor input), 4,3;5,3;5 (one shape per input) or () for a 0-d tensor, "
                  f"each size from 0 to {MAX_SIZE}")


def shape(raw: Any) -> Shape:
    """One shape: [2, 3] (TOML, YAML, Python) or '2,3' / '2x3' / '(2, 3)' / '()'."""
    if isinstance(raw, (list, tuple)):
        if len(raw) > MAX_DIMS or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SIZE
                                          for n in raw):
            raise Invalid(SHAPE_EXPECTED, raw)
        return tuple(raw)
    if not isinstance(raw, str):
        raise Invalid(SHAPE_EXPECTED, raw)
    text = raw.strip()
    cleaned = text.strip("()[] ").rstrip(",").strip()
    if cleaned == "":
        if text in ("()", "[]"):
            return ()
        raise Invalid(SHAPE_EXPECTED, raw)
    tokens = [token.strip() for token in cleaned.replace("x", ",").split(",")]
    if len(tokens) > MAX_DIMS or not all(re.fullmatch(r"\d{1,10}", token) for token in tokens):
        raise Invalid(SHAPE_EXPECTED, raw)
    sizes = tuple(int(token) for token in tokens)
    if any(n > MAX_SIZE for n in sizes):
        raise Invalid(SHAPE_EXPECTED, raw)
    return sizes


def shape_set(raw: Any) -> ShapeSet:
    """'2,3,3' -> ((2,3,3),) (every input); '4,3;5,3;5' -> ((4,3),(5,3),(5,)) (one per input);
    [2, 3] -> ((2, 3),). An empty string is not a shape: '()' is the 0-d one."""
    if isinstance(raw, (list, tuple)):
        return (shape(raw),)
    if not isinstance(raw, str) or not raw.strip():
        raise Invalid(SHAPE_EXPECTED, raw)
    try:
        return tuple(shape(part) for part in raw.split(";"))
    except Invalid:
        raise Invalid(SHAPE_EXPECTED, raw) from None


def shapes(raw: Any) -> tuple[ShapeSet, ...]:
    if isinstance(raw, (list, tuple)) and raw and all(isinstance(n, int) for n in raw):
        raw = [raw]  # shapes = [2, 3]: one shape, not two 1-d ones
    return _each(raw, "shapes", shape_set)


def domain(raw: Any) -> str:
    """A value domain by name, or a user sampler `module:function`."""
    from gradverify.domains import DOMAINS  # imports torch: only when a domain is given

    expected = f"one of {', '.join(DOMAINS)} or 'module:function'"
    if not isinstance(raw, str) or not raw.strip():
        raise Invalid(expected, raw, DOMAINS)
    name = raw.strip()
    if name not in DOMAINS and (":" not in name or not all(part.strip() for part in name.rsplit(":", 1))):
        raise Invalid(expected, raw, DOMAINS)
    return name


def check_name(raw: Any) -> str:
    from gradverify.checks import check_names  # the registry: the one list of check names

    names = check_names()
    if not isinstance(raw, str) or raw.strip() not in names:
        raise Invalid(f"one of {', '.join(names)}", raw, names)
    return raw.strip()


def check_list(raw: Any) -> tuple[str, ...]:
    return _each(raw, "check names", check_name)


def _name(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise Invalid("a non-empty name", raw)
    return raw.strip()


def names(raw: Any) -> tuple[str, ...]:
    return _each(raw, "names", _name)


def _assignment(raw: Any) -> tuple[str, str]:
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        raw = f"{raw[0]}={raw[1]}"
    if not isinstance(raw, str):
        raise Invalid("NAME=VALUE", raw)
    name, sep, value = raw.partition("=")
    if not sep or not name.strip().isidentifier():
        raise Invalid("NAME=VALUE with NAME a parameter name, e.g. dim=1", raw)
    return name.strip(), value.strip()


def argument(raw: Any) -> tuple[str, Any]:
    """--arg NAME=VALUE: VALUE read as a Python literal (1, 1e-5, [0, 1], True, None, 'mean');
    anything that is not a literal is taken as a string."""
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], str) and raw[0].isidentifier():
        return raw[0], raw[1]  # already a (name, value) pair
    name, text = _assignment(raw)
    try:
        value: Any = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        value = text
    return name, value


def arguments(raw: Any) -> tuple[tuple[str, Any], ...]:
    return _each(raw, "NAME=VALUE arguments", argument, unique=False)


def input_domain(raw: Any) -> tuple[str, str]:
    name, text = _assignment(raw)
    return name, domain(text)


def input_domains(raw: Any) -> tuple[tuple[str, str], ...]:
    return _each(raw, "NAME=DOMAIN pairs", input_domain, unique=False)


TOLERANCES_EXPECTED = "a mapping of dtype to {atol, rtol}, like {float32 = {atol = 1e-4, rtol = 1e-3}}"


def tolerances(raw: Any) -> tuple[tuple[str, float | None, float | None], ...]:
    """Per-dtype tolerances: {float32: {atol: 1e-4, rtol: 1e-3}}."""
    if not isinstance(raw, Mapping):
        raise Invalid(TOLERANCES_EXPECTED, raw)
    rows = []
    for index, (name, table) in enumerate(raw.items()):
        try:
            canonical = dtype(name)
        except Invalid:
            raise Invalid(f"a dtype ({', '.join(DTYPES)})", name, DTYPES, index, at=f".{name}") from None
        if not isinstance(table, Mapping) or not table:
            raise Invalid("a mapping with atol and/or rtol", table, index=index, at=f".{name}")
        unknown = sorted(str(key) for key in set(table) - {"atol", "rtol"})
        if unknown:
            raise Invalid("keys atol, rtol", unknown[0], ("atol", "rtol"), index, at=f".{name}")
        found: list[float | None] = []
        for key in ("atol", "rtol"):
            try:
                found.append(tolerance(table[key]) if key in table else None)
            except Invalid as exc:
                raise Invalid(exc.expected, exc.found, index=index, at=f".{name}.{key}") from None
        rows.append((canonical, found[0], found[1]))
    return tuple(rows)


# --- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting: the Settings field it fills, how its values are parsed, and where it may be set.

    key: its name in pyproject.toml, a YAML op, gv.check and verify() (default: the field name).
    flag: its command-line flag on `check`. env_split: how GRADVERIFY_<KEY> splits into a list
    (None: one value).
    """

    name: str
    parse: Callable[[Any], Any]
    help: str
    sources: frozenset[str]
    key: str = ""
    flag: str | None = None
    env_split: str | None = None

    @property
    def config_key(self) -> str:
        return self.key or self.name

    @property
    def env(self) -> str:
        return f"GRADVERIFY_{self.config_key.upper()}"


def _setting(name: str, parse: Callable[[Any], Any], help: str, sources: str, **kwargs: Any) -> Setting:
    return Setting(name=name, parse=parse, help=help, sources=frozenset(sources.split()), **kwargs)


_EVERYWHERE = f"{CLI} {ENV} {PYPROJECT}"

SETTINGS: tuple[Setting, ...] = (
    _setting("paths", names, "spec paths to check when the command line names none (relative to pyproject.toml)",
             f"{ENV} {PYPROJECT}", env_split="pathsep"),
    _setting("shapes", shapes, "shape sets to sweep, each like '2,3,3' or '4,3;5,3'", _EVERYWHERE, flag="--shape",
             env_split="space"),
    _setting("dtypes", dtypes, "dtypes to sweep", f"{_EVERYWHERE} {YAML}", flag="--dtype", env_split=","),
    _setting("devices", devices, "devices to sweep", f"{_EVERYWHERE} {YAML}", flag="--device", env_split=","),
    _setting("seed", seed, "seed of every input", f"{_EVERYWHERE} {YAML} {VERIFY}", flag="--seed"),
    _setting("domain", domain, "value domain of every tensor input", _EVERYWHERE, flag="--domain"),
    _setting("input_domains", input_domains, "one input's domain", CLI, flag="--domain"),
    _setting("args", arguments, "plain values of the op's parameters", CLI, flag="--arg"),
    _setting("ops", names, "the ops to check, by name", CLI, flag="--op"),
    _setting("atol", tolerance, "absolute tolerance", f"{_EVERYWHERE} {YAML} {DECLARE} {VERIFY}", flag="--atol"),
    _setting("rtol", tolerance, "relative tolerance", f"{_EVERYWHERE} {YAML} {DECLARE} {VERIFY}", flag="--rtol"),
    _setting("dtype_tolerances", tolerances, "per-dtype tolerances: {float32 = {atol = ..., rtol = ...}}",
             f"{PYPROJECT} {YAML}", key="tolerances"),
    _setting("gradcheck", choice(GradcheckMode), f"torch's gradcheck: {', '.join(values(GradcheckMode))}",
             f"{_EVERYWHERE} {YAML} {VERIFY}", flag="--gradcheck"),
    _setting("mode", choice(Mode), f"Jacobian comparison: {', '.join(values(Mode))}",
             f"{_EVERYWHERE} {YAML} {VERIFY}", flag="--mode"),
    _setting("order", order, "2 also checks the double backward", f"{_EVERYWHERE} {YAML} {VERIFY}", flag="--order"),
    _setting("nondet_tol", tolerance, "allowed difference between two identical backward calls",
             f"{_EVERYWHERE} {YAML} {VERIFY}", flag="--nondet-tol"),
    _setting("checks", check_list, "the exact optional checks to run", f"{ENV} {PYPROJECT} {YAML} {DECLARE}",
             env_split=","),
    _setting("add_checks", check_list, "optional checks to add", f"{CLI} {VERIFY}", flag="--check"),
    _setting("skip_checks", check_list, "checks not to run", f"{CLI} {ENV} {PYPROJECT} {VERIFY}",
             flag="--skip-check", env_split=","),
    _setting("strict", boolean, "warnings fail the run", f"{_EVERYWHERE} {VERIFY}", flag="--strict"),
    _setting("retries", integer(0, 100), "re-draws of inputs near a non-differentiable point", _EVERYWHERE,
             flag="--retries"),
    _setting("max_entries", integer(0, 1_000_000), "mismatched entries shown per failing check",
             f"{_EVERYWHERE} {VERIFY}", flag="--max-entries"),
    _setting("mismatch_cap", integer(1, 100_000_000), "mismatched entries a check keeps", VERIFY),
    _setting("max_memory", size, "memory budget of Jacobian chunks (and of a case's inputs), like 512M",
             f"{_EVERYWHERE} {VERIFY}", flag="--max-memory"),
    _setting("jobs", integer(1, 1024), "worker processes for independent cases", _EVERYWHERE, flag="--jobs"),
    _setting("timeout", timeout, "seconds one case may run before it is stopped and reported", _EVERYWHERE,
             flag="--timeout"),
    _setting("require_device", boolean, "an unavailable device fails instead of being skipped", _EVERYWHERE,
             flag="--require-device"),
    _setting("forward_ad", boolean, "check the forward-mode jvp where the Function defines one",
             f"{PYPROJECT} {VERIFY}"),
    _setting("output_format", choice(OutputFormat, STDOUT_FORMATS),
             f"the report on stdout: {', '.join(STDOUT_FORMATS)}", _EVERYWHERE, key="format", flag="--format"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def keys_for(source: str) -> dict[str, Setting]:
    """The settings `source` may set, by the key it uses for them (a flag for the command line)."""
    if source == CLI:
        return {s.name: s for s in SETTINGS if CLI in s.sources}
    return {s.config_key: s for s in SETTINGS if source in s.sources}


def parse(name: str, raw: Any) -> Any:
    """The value of setting `name` for `raw`; Invalid if it is not one."""
    return BY_NAME[name].parse(raw)
