"""Frozen settings for one run, and parsing of the values users type for them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gradverify.errors import UsageError

Shape = tuple[int, ...]
ShapeSet = tuple[Shape, ...]

# Used when neither the command line nor the spec gives a shape. Non-square on purpose: a
# transposed gradient or a sum over the wrong dim is invisible on a square input.
DEFAULT_SHAPE: Shape = (3, 4)

DTYPES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64")
GRADCHECK_MODES = ("fast", "slow", "off")


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
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def parse_shape_set(text: str) -> ShapeSet:
    """'2,3,3' -> ((2,3,3),); '4,3;5,3;5' -> ((4,3),(5,3),(5,)); '' or '()' -> a 0-d tensor."""
    parts = [part.strip() for part in text.split(";")]
    shapes: list[Shape] = []
    for part in parts:
        cleaned = part.strip("()[] ")
        if cleaned == "":
            shapes.append(())
            continue
        try:
            sizes = tuple(int(size) for size in cleaned.replace("x", ",").split(",") if size.strip())
        except ValueError:
            raise UsageError(
                f"--shape {text!r}: expected comma-separated sizes like 2,3,3 "
                "(one shape for every input) or shapes separated by ';' like '4,3;5,3;5'"
            ) from None
        if any(size < 0 for size in sizes):
            raise UsageError(f"--shape {text!r}: sizes must not be negative")
        shapes.append(sizes)
    return tuple(shapes)


def parse_dtype(text: str) -> str:
    aliases = {"double": "float64", "float": "float32", "half": "float16", "f64": "float64",
               "f32": "float32", "f16": "float16", "bf16": "bfloat16", "cdouble": "complex128",
               "cfloat": "complex64"}
    name = aliases.get(text.strip().lower(), text.strip().lower())
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise UsageError(f"--dtype {text!r}: expected one of {', '.join(DTYPES)}")
    return name
