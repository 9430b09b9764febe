"""The library core the CLI is a thin layer over: paths or a Function in, a Report out."""

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


def collect_cases(paths: Sequence[Path], settings: Settings) -> list[Case]:
    """Load every spec and expand it into cases; spec errors raise SpecError (exit 2)."""
    cases: list[Case] = []
    for path in paths:
        for file, ops in load_path(Path(path)):
            if settings.ops:
                known = {op.name for op in ops}
                missing = [name for name in settings.ops if name not in known]
                # With several files, an --op may live in another one; only complain about a
                # single file, or when no file at all has it (checked below).
                if missing and len(paths) == 1 and not Path(path).is_dir():
                    raise SpecError(f"no Function named {missing[0]!r} in this file "
                                    f"(found: {', '.join(sorted(known))})", file=str(file))
                ops = [op for op in ops if op.name in settings.ops]
            for op in ops:
                cases.extend(expand_cases(op, settings))
    if settings.ops and not cases:
        raise SpecError(f"no Function named {settings.ops[0]!r} in the given specs")
    return cases


def run_cases(cases: Iterable[Case], settings: Settings, progress: ProgressCallback | None = None) -> Report:
    from gradverify.runner import run_case

    case_list = list(cases)
    if settings.jobs > 1 and len(case_list) > 1:
        from gradverify.parallel import run_parallel

        # Worker processes (spawned); the report keeps the order of the cases.
        return Report(cases=tuple(run_parallel(case_list, settings, min(settings.jobs, len(case_list)), progress)))
    results: list[CaseResult] = []
    for k, case in enumerate(case_list):
        result = run_case(case, settings)
        results.append(result)
        if progress is not None:
            progress(result, k + 1, len(case_list))
    return Report(cases=tuple(results))


def check_paths(paths: Sequence[Path | str], settings: Settings | None = None,
                progress: ProgressCallback | None = None) -> Report:
    """What `gradverify check PATH...` does, minus the rendering."""
    settings = settings or Settings()
    cases = collect_cases([Path(p) for p in paths], settings)
    return run_cases(cases, settings, progress)


def verify(fn: Any, *inputs: Any, **options: Any) -> Report:
    """Check a custom autograd Function at the given inputs; returns the same Report the CLI renders.

        report = gradverify.verify(MyFunc, x, w)
        assert report.ok, gradverify.explain(report)

    fn: the Function class (or its `.apply`). inputs: forward's arguments. Floating tensors are
    differentiated if they require grad (or, when none does, all of them). The caller's tensors
    are never modified: every call works on copies.
    options: atol, rtol, gradcheck ('fast'|'slow'|'off'), seed, nondet_tol, max_entries, order (2 checks
    the double backward), forward_ad (check a defined jvp; default True), reference (a plain function).
    """
    import torch

    from gradverify.runner import run_case
    from gradverify.spec.python import op_from_function

    function = getattr(fn, "__self__", fn)
    if not (isinstance(function, type) and issubclass(function, torch.autograd.Function)):
        raise UsageError(f"verify() expects a torch.autograd.Function subclass, got {fn!r}")
    known = {"atol", "rtol", "gradcheck", "seed", "nondet_tol", "max_entries", "mismatch_cap", "reference",
             "order", "forward_ad", "max_memory", "mode"}
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"verify(): unknown option {sorted(unknown)[0]!r} (expected one of {', '.join(sorted(known))})")
    import math

    for name in ("atol", "rtol", "nondet_tol"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise UsageError(f"verify(): {name} must be a finite non-negative number, got {value!r}")
    reference = options.pop("reference", None)
    settings = Settings(**{k: v for k, v in options.items()})
    try:
        import inspect

        file = inspect.getsourcefile(function) or "<unknown>"
    except (TypeError, OSError):
        file = "<unknown>"
    op = op_from_function(function, file)
    if reference is not None:
        op = OpSpec(**{**op.__dict__, "reference": reference})
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    floating = [x for x in tensors if x.is_floating_point() or x.is_complex()]
    any_requires = any(x.requires_grad for x in floating)
    specs: list[InputSpec] = []
    names = [p.name for p in op.params] + [f"arg{k}" for k in range(len(op.params), len(inputs))]
    for k, value in enumerate(inputs):
        name = names[k]
        if isinstance(value, torch.Tensor):
            needs = (value.is_floating_point() or value.is_complex()) and (value.requires_grad or not any_requires)
            specs.append(InputSpec(name=name, shape=tuple(value.shape), requires_grad=needs))
        else:
            specs.append(InputSpec(name=name, is_tensor=False, value=value, has_value=True))
    dtype = str(floating[0].dtype).removeprefix("torch.") if floating else "float64"
    device = str(floating[0].device) if floating else "cpu"
    parse_dtype(dtype)
    case = Case(op=op, inputs=tuple(specs), dtype=dtype, device=device, seed=settings.seed,
                shape_source="library call")
    # float64 CPU copies of the caller's values: the truth is computed at exactly these values.
    values = [x.detach().to("cpu").to(torch.complex128 if x.is_complex() else torch.float64)
              if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
              else (x.detach().clone() if isinstance(x, torch.Tensor) else x) for x in inputs]
    return Report(cases=(run_case(case, settings, values=values),))


def explain(report: Report) -> str:
    """The plain-text report (what `--format plain` prints), for assertion messages."""
    from gradverify.render.terminal import render_plain

    return render_plain(report)
