"""Supervised runs: the user's code cannot end, hang or corrupt a run; every case gets a verdict."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SPECS, run_cli
from gradverify.config import Settings
from gradverify.errors import SpecError
from gradverify.report import Report, Status
from gradverify.supervise import (CaseFinished, CasesListed, CaseStarted, LoadingSpecs, PhaseChanged, Supervisor,
                                  run_supervised)

SPEC = '''
import ctypes, os, sys, time
import torch
import gradverify as gv

{preamble}

@gv.check(inputs={{"x": gv.tensor(3, 4)}})
class {name}(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        {forward}
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        {backward}
        (x,) = ctx.saved_tensors
        return 2 * grad * x
'''


def write_op(folder: Path, file: str, name: str, forward: str = "pass", backward: str = "pass",
             preamble: str = "") -> Path:
    """A spec for y = x*x with a right backward, plus whatever misbehaviour forward/backward get."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(SPEC.format(name=name, forward=forward, backward=backward, preamble=preamble))
    return path


PRINTS = ("print('py-stdout-in-forward'); print('py-stderr-in-forward', file=sys.stderr); "
          "os.write(1, b'fd1-in-forward\\n'); ctypes.CDLL(None).printf(b'c-stdio-in-forward\\n')")


def _by_op(cases: list[dict]) -> dict[str, dict]:  # type: ignore[type-arg]
    return {case["op"]: case for case in cases}


def _cli_supports_timeout() -> bool:
    import typer

    from gradverify.cli import app

    command = typer.main.get_command(app).commands["check"]  # type: ignore[attr-defined]
    return any("--timeout" in param.opts for param in command.params)


def test_crashes_and_prints_through_the_cli_leave_a_parseable_report(tmp_path: Path) -> None:
    folder = tmp_path / "ops"
    write_op(folder, "a_exit.py", "ExitsInBackward", backward="os._exit(3)")
    write_op(folder, "b_green_exit.py", "ExitsZeroInForward", forward="os._exit(0)")
    write_op(folder, "c_segv.py", "Segfaults", backward="ctypes.string_at(0)")
    write_op(folder, "d_right.py", "RightButChatty", forward=PRINTS, backward="print('in-backward')")
    result = run_cli("check", str(folder), "--format", "json")
    assert result.code == 1, result.stderr
    cases = _by_op(result.json()["cases"])  # stdout is only the report, though every op printed
    assert set(cases) == {"ExitsInBackward", "ExitsZeroInForward", "Segfaults", "RightButChatty"}
    exits = cases["ExitsInBackward"]
    assert exits["status"] == "error"
    assert exits["message"].startswith("the process running backward exited with code 3 without reporting")
    assert [d["kind"] for c in exits["checks"] for d in c["diagnoses"]] == ["crashed"]
    green = cases["ExitsZeroInForward"]  # os._exit(0) used to end the run green with no report
    assert green["status"] == "error"
    assert green["message"] == "the process running forward exited with code 0 without reporting"
    segv = cases["Segfaults"]
    assert segv["status"] == "error" and "the process running backward died with SIGSEGV" in segv["message"]
    right = cases["RightButChatty"]
    assert right["status"] == "passed"
    for text in ("py-stdout-in-forward", "py-stderr-in-forward", "fd1-in-forward", "c-stdio-in-forward",
                 "in-backward"):
        assert text in right["output"]
    assert "in-backward" not in result.stderr and "fd1-in-forward" not in result.stderr


@pytest.mark.skipif(not _cli_supports_timeout(), reason="--timeout is added to the CLI by the cli branch")
def test_endless_loop_exit_and_segfault_through_the_cli(tmp_path: Path) -> None:
    folder = tmp_path / "ops"
    write_op(folder, "a_loop.py", "Loops", forward="while True: pass")
    write_op(folder, "b_exit.py", "Exits", backward="os._exit(3)")
    write_op(folder, "c_segv.py", "Segfaults", backward="ctypes.string_at(0)")
    write_op(folder, "d_right.py", "Right")
    started = time.monotonic()
    result = run_cli("check", str(folder), "--timeout", "3", "--format", "json")
    assert result.code == 1, result.stderr
    assert time.monotonic() - started < 60
    cases = _by_op(result.json()["cases"])
    assert cases["Loops"]["message"] == "forward did not return within 3 s"
    assert "exited with code 3" in cases["Exits"]["message"]
    assert "SIGSEGV" in cases["Segfaults"]["message"]
    assert cases["Right"]["status"] == "passed"


def test_endless_loop_times_out_and_the_next_case_still_runs(tmp_path: Path) -> None:
    write_op(tmp_path, "a_loop.py", "LoopsInBackward", backward="print('about to loop')\n        while True: pass")
    write_op(tmp_path, "b_right.py", "Right")
    events: list[object] = []
    started = time.monotonic()
    supervisor = Supervisor([str(tmp_path)], Settings(timeout=4), on_event=events.append)
    report = Report(cases=tuple(supervisor.run()))
    assert time.monotonic() - started < 40
    # On Linux the replacement worker was forked from the zygote, not started as a fresh interpreter.
    assert supervisor.launcher.use_zygote == sys.platform.startswith("linux")
    loop, right = report.cases
    assert loop.status is Status.ERROR
    assert loop.message == "backward did not return within 4 s (in the contracts check)"
    (check,) = loop.checks
    assert check.name == "contracts" and [d.kind for d in check.diagnoses] == ["timeout"]
    assert "about to loop" in loop.output  # what it printed before it hung is kept
    assert loop.repro.startswith("gradverify check") and loop.inputs[0].shape == (3, 4)
    assert right.status is Status.PASSED
    assert report.exit_code == 1
    # The events a live display needs, in order: the list, each start, its phases, each verdict.
    assert events[0] == LoadingSpecs((str(tmp_path),))
    assert isinstance(events[1], CasesListed) and events[1].titles == ("LoopsInBackward x(3,4) float64 cpu",
                                                                      "Right x(3,4) float64 cpu")
    assert [type(e) for e in events if not isinstance(e, PhaseChanged)][2:] == [
        CaseStarted, CaseFinished, CaseStarted, CaseFinished]
    phases = [e.phase for e in events if isinstance(e, PhaseChanged) and e.index == 1]
    assert phases[:3] == ["forward", "contracts", "jacobian"]
    # The user's code ran in the workers only.
    assert not any(str(getattr(m, "__file__", "")).startswith(str(tmp_path)) for m in list(sys.modules.values()))


def test_the_supervising_process_imports_neither_torch_nor_the_spec() -> None:
    import subprocess

    code = ("import sys; from gradverify.config import Settings; from gradverify.supervise import run_supervised; "
            f"report = run_supervised([{str(SPECS / 'column_normalize.py')!r}], Settings(gradcheck='off')); "
            "print(report.cases[0].status.value, 'torch' in sys.modules, "
            "any('column_normalize' in name for name in sys.modules), 'multiprocessing' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    # No multiprocessing either: nothing (a resource tracker) can outlive the run.
    assert done.stdout.split() == ["passed", "False", "False", "False"], done.stderr


def test_spec_errors_in_a_worker_are_one_line_errors_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef broken(:\n    pass\n")
    result = run_cli("check", str(bad))
    assert result.code == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("gradverify: error: ") and f"{bad}:3" in result.stderr
    assert result.stdout == ""


def test_a_spec_that_ends_the_process_at_import_is_a_spec_error(tmp_path: Path) -> None:
    path = write_op(tmp_path, "dies.py", "Dies", preamble="print('importing'); os._exit(0)")
    with pytest.raises(SpecError, match="worker process exited with code 0 without reporting"):
        run_supervised([path], Settings())


def test_an_import_that_never_returns_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradverify.supervise

    monkeypatch.setattr(gradverify.supervise, "MIN_LOAD_TIMEOUT", 0.0)  # the load limit is then --timeout
    path = write_op(tmp_path, "hangs.py", "Hangs", preamble="while True: pass")
    started = time.monotonic()
    with pytest.raises(SpecError, match="loading the specs did not finish within 3 s"):
        run_supervised([path], Settings(timeout=3))
    assert time.monotonic() - started < 60


def test_fresh_interpreters_where_workers_cannot_be_forked(tmp_path: Path) -> None:
    write_op(tmp_path, "a_exit.py", "Exits", backward="os._exit(3)")
    write_op(tmp_path, "b_right.py", "Right", forward="print('right forward')")
    supervisor = Supervisor([str(tmp_path)], Settings(gradcheck="off"))
    supervisor.launcher.use_zygote = False  # as on macOS and Windows
    exits, right = supervisor.run()
    assert supervisor.launcher.forked == 0
    assert exits.message.startswith("the process running backward exited with code 3 without reporting")
    assert right.status is Status.PASSED and "right forward" in right.output


def test_runs_in_one_process_share_the_zygote_and_each_worker_takes_its_runs_folder_and_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test session or a library caller runs many checks: the zygote (a torch import) is started
    once, and every forked worker still sees the folder and environment of its own run."""
    import gradverify.launcher as launcher

    outputs = []
    for k in range(2):
        folder = tmp_path / f"run{k}"
        write_op(folder, "op.py", "Right",
                 forward="print('cwd=' + os.getcwd() + ' tag=' + os.environ.get('GV_TEST_TAG', '-'))")
        monkeypatch.chdir(folder)
        monkeypatch.setenv("GV_TEST_TAG", f"tag{k}")
        supervisor = Supervisor(["op.py"], Settings(gradcheck="off"))
        [case] = supervisor.run()
        assert case.status is Status.PASSED, case.message
        outputs.append(case.output)
        zygote = launcher._shared
        if k == 0:
            first = zygote
        if sys.platform.startswith("linux"):
            assert supervisor.launcher.forked == 1 and zygote is first and zygote is not None and zygote.alive
    assert f"cwd={tmp_path / 'run0'} tag=tag0" in outputs[0] and f"cwd={tmp_path / 'run1'} tag=tag1" in outputs[1]
    # A variable torch reads when it is imported cannot be handed to a forked worker: a run that
    # changes one gets a zygote of its own.
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("OMP_NUM_THREADS", "3" if os.environ.get("OMP_NUM_THREADS") != "3" else "2")
        supervisor = Supervisor(["op.py"], Settings(gradcheck="off"))
        [case] = supervisor.run()
        assert case.status is Status.PASSED and supervisor.launcher.forked == 1
        assert launcher._shared is not first and launcher._shared is not None and not first.alive
