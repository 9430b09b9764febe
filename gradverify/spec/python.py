"""Load a Python spec: import the file and find the ops it defines or declares.

Discovered: every torch.autograd.Function subclass and every torch.library custom op *defined*
in the file, and every object (a Function, a custom op, a torch.ops overload, any callable)
*declared* in it with `@gradverify.check(...)`. Functions it only imports are not checked
(declare them: subclass and decorate, or `gv.check(...)(imported_op)`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from gradverify.declare import Declaration, TensorArg, declarations_of
from gradverify.errors import NoFunctionError, SpecError
from gradverify.spec.model import CaseDecl, InputSpec, OpSpec
from gradverify.usercode import user_frame

# Re-exported: older callers import it from here.
__all__ = ["import_spec_module", "load_python_spec", "op_spec", "project_root", "user_frame"]


def project_root(path: Path) -> Path | None:
    """The project a spec belongs to: the nearest folder at or above it holding pyproject.toml,
    setup.py or .git (so a spec in specs/ can import the project's own modules)."""
    here = path.resolve().parent
    for folder in (here, *here.parents):
        try:
            if any((folder / marker).exists() for marker in ("pyproject.toml", "setup.py", ".git")):
                return folder
        except OSError:
            return None
    return None


def import_spec_module(path: Path) -> ModuleType:
    """Import `path` as a fresh module with its folder and its project's root importable.

    The module gets a name unique to its path, so two specs with the same file name never
    collide and loading it again re-executes it. Every other module imported from the spec's
    own folder is dropped from `sys.modules` afterwards, so a second load (or another spec
    beside a different `ops.py`) sees the files as they are now. The spec module itself stays
    registered: `inspect` needs it to find source lines, and tracebacks to show them.
    """
    try:
        path = path.resolve()
        exists = path.exists()
    except (OSError, RuntimeError) as exc:
        raise SpecError(f"cannot be read ({exc.__class__.__name__}: {exc})", file=str(path)) from None
    if not exists:
        raise SpecError("file not found", file=str(path))
    if path.suffix != ".py":
        raise SpecError("expected a Python (.py) or YAML (.yaml/.yml) spec", file=str(path))
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"expected a UTF-8 text file, found a byte that is not UTF-8 at offset {exc.start}",
                        file=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot be read: {exc.strerror or exc}", file=str(path)) from None
    folder = str(path.parent)
    root = project_root(path)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_gradverify_spec_{digest}_{path.stem}"
    before = set(sys.modules)
    added = [p for p in dict.fromkeys([folder, str(root) if root else folder]) if p not in sys.path]
    sys.path[:0] = added
    # Importing must not write __pycache__ folders into the user's tree.
    wrote_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise SpecError("cannot be imported as a Python module", file=str(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            sys.modules.pop(module_name, None)
            raise SpecError(f"invalid Python syntax: {exc.msg}", file=exc.filename or str(path), line=exc.lineno,
                            col=exc.offset) from exc
        except SpecError:
            sys.modules.pop(module_name, None)
            raise
        except KeyboardInterrupt:
            sys.modules.pop(module_name, None)
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's module raised (SystemExit too) while importing
            sys.modules.pop(module_name, None)
            file, line = user_frame(exc, prefer=str(path))
            raise SpecError(f"importing the spec raised {type(exc).__name__}: {exc}", file=file or str(path),
                            line=line) from exc
        return module
    finally:
        sys.dont_write_bytecode = wrote_bytecode
        for p in added:
            try:
                sys.path.remove(p)
            except ValueError:
                pass
        # Modules the spec pulled in from its folder or its project (a `mypkg` beside `specs/`)
        # are the user's files as they are now: dropped, so the next spec (another project in
        # the same pytest session, or an edited file) imports its own. Installed packages stay.
        local_prefixes = tuple(dict.fromkeys(p.rstrip(os.sep) + os.sep for p in (folder, str(root) if root else folder)))
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            mod_file = getattr(mod, "__file__", None) or ""
            if name == module_name:
                continue
            if mod_file.startswith(local_prefixes) and "site-packages" not in mod_file:
                sys.modules.pop(name, None)


def _declared_case(declaration: Declaration, params: tuple[InputSpec, ...], op_name: str, file: str) -> CaseDecl:
    assert declaration.inputs is not None
    by_name = {p.name: p for p in params}
    unknown = [name for name in declaration.inputs if name not in by_name]
    if unknown:
        raise SpecError(f"@gradverify.check on {op_name}: it has no parameter {unknown[0]!r} "
                        f"(expected one of: {', '.join(by_name) or 'none'})", file=declaration.file or file,
                        line=declaration.line)
    resolved: list[InputSpec] = []
    for param in params:
        if param.name in declaration.inputs:
            value = declaration.inputs[param.name]
            if isinstance(value, TensorArg):
                resolved.append(InputSpec(name=param.name, shape=value.shape, domain=value.domain,
                                          requires_grad=value.requires_grad, dtype=value.dtype, low=value.low,
                                          high=value.high, keyword=param.keyword, annotation=param.annotation))
            else:
                resolved.append(InputSpec(name=param.name, is_tensor=False, value=value, has_value=True,
                                          keyword=param.keyword, annotation=param.annotation))
        elif param.optional:
            # An optional tensor not mentioned is left out (passed as its default, None).
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None, has_value=True,
                                      keyword=param.keyword))
        else:
            resolved.append(param)
    return CaseDecl(inputs=tuple(resolved), label=declaration.label)


def op_spec(obj: Any, file: str, *, name: str | None = None,
            declarations: tuple[Declaration, ...] | None = None) -> OpSpec:
    """Describe an op of any kind (from a spec file, a YAML spec or the library API)."""
    from gradverify.ops import NotAnOp, adapt

    declarations = declarations_of(obj) if declarations is None else declarations
    name = name or next((d.name for d in declarations if d.name), None)
    try:
        op = adapt(obj, name=name)
    except NotAnOp as exc:
        raise SpecError(str(exc), file=file) from None
    try:
        params = op.params()
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{op.name}: its signature cannot be read ({exc})", file=file, line=op.line) from exc
    reference = surrogate = expect_failure = None
    atol = rtol = None
    checks: tuple[str, ...] = ()
    for declaration in declarations:
        reference = declaration.reference or reference
        surrogate = declaration.surrogate or surrogate
        expect_failure = declaration.expect_failure or expect_failure
        atol = declaration.atol if declaration.atol is not None else atol
        rtol = declaration.rtol if declaration.rtol is not None else rtol
        checks = declaration.checks or checks
    declared = tuple(_declared_case(d, params, op.name, file) for d in declarations if d.inputs is not None)
    op_file = op.file or file
    declared_in = next((d.file for d in declarations if d.file), None)
    spec_file = spec_line = None
    if declared_in and op.file and Path(declared_in) != Path(op.file).resolve():
        spec_file, spec_line = file, next((d.line for d in declarations if d.line), None)
    return OpSpec(name=op.name, op=op, file=op_file, line=op.line, params=params, declared=declared,
                  reference=reference, surrogate=surrogate, expect_failure=expect_failure, atol=atol, rtol=rtol,
                  backward_line=op.backward_line, checks=checks, spec_file=spec_file, spec_line=spec_line)


def _defined_here(obj: Any, module: ModuleType, path: Path) -> bool:
    """A Function or custom op whose code lives in this file."""
    import torch

    from gradverify.ops.custom_op import is_custom_op

    if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
        return obj.__module__ == module.__name__
    if is_custom_op(obj):
        init = getattr(obj, "_init_fn", None)
        code = getattr(inspect.unwrap(init), "__code__", None) if init is not None else None
        return code is not None and Path(code.co_filename).resolve() == path
    return False


def _declared_here(obj: Any, path: Path) -> bool:
    return any(d.file and Path(d.file) == path for d in declarations_of(obj))


def load_python_spec(path: Path) -> list[OpSpec]:
    """Every op defined or declared in `path`, in file order."""
    module = import_spec_module(path)
    resolved = path.resolve()
    display = str(path)
    found: list[tuple[int, OpSpec]] = []
    seen: set[int] = set()
    for attr, obj in list(vars(module).items()):
        if attr.startswith("__") or id(obj) in seen:
            continue
        declared = _declared_here(obj, resolved)
        if not (declared or _defined_here(obj, module, resolved)):
            continue
        seen.add(id(obj))
        decls = tuple(d for d in declarations_of(obj) if not d.file or Path(d.file) == resolved)
        spec = op_spec(obj, display, declarations=decls)
        if spec.file and Path(spec.file).resolve() == resolved:
            spec = OpSpec(**{**spec.__dict__, "file": display})
        order = spec.line if spec.spec_file is None else (decls[0].line if decls and decls[0].line else 0)
        found.append((order or 0, spec))
    if not found:
        raise NoFunctionError(
            "no op is defined in this file: no torch.autograd.Function subclass or torch.library custom op, and "
            "nothing declared with @gradverify.check (an op defined elsewhere: subclass and decorate it, or "
            "`my_op = gradverify.check(inputs=...)(imported_op)`)",
            file=display,
        )
    found.sort(key=lambda item: item[0])
    # An abstract base that other Functions of the file derive from is not an op; a complete
    # Function that a variant subclasses (a buggy copy overriding backward, say) still is.
    classes = [op.op.target for _, op in found if inspect.isclass(op.op.target)]
    return [op for _, op in found
            if not (inspect.isclass(op.op.target) and _is_abstract(op.op.target)
                    and any(other is not op.op.target and issubclass(other, op.op.target) for other in classes))]


def _is_abstract(function: type) -> bool:
    """No forward or backward of its own (beyond torch's), or one that raises NotImplementedError."""
    for name in ("forward", "backward"):
        owner = next((klass for klass in function.__mro__ if name in klass.__dict__), None)
        if owner is None or owner.__module__.split(".")[0] == "torch":
            return True
        method = owner.__dict__[name]
        try:
            source = inspect.getsource(getattr(method, "__func__", method))
        except (OSError, TypeError):
            continue
        if "raise NotImplementedError" in source:
            return True
    return False
