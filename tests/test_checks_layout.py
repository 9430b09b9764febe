"""The layout check: backwards (and kernels) that assume contiguous grad_outputs or inputs.

The "kernels" here are re-typed in torch: a Triton kernel indexes memory with the strides it
is given, which `Tensor.as_strided` reproduces on the cpu (it reads the tensor's storage with
the given strides, and raises where a read would fall outside the storage, where a GPU kernel
would read garbage).
"""

from __future__ import annotations

import pytest
import torch

import gradverify
from gradverify.report import CheckResult, Report, Status

Fn = torch.autograd.Function


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check(report: Report, name: str) -> CheckResult | None:
    return next((c for c in report.cases[0].checks if c.name == name), None)


def kernel_read(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """What a kernel sees when it reads `t`'s memory with `strides` (from its data pointer)."""
    return t.as_strided(t.shape, strides, t.storage_offset())


# --------------------------------------------------------------------------------------------
# Source: pytorch/pytorch#194719 ("Wrong gradient with torch.cat after custom Triton kernel"):
# the backward kernel indexes grad_y with x_batch_stride (x.stride(0)); torch.cat's backward
# hands it a narrow view with stride(0) == 2 * size, so every row but the first is read from the
# wrong place. Forward: y = x * w (w broadcast over rows).
class RowScaleReadsGradWithInputStrides(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        dy = kernel_read(grad_y, x.stride())  # BUG: grad_y's own strides are not x's
        return dy * w, (dy * x).sum(0)


class RowScale(Fn):
    """The fix the maintainer gave: make the grad contiguous before the kernel."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        dy = grad_y.contiguous()
        dy = kernel_read(dy, dy.stride())  # (x's strides were wrong for a strided x as well)
        return dy * w, (dy * x).sum(0)


def test_backward_reading_grad_output_through_the_input_strides_is_caught_and_named() -> None:
    report = gradverify.verify(RowScaleReadsGradWithInputStrides, rand(3, 4), rand(4, seed=1))
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.FAILED, gradverify.explain(report)
    assert {d.kind for d in layout.diagnoses} == {"layout_assumption"}
    text = " ".join(d.message for d in layout.diagnoses)
    assert "strided slice of a wider tensor" in text and "strides (8, 1) instead of (4, 1)" in text
    assert "transposed" in text  # the transposed grad_output is read wrongly too
    assert "contiguous()" in layout.diagnoses[0].hint
    # Everything that only ever feeds contiguous grad_outputs passes it.
    assert check(report, "jacobian").status is Status.PASSED
    assert check(report, "gradcheck").status is Status.PASSED
    assert torch.autograd.gradcheck(RowScaleReadsGradWithInputStrides.apply,
                                     (rand(3, 4).requires_grad_(), rand(4, seed=1).requires_grad_()))


def test_the_test_op_is_really_wrong_after_torch_cat() -> None:
    """The bug the check names is real: after torch.cat the gradient is wrong (not a test artefact)."""
    x, w = rand(3, 4).requires_grad_(), rand(4, seed=1)
    g = rand(3, 8, seed=2)
    torch.cat([RowScaleReadsGradWithInputStrides.apply(x, w), torch.zeros(3, 4)], dim=1).backward(g)
    assert not torch.allclose(x.grad, g[:, :4] * w)
    x.grad = None
    torch.cat([RowScale.apply(x, w), torch.zeros(3, 4)], dim=1).backward(g)
    assert torch.allclose(x.grad, g[:, :4] * w)


def test_the_fixed_op_passes_every_layout() -> None:
    report = gradverify.verify(RowScale, rand(3, 4), rand(4, seed=1))
    layout = check(report, "layout")
    assert report.ok and layout is not None and layout.status is Status.PASSED, gradverify.explain(report)
    assert "transposed grad_output" in dict(layout.details)["layouts"]
    assert "strided inputs" in dict(layout.details)["layouts"]


# --------------------------------------------------------------------------------------------
# Source: ROCm/TransformerEngine#623 ("Fix fused cross-entropy backward with broadcasted
# grad_output"): the per-row loss gradient is read with a row stride of 1 whenever
# grad_output.numel() > 1; loss.sum() gives a stride-0 expansion of one element, and the kernel
# reads past the end of it. Forward: per-row log-sum-exp (the part of cross entropy that matters).
class RowLogSumExpReadsGradAsContiguous(Fn):
    @staticmethod
    def forward(ctx, logits):
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse = ctx.saved_tensors
        stride = 1 if grad_lse.numel() > 1 else 0  # BUG: assumes a contiguous grad_output
        g = kernel_read(grad_lse, (stride,))
        return torch.exp(logits - lse[:, None]) * g[:, None]


def test_stride_zero_grad_output_that_the_kernel_reads_past_is_caught() -> None:
    report = gradverify.verify(RowLogSumExpReadsGradAsContiguous, rand(5, 3))
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.FAILED, gradverify.explain(report)
    expanded = [d.message for d in layout.diagnoses if "stride-0 expansion" in d.message]
    assert expanded and "backward raised RuntimeError" in expanded[0] and "strides (0,)" in expanded[0]
    assert "test_checks_layout.py" in expanded[0]  # where in the user's code


# --------------------------------------------------------------------------------------------
# Source: fla-org/flash-linear-attention#759 ("Many activation functions give incorrect results
# for non-contiguous inputs"): the kernel reads x as if it were contiguous. Forward: swish.
class SwishKernelAssumesContiguousInput(Fn):
    @staticmethod
    def forward(ctx, x):
        xk = kernel_read(x, torch.empty(x.shape).stride())  # BUG: x's own strides ignored
        ctx.save_for_backward(xk)
        return xk * torch.sigmoid(xk)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


def test_forward_that_reads_a_transposed_input_as_contiguous_is_caught() -> None:
    report = gradverify.verify(SwishKernelAssumesContiguousInput, rand(3, 4))
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.FAILED, gradverify.explain(report)
    transposed = [d for d in layout.diagnoses if "with x as a transposed view" in d.message]
    assert transposed and "forward's out differs" in transposed[0].message
    assert "x.contiguous()" in transposed[0].hint


# Source: the Triton layer-norm tutorial pattern (openai/triton python/tutorials/05-layer-norm.py):
# forward runs its kernel on weight.contiguous() but saves `weight` itself, and the backward
# kernel reads the saved weight as if contiguous.
class ColumnScaleSavesStridedWeight(Fn):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w.contiguous()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        wk = kernel_read(w, (1,))  # BUG: the saved w may be strided
        return g * wk, (g * x).sum(0)


def test_backward_that_reads_a_saved_strided_input_as_contiguous_is_caught_and_names_the_input() -> None:
    x, w = rand(3, 4), rand(4, seed=1)
    report = gradverify.verify(ColumnScaleSavesStridedWeight, x.clone().requires_grad_(), w)
    layout = check(report, "layout")
    # Only x requires grad here, so only x arrives in other layouts: nothing to find.
    assert layout is not None and layout.status is Status.PASSED, gradverify.explain(report)
    report = gradverify.verify(ColumnScaleSavesStridedWeight, x.clone().requires_grad_(), w.clone().requires_grad_())
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.FAILED, gradverify.explain(report)
    strided = [d.message for d in layout.diagnoses if "strided slice" in d.message]
    # w is named on its own (x and w were laid out together first, then one at a time).
    assert len(strided) == 1 and "with w as a strided slice of a wider tensor (strides (2,)" in strided[0], strided
    assert "the gradient for x differs" in strided[0] and "saved input" in strided[0]


# --------------------------------------------------------------------------------------------
# channels_last: a per-channel scale whose backward kernel reads grad_output as NCHW-contiguous.
class ChannelScaleReadsGradAsNCHW(Fn):
    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s[None, :, None, None]

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        gk = kernel_read(g, torch.empty(g.shape).stride())  # BUG: g may be channels_last
        return gk * s[None, :, None, None], (gk * x).sum((0, 2, 3))


def test_channels_last_grad_output_is_tried_for_4d_outputs() -> None:
    report = gradverify.verify(ChannelScaleReadsGradAsNCHW, rand(2, 3, 2, 2), rand(3, seed=1))
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.FAILED, gradverify.explain(report)
    assert any("channels_last" in d.message and "strides (12, 1, 6, 3)" in d.message for d in layout.diagnoses)


# --------------------------------------------------------------------------------------------
def test_correct_ops_in_every_layout_pass() -> None:
    for fn, inputs in ((lambda a, b: (a @ b).softmax(-1), (rand(3, 4), rand(4, 5, seed=1))),
                       (lambda x: torch.nn.functional.conv2d(x, torch.ones(2, 3, 1, 1, dtype=x.dtype)),
                        (rand(2, 3, 4, 4),))):
        report = gradverify.verify(fn, *inputs)
        layout = check(report, "layout")
        assert report.ok and layout is not None and layout.status is Status.PASSED, gradverify.explain(report)


def test_a_single_element_has_no_layout_to_vary() -> None:
    report = gradverify.verify(lambda x: x * 3, rand(1))
    layout = check(report, "layout")
    assert layout is not None and layout.status is Status.PASSED and layout.summary == "nothing to vary"


def test_float32_case_is_judged_at_float32_tolerance() -> None:
    report = gradverify.verify(RowScale, rand(6, 5, dtype=torch.float32), rand(5, seed=1, dtype=torch.float32))
    assert report.ok, gradverify.explain(report)
    report = gradverify.verify(RowScaleReadsGradWithInputStrides, rand(6, 5, dtype=torch.float32),
                               rand(5, seed=1, dtype=torch.float32))
    assert check(report, "layout").status is Status.FAILED


class JitteryScale(Fn):
    """A backward whose values vary from call to call beyond rounding (not a layout problem)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g + 1e-3 * torch.randn_like(g)


def test_a_nondeterministic_backward_is_not_accused_of_a_layout_bug() -> None:
    report = gradverify.verify(JitteryScale, rand(3, 4))
    assert check(report, "layout").status is Status.PASSED, gradverify.explain(report)
    assert check(report, "nondeterminism").status is Status.FAILED


def test_the_check_can_be_skipped_and_leaves_the_user_tensors_alone() -> None:
    x, w = rand(3, 4), rand(4, seed=1)
    before = (x.clone(), w.clone(), x.stride())
    report = gradverify.verify(RowScaleReadsGradWithInputStrides, x, w, skip_checks=("layout",))
    assert check(report, "layout") is None and report.ok
    gradverify.verify(RowScaleReadsGradWithInputStrides, x, w)
    assert torch.equal(x, before[0]) and torch.equal(w, before[1]) and x.stride() == before[2]


def test_complex_ops_are_not_probed_for_layouts() -> None:
    z = torch.complex(rand(3, 2), rand(3, 2, seed=1))
    report = gradverify.verify(lambda t: t * t, z)
    assert report.ok and check(report, "layout") is None, gradverify.explain(report)


@pytest.mark.parametrize("kind", ["narrow", "expanded", "transposed", "channels_last"])
def test_each_grad_layout_keeps_the_values_and_changes_the_strides(kind: str) -> None:
    from gradverify.checks.layout import GRAD_LAYOUTS

    layout = next(lay for lay in GRAD_LAYOUTS if lay.kind == kind)
    g = rand(2, 3, 4, 5)
    out = layout.apply(g, torch.Generator().manual_seed(0))
    assert out.shape == g.shape and not out.is_contiguous()
    if kind == "expanded":
        assert out.stride()[:-1] == (0, 0, 0)  # a different, random tensor: its own contiguous twin is compared
    else:
        assert torch.equal(out, g)


def test_selected_from_the_command_line_and_yaml(tmp_path) -> None:
    from conftest import run_cli

    (tmp_path / "ops.py").write_text(
        "import torch\n\n"
        "class Scale(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x * 2\n\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        return g.as_strided(g.shape, (g.shape[1], 1), g.storage_offset()) * 2  # reads g as contiguous\n")
    (tmp_path / "spec.yaml").write_text(
        "function: ops.py:Scale\ninputs:\n  x: {shape: [3, 4]}\nchecks: [contracts, jacobian]\n")
    only_core = run_cli("check", str(tmp_path / "spec.yaml"), "--format", "json")
    assert only_core.code == 0, only_core.stdout + only_core.stderr
    assert "layout" not in {c["name"] for c in only_core.json()["cases"][0]["checks"]}
    asked = run_cli("check", str(tmp_path / "spec.yaml"), "--check", "layout", "--format", "json")
    assert asked.code == 1, asked.stdout + asked.stderr
    layout = next(c for c in asked.json()["cases"][0]["checks"] if c["name"] == "layout")
    assert layout["status"] == "failed" and layout["diagnoses"][0]["kind"] == "layout_assumption"
