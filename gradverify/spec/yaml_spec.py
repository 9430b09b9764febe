"""Load a YAML spec: ops named by import path or file, inputs with named dims, cases, sweeps.

A YAML spec never runs code other than importing the op (and reference) it names: it is read
with a SafeLoader subclass (no object construction), duplicate and unknown keys are errors,
and every error is one line `file:line:col: path.to.key: expected ..., found ...` (exit 2).
The format is documented in docs/yaml.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import keyword
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, NoReturn, Sequence

import yaml

from gradverify import schema
from gradverify.errors import SpecError
from gradverify.schema import MAX_SIZE, Invalid, Setting, describe
from gradverify.spec.model import FIXED_DTYPES, CaseDecl, InputSpec, OpSpec
from gradverify.spec.yaml_load import MarkedDict, MarkedList, read_yaml, where

# Op keys that are settings, parsed by the one schema (as --dtype, GRADVERIFY_SEED, pyproject
# and verify() parse them); those without an OpSpec field of their own go to OpSpec.settings.
SETTING_KEYS: dict[str, Setting] = schema.keys_for(schema.YAML)
_OP_FIELDS = {"dtypes": "dtypes", "devices": "devices", "seed": "seed", "atol": "atol", "rtol": "rtol",
              "dtype_tolerances": "dtype_tolerances", "checks": "checks"}
OP_KEYS: tuple[str, ...] = ("function", "name", "inputs", "cases", *SETTING_KEYS, "reference", "surrogate",
                            "expect_failure", "import", "load_library")
TENSOR_KEYS: tuple[str, ...] = ("shape", "domain", "requires_grad", "dtype", "range")
DIM_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIZE_EXPECTED = f"a size from 0 to {MAX_SIZE}"

SizeOrDim = int | str
_where = where

__all__ = ["DimError", "MarkedDict", "MarkedList", "OP_KEYS", "bind_dims", "describe", "dims_of", "load_yaml_spec",
           "python_files_used", "read_yaml"]


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


# --- named dims ----------------------------------------------------------------------------

class DimError(ValueError):
    """A case cannot bind the named dims: `key` is the case key (or input) at fault, if any."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def dims_of(shapes: Mapping[str, Sequence[SizeOrDim] | None]) -> list[str]:
    """Named dims in the order inputs first use them."""
    found: list[str] = []
    for shape in shapes.values():
        for size in shape or ():
            if isinstance(size, str) and size not in found:
                found.append(size)
    return found


def bind_dims(shapes: Mapping[str, Sequence[SizeOrDim] | None], sizes: Mapping[str, int],
              concrete: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...] | None]:
    """Concrete shapes for one case.

    shapes: each input's shape, sizes or dim names ([M, K]); None = no shape given.
    sizes: the case's dim bindings ({M: 2, K: 3}).
    concrete: shapes the case gives for whole inputs ({a: [2, 3]}); they bind their dims too,
    and every way a dim is bound must agree (else 'conflicting sizes').
    """
    known = dims_of(shapes)
    bound: dict[str, tuple[int, str]] = {}
    for dim, size in sizes.items():
        if dim not in known:
            raise DimError(f"expected a named dim used by an input shape ({', '.join(known) or 'none'}), "
                           f"found {dim!r}", key=dim)
        bound[dim] = (size, f"{dim}: {size}")
    for name, given in (concrete or {}).items():
        template = shapes.get(name)
        if template is None:
            continue
        if len(given) != len(template):
            raise DimError(f"expected a shape of {len(template)} dims like {_show(template)}, found "
                           f"{list(given)}", key=name)
        for axis, (want, size) in enumerate(zip(template, given)):
            if isinstance(want, int):
                if want != size:
                    raise DimError(f"expected size {want} at dim {axis} of {name} ({_show(template)}), "
                                   f"found {size}", key=name)
                continue
            if want in bound and bound[want][0] != size:
                raise DimError(f"expected one size for dim {want!r}, found conflicting sizes "
                               f"{bound[want][0]} ({bound[want][1]}) and {size} ({name}: {list(given)})",
                               key=name)
            bound.setdefault(want, (size, f"{name}: {list(given)}"))
    resolved: dict[str, tuple[int, ...] | None] = {}
    for name, template in shapes.items():
        if name in (concrete or {}):
            resolved[name] = tuple(concrete[name])  # type: ignore[index]
            continue
        if template is None:
            resolved[name] = None
            continue
        out: list[int] = []
        for size in template:
            if isinstance(size, str):
                if size not in bound:
                    raise DimError(f"expected a size for every named dim of {name} {_show(template)}, "
                                   f"found dim {size!r} unbound")
                out.append(bound[size][0])
            else:
                out.append(size)
        resolved[name] = tuple(out)
    return resolved


def _show(shape: Sequence[SizeOrDim]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --- validation ----------------------------------------------------------------------------

class _Reader:
    """Validates one YAML spec's data, raising SpecError at the offending line and column."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        self.folder = path.resolve().parent
        self.modules: dict[Path, ModuleType] = {}

    def fail(self, mark: yaml.Mark | None, path: str, expected: str, found: str) -> NoReturn:
        line, col = _where(mark) if mark is not None else (None, None)
        raise SpecError(f"{path}: expected {expected}, found {found}", file=self.display, line=line, col=col)

    # shape-checking helpers: each takes the container, the key and the path of the value
    def mapping(self, value: Any, mark: yaml.Mark | None, path: str, expected: str) -> MarkedDict:
        if not isinstance(value, MarkedDict):
            self.fail(mark, path, expected, describe(value))
        for key in value:
            if not isinstance(key, str):
                self.fail(value.key_marks[key], path, f"keys that are names in {expected}", describe(key))
        return value

    def keys(self, data: MarkedDict, allowed: Sequence[str], path: str) -> None:
        for key in data:
            if key not in allowed:
                self.fail(data.key_marks[key], _join(path, key), f"one of {', '.join(allowed)}",
                          f"unknown key {key!r}")

    def string(self, data: MarkedDict, key: str, path: str, expected: str = "a string") -> str:
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(data.value_marks[key], _join(path, key), expected, describe(value))
        return value.strip()

    def setting(self, data: MarkedDict, key: str, path: str, setting: Setting) -> Any:
        """An op key that is a setting, parsed by the schema; the error points at the bad item."""
        value = data[key]
        try:
            return setting.parse(value)
        except Invalid as exc:
            mark, at = data.value_marks[key], _join(path, key)
            if exc.index is not None and isinstance(value, MarkedList) and exc.index < len(value.item_marks):
                mark, at = value.item_marks[exc.index], f"{at}[{exc.index}]"
            elif exc.index is not None and isinstance(value, MarkedDict) and exc.index < len(value):
                name = list(value)[exc.index]
                inner = value[name]
                sub = exc.at.split(".")[2:]
                if sub and isinstance(inner, MarkedDict) and sub[0] in inner.value_marks:
                    mark = inner.value_marks[sub[0]]
                elif exc.at == f".{name}" and "dtype" in exc.expected:
                    mark = value.key_marks[name]
                else:
                    mark = value.value_marks[name]
            line, col = _where(mark)
            raise SpecError(f"{at}{exc.at}: {exc.detail}", file=self.display, line=line, col=col) from None

    def string_list(self, data: MarkedDict, key: str, path: str) -> list[tuple[str, yaml.Mark]]:
        value = data[key]
        if isinstance(value, str):
            return [(value, data.value_marks[key])]
        if not isinstance(value, MarkedList) or not value:
            self.fail(data.value_marks[key], _join(path, key), "a non-empty list of strings", describe(value))
        items = []
        for k, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(value.item_marks[k], f"{_join(path, key)}[{k}]", "a string", describe(item))
            items.append((item, value.item_marks[k]))
        return items

    # the spec
    def read(self, data: Any) -> list[OpSpec]:
        if data is None:
            raise SpecError("top level: expected a mapping with 'function' (one op) or 'ops' (a list of ops), "
                            "found an empty file", file=self.display, line=1, col=1)
        top = self.mapping(data, getattr(data, "mark", None), "top level",
                           "a mapping with 'function' (one op) or 'ops' (a list of ops)")
        if "ops" in top:
            self.keys(top, ("ops",), "")
            ops = top["ops"]
            if not isinstance(ops, MarkedList) or not ops:
                self.fail(top.value_marks["ops"], "ops", "a non-empty list of ops", describe(ops))
            return [self.op(self.mapping(item, ops.item_marks[k], f"ops[{k}]", "a mapping describing one op"),
                            f"ops[{k}]") for k, item in enumerate(ops)]
        self.keys(top, (*OP_KEYS, "ops"), "")
        return [self.op(top, "")]

    def op(self, data: MarkedDict, path: str) -> OpSpec:
        self.keys(data, OP_KEYS, path)
        if "function" not in data:
            self.fail(data.mark, _join(path, "function"),
                      "the op's Function as 'module.path:Class' or 'file.py:Class'", "no 'function' key")
        self.preload(data, path)
        function = self.function(data, path)
        from gradverify.spec.python import op_spec

        try:
            op = op_spec(function, self.display, declarations=())
        except SpecError as exc:
            self.fail(data.value_marks["function"], _join(path, "function"), "an op with a readable signature",
                      exc.message)
        changes: dict[str, Any] = {"spec_file": self.display, "spec_line": data.mark.line + 1}
        if not op.file:
            changes.update(file=self.display, line=data.mark.line + 1)
        if "name" in data:
            changes["name"] = self.string(data, "name", path)
        if "inputs" in data:
            changes["declared"] = self.inputs_and_cases(data, path, op)
        elif "cases" in data:
            self.fail(data.key_marks["cases"], _join(path, "cases"), "'inputs' with named dims for cases to bind",
                      "cases without inputs")
        extra_settings: list[tuple[str, Any]] = []
        for key, setting in SETTING_KEYS.items():
            if key not in data:
                continue
            value = self.setting(data, key, path, setting)
            field = _OP_FIELDS.get(setting.name)
            if field == "checks":
                value = tuple(dict.fromkeys(["jacobian", *value]))
            if field:
                changes[field] = value
            else:
                extra_settings.append((setting.name, value))
        if extra_settings:
            changes["settings"] = tuple(extra_settings)
        if "reference" in data:
            changes["reference"] = self.reference(data, path)
        if "surrogate" in data and "expect_failure" in data:
            self.fail(data.key_marks["expect_failure"], _join(path, "expect_failure"),
                      "at most one of surrogate and expect_failure", "both")
        if "surrogate" in data:
            value = data["surrogate"]
            if value is True:
                changes["surrogate"] = "declared a surrogate gradient"
            elif value is False:
                changes["surrogate"] = None
            elif isinstance(value, str) and value.strip():
                changes["surrogate"] = value.strip()
            else:
                self.fail(data.value_marks["surrogate"], _join(path, "surrogate"),
                          "true or a string saying why the backward is not the derivative", describe(value))
        if "expect_failure" in data:
            changes["expect_failure"] = self.string(
                data, "expect_failure", path, "a string naming the known bug")
        return dataclasses.replace(op, **changes)

    def resolve(self, data: MarkedDict, key: str, path: str) -> Any:
        """`module.path:attr` (imported) or `file.py:attr` (relative to this YAML file)."""
        text = self.string(data, key, path, "'module.path:Name' or 'file.py:Name'")
        mark = data.value_marks[key]
        where, sep, attr = text.rpartition(":")
        if not sep or not where or not attr:
            self.fail(mark, _join(path, key), "'module.path:Name' or 'file.py:Name'", repr(text))
        if where.endswith(".py") or "/" in where or os.sep in where:
            file = (self.folder / where).resolve()
            if not file.is_file():
                self.fail(mark, _join(path, key), f"a Python file relative to {self.display}",
                          f"no file {str(file)!r}")
            if file not in self.modules:
                from gradverify.spec.python import import_spec_module

                self.modules[file] = import_spec_module(file)
            module = self.modules[file]
        else:
            if not all(part.isidentifier() for part in where.split(".")):
                self.fail(mark, _join(path, key), "a dotted module path like 'mypkg.ops'", repr(where))
            module = self.import_module(where, mark, _join(path, key))
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                names = sorted(n for n in vars(module) if not n.startswith("_"))
                self.fail(mark, _join(path, key), f"a name defined in {where} ({', '.join(names[:8])}"
                          f"{', ...' if len(names) > 8 else ''})", f"no {attr!r}")
            obj = getattr(obj, part)
        return obj

    def import_module(self, name: str, mark: yaml.Mark, path: str) -> ModuleType:
        """Import `name` with this YAML's folder and the working directory importable."""
        extra = [str(self.folder), os.getcwd()]
        added = [p for p in extra if p not in sys.path]
        sys.path[:0] = added
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            self.fail(mark, path, f"an importable module {name!r}", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the module's own code raised while importing
            from gradverify.spec.python import user_frame

            file, line = user_frame(exc)
            at = f" at {file}:{line}" if file else ""
            self.fail(mark, path, f"module {name!r} to import cleanly",
                      f"{type(exc).__name__}: {exc}{at}")
        finally:
            for p in added:
                try:
                    sys.path.remove(p)
                except ValueError:
                    pass

    def function(self, data: MarkedDict, path: str) -> Any:
        """The op: `module:Name`, `file.py:Name` (a Function, custom op or callable), or a
        dispatcher name `torch.ops.ns.name[.overload]` / `ns::name[.overload]`."""
        text = data["function"]
        if isinstance(text, str) and (text.strip().startswith("torch.ops.") or "::" in text):
            from gradverify.ops.custom_op import resolve_torch_ops

            try:
                return resolve_torch_ops(text)
            except LookupError as exc:
                self.fail(data.value_marks["function"], _join(path, "function"),
                          "a registered operator (import its module with `import:` or its library with "
                          "`load_library:` first)", str(exc))
        obj = self.resolve(data, "function", path)
        if not callable(obj):
            self.fail(data.value_marks["function"], _join(path, "function"),
                      "a torch.autograd.Function, a custom op or a differentiable callable", describe(obj))
        return obj

    def preload(self, data: MarkedDict, path: str) -> None:
        """`import: module` (or a list) and `load_library: path` (or a list) before the op is looked up."""
        if "import" in data:
            for k, (name, mark) in enumerate(self.string_list(data, "import", path)):
                where = f"{_join(path, 'import')}" + (f"[{k}]" if isinstance(data["import"], list) else "")
                if name.endswith(".py"):
                    file = (self.folder / name).resolve()
                    if not file.is_file():
                        self.fail(mark, where, f"a Python file relative to {self.display}", f"no file {str(file)!r}")
                    from gradverify.spec.python import import_spec_module

                    self.modules[file] = import_spec_module(file)
                else:
                    self.import_module(name, mark, where)
        if "load_library" in data:
            import torch

            for k, (name, mark) in enumerate(self.string_list(data, "load_library", path)):
                where = f"{_join(path, 'load_library')}" + (f"[{k}]" if isinstance(data["load_library"], list) else "")
                file = (self.folder / name).resolve()
                if not file.is_file():
                    self.fail(mark, where, f"a shared library relative to {self.display}", f"no file {str(file)!r}")
                try:
                    torch.ops.load_library(str(file))
                except (OSError, RuntimeError) as exc:
                    self.fail(mark, where, "a library torch can load", f"{type(exc).__name__}: {exc}")

    def reference(self, data: MarkedDict, path: str) -> Any:
        obj = self.resolve(data, "reference", path)
        if not callable(obj):
            self.fail(data.value_marks["reference"], _join(path, "reference"), "a callable", describe(obj))
        return obj

    def inputs_and_cases(self, data: MarkedDict, path: str, op: OpSpec) -> tuple[CaseDecl, ...]:
        base = _join(path, "inputs")
        inputs = self.mapping(data["inputs"], data.value_marks["inputs"], base,
                              "a mapping of forward's parameter names to inputs")
        params = {p.name: p for p in op.params}
        varargs = any(p.variadic for p in op.params)
        for name in inputs:
            if name not in params and not varargs:
                self.fail(inputs.key_marks[name], f"{base}.{name}",
                          f"a parameter of {op.name} ({', '.join(params) or 'none'})", repr(name))
        missing = [p.name for p in op.params if p.name not in inputs and not p.optional and not p.has_value
                   and not p.variadic]
        if missing:
            self.fail(inputs.mark, base, f"an entry for every parameter without a default "
                      f"({', '.join(p.name for p in op.params if not p.optional and not p.has_value and not p.variadic)})",
                      f"no {missing[0]!r}")
        templates: dict[str, InputSpec] = {}
        shapes: dict[str, list[SizeOrDim] | None] = {}
        ranges: dict[str, tuple[Any, Any]] = {}
        dim_marks: dict[str, tuple[yaml.Mark, str]] = {}
        order = [p.name for p in op.params if p.name in inputs] + [n for n in inputs if n not in params]
        for name in order:
            value, mark, where = inputs[name], inputs.value_marks[name], f"{base}.{name}"
            if isinstance(value, MarkedDict) and ("value" in value and len(value) == 1):
                templates[name] = InputSpec(name=name, is_tensor=False, value=_plain(value["value"]),
                                            has_value=True)
                continue
            if not isinstance(value, MarkedDict):
                templates[name] = InputSpec(name=name, is_tensor=False, value=_plain(value), has_value=True)
                continue
            if "value" in value:
                self.fail(value.key_marks["value"], f"{where}.value",
                          "either a tensor {shape, domain, requires_grad} or {value: ...}", "value mixed with "
                          "tensor keys")
            self.mapping(value, mark, where, "a tensor {shape, domain, requires_grad}")
            self.keys(value, TENSOR_KEYS, where)
            shape: list[SizeOrDim] | None = None
            if "shape" in value:
                shape = self.shape(value, where, dim_marks, inputs)
            domain = None
            if "domain" in value:
                try:
                    domain = schema.domain(value["domain"])
                except Invalid as exc:
                    line, col = _where(value.value_marks["domain"])
                    raise SpecError(f"{where}.domain: {exc.detail}", file=self.display, line=line, col=col) from None
            dtype = None
            if "dtype" in value:
                dtype = value["dtype"]
                if not isinstance(dtype, str) or dtype not in FIXED_DTYPES:
                    self.fail(value.value_marks["dtype"], f"{where}.dtype",
                              f"one of {', '.join(FIXED_DTYPES)} (leave it out to follow the case's dtype)",
                              describe(dtype))
            integer = dtype is not None and (dtype.startswith(("int", "uint")) or dtype == "bool")
            requires_grad = not integer
            if "requires_grad" in value:
                requires_grad = value["requires_grad"]
                if not isinstance(requires_grad, bool):
                    self.fail(value.value_marks["requires_grad"], f"{where}.requires_grad", "true or false",
                              describe(requires_grad))
                if requires_grad and integer:
                    self.fail(value.value_marks["requires_grad"], f"{where}.requires_grad",
                              f"false for a {dtype} tensor (only floating tensors have gradients)", "true")
            if "range" in value:
                ranges[name] = self.range(value, where, integer, dim_marks, inputs)
            shapes[name] = shape
            templates[name] = InputSpec(name=name, domain=domain, requires_grad=requires_grad, dtype=dtype)
        for p in op.params:  # parameters with defaults the spec leaves out
            if p.name not in templates:
                templates[p.name] = (InputSpec(name=p.name, is_tensor=False, value=None, has_value=True)
                                     if p.optional else p)
        ordered = [templates[p.name] for p in op.params] + [templates[n] for n in order if n not in params]
        for p in op.params:
            if p.name in inputs and not isinstance(inputs[p.name], MarkedDict) and p.keyword:
                pass
        ordered = [dataclasses.replace(t, keyword=params[t.name].keyword) if t.name in params else t for t in ordered]
        return self.cases(data, path, ordered, shapes, dim_marks, ranges)

    def range(self, tensor: MarkedDict, where: str, integer: bool, dim_marks: dict[str, tuple[yaml.Mark, str]],
              inputs: MarkedDict) -> tuple[Any, Any]:
        """`range: [low, high]`: numbers, or dim names bound by the cases (labels in [0, C))."""
        value = tensor["range"]
        if not isinstance(value, MarkedList) or len(value) != 2:
            self.fail(tensor.value_marks["range"], f"{where}.range", "[low, high] (high exclusive for integers)",
                      describe(value))
        bounds = []
        for k, (item, mark) in enumerate(zip(value, value.item_marks)):
            if isinstance(item, bool):
                self.fail(mark, f"{where}.range[{k}]", "a number or a dim name", describe(item))
            if isinstance(item, str) and DIM_PATTERN.match(item) and item not in inputs:
                dim_marks.setdefault(item, (mark, f"{where}.range[{k}]"))
                bounds.append(item)
                continue
            if isinstance(item, str):
                try:
                    item = float(item)
                except ValueError:
                    self.fail(mark, f"{where}.range[{k}]", "a number or a dim name", describe(item))
            if not isinstance(item, (int, float)) or item != item or item in (float("inf"), float("-inf")):
                self.fail(mark, f"{where}.range[{k}]", "a finite number or a dim name", describe(item))
            if integer and not float(item).is_integer():
                self.fail(mark, f"{where}.range[{k}]", "an integer bound for an integer tensor", describe(item))
            bounds.append(item)
        low, high = bounds
        if not isinstance(low, str) and not isinstance(high, str) and high <= low:
            self.fail(tensor.value_marks["range"], f"{where}.range", "high above low", f"[{low}, {high}]")
        return low, high

    def shape(self, tensor: MarkedDict, where: str, dim_marks: dict[str, tuple[yaml.Mark, str]],
              inputs: MarkedDict) -> list[SizeOrDim]:
        value = tensor["shape"]
        if isinstance(value, int) and not isinstance(value, bool):
            value_list: list[Any] = [value]
            marks = [tensor.value_marks["shape"]]
        elif isinstance(value, MarkedList):
            value_list, marks = list(value), value.item_marks
        else:
            self.fail(tensor.value_marks["shape"], f"{where}.shape",
                      "a list of sizes and named dims like [N, 3]", describe(value))
        out: list[SizeOrDim] = []
        for k, (size, mark) in enumerate(zip(value_list, marks)):
            if _is_size(size):
                out.append(size)
            elif isinstance(size, str) and DIM_PATTERN.match(size) and not keyword.iskeyword(size):
                if size in inputs:
                    self.fail(mark, f"{where}.shape[{k}]", "a dim name that is not also an input's name",
                              repr(size))
                dim_marks.setdefault(size, (mark, f"{where}.shape[{k}]"))
                out.append(size)
            else:
                self.fail(mark, f"{where}.shape[{k}]", f"{SIZE_EXPECTED} or a dim name like N", describe(size))
        return out

    def cases(self, data: MarkedDict, path: str, templates: list[InputSpec],
              shapes: dict[str, list[SizeOrDim] | None], dim_marks: dict[str, tuple[yaml.Mark, str]],
              ranges: dict[str, tuple[Any, Any]]) -> tuple[CaseDecl, ...]:
        dims = dims_of({**shapes, **{f"range of {k}": [b for b in v if isinstance(b, str)] for k, v in ranges.items()}})
        base = _join(path, "cases")
        if "cases" not in data:
            if dims:
                mark, where = dim_marks[dims[0]]
                self.fail(mark, where, f"a size for dim {dims[0]!r} from 'cases' (e.g. cases: [{{{dims[0]}: 3}}])",
                          "no cases")
            return (self.case(templates, bind_dims(shapes, {}), "", ranges, shapes),)
        cases = data["cases"]
        if not isinstance(cases, MarkedList) or not cases:
            self.fail(data.value_marks["cases"], base, f"a non-empty list of dim bindings like "
                      f"{{{', '.join(f'{d}: 3' for d in dims) or 'N: 3'}}}", describe(cases))
        decls = []
        for k, entry in enumerate(cases):
            where = f"{base}[{k}]"
            entry = self.mapping(entry, cases.item_marks[k], where,
                                 "a mapping of dim names to sizes (or input names to shapes)")
            sizes: dict[str, int] = {}
            concrete: dict[str, list[int]] = {}
            for key, value in entry.items():
                if key in shapes:
                    if not (isinstance(value, list) and all(_is_size(n) for n in value)):
                        self.fail(entry.value_marks[key], f"{where}.{key}", "a concrete shape like [2, 3]",
                                  describe(value))
                    concrete[key] = list(value)
                elif _is_size(value):
                    sizes[key] = value
                else:
                    self.fail(entry.value_marks[key], f"{where}.{key}", SIZE_EXPECTED, describe(value))
            shape_dims = set(dims_of(shapes))
            range_only = {d: v for d, v in sizes.items() if d not in shape_dims and d in dims}
            try:
                resolved = bind_dims(shapes, {d: v for d, v in sizes.items() if d not in range_only}, concrete)
            except DimError as exc:
                mark = entry.key_marks.get(exc.key, entry.mark) if exc.key is not None else entry.mark
                at = f"{where}.{exc.key}" if exc.key is not None else where
                text = str(exc)
                expected, _, found = text.removeprefix("expected ").partition(", found ")
                self.fail(mark, at, expected, found)
            label = ", ".join(f"{key}={value}" for key, value in entry.items()
                              if not isinstance(value, list)) or f"case {k}"
            decls.append(self.case(templates, resolved, label, ranges, shapes, sizes))
        return tuple(decls)

    @staticmethod
    def case(templates: list[InputSpec], resolved: Mapping[str, tuple[int, ...] | None], label: str,
             ranges: dict[str, tuple[Any, Any]], shapes: Mapping[str, Sequence[SizeOrDim] | None],
             sizes: Mapping[str, int] | None = None) -> CaseDecl:
        bound: dict[str, int] = dict(sizes or {})
        for name, template in shapes.items():
            for want, size in zip(template or (), resolved.get(name) or ()):
                if isinstance(want, str):
                    bound.setdefault(want, size)
        inputs = []
        for t in templates:
            if not t.is_tensor:
                inputs.append(t)
                continue
            t = dataclasses.replace(t, shape=resolved.get(t.name))
            if t.name in ranges:
                low, high = (bound.get(b, 0) if isinstance(b, str) else b for b in ranges[t.name])
                t = dataclasses.replace(t, low=low, high=high)
            inputs.append(t)
        return CaseDecl(inputs=tuple(inputs), label=label)


def _signature_params(function: type) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(function.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _plain(value: Any) -> Any:
    """A non-tensor argument as plain dicts and lists, without the YAML marks."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_yaml_spec(path: Path) -> list[OpSpec]:
    """The ops a YAML spec describes, each with its cases, dtypes, devices and tolerances."""
    if not path.exists():
        raise SpecError("file not found", file=str(path))
    return _Reader(path).read(read_yaml(path))


def python_files_used(ops: Sequence[OpSpec]) -> set[Path]:
    """The Python files YAML ops come from (so a folder scan does not check them on their own)."""
    found: set[Path] = set()
    for op in ops:
        try:
            if op.op.file:
                found.add(Path(op.op.file).resolve())
        except (TypeError, OSError):
            continue
    return found
