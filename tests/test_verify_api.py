"""The library API: gradverify.verify(...) on Functions defined in the test itself."""

from __future__ import annotations

import torch

import gradverify
from gradverify.report import Status


class LinearMap(torch.autograd.Function):
    """y = A x; backward uses A_bwd (a copy of A with chosen entries changed)."""

    @staticmethod
    def forward(ctx, x, a, a_bwd):
        ctx.a_bwd = a_bwd
        return a @ x

    @staticmethod
    def backward(ctx, g):
        return ctx.a_bwd.t() @ g, None, None


def test_wrong_entries_of_a_linear_map_are_reported_exactly_over_many_seeds() -> None:
    """Property: the reported mismatches are exactly the entries where A' differs from A."""
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        m, n = int(torch.randint(2, 6, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
        a = torch.randn(m, n, generator=gen, dtype=torch.float64)
        a_bwd = a.clone()
        k = int(torch.randint(1, m * n + 1, (1,), generator=gen))
        chosen = torch.randperm(m * n, generator=gen)[:k]
        # Each changed entry moves by at least 0.1: far outside any tolerance, as a real bug would.
        delta = (0.1 + torch.rand(k, generator=gen, dtype=torch.float64)) * torch.sign(torch.randn(k, generator=gen))
        a_bwd.view(-1)[chosen] += delta
        x = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
        report = gradverify.verify(LinearMap, x, a, a_bwd)
        jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
        expected = {((i,), (j,)) for i, j in (divmod(int(c), n) for c in chosen)}
        found = {(mm.out_index, mm.in_index) for mm in jac.mismatches}
        assert found == expected, f"seed {seed}"
        assert jac.mismatch_count == k and not report.ok
        assert all(abs(mm.got - mm.expected) >= 0.1 - 1e-12 for mm in jac.mismatches)


def test_correct_linear_map_passes_and_inputs_are_untouched() -> None:
    a = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    before = (a.clone(), x.detach().clone())
    report = gradverify.verify(LinearMap, x, a, a.clone())
    assert report.ok, gradverify.explain(report)
    assert torch.equal(a, before[0]) and torch.equal(x.detach(), before[1])
    assert x.grad is None  # verify never accumulates into the caller's .grad


class InPlaceScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x.mul_(2)  # modifies its input without mark_dirty
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_verify_never_modifies_the_callers_tensor_even_when_forward_writes_in_place() -> None:
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    report = gradverify.verify(InPlaceScale, x)
    assert torch.equal(x.detach(), before)
    contracts = next(c for c in report.cases[0].checks if c.name == "contracts")
    assert contracts.status is Status.FAILED and dict(contracts.details)["inplace"].startswith("forward modified")
    assert contracts.diagnoses[0].kind == "inplace_forward"


class SetupContextSquare(torch.autograd.Function):
    """The forward(*args) + setup_context style."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_setup_context_style_is_supported_with_a_reference() -> None:
    x = torch.randn(2, 3, dtype=torch.float64)
    report = gradverify.verify(SetupContextSquare, x)
    assert report.ok, gradverify.explain(report)
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert dict(jac.details)["truth"].startswith("autograd through the forward body")


class LoopBackward(torch.autograd.Function):
    """A backward vmap cannot batch (Python loop with in-place row writes)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            out[i] = g[i] * x[i].cos()
        return out


def test_analytic_path_falls_back_to_per_row_and_says_so() -> None:
    x = torch.randn(3, 2, dtype=torch.float64)
    report = gradverify.verify(LoopBackward, x)
    assert report.ok, gradverify.explain(report)
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    assert dict(jac.details)["analytic"].startswith("per-row (vmap fallback:")
    square = gradverify.verify(SetupContextSquare, x)
    jac2 = next(c for c in square.cases[0].checks if c.name == "jacobian")
    assert dict(jac2.details)["analytic"] == "batched"


class DetachedForward(torch.autograd.Function):
    """Forward goes through .detach(): autograd through its body gives zeros."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x.detach())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x)


def test_a_silently_wrong_reference_is_not_trusted() -> None:
    x = torch.randn(4, dtype=torch.float64)
    report = gradverify.verify(DetachedForward, x)
    assert report.ok, gradverify.explain(report)
    jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
    details = dict(jac.details)
    assert details["truth"].startswith("finite differences")
    assert any("reference not used" in v for k, v in jac.details if k == "note")


class Surrogate(torch.autograd.Function):
    """Straight-through estimator: round in forward, identity in backward, on purpose."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4 + 0.1 * x

    @staticmethod
    def backward(ctx, g):
        return g


def test_declared_surrogate_is_reported_as_expected_not_as_failure() -> None:
    gradverify.check(surrogate="straight-through estimator")(Surrogate)
    try:
        report = gradverify.verify(Surrogate, torch.randn(5, dtype=torch.float64))
        jac = next(c for c in report.cases[0].checks if c.name == "jacobian")
        assert jac.status is Status.XFAIL and "straight-through" in jac.message
        assert report.ok and report.exit_code == 0
    finally:
        delattr(Surrogate, "__gradverify_checks__")
    undeclared = gradverify.verify(Surrogate, torch.randn(5, dtype=torch.float64))
    assert not undeclared.ok


class SumOfSquares(torch.autograd.Function):
    """A 0-d output."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x * x).sum()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class MaxWithIndex(torch.autograd.Function):
    """A differentiable and an integer (non-differentiable) output."""

    @staticmethod
    def forward(ctx, x):
        values, index = x.max(-1)
        ctx.save_for_backward(x, index)
        ctx.mark_non_differentiable(index)
        return values, index

    @staticmethod
    def backward(ctx, g_values, g_index):
        x, index = ctx.saved_tensors
        out = torch.zeros_like(x)
        out.scatter_(-1, index.unsqueeze(-1), g_values.unsqueeze(-1))
        return out


class SinAndPower(torch.autograd.Function):
    """Two outputs and a non-tensor argument."""

    @staticmethod
    def forward(ctx, x, k=2):
        ctx.save_for_backward(x)
        ctx.k = k
        return x.sin(), x**k

    @staticmethod
    def backward(ctx, g_sin, g_pow):
        (x,) = ctx.saved_tensors
        return g_sin * x.cos() + g_pow * ctx.k * x ** (ctx.k - 1), None


class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.exp()


def test_scalar_outputs_integer_outputs_several_outputs_and_empty_inputs() -> None:
    double = torch.float64
    cases = [(SumOfSquares, (torch.randn(3, dtype=double),)),
             (MaxWithIndex, (torch.randn(2, 4, dtype=double),)),
             (SinAndPower, (torch.randn(3, dtype=double), 3)),
             (Exp, (torch.tensor(0.3, dtype=double),)),
             (Exp, (torch.randn(0, 3, dtype=double),))]
    for function, inputs in cases:
        report = gradverify.verify(function, *inputs)
        assert report.ok, gradverify.explain(report)
    two = gradverify.verify(SinAndPower, torch.randn(3, dtype=double), 3)
    jac = next(c for c in two.cases[0].checks if c.name == "jacobian")
    assert jac.total_entries == 2 * 3 * 3  # both outputs against x


class DirtyScale(torch.autograd.Function):
    """Writes into its input and says so: legal, and must pass."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_in_place_op_with_mark_dirty_passes_and_the_callers_tensor_is_untouched() -> None:
    x = torch.randn(4, dtype=torch.float64)
    before = x.clone()
    report = gradverify.verify(DirtyScale, x)
    assert report.ok, gradverify.explain(report)
    assert torch.equal(x, before)
    contracts = next(c for c in report.cases[0].checks if c.name == "contracts")
    assert contracts.status is Status.PASSED and dict(contracts.details)["inplace"] == "ok"
    second = gradverify.verify(DirtyScale, x, order=2)
    assert second.ok, gradverify.explain(second)


def test_freed_memory_is_handed_back_after_every_check(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # glibc keeps freed large blocks; without a trim between checks each check's peak stacks on
    # the last one's leftovers (BENCHMARKS.md: 616 -> 566 MiB for a 1000x1000 softmax at 256M).
    import gradverify.runner as runner

    calls: list[int] = []
    monkeypatch.setattr(runner, "release_memory", lambda allowance=0: calls.append(allowance))
    report = gradverify.verify(Exp, torch.randn(3, dtype=torch.float64), gradcheck="off")
    ran = [c for c in report.cases[0].checks if c.status is not Status.SKIPPED]
    assert len(calls) >= len(ran) >= 2 and set(calls) == {0}
