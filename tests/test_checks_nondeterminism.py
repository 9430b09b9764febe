"""The nondeterminism check: rounding-level spread passes with a note, beyond it fails and says why."""

from __future__ import annotations

import pytest
import torch

import gradverify
from gradverify.cases import Case
from gradverify.checks.base import CaseContext
from gradverify.checks.nondeterminism import NondeterminismCheck, measure_spread, selected_in
from gradverify.config import Settings
from gradverify.ops import FunctionOp
from gradverify.spec.model import InputSpec, OpSpec
from gradverify.numerics.tolerance import tolerance_for
from gradverify.report import CheckResult, Report, Status

Fn = torch.autograd.Function


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check(report: Report, name: str) -> CheckResult | None:
    return next((c for c in report.cases[0].checks if c.name == name), None)


# --------------------------------------------------------------------------------------------
# Source: the col2im / gather backwards of deformable convolution (CharlesShang/DCNv2#8,
# "Backward is not reentrant ... although analytical gradient matches numerical gradient") and
# embedding backwards: every output position adds its gradient into the input row it read with
# an atomic add, so the order of the additions, and the rounding, changes from call to call.
# The GPU's scheduling is simulated by adding in a random order.
INDEX = torch.tensor([0, 2, 1, 2, 0, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0] * 4)


class GatherAtomicAdd(Fn):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x[INDEX] * 1.5

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = torch.zeros_like(x)
        order = torch.randperm(INDEX.numel())  # the order the atomic adds land in
        for k in order.tolist():
            grad[INDEX[k]] += 1.5 * g[k]
        return grad


def test_nondeterministic_but_right_backward_passes_with_a_note() -> None:
    report = gradverify.verify(GatherAtomicAdd, rand(3, 5, dtype=torch.float32))
    result = check(report, "nondeterminism")
    assert report.ok and result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert result.message.startswith("nondeterministic at rounding level -- correct")
    assert result.summary == "rounding-level spread"
    # The old contract (a fixed 64 eps) and gradcheck's "not reentrant" would have failed it.
    assert check(report, "contracts").status is Status.PASSED


def test_nondeterministic_but_right_in_float64_overrules_gradchecks_reentrance_failure() -> None:
    report = gradverify.verify(GatherAtomicAdd, rand(3, 5))
    assert report.ok, gradverify.explain(report)
    assert check(report, "nondeterminism").status is Status.PASSED


class NoisyBackward(Fn):
    """Varies beyond rounding: a backward that depends on randomness."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g * (1 + 1e-3 * torch.randn_like(g))


def test_spread_beyond_tolerance_fails_and_says_so() -> None:
    report = gradverify.verify(NoisyBackward, rand(3, 4))
    result = check(report, "nondeterminism")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    assert [d.kind for d in result.diagnoses] == ["nondeterministic"]
    message = result.diagnoses[0].message
    assert "identical backward calls differ beyond the case's tolerance" in message
    assert "beyond a change of summation order" in message
    assert "under torch.use_deterministic_algorithms(True) they still differ" in message
    # The contracts agree (same criterion), and name the cause of the Jacobian mismatch.
    assert check(report, "contracts").status is Status.FAILED
    assert {d.kind for d in check(report, "jacobian").diagnoses} == {"nondeterministic"}


def test_nondet_tol_allows_a_known_spread() -> None:
    report = gradverify.verify(NoisyBackward, rand(3, 4), nondet_tol=0.1, checks=("nondeterminism",))
    result = check(report, "nondeterminism")
    assert result is not None and result.status is Status.PASSED, gradverify.explain(report)
    assert "--nondet-tol 0.1" in result.message


# Source: CoinCheung/pytorch-loss mish.py ("self-computed back-propagation"): the local gradient is
# computed in forward, kept on ctx and multiplied in place by grad_output in backward, so a second
# backward through the same graph multiplies it again.
class MishInPlaceOnCtx(Fn):
    @staticmethod
    def forward(ctx, feat):
        tanh_x = torch.tanh(torch.nn.functional.softplus(feat))
        ctx.grad = tanh_x + feat * (1 - tanh_x ** 2) * torch.sigmoid(feat)
        return feat * tanh_x

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        grad *= grad_output  # BUG: changes ctx.grad for the next call
        return grad


def test_backward_that_changes_its_own_state_is_told_from_randomness() -> None:
    report = gradverify.verify(MishInPlaceOnCtx, rand(6))
    result = check(report, "nondeterminism")
    assert result is not None and result.status is Status.FAILED, gradverify.explain(report)
    message = result.diagnoses[0].message
    assert "the backward changes state it reads" in message and "retain_graph=True" in message
    assert "saved tensor" in result.diagnoses[0].hint or "ctx" in result.diagnoses[0].hint


class RacyUnlessDeterministic(Fn):
    """A kernel library that honours torch.use_deterministic_algorithms: its fast path races
    (noise beyond rounding), its deterministic path does not."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        if torch.are_deterministic_algorithms_enabled():
            return 3 * g
        return 3 * g * (1 + 1e-3 * torch.randn_like(g))


@pytest.mark.parametrize("initially", [False, True])
def test_deterministic_rerun_tells_a_racy_kernel_and_restores_the_flag(initially: bool) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(initially)
    try:
        report = gradverify.verify(RacyUnlessDeterministic, rand(4))
        assert torch.are_deterministic_algorithms_enabled() is initially
    finally:
        torch.use_deterministic_algorithms(before)
    result = check(report, "nondeterminism")
    assert result is not None
    if initially:
        # Already deterministic: nothing varies.
        assert result.status is Status.PASSED and result.summary == "4/4 identical"
    else:
        assert result.status is Status.FAILED
        assert "under torch.use_deterministic_algorithms(True) the calls agree" in result.message


def test_deterministic_backward_passes_quietly() -> None:
    report = gradverify.verify(lambda x: (x * x).sum(0), rand(3, 4))
    result = check(report, "nondeterminism")
    assert report.ok and result is not None and result.summary == "4/4 identical" and not result.notes


def test_the_check_leaves_the_users_rng_alone() -> None:
    """The user's backward draws from the global RNG; the check's calls do so on a forked stream."""
    op = OpSpec(name="NoisyBackward", op=FunctionOp(NoisyBackward), file="noisy.py", line=1,
                params=(InputSpec(name="x"),))
    case = Case(op=op, inputs=(InputSpec(name="x", shape=(3,)),), dtype="float64", device="cpu", seed=0)
    ctx = CaseContext(case, Settings(), [rand(3)])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    [result] = NondeterminismCheck().run(ctx)
    assert result.status is Status.FAILED
    assert torch.equal(torch.rand(3), expected)


def test_measure_spread_against_the_tolerance() -> None:
    tol = tolerance_for("float32")
    a = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float32)
    same = measure_spread([(a,), (a.clone(),)], tol)
    assert same.worst == 0 and not same.beyond
    rounding = measure_spread([(a,), (a + torch.tensor([0, 2.4e-7, 0]),)], tol)
    assert 0 < rounding.worst and not rounding.beyond
    wrong = measure_spread([(a,), (a + torch.tensor([0, 0.01, 0]),)], tol, names=("x",))
    assert wrong.beyond == 1 and wrong.total == 3 and wrong.where == "x"
    allowed = measure_spread([(a,), (a + torch.tensor([0, 0.01, 0]),)], tol, floor=0.02)
    assert not allowed.beyond
    nan = measure_spread([(a,), (torch.tensor([1.0, float("nan"), -3.0]),)], tol)
    assert nan.beyond == 1
    first_only = measure_spread([(a,), (a * 2,), (a * 2,), (a * 2,)], tol)
    assert first_only.first_only


def test_selected_in_follows_the_check_selection() -> None:
    assert selected_in(Settings())
    assert not selected_in(Settings(skip_checks=("nondeterminism",)))
    assert not selected_in(Settings(checks=("layout",)))
    assert selected_in(Settings(checks=("layout",), add_checks=("nondeterminism",)))


def test_skipping_the_check_leaves_the_rounding_note_to_the_contracts() -> None:
    report = gradverify.verify(GatherAtomicAdd, rand(3, 5, dtype=torch.float32), skip_checks=("nondeterminism",))
    assert report.ok and check(report, "nondeterminism") is None
    assert any("rounding level" in n for n in report.cases[0].notes), report.cases[0].notes
