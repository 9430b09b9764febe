"""YAML specs: loading, named dims, and every error class with its line and column."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from conftest import SPECS, run_cli
from gradverify.errors import SpecError
from gradverify.spec import load_path, load_spec
from gradverify.spec.yaml_spec import DimError, bind_dims, load_yaml_spec

OPS = '''
import torch


class MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g @ b.T, a.T @ g


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor=2.0, bias=None):
        ctx.factor = factor
        return x * factor if bias is None else x * factor + bias

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None, g


def reference(a, b):
    return a @ b


NOT_A_FUNCTION = 3
NOT_CALLABLE = 3
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "ops.py").write_text(OPS)
    return tmp_path


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# --- named dims ------------------------------------------------------------------------------

def test_bind_dims_shares_sizes_between_inputs() -> None:
    shapes = {"a": ["M", "K"], "b": ["K", "N"], "bias": [4]}
    assert bind_dims(shapes, {"M": 2, "K": 3, "N": 5}) == {"a": (2, 3), "b": (3, 5), "bias": (4,)}


def test_bind_dims_from_a_concrete_input_shape() -> None:
    shapes = {"a": ["M", "K"], "b": ["K", "N"]}
    assert bind_dims(shapes, {"N": 4}, {"a": [2, 3]}) == {"a": (2, 3), "b": (3, 4)}


def test_bind_dims_unbound_dim() -> None:
    with pytest.raises(DimError, match="found dim 'N' unbound"):
        bind_dims({"a": ["M", "K"], "b": ["K", "N"]}, {"M": 2, "K": 3})


def test_bind_dims_conflicting_sizes() -> None:
    with pytest.raises(DimError, match="conflicting sizes 3 .*and 4") as info:
        bind_dims({"a": ["M", "K"], "b": ["K", "N"]}, {"K": 3, "N": 2}, {"a": [2, 4]})
    assert info.value.key == "a"
    with pytest.raises(DimError, match="conflicting sizes"):
        bind_dims({"a": ["M", "K"], "b": ["K", "N"]}, {"M": 1, "N": 1}, {"a": [1, 3], "b": [4, 1]})


def test_bind_dims_unknown_dim_and_wrong_rank() -> None:
    with pytest.raises(DimError, match="found 'Q'") as info:
        bind_dims({"a": ["M"]}, {"M": 1, "Q": 2})
    assert info.value.key == "Q"
    with pytest.raises(DimError, match="expected a shape of 2 dims"):
        bind_dims({"a": ["M", 3]}, {}, {"a": [1, 3, 1]})
    with pytest.raises(DimError, match="expected size 3 at dim 1"):
        bind_dims({"a": ["M", 3]}, {}, {"a": [1, 4]})


# --- loading ---------------------------------------------------------------------------------

def test_matmul_with_named_dims(folder: Path) -> None:
    path = write(folder, """
        function: ops.py:MatMul
        inputs:
          a: {shape: [M, K]}
          b: {shape: [K, N], domain: positive, requires_grad: false}
        cases:
          - {M: 2, K: 3, N: 4}
          - {M: 1, K: 5, N: 2}
        dtypes: [float64, f32]
        devices: [cpu, cuda:1]
        seed: 7
        atol: 1e-7
        tolerances: {float32: {rtol: 0.001}}
        checks: [gradcheck, second_order]
        reference: ops.py:reference
        expect_failure: issue 12
    """)
    [op] = load_yaml_spec(path)
    assert op.name == "MatMul" and op.spec_file == str(path) and op.spec_line == 1
    assert op.file.endswith("ops.py") and op.line is not None  # the op itself lives in ops.py
    assert [[p.shape for p in c.inputs] for c in op.declared] == [[(2, 3), (3, 4)], [(1, 5), (5, 2)]]
    assert op.declared[0].label == "M=2, K=3, N=4"
    b = op.declared[0].inputs[1]
    assert (b.domain, b.requires_grad) == ("positive", False)
    assert op.dtypes == ("float64", "float32") and op.devices == ("cpu", "cuda:1") and op.seed == 7
    assert op.atol == 1e-7 and op.dtype_tolerances == (("float32", None, 0.001),)
    assert op.checks == ("jacobian", "gradcheck", "second_order")
    assert op.reference is not None and op.reference.__name__ == "reference"
    assert op.expect_failure == "issue 12"


def test_plain_values_defaults_and_several_ops(folder: Path) -> None:
    path = write(folder, """
        ops:
          - function: ops.py:Scale
            name: Scale3
            inputs:
              x: {shape: [2, 3]}
              factor: 3.0
          - function: ops.py:Scale
            inputs:
              bias: {shape: [3]}
              x: {shape: [3]}
              factor: {value: {"nested": [1, 2]}}
            surrogate: true
    """)
    first, second = load_yaml_spec(path)
    assert first.name == "Scale3"
    x, factor, bias = first.declared[0].inputs
    assert x.shape == (2, 3) and not factor.is_tensor and factor.value == 3.0
    assert not bias.is_tensor and bias.value is None  # optional tensor left out: passed as None
    x, factor, bias = second.declared[0].inputs  # forward's order, whatever order the YAML uses
    assert (x.name, bias.name, bias.shape) == ("x", "bias", (3,))
    assert factor.value == {"nested": [1, 2]} and type(factor.value) is dict
    assert second.surrogate == "declared a surrogate gradient"
    assert second.spec_line == 7


def test_function_by_import_path(folder: Path) -> None:
    (folder / "yamlmod_abc.py").write_text(OPS)
    path = write(folder, """
        function: yamlmod_abc:MatMul
        inputs: {a: {shape: [2, 2]}, b: {shape: [2, 2]}}
    """)
    [op] = load_spec(path)
    assert op.op.target.__name__ == "MatMul" and op.declared[0].inputs[0].shape == (2, 2)


def test_no_object_construction(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(folder, f"""
        function: !!python/object/apply:os.system ["touch {marker}"]
    """)
    with pytest.raises(SpecError, match=r"spec.yaml:1:\d+: yaml: expected valid YAML"):
        load_yaml_spec(path)
    assert not marker.exists()


# --- every error class, with its line ------------------------------------------------------

# Each case: the YAML (the line marked `#<` is where the error must point), the key path and
# a fragment of the message.
ERRORS = {
    "syntax": ("""
        function: ops.py:MatMul
        inputs: {a: [1, 2}   #<
    """, "yaml", "expected valid YAML"),
    "duplicate key": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2]}
          a: {shape: [3]}   #<
    """, "a", "expected each key once in a mapping, found 'a' again (first at line 3)"),
    "unknown top key": ("""
        function: ops.py:MatMul
        dtyeps: [float64]   #<
    """, "dtyeps", "expected one of function, name, inputs"),
    "unknown tensor key": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2], grad: false}   #<
          b: {shape: [2, 2]}
    """, "inputs.a.grad", "found unknown key 'grad'"),
    "missing function": ("""
        inputs:   #<
          a: {shape: [2]}
    """, "function", "found no 'function' key"),
    "module not importable": ("""
        function: no_such_module_xyz:MatMul   #<
    """, "function", "expected an importable module 'no_such_module_xyz', found ModuleNotFoundError"),
    "file not found": ("""
        function: missing.py:MatMul   #<
    """, "function", "expected a Python file relative to"),
    "no such class": ("""
        function: ops.py:Matmul   #<
    """, "function", "found no 'Matmul'"),
    "not a Function": ("""
        function: ops.py:NOT_CALLABLE   #<
    """, "function", "expected a torch.autograd.Function, a custom op or a differentiable callable, found the integer 3"),
    "bad function string": ("""
        ops:
          - function: MatMul   #<
    """, "ops[0].function", "expected 'module.path:Name' or 'file.py:Name'"),
    "unknown input": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2]}
          c: {shape: [2, 2]}   #<
    """, "inputs.c", "expected a parameter of MatMul (a, b), found 'c'"),
    "missing input": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2]}   #<
    """, "inputs", "found no 'b'"),
    "shape not a list": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: 2x2}   #<
          b: {shape: [2, 2]}
    """, "inputs.a.shape", "expected a list of sizes and named dims like [N, 3], found the string '2x2'"),
    "bad size": ("""
        function: ops.py:MatMul
        inputs:
          a:
            shape:
              - 2
              - -1   #<
          b: {shape: [2, 2]}
    """, "inputs.a.shape[1]", "found the integer -1"),
    "bad domain": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2], domain: positve}   #<
          b: {shape: [2, 2]}
    """, "inputs.a.domain", "expected one of any, positive"),
    "bad requires_grad": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2], requires_grad: "no"}   #<
          b: {shape: [2, 2]}
    """, "inputs.a.requires_grad", "expected true or false, found the string 'no'"),
    "unbound dim without cases": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [2, 2]}
          b:
            shape: [2,
                    N]   #<
    """, "inputs.b.shape[1]", "expected a size for dim 'N' from 'cases'"),
    "unbound dim in a case": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [M, K]}
          b: {shape: [K, N]}
        cases:
          - {M: 2, K: 3, N: 4}
          - {M: 2, K: 3}   #<
    """, "cases[1]", "found dim 'N' unbound"),
    "unknown dim in a case": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [M, K]}
          b: {shape: [K, N]}
        cases:
          - M: 2
            K: 3
            N: 4
            Q: 1   #<
    """, "cases[0].Q", "expected a named dim used by an input shape (M, K, N), found 'Q'"),
    "conflicting sizes": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [M, K]}
          b: {shape: [K, N]}
        cases:
          - K: 3
            N: 1
            a: [2, 4]   #<
    """, "cases[0].a", "found conflicting sizes 3 (K: 3) and 4 (a: [2, 4])"),
    "bad case size": ("""
        function: ops.py:MatMul
        inputs:
          a: {shape: [M, 2]}
          b: {shape: [2, 2]}
        cases:
          - {M: two}   #<
    """, "cases[0].M", "expected a non-negative size, found the string 'two'"),
    "cases without inputs": ("""
        function: ops.py:MatMul
        cases:   #<
          - {M: 1}
    """, "cases", "found cases without inputs"),
    "bad dtype": ("""
        function: ops.py:MatMul
        dtypes:
          - float64
          - float128   #<
    """, "dtypes[1]", "expected one of float64, float32"),
    "bad device": ("""
        function: ops.py:MatMul
        devices: [cpu, gpu]   #<
    """, "devices[1]", "expected cpu, cuda, cuda:N or mps, found 'gpu'"),
    "bad seed": ("""
        function: ops.py:MatMul
        seed: 1.5   #<
    """, "seed", "expected a non-negative integer, found the number 1.5"),
    "bad tolerance": ("""
        function: ops.py:MatMul
        tolerances:
          float32: {atol: small}   #<
    """, "tolerances.float32.atol", "expected a non-negative number, found the string 'small'"),
    "bad tolerance dtype": ("""
        function: ops.py:MatMul
        tolerances:
          float8: {atol: 1.0}   #<
    """, "tolerances.float8", "expected a dtype"),
    "bad check": ("""
        function: ops.py:MatMul
        checks: [jacobian, hessian]   #<
    """, "checks[1]", "expected one of contracts, jacobian, needs_input_grad, gradcheck, registration, opcheck, transforms, forward_mode, second_order, device, compile, found 'hessian'"),
    "bad reference": ("""
        function: ops.py:MatMul
        reference: ops.py:NOT_A_FUNCTION   #<
    """, "reference", "expected a callable, found the integer 3"),
    "surrogate and expect_failure": ("""
        function: ops.py:MatMul
        surrogate: true
        expect_failure: bug   #<
    """, "expect_failure", "expected at most one of surrogate and expect_failure"),
    "top level not a mapping": ("""
        - function: ops.py:MatMul   #<
    """, "top level", "expected a mapping with 'function' (one op) or 'ops'"),
    "ops not a list": ("""
        ops: ops.py:MatMul   #<
    """, "ops", "expected a non-empty list of ops, found the string"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_error_points_at_its_line(folder: Path, name: str) -> None:
    text, key_path, fragment = ERRORS[name]
    text = textwrap.dedent(text).lstrip("\n")
    line = next(k for k, row in enumerate(text.splitlines(), start=1) if "#<" in row)
    path = write(folder, text)
    with pytest.raises(SpecError) as info:
        load_yaml_spec(path)
    message = str(info.value)
    assert re.match(rf"^{re.escape(str(path))}:{line}:\d+: {re.escape(key_path)}: expected .+, found .+$",
                    message), message
    assert fragment in message, message
    assert "\n" not in message


def test_empty_file(folder: Path) -> None:
    path = write(folder, "# nothing here\n")
    with pytest.raises(SpecError, match=r"spec.yaml:1:1: top level: expected .*found an empty file"):
        load_yaml_spec(path)


def test_column_of_unknown_key(folder: Path) -> None:
    row = "  a: {shape: [2], oops: 1}"
    path = write(folder, f"function: ops.py:MatMul\ninputs:\n{row}\n  b: {{shape: [2]}}\n")
    with pytest.raises(SpecError) as info:
        load_yaml_spec(path)
    assert str(info.value).startswith(f"{path}:3:{row.index('oops') + 1}: inputs.a.oops:")


# --- folders and the shipped examples ------------------------------------------------------

def test_folder_skips_helpers_and_op_modules(folder: Path) -> None:
    write(folder, "function: ops.py:MatMul\ninputs: {a: {shape: [2, 2]}, b: {shape: [2, 2]}}\n")
    (folder / "helpers.py").write_text("SCALE = 2\n")  # defines no Function: a helper
    found = load_path(folder)
    assert [(f.name, [op.name for op in ops]) for f, ops in found] == [("spec.yaml", ["MatMul"])]
    with pytest.raises(SpecError, match="no torch.autograd.Function"):
        load_path(folder / "helpers.py")  # named directly, it is still an error


def test_shipped_yaml_specs_load() -> None:
    [matmul] = load_spec(SPECS / "matmul.yaml")
    assert [c.inputs[1].shape for c in matmul.declared] == [(3, 4), (5, 2)]
    softplus, ste = load_spec(SPECS / "activations.yaml")
    assert softplus.declared[0].inputs[1].value == 2.0 and ste.surrogate
    files = [f.relative_to(SPECS).as_posix() for f, _ in load_path(SPECS)]
    assert "matmul.yaml" in files and "ops/matmul.py" not in files


def test_cli_reports_yaml_error_with_exit_2(folder: Path) -> None:
    path = write(folder, "function: ops.py:MatMul\ninputs:\n  a: {shape: [M]}\n  b: {shape: [2]}\n")
    result = run_cli("check", str(path))
    assert result.code == 2
    assert f"{path}:3:15: inputs.a.shape[0]: expected a size for dim 'M'" in result.stderr
    assert "Traceback" not in result.stderr


LINEAR = '''
import torch


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias=None, scale=1.0, options=None):
        ctx.save_for_backward(x, weight)
        ctx.scale = scale
        out = scale * x @ weight.T
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return ctx.scale * g @ weight, ctx.scale * g.T @ x, g.sum(0), None, None


def linear_reference(x, weight, bias=None, scale=1.0, options=None):
    out = scale * x @ weight.T
    return out if bias is None else out + bias
'''


def test_documented_example_loads_and_passes(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = docs.split("```yaml\n# specs/linear.yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "linear.py").write_text(LINEAR)
    path = write(tmp_path, example, "linear.yaml")
    [op] = load_yaml_spec(path)
    assert op.name == "Linear[bias]" and len(op.declared) == 3
    assert [p.shape for p in op.declared[2].inputs[:3]] == [(3, 2), (1, 2), (1,)]
    assert op.declared[0].inputs[4].value == {"fused": False}
    from gradverify.api import check_paths
    from gradverify.config import Settings

    settings = Settings(devices=("cpu",), dtypes=("float64",), explicit=frozenset({"devices", "dtypes"}))
    report = check_paths([path], settings)
    assert report.ok and len(report.cases) == 3, [c.message for c in report.cases]
