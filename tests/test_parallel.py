"""-j N: the same report as -j 1, workers that load the specs once, and die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, SPECS
from gradverify.api import check_paths
from gradverify.config import Settings
from gradverify.report import Report, to_dict
from gradverify.supervise import CaseStarted, run_supervised

SPEC = '''
import os, sys, time
from pathlib import Path
import torch
import gradverify as gv

{preamble}


def barrier():
    """With GV_TEST_BARRIER set: a worker's first case waits (bounded) until a second worker runs
    one too, so the test knows two workers really shared the cases."""
    folder = os.environ.get("GV_TEST_BARRIER")
    if not folder or (Path(folder) / str(os.getpid())).exists():
        return
    (Path(folder) / str(os.getpid())).write_text("")
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

@gv.check(inputs={{"x": gv.tensor(3, 4)}})
@gv.check(inputs={{"x": gv.tensor(2, 5)}})
class {name}(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        barrier()
        {forward}
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * grad * x
'''


def write_op(folder: Path, name: str, forward: str = "pass", preamble: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name.lower()}.py").write_text(SPEC.format(name=name, forward=forward, preamble=preamble))


def timeless(report: Report) -> dict[str, Any]:
    data = to_dict(report)
    for case in data["cases"]:
        case.pop("duration_s")
    return data


def test_two_workers_give_the_same_report_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Four cases, so -j 2 really runs two workers; an import that turns grad mode off and an op
    # that prints must not make the workers disagree (or fail the right op).
    write_op(tmp_path, "Quiet")
    write_op(tmp_path, "NoGradAtImport", preamble="torch.set_grad_enabled(False)")
    write_op(tmp_path, "Chatty", forward="print('forward of', tuple(x.shape))")
    serial = run_supervised([tmp_path], Settings(gradcheck="off"))
    started: list[CaseStarted] = []
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("GV_TEST_BARRIER", str(tmp_path / "barrier"))
    parallel = run_supervised([tmp_path], Settings(gradcheck="off", jobs=2),
                              on_event=lambda e: started.append(e) if isinstance(e, CaseStarted) else None)
    assert len(serial.cases) == 6 and all(case.status.value == "passed" for case in serial.cases)
    assert len({event.worker for event in started}) == 2
    assert timeless(serial) == timeless(parallel)
    chatty = next(case for case in parallel.cases if case.op == "Chatty" and case.shapes == ((2, 5),))
    assert "forward of (2, 5)" in chatty.output and "(3, 4)" not in chatty.output


def test_a_small_run_uses_one_worker() -> None:
    started: list[CaseStarted] = []
    report = run_supervised([SPECS / "column_normalize.py", SPECS / "linear.py"], Settings(gradcheck="off", jobs=2),
                            on_event=lambda e: started.append(e) if isinstance(e, CaseStarted) else None)
    assert len(report.cases) < 4  # fewer than 2 x jobs
    assert len({event.worker for event in started}) == 1


def test_library_check_paths_with_jobs_gives_the_same_report() -> None:
    paths = [SPECS / "column_normalize.py", SPECS / "column_normalize_buggy.py", SPECS / "linear.py"]
    settings = Settings(gradcheck="off", shapes=(((3, 3),), ((2, 4),)))
    serial = check_paths(paths, settings)
    parallel = check_paths(paths, settings.with_(jobs=2))
    assert len(serial.cases) >= 4
    assert timeless(serial) == timeless(parallel)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by whatever adopted it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_leaves_no_worker(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    # Two ops x two shapes = four endless cases: -j 2 starts two workers, each reporting its pid.
    for name in ("LoopA", "LoopB"):
        write_op(tmp_path / "ops", name,
                 forward=f"(Path({str(pids)!r}) / str(os.getpid())).write_text('')\n        while True: pass")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    parent = subprocess.Popen([sys.executable, "-m", "gradverify", "check", str(tmp_path / "ops"), "-j", "2",
                               "--format", "json"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "the workers never started their cases"
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
