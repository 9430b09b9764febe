"""Sweeps: an op's own dtypes/devices/seed/tolerances/checks vs the run's settings, and the progress bar."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import SPECS, run_cli
from gradverify.cases import case_settings, expand_cases
from gradverify.config import Settings, resolve_settings
from gradverify.spec import load_spec
from gradverify.ops import FunctionOp
from gradverify.spec.model import CaseDecl, InputSpec, OpSpec


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def make_op(**fields: object) -> OpSpec:
    declared = (CaseDecl(inputs=(InputSpec(name="x", shape=(2, 3)),)),)
    base = OpSpec(name="Double", op=FunctionOp(Double), file="double.py", line=1,
                  params=(InputSpec(name="x"),), declared=declared)
    return dataclasses.replace(base, **fields)


def cli(tmp_path: Path, **flags: object) -> Settings:
    return resolve_settings(flags, tmp_path, {})


def test_op_values_used_when_the_run_does_not_choose(tmp_path: Path) -> None:
    op = make_op(dtypes=("float64", "float32"), devices=("cpu", "cuda"), seed=9)
    cases = expand_cases(op, cli(tmp_path))
    assert [(c.dtype, c.device, c.seed) for c in cases] == [
        ("float64", "cpu", 9), ("float64", "cuda", 9), ("float32", "cpu", 9), ("float32", "cuda", 9)]
    assert expand_cases(op, Settings())[0].seed == 9  # a Settings built in code, left at its defaults


def test_command_line_wins_over_the_op(tmp_path: Path) -> None:
    op = make_op(dtypes=("float32",), devices=("cuda",), seed=9)
    cases = expand_cases(op, cli(tmp_path, dtypes=["float64"], devices=["cpu"], seed=0))
    assert [(c.dtype, c.device, c.seed) for c in cases] == [("float64", "cpu", 0)]


def test_pyproject_defaults_lose_to_the_op(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.gradverify]\ndtypes = ['float16']\nshapes = ['5']\nseed = 3\n")
    op = make_op(dtypes=("float32",))
    [case] = expand_cases(op, cli(tmp_path))
    assert (case.dtype, case.shapes, case.seed, case.shape_source) == ("float32", ((2, 3),), 3, "spec")
    # An op that declares no shapes takes the configured ones.
    [case] = expand_cases(make_op(declared=()), cli(tmp_path))
    assert (case.shapes, case.shape_source) == (((5,),), "configuration")
    # Shapes on the command line replace the spec's.
    [case] = expand_cases(op, cli(tmp_path, shapes=["4,4"]))
    assert (case.shapes, case.shape_source) == (((4, 4),), "command line")


def test_tolerance_precedence(tmp_path: Path) -> None:
    op = make_op(atol=1e-3, rtol=1e-2, dtype_tolerances=(("float32", 1e-4, None),))
    [f64] = expand_cases(op, cli(tmp_path))
    [f32] = expand_cases(op, cli(tmp_path, dtypes=["float32"]))
    assert (case_settings(f64, cli(tmp_path)).atol, case_settings(f64, cli(tmp_path)).rtol) == (1e-3, 1e-2)
    assert case_settings(f32, cli(tmp_path)).atol == 1e-4          # the op's per-dtype value
    assert case_settings(f32, cli(tmp_path, atol=0.5)).atol == 0.5  # the command line wins
    (tmp_path / "pyproject.toml").write_text(
        "[tool.gradverify]\natol = 0.25\n[tool.gradverify.tolerances]\nfloat64 = {rtol = 0.125}\n")
    plain = make_op()
    [case] = expand_cases(plain, cli(tmp_path))
    effective = case_settings(case, cli(tmp_path))
    assert (effective.atol, effective.rtol) == (0.25, 0.125)      # pyproject, when the op says nothing
    assert case_settings(f64, cli(tmp_path)).atol == 1e-3          # the op beats pyproject


def test_checks_select_gradcheck_second_order_forward_mode(tmp_path: Path) -> None:
    from gradverify.checks import selected

    [case] = expand_cases(make_op(checks=("jacobian",)), cli(tmp_path))
    effective = case_settings(case, cli(tmp_path))
    assert (effective.gradcheck, effective.order, effective.checks) == ("off", 1, ("jacobian",))
    assert [c.name for c in selected(effective.checks, (), ())] == ["contracts", "jacobian"]
    [case] = expand_cases(make_op(checks=("jacobian", "gradcheck", "second_order", "forward_mode")), cli(tmp_path))
    effective = case_settings(case, cli(tmp_path))
    assert (effective.gradcheck, effective.order) == ("fast", 2)
    assert [c.name for c in selected(effective.checks, (), ())] == [
        "contracts", "jacobian", "gradcheck", "forward_mode", "second_order"]
    assert case_settings(case, cli(tmp_path, gradcheck="off")).gradcheck == "off"
    [case] = expand_cases(make_op(checks=("jacobian",)), cli(tmp_path))
    assert case_settings(case, cli(tmp_path, gradcheck="slow")).gradcheck == "slow"  # explicitly asked for


def test_yaml_op_sweeps_its_cases_and_dtypes() -> None:
    [op] = load_spec(SPECS / "matmul.yaml")
    cases = expand_cases(op, Settings())
    assert [(c.shapes, c.dtype) for c in cases] == [
        (((2, 3), (3, 4)), "float64"), (((2, 3), (3, 4)), "float32"),
        (((1, 5), (5, 2)), "float64"), (((1, 5), (5, 2)), "float32")]


def test_sweep_two_shapes_by_two_dtypes_gives_four_rows() -> None:
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--shape", "3,3", "--shape", "2,4",
                     "--dtype", "float64", "--dtype", "float32", "--domain", "positive", "--format", "json")
    assert result.code == 0, result.stderr
    cases = result.json()["cases"]
    assert len(cases) == 4
    assert sorted((tuple(tuple(s) for s in c["shapes"]), c["dtype"]) for c in cases) == sorted(
        [(((3, 3),), "float64"), (((3, 3),), "float32"), (((2, 4),), "float64"), (((2, 4),), "float32")])
    assert "\x1b[" not in result.stderr and "checking" not in result.stderr  # no progress bar off a terminal


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_yaml_float_tolerance_reaches_the_runner(tmp_path: Path, dtype: str) -> None:
    from gradverify.runner import run_case

    [case] = expand_cases(make_op(atol=0.5), Settings(dtypes=(dtype,)))
    result = run_case(case, Settings(dtypes=(dtype,)))
    jac = next(c for c in result.checks if c.name == "jacobian")
    assert result.ok and any("atol 0.5" in v for _, v in jac.details)
