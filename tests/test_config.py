"""Project configuration: [tool.gradverify] in pyproject.toml, GRADVERIFY_* variables, precedence."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import SPECS, run_cli
from gradverify.config import Settings, find_pyproject, resolve_settings
from gradverify.errors import UsageError

NO_ENV: dict[str, str] = {}


def project(tmp_path: Path, table: str) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n\n[tool.gradverify]\n"
                                             + textwrap.dedent(table))
    sub = tmp_path / "specs" / "deep"
    sub.mkdir(parents=True)
    return sub


def test_defaults_without_any_configuration(tmp_path: Path) -> None:
    settings = resolve_settings({}, tmp_path, NO_ENV)
    assert (settings.dtypes, settings.devices, settings.seed, settings.gradcheck) == (("float64",), ("cpu",), 0, "fast")
    assert settings.explicit == frozenset() and "config_file" not in settings.extra


def test_pyproject_found_upward_from_the_spec(tmp_path: Path) -> None:
    sub = project(tmp_path, """
        paths = ["specs"]
        shapes = ["2,3", [4]]
        dtypes = ["float64", "f32"]
        devices = ["cpu"]
        seed = 5
        domain = "positive"
        atol = 1e-7
        max-entries = 3
        format = "json"
        gradcheck = "slow"
        require_device = true
        [tool.gradverify.tolerances]
        float32 = {atol = 1e-4, rtol = 1e-3}
    """)
    spec = sub / "op.py"
    assert find_pyproject(spec) == tmp_path / "pyproject.toml"
    settings = resolve_settings({}, spec, NO_ENV)
    assert settings.paths == (str((tmp_path / "specs").resolve()),)
    assert settings.shapes == (((2, 3),), ((4,),))
    assert settings.dtypes == ("float64", "float32") and settings.seed == 5 and settings.domain == "positive"
    assert settings.atol == 1e-7 and settings.max_entries == 3 and settings.output_format == "json"
    assert settings.gradcheck == "slow" and settings.require_device is True
    assert settings.dtype_tolerances == (("float32", 1e-4, 1e-3),)
    assert settings.explicit == frozenset()  # all of it only defaults: a spec's own values beat them
    assert settings.extra["sources"]["seed"] == "pyproject.toml"


def test_precedence_cli_over_env_over_pyproject_over_default(tmp_path: Path) -> None:
    sub = project(tmp_path, """
        seed = 1
        dtypes = ["float32"]
        devices = ["cpu", "cuda"]
        gradcheck = "slow"
    """)
    env = {"GRADVERIFY_SEED": "2", "GRADVERIFY_DTYPES": "float16,bf16", "GRADVERIFY_UNRELATED": "x"}
    settings = resolve_settings({"seed": 3, "dtypes": [], "devices": None}, sub, env)
    assert settings.seed == 3                          # command line
    assert settings.dtypes == ("float16", "bfloat16")  # environment
    assert settings.devices == ("cpu", "cuda")         # pyproject
    assert settings.max_entries == 20                  # built-in default
    assert settings.gradcheck == "slow"
    assert settings.explicit == frozenset({"seed", "dtypes"})
    sources = settings.extra["sources"]
    assert (sources["seed"], sources["dtypes"], sources["devices"]) == (
        "command line", "GRADVERIFY_DTYPES", "pyproject.toml")


def test_env_values_are_parsed(tmp_path: Path) -> None:
    env = {"GRADVERIFY_SHAPES": "2,3 4,3;5,3", "GRADVERIFY_REQUIRE_DEVICE": "1", "GRADVERIFY_ATOL": "1e-3",
           "GRADVERIFY_FORMAT": "plain"}
    settings = resolve_settings({}, tmp_path, env)
    assert settings.shapes == (((2, 3),), ((4, 3), (5, 3)))
    assert settings.require_device is True and settings.atol == 1e-3 and settings.output_format == "plain"


def test_cli_only_settings_pass_through(tmp_path: Path) -> None:
    settings = resolve_settings({"ops": ["A"], "retries": 0, "order": None}, tmp_path, NO_ENV)
    assert settings.ops == ("A",) and settings.retries == 0 and settings.order == 1
    assert settings.explicit == frozenset({"ops", "retries"})


@pytest.mark.parametrize("table, message", [
    ("seeed = 1\n", "pyproject.toml:5: [tool.gradverify] unknown key 'seeed' (expected one of paths, shapes"),
    ("\nseed = 'one'\n", "pyproject.toml:6: [tool.gradverify] seed: expected a non-negative integer below"),
    ("dtypes = ['float128']\n", "[tool.gradverify] dtypes: expected one of float64"),
    ("shapes = ['2,a']\n", "[tool.gradverify] shapes: expected comma-separated sizes"),
    ("format = 'xml'\n", "[tool.gradverify] format: expected one of rich, plain, json"),
    ("[tool.gradverify.tolerances]\nfloat32 = {atol = 'big'}\n",
     "[tool.gradverify] tolerances.float32.atol: expected a finite non-negative number"),
    ("atol = nan\n", "[tool.gradverify] atol: expected a finite non-negative number"),
    ("devices = ['tpu']\n", "[tool.gradverify] devices: expected cpu, cuda, cuda:N or mps, found 'tpu'"),
    ("seed = \n", "pyproject.toml:5:8: invalid TOML"),
])
def test_pyproject_errors(tmp_path: Path, table: str, message: str) -> None:
    project(tmp_path, table)
    with pytest.raises(UsageError) as info:
        resolve_settings({}, tmp_path, NO_ENV)
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith(str(tmp_path / "pyproject.toml"))


def test_env_and_cli_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^GRADVERIFY_SEED: expected a non-negative integer"):
        resolve_settings({}, tmp_path, {"GRADVERIFY_SEED": "x"})
    with pytest.raises(UsageError, match=r"^--dtype: expected one of float64"):
        resolve_settings({"dtypes": ["float7"]}, tmp_path, NO_ENV)


def test_is_explicit_for_settings_built_in_code() -> None:
    settings = Settings(dtypes=("float32",))
    assert settings.is_explicit("dtypes") and not settings.is_explicit("devices")
    assert not Settings(explicit=frozenset({"seed"})).is_explicit("dtypes")


def test_cli_uses_pyproject_paths_and_rejects_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        f"[tool.gradverify]\npaths = ['{SPECS / 'column_normalize.py'}']\ndtypes = ['float32']\nformat = 'json'\n")
    result = run_cli("check", cwd=tmp_path, env={"GRADVERIFY_SEED": "4"})
    assert result.code == 0, result.stderr
    [case] = result.json()["cases"]
    assert (case["dtype"], case["seed"]) == ("float32", 4)
    (tmp_path / "pyproject.toml").write_text("[tool.gradverify]\ncolour = true\n")
    result = run_cli("check", cwd=tmp_path)  # no path: the search starts in the working directory
    assert result.code == 2
    assert "pyproject.toml:2: [tool.gradverify] unknown key 'colour'" in result.stderr
