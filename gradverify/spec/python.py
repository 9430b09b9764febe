"""Load a Python spec: import the file and find the autograd Functions it defines."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from gradverify.declare import DECLARATION_ATTR, Declaration, TensorArg
from gradverify.errors import NoFunctionError, SpecError
from gradverify.spec.model import CaseDecl, InputSpec, OpSpec


def import_spec_module(path: Path) -> ModuleType:
    """Import `path` as a fresh module with its folder importable for its own imports.

    The module gets a name unique to its path, so two specs with the same file name never
    collide and loading it again re-executes it. Every other module imported from the spec's
    own folder is dropped from `sys.modules` afterwards, so a second load (or another spec
    beside a different `ops.py`) sees the files as they are now. The spec module itself stays
    registered: `inspect` needs it to find source lines, and tracebacks to show them.
    """
    path = path.resolve()
    if not path.exists():
        raise SpecError("file not found", file=str(path))
    if path.suffix != ".py":
        raise SpecError("expected a Python (.py) or YAML (.yaml/.yml) spec", file=str(path))
    folder = str(path.parent)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_gradverify_spec_{digest}_{path.stem}"
    before = set(sys.modules)
    sys.path.insert(0, folder)
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
            raise SpecError(
                f"invalid Python syntax: {exc.msg}",
                file=exc.filename or str(path),
                line=exc.lineno,
                col=exc.offset,
            ) from exc
        except SpecError:
            raise
        except BaseException as exc:  # the user's module code raised while importing
            sys.modules.pop(module_name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            file, line = user_frame(exc, prefer=str(path))
            raise SpecError(
                f"importing the spec raised {type(exc).__name__}: {exc}",
                file=file or str(path),
                line=line,
            ) from exc
        return module
    finally:
        sys.dont_write_bytecode = wrote_bytecode
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
        local_prefix = folder.rstrip(os.sep) + os.sep
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            mod_file = getattr(mod, "__file__", None) or ""
            if name == module_name:
                continue
            if mod_file.startswith(local_prefix) and "site-packages" not in mod_file:
                sys.modules.pop(name, None)


def user_frame(exc: BaseException, prefer: str | None = None) -> tuple[str | None, int | None]:
    """The file:line in the user's code where `exc` was raised.

    Prefers the deepest frame in `prefer` (the spec file); otherwise the deepest frame that is
    neither gradverify's nor torch's nor the standard library's.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno
    if prefer:
        preferred = str(Path(prefer).resolve())
        for frame in reversed(frames):
            if str(Path(frame.filename).resolve()) == preferred:
                return frame.filename, frame.lineno
    skip = ("/gradverify/", "/torch/", "/site-packages/", "/lib/python", "<frozen")
    for frame in reversed(frames):
        if not any(part in frame.filename for part in skip):
            return frame.filename, frame.lineno
    if frames:
        return frames[-1].filename, frames[-1].lineno
    return None, None


def uses_setup_context(function: type) -> bool:
    """True for the `forward(*args)` + `setup_context` style (forward takes no ctx)."""
    from torch.autograd.function import _SingleLevelFunction

    return getattr(function, "setup_context", None) is not _SingleLevelFunction.setup_context


# How many tensors a forward(ctx, *args) can be given from the command line.
MAX_VARIADIC = 8


def forward_params(function: type, file: str, line: int | None) -> tuple[InputSpec, ...]:
    """Forward's positional parameters: no default = tensor, default None = optional tensor,
    any other default = non-tensor argument with that value."""
    try:
        signature = inspect.signature(function.forward)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{function.__name__}.forward has no readable signature: {exc}",
                        file=file, line=line) from exc
    params = list(signature.parameters.values())
    if not uses_setup_context(function):
        if not params:
            raise SpecError(f"{function.__name__}.forward must take ctx as its first argument",
                            file=file, line=line)
        params = params[1:]
    specs: list[InputSpec] = []
    for param in params:
        if param.kind is param.VAR_POSITIONAL:
            # forward(ctx, *xs): one tensor at least, more when --shape names more ("3;3;3").
            specs.append(InputSpec(name=f"{param.name}[0]", variadic=True))
            specs.extend(InputSpec(name=f"{param.name}[{k}]", optional=True, variadic=True)
                         for k in range(1, MAX_VARIADIC))
            continue
        if param.kind in (param.VAR_KEYWORD, param.KEYWORD_ONLY):
            continue
        if param.default is inspect.Parameter.empty:
            specs.append(InputSpec(name=param.name))
        elif param.default is None:
            specs.append(InputSpec(name=param.name, optional=True))
        else:
            specs.append(InputSpec(name=param.name, is_tensor=False, value=param.default,
                                   has_value=True))
    return tuple(specs)


def _line_of(obj: Any) -> int | None:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return None


def _def_line(func: Any) -> int | None:
    """The line of `def name(...)` itself, below any decorators (where an annotation belongs)."""
    func = inspect.unwrap(func)
    try:
        lines, start = inspect.getsourcelines(func)
    except (OSError, TypeError):
        return None
    for offset, text in enumerate(lines):
        if text.lstrip().startswith(("def ", "async def ")):
            return start + offset
    return start


def _declared_case(declaration: Declaration, params: tuple[InputSpec, ...], op_name: str,
                   file: str) -> CaseDecl:
    assert declaration.inputs is not None
    by_name = {p.name: p for p in params}
    unknown = [name for name in declaration.inputs if name not in by_name]
    if unknown:
        raise SpecError(
            f"@gradverify.check on {op_name}: forward has no parameter {unknown[0]!r} "
            f"(expected one of: {', '.join(by_name) or 'none'})",
            file=file, line=declaration.line,
        )
    resolved: list[InputSpec] = []
    for param in params:
        if param.name in declaration.inputs:
            value = declaration.inputs[param.name]
            if isinstance(value, TensorArg):
                resolved.append(InputSpec(name=param.name, shape=value.shape, domain=value.domain,
                                          requires_grad=value.requires_grad))
            else:
                resolved.append(InputSpec(name=param.name, is_tensor=False, value=value,
                                          has_value=True))
        elif param.optional:
            # An optional tensor not mentioned is left out (passed as its default, None).
            resolved.append(InputSpec(name=param.name, is_tensor=False, value=None,
                                      has_value=True))
        else:
            resolved.append(param)
    return CaseDecl(inputs=tuple(resolved), label=declaration.label)


def op_from_function(function: type, file: str) -> OpSpec:
    """Describe a Function class (from a spec file or handed to the library API)."""
    line = _line_of(function)
    params = forward_params(function, file, line)
    declarations: tuple[Declaration, ...] = function.__dict__.get(DECLARATION_ATTR, ())
    reference = surrogate = expect_failure = None
    atol = rtol = None
    for declaration in declarations:
        reference = declaration.reference or reference
        surrogate = declaration.surrogate or surrogate
        expect_failure = declaration.expect_failure or expect_failure
        atol = declaration.atol if declaration.atol is not None else atol
        rtol = declaration.rtol if declaration.rtol is not None else rtol
    declared = tuple(
        _declared_case(d, params, function.__name__, file)
        for d in declarations
        if d.inputs is not None
    )
    backward = function.__dict__.get("backward")
    backward_line = _def_line(getattr(backward, "__func__", backward)) if backward else None
    return OpSpec(
        name=function.__name__,
        function=function,
        file=file,
        line=line,
        params=params,
        declared=declared,
        reference=reference,
        surrogate=surrogate,
        expect_failure=expect_failure,
        atol=atol,
        rtol=rtol,
        backward_line=backward_line,
    )


def load_python_spec(path: Path) -> list[OpSpec]:
    """Every autograd Function defined in `path` itself (not imported into it), in file order."""
    import torch

    module = import_spec_module(path)
    display = str(path)
    found: list[tuple[int, OpSpec]] = []
    for obj in vars(module).values():
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.autograd.Function)
            and obj.__module__ == module.__name__
        ):
            op = op_from_function(obj, display)
            found.append((op.line or 0, op))
    if not found:
        raise NoFunctionError(
            "no torch.autograd.Function subclass is defined in this file "
            "(Functions it only imports are not checked)",
            file=display,
        )
    found.sort(key=lambda item: item[0])
    # An abstract base that other Functions of the file derive from is not an op; a complete
    # Function that a variant subclasses (a buggy copy overriding backward, say) still is.
    classes = [op.function for _, op in found]
    return [op for _, op in found
            if not (_is_abstract(op.function)
                    and any(other is not op.function and issubclass(other, op.function) for other in classes))]


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
