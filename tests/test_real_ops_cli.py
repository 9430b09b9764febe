"""Real ops from the command line with no edit to the op's file (issue 10): only --shape, --arg and
--domain, or a YAML spec (tests/corpus/specs) naming the op. Correct ops pass; twins fail with the
right name; guessed arguments are spec problems, not the user's bug."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

CORPUS = Path(__file__).resolve().parent / "corpus"
SPECS = CORPUS / "specs"


def run(*args: str) -> tuple[int, Any]:
    """`gradverify check ... --format json` in this process: (exit code, parsed report)."""
    result = run_cli("check", *args, "--format", "json")
    try:
        return result.code, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.code, result.stdout + result.stderr


def cases(report: Any) -> dict[str, Any]:
    return {c["op"]: c for c in report["cases"]}


def kinds(case: Any) -> set[str]:
    return {d["kind"] for c in case["checks"] if c["counts"] for d in c["diagnoses"]}


def test_labels_as_an_int64_range_bound_to_the_number_of_classes() -> None:
    code, report = run(str(SPECS / "losses.yaml"))
    found = cases(report)
    assert code == 1
    assert found["LabelSmoothingCE"]["status"] == "passed"
    labels = next(i for i in found["LabelSmoothingCE"]["inputs"] if i["name"] == "labels")
    assert labels["dtype"] == "int64" and not labels["requires_grad"]
    assert found["LabelSmoothingCE_bug_scaled"]["status"] == "failed"
    assert "scaled" in kinds(found["LabelSmoothingCE_bug_scaled"])


def test_index_tensors_including_an_index_as_the_first_argument() -> None:
    code, report = run(str(SPECS / "sparse.yaml"))
    assert code == 0, report
    assert {c["status"] for c in report["cases"]} == {"passed"}


def test_custom_ops_by_definition_and_by_dispatcher_name_with_int_float_and_list_arguments() -> None:
    code, report = run(str(SPECS / "custom_ops.yaml"))
    assert code == 0, report
    found = cases(report)
    assert found["rms_norm"]["kind"] == "custom_op" and found["corpus.rms_norm.default"]["kind"] == "torch.ops"
    assert found["corpus.softmax_lse.default"]["status"] == "passed"  # two outputs, an int argument
    stats = found["layer_norm_stats"]
    assert stats["status"] == "passed" and any(i["value"] == "[3, 4]" for i in stats["inputs"])  # a list argument


def test_structured_domains_from_a_yaml_spec() -> None:
    code, report = run(str(SPECS / "structured.yaml"))
    assert code == 0, report
    found = cases(report)
    assert set(found) == {"SortValues", "SimplexEntropy", "SphericalDistance", "SoftDiceLossFunc"}
    simplex = next(c for c in found["SimplexEntropy"]["checks"] if c["name"] == "jacobian")
    assert any("zero-sum perturbations" in n for n in simplex["notes"])


def test_spd_matrix_function_passes_and_its_scaled_twin_fails() -> None:
    code, report = run(str(SPECS / "matrix.yaml"))
    found = cases(report)
    assert code == 1 and found["MatrixSquareRoot"]["status"] == "passed"
    assert "scaled" in kinds(found["MatrixSquareRoot_bug_scaled"])
    # torch's gradcheck nudges one entry of the symmetric input at a time: overruled, and why
    gradcheck = next(c for c in found["MatrixSquareRoot"]["checks"] if c["name"] == "gradcheck")
    assert gradcheck["status"] == "failed" and not gradcheck["counts"]
    assert "leaves the domain, gradverify compares along symmetric perturbations" in gradcheck["message"]
    text = run_cli("check", str(SPECS / "matrix.yaml"), "--op", "MatrixSquareRoot", "--format", "plain").stdout
    assert "gradcheck failed, not counted" in " ".join(text.split())


def test_wrapper_function_checked_to_second_order() -> None:
    code, report = run(str(SPECS / "wrappers.yaml"))
    assert code == 0, report
    [case] = report["cases"]
    assert case["kind"] == "callable"
    assert {c["name"] for c in case["checks"]} >= {"jacobian", "second_order"}


def test_flags_only_on_an_unedited_file() -> None:
    ops = str(CORPUS / "ops" / "classics.py")
    # forward(ctx, x, dim): without a value for dim gradverify has to guess a tensor, softmax
    # raises on it, and that is a spec problem that says what to pass.
    code, report = run(ops, "--op", "Softmax", "--shape", "3,5")
    assert code == 2 and "--arg dim=" in report["cases"][0]["message"]
    code, report = run(ops, "--op", "Softmax", "--op", "Softmax_bug_wrong_dim", "--shape", "3,5", "--arg", "dim=0")
    found = cases(report)
    assert code == 1
    assert found["Softmax"]["status"] == "passed" and found["Softmax_bug_wrong_dim"]["status"] == "failed"


def test_swapped_needs_input_grad_guards_are_caught_and_named() -> None:
    ops = str(CORPUS / "ops" / "linear.py")
    code, report = run(ops, "--op", "LinearFunction_bug_needs_input_grad", "--shape", "4,3;5,3;5")
    [case] = report["cases"]
    assert code == 1 and "needs_input_grad" in kinds(case)
    check = next(c for c in case["checks"] if c["name"] == "needs_input_grad")
    assert "needs_input_grad[" in check["message"]


def test_engine_reduced_bias_is_a_warning_and_strict_fails_it() -> None:
    ops = str(CORPUS / "ops" / "engine.py")
    code, report = run(ops, "--op", "FusedBiasGeLU", "--shape", "4,3;3")
    [case] = report["cases"]
    assert code == 0 and case["status"] == "warned" and "engine_reduced" in kinds(case)
    code, report = run(ops, "--op", "FusedBiasGeLU", "--shape", "4,3;3", "--strict")
    assert code == 1 and report["cases"][0]["status"] == "failed"


# ---------------------------------------------------------------- arguments

DIM_OP = """\
    import torch

    class SumNormalize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dim{annotation}):
            s = x.sum(dim, keepdim=True)
            ctx.save_for_backward(x, s)
            ctx.dim = dim
            return x / s

        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            return g / s - (g * x).sum(ctx.dim, keepdim=True) / s**2, None
    """


def _write(tmp_path: Path, source: str) -> str:
    path = tmp_path / "op.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest.mark.parametrize("annotation", ["", ": int"])
def test_dim_argument_needs_a_value_and_arg_gives_it(tmp_path: Path, annotation: str) -> None:
    path = _write(tmp_path, DIM_OP.format(annotation=annotation))
    code, report = run(path, "--shape", "3,4", "--domain", "positive")
    [case] = report["cases"]
    # Unannotated: gradverify guessed a tensor and forward raised on it. Annotated int without a
    # default: no value to pass. Either way a spec problem (exit 2), and the message says the fix.
    assert code == 2 and case["status"] == "spec_error", case
    assert "--arg dim=" in case["message"]
    assert "spec_guess" in kinds(case)
    code, report = run(path, "--shape", "3,4", "--domain", "positive", "--arg", "dim=1")
    assert code == 0 and report["cases"][0]["status"] == "passed", report


def test_unknown_arg_name_is_a_usage_error(tmp_path: Path) -> None:
    path = _write(tmp_path, DIM_OP.format(annotation=": int"))
    result = run_cli("check", path, "--arg", "axis=1")
    assert result.code == 2 and "no op in the given specs has a parameter 'axis'" in result.stderr, result.stderr


def test_symmetric_and_user_sampler_domains(tmp_path: Path) -> None:
    (tmp_path / "samplers.py").write_text(textwrap.dedent("""\
        import torch

        def well_spread(shape, dtype, generator):
            return torch.linspace(1.0, 2.0, int(torch.tensor(shape).prod())).reshape(shape).to(dtype)
        """))
    path = _write(tmp_path, """\
        import torch

        class SymmetricSquare(torch.autograd.Function):
            '''A @ A for symmetric A; its backward returns the symmetric part only.'''
            @staticmethod
            def forward(ctx, a):
                ctx.save_for_backward(a)
                return a @ a

            @staticmethod
            def backward(ctx, g):
                a, = ctx.saved_tensors
                grad = g @ a.t() + a.t() @ g
                return (grad + grad.t()) / 2
        """)
    code, report = run(path, "--shape", "3,3", "--domain", "a=symmetric")
    assert code == 0, report  # valid for symmetric perturbations: compared along those
    code, report = run(path, "--shape", "3,3")
    assert code == 1  # along every direction the symmetric-only backward is wrong
    code, report = run(path, "--shape", "3,3", "--domain", f"{tmp_path / 'samplers.py'}:well_spread")
    [case] = report["cases"]
    assert case["domain"].endswith("well_spread") and code == 1
