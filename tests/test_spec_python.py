"""Loading Python specs: which Functions are found, how their inputs are read, clean reloads."""

from __future__ import annotations

import sys
import pytest

from gradverify.api import collect_cases
from gradverify.config import Settings, parse_shape_set
from gradverify.errors import SpecError, UsageError
from gradverify.spec import load_spec

HELPER = """\
import torch

class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * FACTOR

    @staticmethod
    def backward(ctx, g):
        return g * FACTOR

FACTOR = {factor}
"""

SPEC = """\
import torch
from helper_ops import Double  # imported: not checked

class Local(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias=None, scale=2.0):
        return x * w * scale

    @staticmethod
    def backward(ctx, g):
        return g, g, None, None

def wrapped(x):
    return Double.apply(x)
"""


def test_only_functions_defined_in_the_file_are_found_and_its_folder_is_importable(write_spec) -> None:
    write_spec("helper_ops.py", HELPER.format(factor=2))
    spec = write_spec("spec.py", SPEC)
    ops = load_spec(spec)
    assert [op.name for op in ops] == ["Local"]
    params = ops[0].params
    assert [p.name for p in params] == ["x", "w", "bias", "scale"]
    assert [(p.is_tensor, p.optional) for p in params] == [(True, False), (True, False), (True, True), (False, False)]
    assert params[3].value == 2.0
    assert "helper_ops" not in sys.modules  # nothing of the spec's folder left behind
    assert str(spec.parent) not in sys.path


def test_second_load_sees_the_files_as_they_are_now(write_spec) -> None:
    write_spec("helper_ops.py", HELPER.format(factor=2))
    spec = write_spec("spec.py", SPEC + "\nVALUE = Double.apply\n")
    first = load_spec(spec)
    write_spec("helper_ops.py", HELPER.format(factor=3))
    second = load_spec(spec)
    module_first = sys.modules[first[0].op.target.__module__]
    assert first[0].op.target is not second[0].op.target
    assert module_first is sys.modules[second[0].op.target.__module__]  # same unique name, re-executed
    import torch

    factor = second[0].op.target.forward.__globals__["wrapped"](torch.ones(1))
    assert float(factor) == 3.0


def test_shapes_select_optional_inputs_and_bad_counts_skip_the_op(write_spec) -> None:
    write_spec("helper_ops.py", HELPER.format(factor=2))
    spec = write_spec("spec.py", SPEC)
    one = collect_cases([spec], Settings(shapes=(parse_shape_set("2,3"),)))
    assert one[0].shapes == ((2, 3), (2, 3))  # one shape: every required tensor input
    three = collect_cases([spec], Settings(shapes=(parse_shape_set("2,3;2,3;3"),)))
    assert three[0].shapes == ((2, 3), (2, 3), (3,))
    # An arity that does not match skips that op with the reason (other ops of the file still run).
    [case] = collect_cases([spec], Settings(shapes=(parse_shape_set("2;2;2;2"),)))
    assert case.skip_reason and "takes 2 to 3 tensor inputs" in case.skip_reason
    default = collect_cases([spec], Settings())
    assert default[0].shape_source == "default"
    sweep = collect_cases([spec], Settings(shapes=(parse_shape_set("2"), parse_shape_set("3")),
                                           dtypes=("float64", "float32")))
    assert len(sweep) == 4


def test_op_filter_and_unknown_op(write_spec) -> None:
    write_spec("helper_ops.py", HELPER.format(factor=2))
    spec = write_spec("spec.py", SPEC)
    assert len(collect_cases([spec], Settings(ops=("Local",)))) == 1
    with pytest.raises(SpecError, match="no op named 'Nope'.*found: Local"):
        collect_cases([spec], Settings(ops=("Nope",)))


def test_import_error_in_spec_names_the_line(write_spec) -> None:
    spec = write_spec("bad_import.py", "import torch\n\nraise RuntimeError('boom')\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.line == 3 and "RuntimeError: boom" in str(info.value)


def test_declaration_naming_an_unknown_parameter_is_a_spec_error(write_spec) -> None:
    spec = write_spec("decl.py", """\
        import torch
        import gradverify as gv

        @gv.check(inputs={"y": gv.tensor(2)})
        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x

            @staticmethod
            def backward(ctx, g):
                return g
        """)
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.line == 4 and "no parameter 'y'" in str(info.value)


def test_shape_parsing() -> None:
    assert parse_shape_set("2,3,3") == ((2, 3, 3),)
    assert parse_shape_set("4,3;5,3;5") == ((4, 3), (5, 3), (5,))
    assert parse_shape_set("()") == ((),)
    with pytest.raises(UsageError):
        parse_shape_set("2,a")


def test_paths_are_not_modified(write_spec) -> None:
    write_spec("helper_ops.py", HELPER.format(factor=2))
    spec = write_spec("spec.py", SPEC)
    before = {p: p.read_bytes() for p in spec.parent.iterdir()}
    load_spec(spec)
    after = {p: p.read_bytes() for p in spec.parent.iterdir()}  # no __pycache__ either
    assert before == after


def test_backward_line_is_the_def_line_below_its_decorators(write_spec) -> None:
    spec = write_spec("lines.py", """\
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x

            @staticmethod
            def backward(ctx, g):
                return g
        """)
    (op,) = load_spec(spec)
    assert op.line == 3 and op.backward_line == 9


def test_trailing_comma_and_bad_tokens_in_shapes() -> None:
    assert parse_shape_set("3,") == ((3,),)
    assert parse_shape_set("2x3") == ((2, 3),)
    for bad in ("2,x", "2,,3"):
        with pytest.raises(UsageError):
            parse_shape_set(bad)


def test_varargs_forward_takes_one_tensor_per_shape_and_base_classes_are_not_ops(write_spec) -> None:
    spec = write_spec("varargs.py", """\
        import torch

        class Base(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                raise NotImplementedError

        class Twice(Base):
            @staticmethod
            def forward(ctx, x):
                return 2 * x

            @staticmethod
            def backward(ctx, g):
                return 2 * g

        class Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *xs):
                return sum(xs)

            @staticmethod
            def backward(ctx, g):
                return (g,) * 3
        """)
    assert [op.name for op in load_spec(spec)] == ["Twice", "Sum"]
    variant = write_spec("variant.py", """\
        import torch

        class Good(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return 2 * x

            @staticmethod
            def backward(ctx, g):
                return 2 * g

        class Buggy(Good):
            @staticmethod
            def backward(ctx, g):
                return g
        """)
    assert [op.name for op in load_spec(variant)] == ["Good", "Buggy"]  # a complete parent is an op
    (three,) = collect_cases([spec], Settings(ops=("Sum",), shapes=(parse_shape_set("3;3;3"),)))
    assert [p.name for p in three.inputs] == ["xs[0]", "xs[1]", "xs[2]"]
    (one,) = collect_cases([spec], Settings(ops=("Sum",)))
    assert [p.name for p in one.inputs] == ["xs[0]"]
    from gradverify.api import run_cases

    report = run_cases([three], Settings())
    assert report.ok, [c.message for c in report.cases]
    (two,) = collect_cases([spec], Settings(ops=("Sum",), shapes=(parse_shape_set("3;3"),)))
    assert not run_cases([two], Settings()).ok  # 3 gradients for 2 inputs


def test_nothing_to_differentiate_is_skipped_not_passed(write_spec) -> None:
    spec = write_spec("constant.py", """\
        import torch
        import gradverify as gv

        @gv.check(inputs={"x": 3.0})
        class Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return torch.tensor(x) * 2

            @staticmethod
            def backward(ctx, g):
                return g * 3
        """)
    from gradverify.api import check_paths
    from gradverify.report import Status

    (case,) = check_paths([spec], Settings()).cases
    assert case.status is Status.SKIPPED and "nothing to differentiate" in case.message
