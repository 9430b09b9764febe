"""The real entry points as separate processes: `python -m gradverify` and the console script
installed next to this interpreter (never skipped: a missing script is a failed install), and
Ctrl-C delivered as a real SIGINT. Everything else runs in-process (test_cli.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, SPECS, run_cli

ARGS = ("check", str(SPECS / "column_normalize_buggy.py"), "--shape", "3,3", "--domain", "positive", "--format", "json")


def _timeless(report: dict) -> dict:  # type: ignore[type-arg]
    for case in report["cases"]:
        case.pop("duration_s")
    return report


def test_module_console_script_and_main_give_the_same_report() -> None:
    via_module = run_cli(*ARGS, in_process=False)
    via_script = run_cli(*ARGS, module=False)
    via_main = run_cli(*ARGS)
    assert via_module.code == via_script.code == via_main.code == 1, via_module.stderr + via_script.stderr
    assert _timeless(via_module.json()) == _timeless(via_script.json()) == _timeless(via_main.json())
    assert via_module.stderr == via_script.stderr == ""  # no NumPy warning, nothing else


def test_usage_error_through_the_real_entry_point_is_one_line() -> None:
    result = run_cli("check", str(SPECS / "column_normalize.py"), "--gradcheck", "bogus", in_process=False)
    assert result.code == 2 and result.stdout == ""
    assert result.stderr == "gradverify: error: --gradcheck: expected one of fast, slow, off, found 'bogus'\n"


def test_sigint_exits_130_with_one_line(tmp_path: Path) -> None:
    started = tmp_path / "started"
    spec = tmp_path / "slow.py"
    spec.write_text(f'''
import pathlib
import time

import torch


class Slow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        pathlib.Path({str(started)!r}).touch()
        time.sleep(60)
        return x

    @staticmethod
    def backward(ctx, g):
        return g
''')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    process = subprocess.Popen([sys.executable, "-m", "gradverify", "check", str(spec)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert started.exists(), process.communicate()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().endswith("gradverify: interrupted") and "Traceback" not in err

