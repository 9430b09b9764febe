"""What is being checked right now, live on a terminal's stderr.

    ⠹ checking 1/3 · 0:42
      RowSoftmax x(1000,1000) float64 cpu — jacobian 0:40

Driven by the events of `supervise.run_supervised`, from the first second of a run (one big case
is not a blank screen for minutes). Only on a terminal: when stderr is not a TTY (CI logs,
pipes) or `CI` is set, it draws nothing, so logs and JSON never hold a progress line. The lines
are transient: the report replaces them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

from gradverify.run_events import CaseFinished, CasesListed, CaseStarted, Event, LoadingSpecs, PhaseChanged


def on_ci(env: Any = None) -> bool:
    """`CI` is set by every major CI service; read after the fact, its logs need no live display."""
    value = (os.environ if env is None else env).get("CI", "")
    return value.strip().lower() not in ("", "0", "false", "no")


def wanted(stream: IO[str] | None = None, env: Any = None) -> bool:
    """Whether a live display belongs on `stream` (default stderr): a terminal, and not CI."""
    stream = sys.stderr if stream is None else stream
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    return interactive and not on_ci(env)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LiveProgress:
    """An `on_event` handler for run_supervised that draws the cases in flight; call close() at the end."""

    def __init__(self, enabled: bool | None = None, console: Any = None) -> None:
        self.enabled = wanted() if enabled is None else enabled
        self.console = console
        self.live: Any = None
        self.total = 0
        self.loading = ""
        self.done = 0
        self.started = time.monotonic()
        # case index -> [title, phase, started]; read by rich's refresh thread, hence the lock.
        self.running: dict[int, list[Any]] = {}
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        with self.lock:
            if isinstance(event, LoadingSpecs):
                self.loading = ", ".join(event.paths)
            elif isinstance(event, CasesListed):
                self.total, self.loading = len(event.titles), ""
            elif isinstance(event, CaseStarted):
                self.running[event.index] = [event.title, "", time.monotonic()]
            elif isinstance(event, PhaseChanged):
                entry = self.running.setdefault(event.index, [event.title, "", time.monotonic()])
                entry[1] = event.phase
            elif isinstance(event, CaseFinished):
                self.running.pop(event.index, None)
                self.done, self.total = event.done, event.total
        if self.live is None:
            self._start()
        else:
            self.live.refresh()  # a new case or phase shows at once; the clocks tick at 4 Hz

    def _start(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = self.console or Console(stderr=True)
        # stderr stays redirected above the display (a spec's import prints there); stdout is the
        # report's and is left alone.
        self.live = Live(console=console, transient=True, refresh_per_second=4, redirect_stdout=False,
                         get_renderable=self.render)
        self.live.start()

    def render(self) -> Any:
        """The lines drawn now: the run, then one line per case in flight with its phase and time."""
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.text import Text

        now = time.monotonic()
        with self.lock:
            total = f"/{self.total}" if self.total else ""
            header = Text.assemble(("checking ", "bold"), f"{self.done}{total}", ("  " + _clock(now - self.started),
                                                                                  "dim"))
            if self.loading:
                header = Text.assemble(("loading ", "bold"), self.loading, ("  " + _clock(now - self.started), "dim"))
            lines: list[Any] = [Spinner("dots", text=header)]
            for title, phase, started in sorted(self.running.values(), key=lambda entry: entry[2]):
                line = Text("  " + title, overflow="ellipsis", no_wrap=True)
                if phase:
                    line.append(" — " + phase, style="cyan")
                line.append("  " + _clock(now - started), style="dim")
                lines.append(line)
        return Group(*lines)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
