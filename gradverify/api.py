"""The library core the CLI is a thin layer over: paths or an op in, a Report out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from gradverify.cases import Case, expand_cases
from gradverify.config import Settings, parse_dtype
from gradverify.errors import SpecError, UsageError
from gradverify.report import CaseResult, Report
from gradverify.spec import load_path
from gradverify.spec.model import InputSpec, OpSpec

ProgressCallback = Callable[[CaseResult, int, int], None]
# (case index, case title, phase) while a case runs: what is being checked right now.
PhaseCallback = Callable[[int, str, str], None]


def collect_ops(paths: Sequence[Path], settings: Settings) -> list[OpSpec]:
    """Every op the spec paths describe (filtered by --op); spec errors raise SpecError (exit 2)."""
    selected_ops: list[OpSpec] = []
    for path in paths:
        for file, ops in load_path(Path(path)):
            if settings.ops:
                known = {op.name for op in ops}
                missing = [name for name in settings.ops if name not in known]
                # With several files, an --op may live in another one; only complain about a
                # single file, or when no file at all has it (checked below).
                if missing and len(paths) == 1 and not Path(path).is_dir():
                    from gradverify.config import did_you_mean

                    raise SpecError(f"no op named {missing[0]!r} in this file (found: {', '.join(sorted(known))})"
                                    + did_you_mean(missing[0], known), file=str(file))
                ops = [op for op in ops if op.name in settings.ops]
            selected_ops.extend(ops)
    if settings.ops and not selected_ops:
        raise SpecError(f"no op named {settings.ops[0]!r} in the given specs")
    if settings.args:
        params = {p.name for op in selected_ops for p in op.params}
        unknown = [name for name, _ in settings.args if name not in params]
        if unknown:
            raise UsageError(f"--arg {unknown[0]}=...: no op in the given specs has a parameter {unknown[0]!r} "
                             f"(they have: {', '.join(sorted(params)) or 'none'})")
    if settings.input_domains:
        tensors = {p.name for op in selected_ops for p in op.params}
        unknown = [name for name, _ in settings.input_domains if name not in tensors]
        if unknown:
            raise UsageError(f"--domain {unknown[0]}=...: no op in the given specs has an input {unknown[0]!r}")
    return selected_ops


def collect_cases(paths: Sequence[Path], settings: Settings) -> list[Case]:
    """Load every spec and expand it into cases."""
    from gradverify.config import check_input_memory

    cases: list[Case] = []
    for op in collect_ops(paths, settings):
        cases.extend(expand_cases(op, settings))
    check_input_memory(cases, settings)  # before any input is drawn
    return cases


def run_cases(cases: Iterable[Case], settings: Settings, progress: ProgressCallback | None = None,
              phase: PhaseCallback | None = None) -> Report:
    """Every case in this process, in order."""
    from gradverify.runner import run_case

    case_list = list(cases)
    if settings.jobs > 1 and len(case_list) > 1:
        from gradverify.parallel import run_parallel

        # Worker processes (spawned); the report keeps the order of the cases.
        return Report(cases=tuple(run_parallel(case_list, settings, min(settings.jobs, len(case_list)), progress)))
    results: list[CaseResult] = []
    for k, case in enumerate(case_list):
        on_phase = (lambda name, k=k, case=case: phase(k, case.op.name, name)) if phase else None
        result = run_case(case, settings, progress=on_phase)
        results.append(result)
        if progress is not None:
            progress(result, k + 1, len(case_list))
    return Report(cases=tuple(results))


def check_paths(paths: Sequence[Path | str], settings: Settings | None = None,
                progress: ProgressCallback | None = None) -> Report:
    """What `gradverify check PATH...` does, minus the rendering (in this process)."""
    settings = settings or Settings()
    cases = collect_cases([Path(p) for p in paths], settings)
    return run_cases(cases, settings, progress)


def _verify_options() -> tuple[str, ...]:
    """verify()'s keyword options: the settings the schema lets a library call set, and what
    describes the op itself."""
    from gradverify.config import VERIFY_SETTINGS

    settings = ["checks" if key == "add_checks" else key for key in VERIFY_SETTINGS]
    return (*settings, "reference", "surrogate", "expect_failure", "name", "domains")


VERIFY_OPTIONS = _verify_options()


def verify(fn: Any, *inputs: Any, **kwargs: Any) -> Report:
    """Check an op at the given inputs; returns the same Report the CLI renders.

        report = gradverify.verify(MyFunc, x, w)                  # a torch.autograd.Function
        report = gradverify.verify(my_custom_op, x, 3, dims=[0])  # a custom op, plain arguments
        report = gradverify.verify(my_wrapper, x)                 # any differentiable callable
        assert report.ok, gradverify.explain(report)

    fn: the op (a Function class or its `.apply`, a torch.library custom op, a torch.ops
    overload, any callable). inputs (and keyword arguments): its arguments. Floating tensors
    are differentiated if they require grad (or, when none does, all of them); integer/bool
    tensors and plain values are passed as they are. The caller's tensors are never modified.

    Options (keyword arguments with these names are options, not the op's arguments): atol,
    rtol, gradcheck ('fast'|'slow'|'off'), seed, nondet_tol, order (2 checks the double backward),
    forward_ad, mode, max_memory, checks / skip_checks (names of checks), strict, reference (a
    plain function computing the same), surrogate / expect_failure (declared mismatches), name,
    domains ({input name: domain}, e.g. {"a": "spd"}: compare along that domain's perturbations).
    """
    import torch

    from gradverify.cases import Case
    from gradverify.config import validate_options
    from gradverify.runner import run_case
    from gradverify.spec.python import op_spec

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in VERIFY_OPTIONS}
    reference = options.pop("reference", None)
    surrogate = options.pop("surrogate", None)
    expect_failure = options.pop("expect_failure", None)
    name = options.pop("name", None)
    domains = dict(options.pop("domains", None) or {})
    settings = validate_options(options, where="verify()")
    try:
        file = _source_file(fn)
        op = op_spec(fn, file, name=name)
    except SpecError as exc:
        raise UsageError(f"verify(): {exc.message}") from None
    changes: dict[str, Any] = {}
    if reference is not None:
        changes["reference"] = reference
    if surrogate:
        changes["surrogate"] = surrogate if isinstance(surrogate, str) else "declared a surrogate gradient"
    if expect_failure:
        changes["expect_failure"] = str(expect_failure)
    if changes:
        op = OpSpec(**{**op.__dict__, **changes})
    tensors = [x for x in (*inputs, *kwargs.values()) if isinstance(x, torch.Tensor)]
    floating = [x for x in tensors if x.is_floating_point() or x.is_complex()]
    any_requires = any(x.requires_grad for x in floating)
    params = [p for p in op.params if not p.keyword]
    names = [p.name for p in params] + [f"arg{k}" for k in range(len(params), len(inputs))]
    for key in kwargs:
        if key not in {p.name for p in op.params}:
            raise UsageError(f"verify(): {op.name} has no parameter {key!r} (options are: "
                             f"{', '.join(VERIFY_OPTIONS)})")
    specs: list[InputSpec] = []
    values: list[Any] = []
    items = [(names[k], value, False) for k, value in enumerate(inputs)] + [(k, v, True) for k, v in kwargs.items()]
    for param_name, value, keyword in items:
        if isinstance(value, torch.Tensor):
            floating_tensor = value.is_floating_point() or value.is_complex()
            needs = floating_tensor and (value.requires_grad or not any_requires)
            dtype = None if floating_tensor else str(value.dtype).removeprefix("torch.")
            specs.append(InputSpec(name=param_name, shape=tuple(value.shape), requires_grad=needs, dtype=dtype,
                                   keyword=keyword, domain=domains.get(param_name)))
            # float64 CPU copies of the caller's values: the truth is computed at exactly these.
            if floating_tensor:
                values.append(value.detach().to("cpu").to(torch.complex128 if value.is_complex() else torch.float64))
            else:
                values.append(value.detach().clone())
        else:
            specs.append(InputSpec(name=param_name, is_tensor=False, value=value, has_value=True, keyword=keyword))
            values.append(value)
    dtype = str(floating[0].dtype).removeprefix("torch.") if floating else "float64"
    device = str(floating[0].device) if floating else "cpu"
    parse_dtype(dtype)
    case = Case(op=op, inputs=tuple(specs), dtype=dtype, device=device, seed=settings.seed,
                shape_source="library call")
    result = run_case(case, settings, values=values)
    return Report(cases=(result,))


def _source_file(fn: Any) -> str:
    import inspect

    target = getattr(fn, "__self__", fn)
    for candidate in (target, getattr(target, "_init_fn", None), getattr(target, "func", None)):
        if candidate is None:
            continue
        try:
            found = inspect.getsourcefile(inspect.unwrap(candidate) if callable(candidate) else candidate)
        except (TypeError, OSError):
            found = None
        if found:
            return found
    return "<unknown>"


def explain(report: Report) -> str:
    """The plain-text report (what `--format plain` prints), for assertion messages."""
    from gradverify.render.terminal import render_plain

    return render_plain(report)
