"""The live display: what is being checked and its phase, only on a terminal and never on CI."""

from __future__ import annotations

import io

from rich.console import Console

from gradverify.progress import LiveProgress, wanted
from gradverify.report import CaseResult, Status
from gradverify.run_events import CaseFinished, CasesListed, CaseStarted, LoadingSpecs, PhaseChanged


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_wanted_only_on_a_terminal_outside_ci() -> None:
    assert wanted(_Stream(True), env={})
    assert not wanted(_Stream(False), env={})
    assert not wanted(_Stream(True), env={"CI": "true"})
    assert wanted(_Stream(True), env={"CI": "false"})


def test_the_display_names_the_case_and_its_phase_while_it_runs() -> None:
    title = "RowSoftmax x(1000,1000) float64 cpu"
    buffer = io.StringIO()
    progress = LiveProgress(enabled=True, console=Console(file=buffer, force_terminal=True, width=120))
    drawn = Console(file=io.StringIO(), width=120)
    progress(LoadingSpecs(("specs/softmax.py",)))  # from the first second, before torch is even loaded
    with drawn.capture() as capture:
        drawn.print(progress.render())
    assert "loading specs/softmax.py" in capture.get()
    progress(CasesListed((title, "Other x(2) float64 cpu")))
    progress(CaseStarted(0, title, worker=1))
    progress(PhaseChanged(0, title, "jacobian"))
    with drawn.capture() as capture:
        drawn.print(progress.render())
    text = capture.get()
    assert "checking 0/2" in text and f"{title} — jacobian" in text and "0:0" in text
    result = CaseResult(op="RowSoftmax", file="f.py", shapes=((1000, 1000),), dtype="float64", device="cpu",
                        seed=0, status=Status.PASSED)
    progress(CaseFinished(0, result, done=1, total=2))
    with drawn.capture() as capture:
        drawn.print(progress.render())
    assert "checking 1/2" in capture.get() and title not in capture.get()
    progress.close()
    assert title in buffer.getvalue()  # it was drawn on the (forced) terminal


def test_disabled_it_draws_nothing() -> None:
    buffer = io.StringIO()
    progress = LiveProgress(enabled=False, console=Console(file=buffer, force_terminal=True))
    progress(CasesListed(("Op x(2) float64 cpu",)))
    progress(CaseStarted(0, "Op x(2) float64 cpu", worker=1))
    progress.close()
    assert progress.live is None and buffer.getvalue() == ""
