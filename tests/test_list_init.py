"""`gradverify list` and `gradverify init`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SPECS, run_cli
from gradverify.api import check_paths
from gradverify.commands.init import class_name, starter_files, write_starter
from gradverify.commands.list_ops import list_ops
from gradverify.config import Settings
from gradverify.errors import UsageError


def test_list_shows_ops_inputs_cases_and_checks() -> None:
    text = list_ops([SPECS / "matmul.yaml", SPECS / "activations.yaml"], Settings())
    assert "MatMul  [Function]  (" in text and "ops/matmul.py:" in text and "declared in" in text \
        and "matmul.yaml:5)" in text
    assert "inputs:   a: tensor, b: tensor" in text
    assert ("a(2,3) b(3,4)  float32  cpu  seed 0  [spec]: contracts; jacobian; layout; ctx_hygiene; nondeterminism; "
            "gradcheck skipped in float32") in text
    assert "x: tensor, beta=2.0" in text and "gradcheck off" in text
    assert "expected: surrogate gradient" in text
    assert text.rstrip().endswith("6 cases would run")


def test_list_marks_unavailable_devices() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    text = list_ops([SPECS / "column_normalize.py"], Settings(devices=("cuda",)))
    assert "cuda (skipped: cuda not available)" in text and "agreement with cpu" in text
    text = list_ops([SPECS / "column_normalize.py"], Settings(devices=("cuda",), require_device=True))
    assert "cuda (fails: cuda not available)" in text


def test_class_name() -> None:
    assert class_name("my_op") == "MyOp" and class_name("2d-conv") == "Op2dConv" and class_name("x") == "X"


@pytest.mark.parametrize("kind", ["python", "yaml", "both"])
def test_starter_as_written_loads_and_passes(tmp_path: Path, kind: str) -> None:
    written = write_starter(str(tmp_path / "my_op"), kind)
    names = sorted(p.name for p in written)
    assert names == {"python": ["my_op.py"], "yaml": ["my_op.py", "my_op.yaml"],
                     "both": ["my_op.py", "my_op.yaml"]}[kind]
    for path in written:
        assert path.read_text().lstrip().startswith(('"""', "#"))  # commented for the user
        report = check_paths([path])
        assert report.ok and report.cases, [c.message for c in report.cases]
    folder = check_paths([tmp_path])  # the folder: the YAML is the op module's spec, not checked twice
    assert folder.ok and len(folder.cases) == (1 if kind == "python" else 4)


def test_starter_fails_as_documented_when_backward_is_wrong(tmp_path: Path) -> None:
    [path] = write_starter(str(tmp_path / "op"), "python")
    path.write_text(path.read_text().replace("return grad_out * w, grad_out * x", "return grad_out * w, grad_out"))
    report = check_paths([path])
    assert not report.ok and report.exit_code == 1


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "op.yaml").write_text("keep me")
    with pytest.raises(UsageError, match="op.yaml already exists: refusing to overwrite"):
        write_starter(str(tmp_path / "op"), "both")
    assert not (tmp_path / "op.py").exists() and (tmp_path / "op.yaml").read_text() == "keep me"
    with pytest.raises(UsageError, match=r"^--kind: expected one of python, yaml, both, found 'toml'$"):
        starter_files("op", "toml")
    with pytest.raises(UsageError, match=r"found 'ymal' \(did you mean 'yaml'\?\)"):
        starter_files("op", "ymal")


def test_init_and_list_through_the_cli(tmp_path: Path) -> None:
    result = run_cli("init", "specs/new_op", "--kind", "yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "wrote specs/new_op.py" in result.stdout and "wrote specs/new_op.yaml" in result.stdout
    again = run_cli("init", "specs/new_op", cwd=tmp_path)
    assert again.code == 2 and "refusing to overwrite" in again.stderr
    listed = run_cli("list", "specs", cwd=tmp_path)
    assert listed.code == 0, listed.stderr
    bad = run_cli("list", "specs", "--dtype", "flaot32", cwd=tmp_path)
    assert bad.code == 2 and bad.stderr == ("gradverify: error: --dtype: expected one of float64, float32, float16, "
                                            "bfloat16, complex128, complex64, found 'flaot32' (did you mean "
                                            "'float32'?)\n")
    assert "NewOp  [Function]  (" in listed.stdout and "declared in specs/new_op.yaml:" in listed.stdout
    assert "4 cases would run" in listed.stdout
