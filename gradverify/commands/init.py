'''`gradverify init NAME`: a commented starter spec that passes as written.

The starter checks a small working op (out = x * w, element-wise) so the user sees a green
run first, then replaces forward and backward with their own.
'''

from __future__ import annotations

import os
import re
from pathlib import Path

from gradverify.errors import UsageError, shorten

KINDS = ("python", "yaml", "both")

_PY_HEADER = '''"""Starter spec for {cls}. As written it passes: replace forward and backward with your op.

    gradverify check {py}

gradverify finds every torch.autograd.Function defined in this file, calls forward with
random inputs, and compares your backward with the derivative, entry by entry.
"""

import torch
'''

_PY_MODULE_HEADER = '''"""The op {cls}: plain torch, no gradverify code. {yaml} is its spec:

    gradverify check {yaml}

As written it passes: replace forward and backward with your op.
"""

import torch
'''

_PY_DECLARED = '''
import gradverify as gv


# One @gv.check per way to call the op: forward's arguments by name. gv.tensor(4, 3) is a
# random 4x3 tensor; domain= picks its values (any, positive, negative, nonzero, unit,
# probability), e.g. "positive" for log or 1/x. Other options:
#   reference=fn          a plain function computing the same as forward (an extra truth)
#   surrogate="why"       backward is deliberately not the derivative (straight-through...)
#   expect_failure="why"  a known bug: reported as an expected failure until it is fixed
#   atol=..., rtol=...    tolerances (defaults depend on the dtype)
@gv.check(inputs={{"x": gv.tensor(4, 3), "w": gv.tensor(4, 3)}})
'''

_PY_BODY = '''class {cls}(torch.autograd.Function):
    """out = x * w, element-wise (replace with your op)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad_out):
        # One gradient per forward argument, each shaped like that argument (None for
        # arguments that need none).
        x, w = ctx.saved_tensors
        return grad_out * w, grad_out * x
'''

_YAML = '''# Starter YAML spec for {cls}. As written it passes: put your op in {py_name} (or point
# `function` at it by import path) and describe its inputs.
#
#   gradverify check {yaml}
#
# The full format is in the gradverify docs (YAML specs).

# The op: 'file.py:Class' relative to this file, or 'mypkg.ops:Class' by import path.
function: {py_name}:{cls}

# forward's arguments by name. Tensors get a shape, which may use named dims (N, K...) so
# related inputs agree; `domain` picks their values; `requires_grad: false` for inputs that
# need no gradient. Anything else is a plain value passed as is (e.g. `dim: 1`).
inputs:
  x: {{shape: [N, K]}}
  w: {{shape: [N, K], domain: any}}

# Each case binds the named dims once: one case per entry.
cases:
  - {{N: 4, K: 3}}
  - {{N: 1, K: 5}}

# What to sweep (the command line's --dtype/--device/--seed win over these).
dtypes: [float64, float32]
devices: [cpu]
seed: 0

# Optional:
# tolerances: {{float32: {{atol: 1.0e-5, rtol: 1.0e-4}}}}
# checks: [jacobian, gradcheck]
# reference: mypkg.ops:plain_function
# surrogate: straight-through estimator     (or: expect_failure: issue 123)
'''


def class_name(stem: str) -> str:
    """'my_op' -> 'MyOp': a valid Python class name from a file name."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", stem) if p]
    name = "".join(p[:1].upper() + p[1:] for p in parts) or "MyOp"
    return name if name[0].isalpha() else f"Op{name}"


def starter_files(name: str, kind: str = "python") -> dict[Path, str]:
    """The files `init` writes and their text (kind: python, yaml or both)."""
    if kind not in KINDS:
        from gradverify.schema import Invalid

        raise UsageError(Invalid(f"one of {', '.join(KINDS)}", kind, KINDS).message("--kind"))
    base = Path(name)
    if base.suffix in (".py", ".yaml", ".yml"):
        base = base.with_suffix("")
    if not base.name or base.name.startswith("."):
        raise UsageError(f"init {name!r}: expected a name like my_op or specs/my_op")
    cls = class_name(base.name)
    py, yaml_path = base.with_suffix(".py"), base.with_suffix(".yaml")
    # With YAML only, the .py is a plain op module; the YAML is its spec.
    decorated = kind in ("python", "both")
    header = (_PY_HEADER.format(cls=cls, py=py) if decorated
              else _PY_MODULE_HEADER.format(cls=cls, yaml=yaml_path))
    files = {py: header + (_PY_DECLARED.format() if decorated else "\n\n") + _PY_BODY.format(cls=cls)}
    if kind in ("yaml", "both"):
        files[yaml_path] = _YAML.format(cls=cls, py_name=py.name, yaml=yaml_path)
    return files


def write_starter(name: str, kind: str = "python") -> list[Path]:
    """Write the starter files; refuses (exit 2) if any of them exists already."""
    files = starter_files(name, kind)
    try:
        existing = [str(p) for p in files if os.path.lexists(p)]
        if existing:
            raise UsageError(f"{existing[0]} already exists: refusing to overwrite it (choose another NAME)")
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as handle:
                handle.write(text)
    except OSError as exc:  # a name too long, a parent that is a file, no permission
        raise UsageError(f"cannot write the starter: {exc.strerror or exc}",
                         file=shorten(str(exc.filename or name))) from None
    return list(files)


def run_init(name: str, kind: str) -> int:
    """What `gradverify init` does: write the starter, say what to run next."""
    import sys

    from gradverify.errors import escape_terminal

    written = write_starter(name, kind)
    for path in written:
        sys.stdout.write(escape_terminal(f"wrote {path}") + "\n")
    sys.stdout.write(escape_terminal(f"next: gradverify check {written[-1]}") + "\n")
    return 0
