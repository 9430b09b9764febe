"""The registration check on custom ops written here (re-typed from public patterns, sources below).

Every op lives in the `gv_test_registration` namespace and is registered once per process (the
`_once` pattern of tests/corpus/ops/custom_ops.py), so importing this file twice is harmless.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

import gradverify
from gradverify.report import CheckResult, Status
from conftest import run_cli

_REGISTRY = sys.modules.setdefault("_gv_test_registration_ops", types.ModuleType("_gv_test_registration_ops"))
_OPS: dict[str, Any] = _REGISTRY.__dict__.setdefault("ops", {})


def _once(name: str, define: Callable[[], Any]) -> Any:
    if name not in _OPS:
        _OPS[name] = define()
    return _OPS[name]


def check(report: gradverify.Report, name: str) -> CheckResult:
    return next(c for c in report.cases[0].checks if c.name == name)


def has_check(report: gradverify.Report, name: str) -> bool:
    return any(c.name == name for c in report.cases[0].checks)


# Squared pairwise distances (N, D) x (M, D) -> (N, M): the custom_op + register_fake +
# register_autograd pattern of the PyTorch tutorial (pytorch/tutorials
# advanced_source/python_custom_ops.py) applied to a cdist-like kernel. Backward: 2 (rowsum(g) x - g y).
def _sqdist_backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
    x, y = ctx.saved_tensors
    return 2 * (g.sum(1, keepdim=True) * x - g @ y), 2 * (g.sum(0).unsqueeze(1) * y - g.t() @ x)


def _sqdist_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _define_sqdist(name: str, transposed_kernel: bool) -> Any:
    @torch.library.custom_op(f"gv_test_registration::{name}", mutates_args=())
    def op(x: Tensor, y: Tensor) -> Tensor:
        if transposed_kernel:
            # The "y-major" product, returned transposed: an (N, M) result with strides (1, N).
            return (y.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1) - 2 * y @ x.t()).t()
        return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()).contiguous()

    @op.register_fake
    def _(x: Tensor, y: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], y.shape[0])  # contiguous: wrong for the transposed kernel

    op.register_autograd(_sqdist_backward, setup_context=_sqdist_setup)
    return op


sqdist = _once("sqdist", lambda: _define_sqdist("sqdist", False))
sqdist_bug_fake_strides = _once("sqdist_bug_fake_strides", lambda: _define_sqdist("sqdist_bug_fake_strides", True))


# A kernel that guards against overflow by clamping its input in place, like the
# `x.clamp_(min=-max_val, max=max_val)` guards of fused kernels (e.g. the logits soft-capping
# and clamping in vllm-project/vllm's sampler code): a no-op on ordinary values, so the values
# before and after agree, but the caller's tensor is written to without being declared.
def _define_clamped_exp(name: str, declared: bool) -> Any:
    @torch.library.custom_op(f"gv_test_registration::{name}", mutates_args=("x",) if declared else ())
    def op(x: Tensor) -> Tensor:
        x.clamp_(min=-60.0, max=60.0)
        return torch.exp(x)

    @op.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(output)

    def backward(ctx: Any, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return g * y

    op.register_autograd(backward, setup_context=setup)
    return op


clamped_exp_bug_undeclared = _once("clamped_exp_bug_undeclared", lambda: _define_clamped_exp(
    "clamped_exp_bug_undeclared", False))


# Residual add written into `residual` in place, undeclared: vllm-project/vllm
# vllm/_custom_ops.py fused_add_rms_norm (which does declare it), reduced to the add.
def _define_add_inplace() -> Any:
    @torch.library.custom_op("gv_test_registration::add_into_residual", mutates_args=())
    def op(x: Tensor, residual: Tensor) -> Tensor:
        residual.add_(x)
        return residual.clone()

    @op.register_fake
    def _(x: Tensor, residual: Tensor) -> Tensor:
        return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        return g, g

    op.register_autograd(backward, setup_context=setup)
    return op


add_into_residual = _once("add_into_residual", _define_add_inplace)


# SwiGLU without a fake kernel: linkedin/Liger-Kernel src/liger_kernel/ops/swiglu.py's maths as a
# custom op whose author registered the backward but not register_fake.
def _define_swiglu_no_fake() -> Any:
    @torch.library.custom_op("gv_test_registration::swiglu_no_fake", mutates_args=())
    def op(a: Tensor, b: Tensor) -> Tensor:
        return a * torch.sigmoid(a) * b

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)
        return g * b * sig * (1 + a * (1 - sig)), g * a * sig

    op.register_autograd(backward, setup_context=setup)
    return op


swiglu_no_fake = _once("swiglu_no_fake", _define_swiglu_no_fake)


# Backwards that cannot be traced, both patterns from CUDA-extension wrappers: a Python-side scale
# read with .item() (loss-scaling / clipping code), and an alignment test on data_ptr() before
# picking a vectorised kernel (as xformers/flash-attn style wrappers do).
def _define_scaled(name: str, how: str) -> Any:
    @torch.library.custom_op(f"gv_test_registration::{name}", mutates_args=())
    def op(x: Tensor) -> Tensor:
        return x * x

    @op.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if how == "item":
            norm = g.norm().item()  # clip a runaway gradient (never triggers on these inputs)
            if norm > 1e6:
                g = g * (1e6 / norm)
            return 2 * g * x
        if g.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0:
            return 2 * g * x  # the "vectorised" path
        return (2 * g) * x  # the scalar path: the same maths

    op.register_autograd(backward, setup_context=setup)
    return op


square_bug_item = _once("square_bug_item", lambda: _define_scaled("square_bug_item", "item"))
square_bug_data_ptr = _once("square_bug_data_ptr", lambda: _define_scaled("square_bug_data_ptr", "data_ptr"))


# Ops defined the pre-custom_op way (torch.library.Library + define + impl), as C++ extensions and
# older Python code do: one returns a view of its input (pytorch/pytorch#102170's review lists
# "forward impl directly returns one of the input tensors" among the failures users hit), one
# calls an autograd.Function from its CPU kernel (the misregistration opcheck's
# test_autograd_registration was written for, pytorch/pytorch#106561).
class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


def _define_library() -> Any:
    lib = torch.library.Library("gv_test_registration", "FRAGMENT")
    lib.define("flatten_view(Tensor x) -> Tensor")
    lib.impl("flatten_view", lambda x: x.view(-1), "CPU")
    lib.impl("flatten_view", lambda x: x.new_empty(x.numel()), "Meta")

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.shape = inputs[0].shape

    torch.library.register_autograd("gv_test_registration::flatten_view", lambda ctx, g: g.reshape(ctx.shape),
                                    setup_context=setup, lib=lib)
    lib.define("square_backend_key(Tensor x) -> Tensor")
    lib.impl("square_backend_key", lambda x: _Square.apply(x), "CPU")
    lib.impl("square_backend_key", lambda x: torch.empty_like(x), "Meta")
    return lib


_LIBRARY = _once("library", _define_library)


# --- the correct op passes; the registration bugs are named ---------------------------------


def test_correct_custom_op_passes_registration_and_opcheck() -> None:
    report = gradverify.verify(sqdist, torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    assert report.ok, gradverify.explain(report)
    registration = check(report, "registration")
    assert registration.status is Status.PASSED and registration.unverifiable_count == 0
    probes = dict(registration.details)
    assert set(probes) == {"mutation", "aliasing", "fake kernel", "autograd key", "backward tracing"}
    assert all(text.startswith("ok") for text in probes.values()), probes
    assert check(report, "opcheck").status is Status.PASSED


def test_fake_kernel_with_wrong_strides_is_named_with_the_output_and_both_layouts() -> None:
    report = gradverify.verify(sqdist_bug_fake_strides, torch.randn(4, 3, dtype=torch.float64),
                               torch.randn(5, 3, dtype=torch.float64))
    assert not report.ok
    registration = check(report, "registration")
    assert registration.status is Status.FAILED
    [diagnosis] = registration.diagnoses
    assert (diagnosis.kind, diagnosis.output) == ("fake_kernel_mismatch", "out")
    assert "strides (5, 1) (contiguous)" in diagnosis.message and "strides (1, 4) (not contiguous)" in diagnosis.message
    assert "empty_strided" in diagnosis.hint
    # The gradients are right: the Jacobian passes, gradcheck passes, and opcheck agrees with us.
    assert check(report, "jacobian").status is Status.PASSED
    opcheck = check(report, "opcheck")
    assert opcheck.status is Status.FAILED and not opcheck.counts
    assert opcheck.message.startswith("torch opcheck failed: test_faketensor: Stride mismatch!")
    assert "scroll up" not in opcheck.message and "consistent with registration (fake_kernel_mismatch)" in \
        opcheck.message


def test_mutation_that_leaves_the_values_equal_is_named_by_registration_only() -> None:
    x = torch.randn(6, dtype=torch.float64)
    before = x.clone()
    report = gradverify.verify(clamped_exp_bug_undeclared, x)
    assert torch.equal(x, before)  # the caller's tensor is never touched
    assert check(report, "contracts").status is Status.PASSED  # its values did not change
    registration = check(report, "registration")
    assert registration.status is Status.FAILED
    [diagnosis] = registration.diagnoses
    assert (diagnosis.kind, diagnosis.input) == ("undeclared_mutation", "x")
    assert "version counter" in diagnosis.message and 'mutates_args=("x",)' in diagnosis.hint
    # opcheck's test_schema compares values before and after, so it misses this write.
    assert check(report, "opcheck").status is Status.PASSED


def test_mutation_the_contracts_check_names_is_linked_not_repeated() -> None:
    report = gradverify.verify(add_into_residual, torch.randn(5, dtype=torch.float64),
                               torch.randn(5, dtype=torch.float64))
    contracts = check(report, "contracts")
    assert [d.kind for d in contracts.diagnoses] == ["undeclared_mutation"]
    registration = check(report, "registration")
    assert registration.status is Status.PASSED and not registration.diagnoses
    assert "reported by contracts" in registration.message and registration.summary == "ok (see contracts)"
    kinds = [d.kind for c in report.cases[0].checks if c.counts for d in c.diagnoses]
    assert kinds.count("undeclared_mutation") == 1
    assert "consistent with contracts (undeclared_mutation)" in check(report, "opcheck").message


def test_missing_fake_kernel_is_a_warning_that_fails_only_under_strict() -> None:
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    report = gradverify.verify(swiglu_no_fake, a, b)
    registration = check(report, "registration")
    assert registration.status is Status.WARNED and report.cases[0].status is Status.WARNED and report.exit_code == 0
    [diagnosis] = registration.diagnoses
    assert diagnosis.kind == "missing_fake" and "gv_test_registration::swiglu_no_fake" in diagnosis.message
    assert "register_fake" in diagnosis.hint
    assert "consistent with registration (missing_fake)" in check(report, "opcheck").message
    assert gradverify.verify(swiglu_no_fake, a, b, strict=True).exit_code == 1


def test_backward_reading_a_value_or_a_data_pointer_is_untraceable() -> None:
    for op, words in ((square_bug_item, "reads a tensor's value"), (square_bug_data_ptr, "reads raw memory")):
        report = gradverify.verify(op, torch.randn(5, dtype=torch.float64))
        assert check(report, "jacobian").status is Status.PASSED  # eager gradients are right
        registration = check(report, "registration")
        assert registration.status is Status.WARNED, gradverify.explain(report)
        [diagnosis] = registration.diagnoses
        assert diagnosis.kind == "untraceable_backward" and words in diagnosis.message
        assert Path(__file__).name in diagnosis.message  # the file:line of the offending call


def test_output_aliasing_an_input_is_named_for_a_library_op() -> None:
    report = gradverify.verify(torch.ops.gv_test_registration.flatten_view.default, torch.randn(3, 4,
                                                                                              dtype=torch.float64))
    registration = check(report, "registration")
    assert registration.status is Status.FAILED
    [diagnosis] = registration.diagnoses
    assert (diagnosis.kind, diagnosis.output, diagnosis.input) == ("output_alias", "out", "x")


def test_autograd_in_the_cpu_kernel_is_named_although_eager_gradients_are_right() -> None:
    report = gradverify.verify(torch.ops.gv_test_registration.square_backend_key.default,
                               torch.randn(5, dtype=torch.float64))
    assert check(report, "jacobian").status is Status.PASSED
    registration = check(report, "registration")
    assert registration.status is Status.FAILED
    assert [d.kind for d in registration.diagnoses] == ["autograd_backend_key"]
    assert "register_autograd" in registration.diagnoses[0].hint
    opcheck = check(report, "opcheck")
    assert "test_autograd_registration" in opcheck.message and not opcheck.counts


def test_registration_does_not_apply_to_functions_and_says_so_when_asked() -> None:
    x = torch.randn(4, dtype=torch.float64)
    report = gradverify.verify(_Square, x)
    assert not has_check(report, "registration") and not has_check(report, "opcheck")
    report = gradverify.verify(_Square, x, checks=["registration"])
    registration = check(report, "registration")
    assert registration.status is Status.SKIPPED and registration.message.startswith("not applicable: not a custom op")
    assert gradverify.verify(sqdist, torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64),
                             skip_checks=["registration"]).ok


SWEEP_SPEC = """
    import torch
    from torch import Tensor
    import gradverify as gv

    # The transposed-kernel twin of tests/test_checks_registration.py, in a fresh process.
    @torch.library.custom_op("gv_sweep::sqdist_bug_fake_strides", mutates_args=())
    def sqdist_bug_fake_strides(x: Tensor, y: Tensor) -> Tensor:
        return (y.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1) - 2 * y @ x.t()).t()

    @sqdist_bug_fake_strides.register_fake
    def _(x, y):
        return x.new_empty(x.shape[0], y.shape[0])

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return 2 * (g.sum(1, keepdim=True) * x - g @ y), 2 * (g.sum(0).unsqueeze(1) * y - g.t() @ x)

    sqdist_bug_fake_strides.register_autograd(backward, setup_context=setup)
"""


def test_every_case_of_the_sweep_is_checked(write_spec) -> None:
    spec = write_spec("sweep_spec.py", SWEEP_SPEC)
    result = run_cli("check", str(spec), "--shape", "3,2;4,2", "--shape", "5,3;2,3", "--dtype", "float64",
                     "--dtype", "float32", "--format", "json")
    assert result.code == 1, result.stderr
    cases = result.json()["cases"]
    assert len(cases) == 4
    for case in cases:
        registration = next(c for c in case["checks"] if c["name"] == "registration")
        assert registration["status"] == "failed"
        assert [d["kind"] for d in registration["diagnoses"]] == ["fake_kernel_mismatch"]
        n, m = case["shapes"][0][0], case["shapes"][1][0]
        assert f"strides ({m}, 1)" in registration["diagnoses"][0]["message"]
        assert f"strides (1, {n})" in registration["diagnoses"][0]["message"]

