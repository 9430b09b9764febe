"""Project configuration: [tool.gradverify] in pyproject.toml, GRADVERIFY_* variables, precedence."""

from __future__ import annotations

import re
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
    ("\nseed = 'one'\n", "pyproject.toml:6: [tool.gradverify] seed: expected an integer from 0 to 9223344366820, "
                        "found 'one'"),
    ("seed = 18446744073709551616\n", "[tool.gradverify] seed: expected an integer from 0 to"),
    ("timeout = -1\n", "[tool.gradverify] timeout: expected a number of seconds above 0"),
    ("strict = 'yes please'\n", "[tool.gradverify] strict: expected true or false, found 'yes please'"),
    ("gradcheck = 'bogus'\n", "[tool.gradverify] gradcheck: expected one of fast, slow, off, found 'bogus'"),
    ("mode = 'ful'\n", "[tool.gradverify] mode: expected one of auto, full, fast, found 'ful' (did you mean 'full'?)"),
    ("order = 3\n", "[tool.gradverify] order: expected 1 (gradients) or 2 (also the double backward), found 3"),
    ("max_memory = 10\n", "[tool.gradverify] max_memory: expected a size from 1M to 1P"),
    ("checks = ['hessian']\n", "[tool.gradverify] checks: expected one of contracts, jacobian"),
    ("atol = inf\n", "[tool.gradverify] atol: expected a finite non-negative number, found inf"),
    ("stirct = true\n", "unknown key 'stirct' (expected one of paths, shapes, dtypes"),
    ("dtypes = ['float128']\n", "[tool.gradverify] dtypes: expected one of float64"),
    ("shapes = ['2,a']\n", "[tool.gradverify] shapes: expected sizes like 2,3,3"),
    ("shapes = ['']\n", "[tool.gradverify] shapes: expected sizes like 2,3,3"),
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
    with pytest.raises(UsageError, match=r"^GRADVERIFY_SEED: expected an integer from 0 to"):
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


# --- one schema: the same value gets the same verdict and the same words everywhere -----------

OP = '''
import torch


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 3 * g  # BUG: the derivative is 2
'''


def _everywhere(tmp_path: Path, key: str, yaml_value: str, toml_value: str, flag_value: str,
                python_value: object) -> dict[str, str]:
    """The error each source gives for one bad value of `key`: the command line, GRADVERIFY_*,
    pyproject.toml, a YAML op and verify()."""
    import torch

    import gradverify
    from gradverify import schema

    setting = schema.keys_for(schema.PYPROJECT)[key]
    (tmp_path / "op.py").write_text(OP)
    messages: dict[str, str] = {}
    flag = run_cli("check", str(tmp_path / "op.py"), setting.flag or "", flag_value, cwd=tmp_path)
    assert flag.code == 2, flag.stderr
    messages["cli"] = flag.stderr.strip().removeprefix("gradverify: error: ")
    env = run_cli("check", str(tmp_path / "op.py"), cwd=tmp_path, env={setting.env: flag_value})
    assert env.code == 2, env.stderr
    messages["env"] = env.stderr.strip().removeprefix("gradverify: error: ")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(f"[tool.gradverify]\n{key} = {toml_value}\n")
    with pytest.raises(UsageError) as pyproject:
        resolve_settings({}, project, NO_ENV)
    messages["pyproject"] = str(pyproject.value)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"function: op.py:Double\n{key}: {yaml_value}\n")
    yaml_run = run_cli("check", str(spec), cwd=tmp_path)
    assert yaml_run.code == 2, yaml_run.stdout + yaml_run.stderr
    messages["yaml"] = yaml_run.stderr.strip().removeprefix("gradverify: error: ")
    if key in schema.keys_for(schema.VERIFY):
        with pytest.raises(ValueError) as verify:
            gradverify.verify(OpFromText.get(tmp_path), torch.randn(3, dtype=torch.float64), **{key: python_value})
        messages["verify"] = str(verify.value)
    return messages


class OpFromText:
    """The Double op, imported from the file the CLI checks."""

    @staticmethod
    def get(folder: Path):  # type: ignore[no-untyped-def]
        from gradverify.spec.python import import_spec_module

        return import_spec_module(folder / "op.py").Double


@pytest.mark.parametrize("key, yaml_value, toml_value, flag_value, python_value, detail", [
    ("gradcheck", "bogus", "'bogus'", "bogus", "bogus", "expected one of fast, slow, off, found 'bogus'"),
    ("mode", "fsat", "'fsat'", "fsat", "fsat", "expected one of auto, full, fast, found 'fsat' (did you mean 'fast'?)"),
    ("order", "'3'", "'3'", "3", "3", "expected 1 (gradients) or 2 (also the double backward), found '3'"),
    ("seed", "'-1'", "'-1'", "-1", "-1", "expected an integer from 0 to 9223344366820, found '-1'"),
    ("atol", "'nan'", "'nan'", "nan", "nan", "expected a finite non-negative number, found 'nan'"),
    ("nondet_tol", "'inf'", "'inf'", "inf", "inf", "expected a finite non-negative number, found 'inf'"),
])
def test_one_bad_value_one_message_in_every_source(tmp_path: Path, key: str, yaml_value: str, toml_value: str,
                                                   flag_value: str, python_value: object, detail: str) -> None:
    messages = _everywhere(tmp_path, key, yaml_value, toml_value, flag_value, python_value)
    assert set(messages) >= {"cli", "env", "pyproject", "yaml"}
    for source, message in messages.items():
        assert message.endswith(f": {detail}") and message.count(detail) == 1, (source, message)
    from gradverify import schema

    flag = schema.BY_NAME[schema.keys_for(schema.PYPROJECT)[key].name].flag
    assert messages["cli"] == f"{flag}: {detail}"
    assert messages["env"] == f"GRADVERIFY_{key.upper()}: {detail}"
    assert messages["pyproject"].endswith(f"pyproject.toml:2: [tool.gradverify] {key}: {detail}")
    assert re.search(rf"spec\.yaml:2:\d+: {key}: {re.escape(detail)}$", messages["yaml"]), messages["yaml"]
    if "verify" in messages:
        assert messages["verify"] == f"verify(): {key}: {detail}"


def test_verify_rejects_what_the_command_line_rejects() -> None:
    import torch

    import gradverify
    from gradverify.errors import OptionError

    x = torch.randn(3, dtype=torch.float64)
    for options, detail in [
        ({"gradcheck": "bogus"}, "verify(): gradcheck: expected one of fast, slow, off, found 'bogus'"),
        ({"mode": "bogus"}, "verify(): mode: expected one of auto, full, fast, found 'bogus'"),
        ({"order": 3}, "verify(): order: expected 1 (gradients) or 2 (also the double backward), found 3"),
        ({"seed": -1}, "verify(): seed: expected an integer from 0 to 9223344366820, found -1"),
        ({"seed": 2**64}, "verify(): seed: expected an integer from 0 to 9223344366820, found 18446744073709551616"),
        ({"max_memory": 10}, "verify(): max_memory: expected a size from 1M to 1P, like 512M or 2G, found 10"),
        ({"atol": float("inf")}, "verify(): atol: expected a finite non-negative number, found inf"),
        ({"checks": ["secnd_order"]}, "found 'secnd_order' (did you mean 'second_order'?)"),
    ]:
        with pytest.raises(OptionError) as info:
            gradverify.verify(torch.sin, x, **options)
        assert detail in str(info.value), str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_declarations_go_through_the_schema_with_the_line(tmp_path: Path) -> None:
    from gradverify.errors import SpecError
    from gradverify.spec import load_spec

    for declaration, detail in [
        ("@gv.check(atol=float('nan'))", "gradverify.check: atol: expected a finite non-negative number, found nan"),
        ("@gv.check(checks=['hessian'])", "gradverify.check: checks: expected one of contracts"),
        ("@gv.check(inputs={'x': gv.tensor(2**40)})", "gradverify.tensor: shape: expected sizes like"),
    ]:
        path = tmp_path / "spec.py"
        path.write_text(f"import torch\nimport gradverify as gv\n\n{declaration}\n{OP.split('import torch')[1]}")
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert str(info.value).startswith(f"{path}:4: {detail}"), str(info.value)


def test_every_setting_is_a_settings_field_and_choices_come_from_one_place() -> None:
    from dataclasses import fields

    from gradverify import schema
    from gradverify.checks import check_names

    names = {f.name for f in fields(Settings)}
    assert {s.name for s in schema.SETTINGS} <= names
    with pytest.raises(schema.Invalid) as info:
        schema.check_name("nope")
    assert info.value.choices == check_names()  # the registry's names, not a copy
    assert schema.STDOUT_FORMATS == tuple(f.value for f in schema.OutputFormat if f is not schema.OutputFormat.HTML)


def test_timeout_strict_and_new_keys_from_pyproject_and_env(tmp_path: Path) -> None:
    sub = project(tmp_path, """
        timeout = 30
        strict = true
        mode = "fast"
        max_memory = "1G"
        order = 2
        jobs = 2
        checks = ["second_order"]
    """)
    settings = resolve_settings({}, sub, NO_ENV)
    assert (settings.timeout, settings.strict, settings.mode, settings.max_memory, settings.order, settings.jobs) == (
        30.0, True, "fast", 2**30, 2, 2)
    assert settings.checks == ("second_order",)
    env = resolve_settings({}, sub, {"GRADVERIFY_TIMEOUT": "7.5", "GRADVERIFY_STRICT": "0"})
    assert env.timeout == 7.5 and env.strict is False
    cli = resolve_settings({"timeout": "3", "strict": False}, sub, NO_ENV)
    assert cli.timeout == 3.0 and cli.strict is False and cli.is_explicit("timeout")
    assert Settings().timeout == 120.0


def test_pyproject_search_survives_a_symlink_loop_and_a_name_too_long(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.gradverify]\nseed = 3\n")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert find_pyproject(loop) == tmp_path / "pyproject.toml"
    assert find_pyproject(loop / "spec.py") == tmp_path / "pyproject.toml"
    assert find_pyproject(tmp_path / ("n" * 5000)) == tmp_path / "pyproject.toml"


def test_a_non_utf8_pyproject_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_bytes(b"[tool.gradverify]\nseed = 1 # \xff\n")
    with pytest.raises(UsageError, match="expected a UTF-8 text file"):
        resolve_settings({}, tmp_path, NO_ENV)


def test_inputs_past_the_memory_budget_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    (tmp_path / "op.py").write_text(OP)
    result = run_cli("check", str(tmp_path / "op.py"), "--shape", "100000,100000")
    assert result.code == 2
    assert result.stderr.strip().endswith("Double: shape (100000, 100000) needs 80 GB for its inputs alone; "
                                          "--max-memory is 512M")
    bigger = run_cli("check", str(tmp_path / "op.py"), "--shape", "100000,100000", "--max-memory", "1P", "--op",
                     "Double", "--seed", "0", "--timeout", "1", "--format", "json", "--gradcheck", "off",
                     "--shape", "2147483648")
    assert bigger.code == 2 and "--shape: expected sizes like" in bigger.stderr
