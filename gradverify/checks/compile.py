"""torch.compile against eager: forward values and gradients (opt-in: --check compile).

The op is compiled as a function of its differentiable inputs (backend "aot_eager" everywhere:
Dynamo + AOTAutograd, the graphs run eagerly, so a difference is the tracing's, not a kernel's
rounding; "inductor" too on CUDA, where Triton runs). Its outputs and its gradients for one set
of random cotangents are compared with the eager call, which the jacobian check judges
against the truth, so compiled values that agree with eager are right exactly where eager is
(`compile_mismatch` otherwise). Where torch.func differentiates the op, the gradient of
torch.compile(torch.func.vjp(op)) is compared too: Dynamo has inlined a Function's forward and
dropped its backward there (pytorch/pytorch#193279).

Graph breaks are information, never failures: a break costs speed, not correctness. Dynamo's
caches are reset before and after every compilation, so nothing compiled here leaks into the
other checks or the next case. Cost (measured on a 2-core CPU machine): 0.1-0.3 s per case on
small ops once the compiler is imported, which takes 2-5 s once per process (a custom op's first
call imports it anyway); on CPU inductor is not run (a C++ build: about 20 s per op here).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.common import first_line, not_applicable_result, quiet_torch, requested
from gradverify.checks.transforms import close, diff_function, random_like
from gradverify.report import CheckResult, Diagnosis, Status
from gradverify.usercode import UserCodeError, boundary, user_code, user_frame

NAME = "compile"


def backends_for(device: str) -> tuple[str, ...]:
    """aot_eager wherever torch runs; inductor where its kernels are Triton (CUDA)."""
    return ("aot_eager", "inductor") if device.split(":")[0] == "cuda" else ("aot_eager",)


def _reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def _graph_breaks() -> tuple[int, str]:
    from torch._dynamo.utils import counters

    breaks: dict[str, int] = dict(counters.get("graph_break", {}))
    total = sum(breaks.values())
    lines = [line.strip() for line in next(iter(breaks), "").strip().splitlines() if line.strip()]
    # Dynamo's reason is a title line, then "Explanation: ..." saying what it could not trace.
    explanation = next((line for line in lines[1:] if line.startswith("Explanation:")), "")
    text = f"{lines[0]} ({explanation.removeprefix('Explanation: ')})" if lines and explanation else \
        (lines[0] if lines else "")
    return total, text[:240]


def root_cause(exc: BaseException) -> BaseException:
    """The exception Dynamo wrapped ("RuntimeError when making fake tensor call" says nothing;
    its cause says which op had no fake kernel)."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        exc = inner
        seen.add(id(exc))


@boundary
def _compiled_vjp(compiled: Callable[..., Any], primals: Sequence[torch.Tensor],
                  cotangents: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Outputs and gradients through the compiled function (a boundary: anything raised in it,
    Dynamo's errors about the user's code included, is the op's under compile)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        # Non-leaf copies, as in real use (x = layer(...)): an op that writes into its input
        # with mark_dirty may do so on these.
        outs = compiled(*[leaf.clone() for leaf in leaves])
        pairs = [(o, u) for o, u in zip(outs, cotangents) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True) \
            if pairs else tuple(None for _ in leaves)
    return tuple(o.detach() for o in outs), tuple(grads)


class CompileCheck:
    name = NAME
    default = False
    description = ("torch.compile (aot_eager; inductor on CUDA) forward values and gradients against eager; graph "
                   "breaks reported")

    def applies(self, ctx: CaseContext) -> str | None:
        if ctx.op is not ctx.case.op.op:
            return "complex inputs (checked through real views, which torch.compile would see as another op)"
        if not ctx.run.diff_outputs:
            return "no differentiable output"
        return None

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return [not_applicable_result(NAME, reason)] if requested(ctx, NAME) else []
        fn, primals = diff_function(ctx, clone_inputs=False)
        outs = [o for _, o in ctx.run.diff_outputs]
        cotangents = [u[0] for u in random_like(ctx, outs, 3)]
        try:
            with user_code("backward"):
                eager = torch.autograd.grad(outs, [leaf for _, leaf in ctx.run.leaves], cotangents, retain_graph=True,
                                            allow_unused=True)
        except UserCodeError as exc:
            return [ctx.user_error(NAME, exc)]
        eager_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(eager, primals)]
        details: list[tuple[str, str]] = []
        diagnoses: list[Diagnosis] = []
        errors: list[str] = []
        notes: list[str] = []
        with quiet_torch():
            for backend in backends_for(ctx.case.device):
                self._one(ctx, backend, fn, primals, outs, cotangents, eager_grads, details, diagnoses, errors,
                          notes)
            self._functional(ctx, fn, primals, cotangents, eager_grads, details, diagnoses)
        if errors:
            message = "; ".join(errors)
            return [CheckResult(name=NAME, status=Status.ERROR, summary="compile raised", message=message,
                                details=tuple(details), notes=tuple(notes),
                                diagnoses=(Diagnosis("backward_error", message,
                                                     hint="the op does not run under torch.compile: see the message "
                                                          "(a missing fake kernel, an unsupported construct)"),))]
        if diagnoses:
            return [CheckResult(name=NAME, status=Status.FAILED, summary="failed: compile_mismatch",
                                message="; ".join(d.message for d in diagnoses), diagnoses=tuple(diagnoses),
                                details=tuple(details), notes=tuple(notes))]
        return [CheckResult(name=NAME, status=Status.PASSED, summary="agrees with eager", details=tuple(details),
                            notes=tuple(notes),
                            message="torch.compile: forward and gradients agree with eager ("
                                    + ", ".join(backends_for(ctx.case.device)) + ")"
                                    + (f"; {notes[0]}" if notes else ""))]

    def _one(self, ctx: CaseContext, backend: str, fn: Callable[..., Any], primals: Sequence[torch.Tensor],
             outs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], eager_grads: Sequence[torch.Tensor],
             details: list[tuple[str, str]], diagnoses: list[Diagnosis], errors: list[str], notes: list[str]) -> None:
        from torch._dynamo.utils import counters

        _reset()
        counters.clear()
        try:
            compiled = torch.compile(fn, backend=backend, dynamic=False)
            with user_code(f"torch.compile ({backend})"):
                got_outs, got_grads = _compiled_vjp(compiled, primals, cotangents)
        except UserCodeError as exc:
            root = root_cause(exc.original)
            file, line = user_frame(root, prefer=ctx.case.op.file)
            where = f" at {file}:{line}" if file else ""
            errors.append(f"torch.compile(backend={backend!r}) raised {type(root).__name__}: {first_line(root)}{where}")
            details.append((backend, "raised"))
            return
        finally:
            breaks, reason = _graph_breaks()
            _reset()
        if breaks:
            notes.append(f"{breaks} graph break{'s' if breaks != 1 else ''} under {backend} (not a failure: a break "
                         f"costs speed): {reason}")
        found = len(diagnoses)
        for k, (got, want) in enumerate(zip(got_outs, outs)):
            self._compare(ctx, backend, "forward", ctx.output_names.get(ctx.out_positions[k], f"out[{k}]"), got,
                          want, diagnoses, output=True)
        for k, (got, want) in enumerate(zip(got_grads, eager_grads)):
            got = got if got is not None else torch.zeros_like(want)
            self._compare(ctx, backend, "gradient", ctx.input_names[ctx.diff_positions[k]], got, want, diagnoses,
                          output=False)
        details.append((backend, "ok: forward and gradients agree with eager" if len(diagnoses) == found else
                        "differs from eager" + (f"; {breaks} graph break(s)" if breaks else "")))

    def _functional(self, ctx: CaseContext, fn: Callable[..., Any], primals: Sequence[torch.Tensor],
                    cotangents: Sequence[torch.Tensor], eager_grads: Sequence[torch.Tensor],
                    details: list[tuple[str, str]], diagnoses: list[Diagnosis]) -> None:
        label = "torch.func.vjp under aot_eager"
        try:
            with user_code("torch.func.vjp"):
                torch.func.vjp(fn, *primals)
        except UserCodeError as exc:
            details.append((label, f"not applicable: torch.func does not differentiate this op "
                                   f"({first_line(exc.original)[:120]})"))
            return

        def functional(*p: torch.Tensor) -> Any:
            return torch.func.vjp(fn, *p)[1](tuple(cotangents))

        _reset()
        try:
            compiled = torch.compile(functional, backend="aot_eager", dynamic=False)
            with user_code("torch.compile(torch.func.vjp)"):
                got = _call(compiled, primals)
        except UserCodeError as exc:
            details.append((label, f"not applicable: it raised {type(exc.original).__name__}: "
                                   f"{first_line(exc.original)[:120]}"))
            return
        finally:
            _reset()
        found = len(diagnoses)
        for k, (g, want) in enumerate(zip(got, eager_grads)):
            g = g if g is not None else torch.zeros_like(want)
            self._compare(ctx, "aot_eager", "gradient of torch.func.vjp", ctx.input_names[ctx.diff_positions[k]], g,
                          want, diagnoses, output=False)
        if len(diagnoses) > found:
            diagnoses[-1] = Diagnosis(diagnoses[-1].kind, diagnoses[-1].message + " (Dynamo can inline a Function's "
                                      "forward under torch.func and drop its backward: pytorch/pytorch#193279)",
                                      output=diagnoses[-1].output, input=diagnoses[-1].input,
                                      hint=diagnoses[-1].hint)
        details.append((label, "ok: agrees with eager" if len(diagnoses) == found else "differs from eager"))

    def _compare(self, ctx: CaseContext, backend: str, what: str, name: str, got: torch.Tensor, want: torch.Tensor,
                 diagnoses: list[Diagnosis], *, output: bool) -> None:
        ok, err, index = close(got, want.detach(), ctx.tolerance)
        if ok:
            return
        where = f"{name}[{','.join(map(str, index))}]" if index else name
        value = (f"{where} is {float(got[index]):.6g}, eager gives {float(want[index]):.6g} (max error {err:.3g})"
                 if got.shape == want.shape else f"shape {tuple(got.shape)}, eager gives {tuple(want.shape)}")
        diagnoses.append(Diagnosis(
            "compile_mismatch", f"under torch.compile(backend={backend!r}) the {what} of {name} differs from eager: "
                                f"{value}",
            output=name if output else None, input=None if output else name,
            hint="eager is what gradverify judges against the truth: look for in-place writes to saved tensors or "
                 "ctx attributes, torch.compiler.is_compiling() branches, a fake kernel that lies; else report it to "
                 "PyTorch with the repro line"))


@boundary
def _call(compiled: Callable[..., Any], primals: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    return tuple(compiled(*[p.detach().clone() for p in primals]))


__all__ = ["CompileCheck", "backends_for"]
