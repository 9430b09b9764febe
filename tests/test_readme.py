"""The README's sample outputs are real: each block marked `<!-- sample: gradverify check ARGS -->`
is what that command prints today, through the real command line at 80 columns without colour.

When a renderer or a diagnosis changes its wording this test fails; regenerate the block by
running the command in the marker (COLUMNS=80 NO_COLOR=1, CI unset) from the repository root.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from rich.cells import cell_len
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# torch warns at import when NumPy is missing; the real entry point (main) silences it too.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to initialize NumPy")

MAIN_SAMPLE = "specs/column_normalize_buggy.py --shape 3,3 --domain positive"

# A marker line, then the fenced block right below it.
_SAMPLE = re.compile(r"^<!-- sample: gradverify check (?P<args>.+?) -->\n```text\n(?P<body>.*?)^```$",
                     re.MULTILINE | re.DOTALL)


def readme_samples() -> list[tuple[str, str]]:
    return [(m["args"], m["body"]) for m in _SAMPLE.finditer(README.read_text(encoding="utf-8"))]


def normalise(text: str) -> str:
    """Only what varies between machines and runs: the repository's absolute path, durations,
    trailing blanks."""
    text = text.replace(str(REPO) + os.sep, "").replace(str(REPO), ".")
    text = re.sub(r"\b\d+(\.\d+)?s\b(?= elapsed| total|\))", "<duration>", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def run_check(args: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`gradverify check ARGS` in-process, from the repository root, as a user at an 80-column
    terminal with NO_COLOR and not on CI would run it."""
    for name in list(os.environ):
        if name in ("GITHUB_STEP_SUMMARY",):
            monkeypatch.delenv(name)
    # run_cli drops CI, GITHUB_ACTIONS and GRADVERIFY_* from the environment
    result = run_cli("check", *shlex.split(args), cwd=REPO, env={"COLUMNS": "80", "NO_COLOR": "1"})
    return result.code, result.stdout


def test_the_readme_has_samples_and_the_main_one_is_marked() -> None:
    args = [a for a, _ in readme_samples()]
    assert MAIN_SAMPLE in args, "the column normalisation sample must be marked as a real sample"
    assert len(args) == len(set(args))


@pytest.mark.parametrize("args,body", readme_samples(), ids=[a for a, _ in readme_samples()])
def test_readme_sample_is_the_real_output(args: str, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = run_check(args, monkeypatch)
    assert normalise(out) == normalise(body), f"README sample `gradverify check {args}` drifted; now:\n{out}"


def test_main_sample_fits_80_columns_and_30_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_check(MAIN_SAMPLE, monkeypatch)
    assert code == 1
    lines = out.rstrip("\n").split("\n")
    repro = [line for line in lines if line.lstrip().startswith("reproduce:")]
    assert len(repro) == 1 and "--domain positive" in repro[0]  # whole, for copy-paste
    assert [line for line in lines if cell_len(line) > 80 and line not in repro] == []
    # 30 rows of an 80-column terminal, counting the rows the terminal wraps the repro line onto
    rows = sum(max(1, -(-cell_len(line) // 80)) for line in lines)
    assert rows <= 30, out
