"""A supervised run: every case gets a verdict, whatever the user's code does to its process.

`run_supervised(paths, settings)` is what `gradverify check` runs. This process never imports the
user's code (nor torch): worker processes (gradverify/worker.py) load the specs once each, expand
the cases and run the ones they are handed, one at a time, reporting back over pipes. Here:

* a case that runs past `settings.timeout` has its worker killed and becomes an ERROR with a
  `timeout` diagnosis naming what was running ("backward did not return within 120 s");
* a worker that dies (os._exit, a signal, a segfault in compiled code) makes its case an ERROR
  with a `crashed` diagnosis ("the process running backward died with SIGSEGV");
* a fresh worker then takes the next case, so the other cases still run and are reported (on
  Linux it is forked from a zygote that imported torch once: see launcher.py);
* what the user's code printed during a case is kept in `CaseResult.output` (the last 4 KB), so
  stdout holds only the report; what a worker prints outside a case (a spec's import) goes to
  stderr;
* -j N runs N workers when there are at least 2 N cases (fewer: one worker, so -j never makes a
  run slower than -j 1), each with its share of the CPU's threads; results keep the case order;
* workers die with this process: the kernel kills them if it dies (PR_SET_PDEATHSIG on Linux, a
  watcher thread elsewhere), and every exit path here kills what is left.

Spec errors raised in a worker are raised here as the same error (exit 2); a bug of gradverify's
in a worker is raised here as an internal error (exit 3), with the worker's traceback as a note.
"""

from __future__ import annotations

import codecs
import collections
import mmap
import os
import queue
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from gradverify.config import Settings
from gradverify.errors import SpecError
from gradverify.launcher import Launcher, WorkerProcess
from gradverify.report import CaseResult, Report
from gradverify.run_events import (CaseFinished, CasesListed, CaseStarted, Event, EventHandler, LoadingSpecs,
                                   PhaseChanged)
from gradverify.worker import PARENT_PID_ENV
from gradverify.worker_results import crash_result, internal_error, rebuild_error, signal_name, timeout_result
from gradverify.workerio import (PHASE_BLOCK_SIZE, MarkerSplitter, OutputTail, marker_prefix, receive_message,
                                 send_message)

DEFAULT_TIMEOUT = 120.0
# The least time a worker gets to import torch and load the specs (see Supervisor.load_timeout).
MIN_LOAD_TIMEOUT = 60.0
# How long the zygote (launcher.py) may take to import torch before workers are spawned instead.
ZYGOTE_START_S = 300.0
# After a worker was killed or died: how long to wait for the rest of what it printed (the pipe
# stays open while a child process it started holds it) before giving the verdict without it.
OUTPUT_GRACE_S = 1.0
# A worker asked to stop has this long to exit before it is killed.
STOP_GRACE_S = 2.0
# Workers that die outside any case (a thread of the spec calling os._exit, say) are replaced;
# this many in a row means they will keep dying, and the run stops with an error.
MAX_IDLE_DEATHS = 3


def run_supervised(paths: Sequence[Path | str], settings: Settings, *,
                   on_event: EventHandler | None = None) -> Report:
    """Every case of the specs at `paths`, each checked in a worker process, in case order."""
    supervisor = Supervisor([str(p) for p in paths], settings, on_event=on_event)
    return Report(cases=tuple(supervisor.run()))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Worker:
    """One worker process as the supervisor sees it."""

    def __init__(self, number: int, process: WorkerProcess, init: dict[str, Any], inbox: queue.Queue,
                 prefix: bytes) -> None:
        self.number = number
        self.process = process
        fd, self.phase_file = tempfile.mkstemp(prefix="gradverify-phase-")
        try:
            os.write(fd, bytes(PHASE_BLOCK_SIZE))
            self.board = mmap.mmap(fd, PHASE_BLOCK_SIZE)
        finally:
            os.close(fd)
        self.pid = process.pid
        self.state = "loading"  # loading | idle | busy | stopping | gone
        self.since = time.monotonic()
        self.case: int | None = None
        self.phase = ""
        self.capturing: int | None = None
        self.tail = OutputTail()
        self.ended: int | None = None  # last case whose end marker arrived
        self.held: tuple[int, CaseResult, float] | None = None  # a result waiting for its end marker
        self.output_open = True
        self.verdict: tuple[str, float] | None = None  # ("timeout" | "died", deadline) once retiring
        self.stderr_text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.prefix = prefix
        self.command({**init, "phase_file": self.phase_file})
        for target, stream in ((self._read_events, process.events), (self._read_output, process.output)):
            threading.Thread(target=target, args=(stream, inbox), daemon=True,
                             name=f"gradverify-worker-{number}").start()

    def command(self, message: Any) -> None:
        try:
            send_message(self.process.commands, message)
        except (OSError, ValueError):
            pass  # it died: its events pipe closes and the supervisor hears of it there

    def user_phase(self) -> str:
        """The user-code phase the worker was in ("" when not in user code)."""
        return bytes(self.board[:PHASE_BLOCK_SIZE]).split(b"\0", 1)[0].decode("utf-8", "replace")

    def _read_events(self, stream: Any, inbox: queue.Queue) -> None:
        while True:
            try:
                message = receive_message(stream)
            except Exception as exc:  # noqa: BLE001 - a garbled message: report it, stop reading
                inbox.put((self, "garbled", exc))
                return
            if message is None:
                inbox.put((self, "events-closed", None))
                return
            inbox.put((self, "message", message))

    def _read_output(self, stream: Any, inbox: queue.Queue) -> None:
        splitter = MarkerSplitter(self.prefix)
        while True:
            try:
                chunk = stream.read1(65536)
            except (OSError, ValueError):
                chunk = b""
            if not chunk:
                for item in splitter.close():
                    inbox.put((self, *item))
                inbox.put((self, "output-closed", None))
                return
            for item in splitter.feed(chunk):
                inbox.put((self, *item))

    def kill(self) -> None:
        self.process.kill()

    def exit_status(self, wait_s: float) -> int | None:
        return self.process.exit_status(wait_s)

    def close(self, grace_s: float = 0.0) -> None:
        """Give it `grace_s` to exit, kill it (and what it started) if it is still there, reap it,
        and free what it held."""
        if grace_s:
            self.exit_status(grace_s)
        self.kill()
        self.exit_status(STOP_GRACE_S)
        self.process.close_pipes()
        self.discard_phase_file()
        try:
            self.board.close()
        except (BufferError, ValueError):
            pass
        self.state = "gone"

    def discard_phase_file(self) -> None:
        try:
            os.unlink(self.phase_file)
        except OSError:
            pass


class Supervisor:
    """Schedules cases onto workers, enforces the time limit, turns deaths into verdicts."""

    def __init__(self, paths: list[str], settings: Settings, *, on_event: EventHandler | None = None) -> None:
        self.paths = paths
        self.settings = settings
        self.on_event = on_event
        timeout = getattr(settings, "timeout", DEFAULT_TIMEOUT)
        self.timeout: float | None = float(timeout) if timeout and timeout > 0 else None
        # Starting a worker imports torch and the specs: seconds on a busy machine, whatever the
        # per-case limit. An import that never returns is still stopped.
        self.load_timeout = max(self.timeout, MIN_LOAD_TIMEOUT) if self.timeout is not None else None
        self.launcher = Launcher({**os.environ, PARENT_PID_ENV: str(os.getpid())}, start_timeout=ZYGOTE_START_S)
        self.jobs = max(1, int(getattr(settings, "jobs", 1) or 1))
        self.nonce = secrets.token_hex(8)
        self.prefix = marker_prefix(self.nonce)
        self.inbox: queue.Queue = queue.Queue()
        self.workers: list[_Worker] = []
        self.spawned = 0
        self.outlines: tuple[CaseResult, ...] | None = None
        self.selected: list[int] = []
        self.pending: collections.deque[int] = collections.deque()
        self.results: dict[int, CaseResult] = {}
        self.width = 1  # how many cases run at once
        self.threads: int | None = None
        self.deaths = 0
        self.idle_deaths = 0
        self.select: Callable[[tuple[CaseResult, ...]], list[int]] | None = None
        self.keys: tuple[Any, ...] = ()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, select: Callable[[tuple[CaseResult, ...]], list[int]] | None = None) -> list[CaseResult]:
        """The results of the cases `select` picks from the expanded list (default: all), in its order."""
        self.select = select
        finished = False
        try:
            self._emit(LoadingSpecs(tuple(self.paths)))
            self._spawn()
            while self.outlines is None or len(self.results) < len(self.selected):
                try:
                    item = self.inbox.get(timeout=self._wait_s())
                except queue.Empty:
                    item = None
                if item is not None:
                    self._handle(*item)
                self._enforce_deadlines()
                self._schedule()
            finished = True
            return [self.results[k] for k in self.selected]
        finally:
            self._shutdown(graceful=finished)

    def _wait_s(self) -> float:
        """Until the next deadline, at most half a second (so Ctrl-C is handled promptly)."""
        now = time.monotonic()
        wait = 0.5
        for deadline in self._deadlines():
            wait = min(wait, max(0.0, deadline - now))
        return wait

    def _deadlines(self) -> list[float]:
        found = []
        for w in self.workers:
            if w.verdict is not None:
                found.append(w.verdict[1])
            elif w.held is not None:
                found.append(w.held[2])
            elif self.timeout is not None and w.state == "busy":
                found.append(w.since + self.timeout)
            elif self.load_timeout is not None and w.state == "loading":
                found.append(w.since + self.load_timeout)
        return found

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _title(self, index: int) -> str:
        assert self.outlines is not None
        return self.outlines[index].title

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        self.spawned += 1
        init = {"nonce": self.nonce, "paths": self.paths, "settings": self.settings, "sys_path": list(sys.path),
                "threads": self.threads}
        worker = _Worker(self.spawned, self.launcher.start(), init, self.inbox, self.prefix)
        self.workers.append(worker)
        return worker

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers if w.state in ("loading", "idle", "busy") and w.verdict is None]

    def _schedule(self) -> None:
        if self.outlines is None:
            return
        live = self._live()
        busy = sum(1 for w in live if w.state == "busy" or w.held is not None)
        for worker in live:
            if worker.state == "idle" and worker.held is None:
                if self.pending and busy < self.width:
                    worker.case = self.pending.popleft()
                    worker.state, worker.since, worker.phase = "busy", time.monotonic(), ""
                    worker.command(("run", worker.case))
                    busy += 1
                elif not self.pending:
                    worker.state = "stopping"
                    worker.command(("stop",))
        # Keep `width` workers while there is work; after a death, one spare that has already
        # loaded the specs, so the next crash does not wait for the specs' import (or, where
        # workers cannot be forked, a fresh interpreter importing torch).
        wanted = min(self.width + (1 if self.deaths else 0), busy + len(self.pending))
        for _ in range(wanted - len(self._live())):
            self._spawn()

    def _shutdown(self, graceful: bool) -> None:
        """Every worker gone: asked to stop after a finished run, killed at once after an error or Ctrl-C."""
        remaining = [w for w in self.workers if w.state != "gone"]
        if graceful:
            for worker in remaining:
                worker.command(("stop",))
            deadline = time.monotonic() + STOP_GRACE_S
            for worker in remaining:
                worker.exit_status(max(0.0, deadline - time.monotonic()))
        for worker in remaining:
            worker.close()
        self.launcher.close()

    # -- what workers say ---------------------------------------------------------------------

    def _handle(self, worker: _Worker, kind: str, payload: Any) -> None:
        if worker.state == "gone":
            return
        if kind == "message":
            self._on_message(worker, payload)
        elif kind == "text":
            if worker.capturing is not None:
                worker.tail.add(payload)
            else:
                self._forward(worker, payload)
        elif kind == "mark":
            mark, index = payload
            if mark == "S":
                worker.capturing, worker.tail = index, OutputTail()
            else:
                worker.capturing, worker.ended = None, index
                self._release(worker)
        elif kind == "output-closed":
            worker.output_open = False
            self._release(worker, force=True)
            if worker.verdict is not None:
                self._retire(worker)
        elif kind == "events-closed":
            if worker.state == "stopping":
                worker.close(STOP_GRACE_S)
            elif worker.verdict is None:
                self._on_death(worker)
        elif kind == "garbled":
            raise RuntimeError(f"a gradverify worker sent a message that cannot be read: {payload}")

    def _forward(self, worker: _Worker, data: bytes) -> None:
        text = worker.stderr_text.decode(data)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "hello":
            worker.discard_phase_file()  # both sides have it mapped: the file is no longer needed
            worker.since = time.monotonic()  # the load starts now (a forked worker has torch already)
        elif kind == "cases":
            self._on_cases(worker, message[1])
        elif kind == "started":
            worker.since = time.monotonic()
            self._emit(CaseStarted(message[1], self._title(message[1]), worker.pid))
        elif kind == "phase":
            worker.phase = message[2]
            self._emit(PhaseChanged(message[1], self._title(message[1]), message[2]))
        elif kind == "result":
            worker.held = (message[1], message[2], time.monotonic() + OUTPUT_GRACE_S)
            self._release(worker)
        elif kind == "error":
            self._drain(worker)
            raise rebuild_error(*message[1:])
        elif kind == "internal":
            self._drain(worker)
            raise internal_error(*message[1:])

    def _on_cases(self, worker: _Worker, outlines: tuple[CaseResult, ...]) -> None:
        keys = tuple((o.op, o.file, o.shapes, o.dtype, o.device, o.seed, o.repro) for o in outlines)
        if self.outlines is None:
            self.outlines, self.keys = outlines, keys
            self.selected = list(self.select(outlines)) if self.select else list(range(len(outlines)))
            self.pending = collections.deque(self.selected)
            # Fewer than two cases per worker: one worker, so -j never costs a second interpreter
            # (and a second import of torch and the specs) for a run that cannot use it.
            self.width = self.jobs if len(self.selected) >= 2 * self.jobs else 1
            if self.width > 1:
                self.threads = max(1, _cpu_count() // self.width)
                worker.command(("threads", self.threads))
            self._emit(CasesListed(tuple(self._title(k) for k in self.selected)))
        elif keys != self.keys:
            raise SpecError("the specs expanded into different cases in a fresh worker process (is the case "
                            "list built from something random or from the environment?)")
        worker.state = "idle"

    def _release(self, worker: _Worker, force: bool = False) -> None:
        """Hand over a held result once its end marker arrived (all its output is in the tail)."""
        if worker.held is None:
            return
        index, result, deadline = worker.held
        if not (force or worker.ended == index or time.monotonic() >= deadline or not worker.output_open):
            return
        worker.held = None
        self.idle_deaths = 0
        self._record(index, replace(result, output=worker.tail.text()))
        worker.tail, worker.case = OutputTail(), None
        if worker.state == "busy":
            worker.state = "idle"

    def _record(self, index: int, result: CaseResult) -> None:
        self.results[index] = result
        self._emit(CaseFinished(index, result, len(self.results), len(self.selected)))

    def _drain(self, worker: _Worker) -> None:
        """Before the run stops with an error: forward what the failing worker printed (a spec's own
        message), briefly. Everything else in the inbox is dropped: the run is over."""
        deadline = time.monotonic() + OUTPUT_GRACE_S
        while worker.output_open and time.monotonic() < deadline:
            try:
                source, kind, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if source is worker and kind == "text":
                self._forward(worker, payload)
            elif source is worker and kind == "output-closed":
                worker.output_open = False

    # -- deaths and time limits ---------------------------------------------------------------

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.state == "gone":
                continue
            if worker.verdict is not None:
                if now >= worker.verdict[1]:
                    self._retire(worker)
            elif worker.held is not None:
                self._release(worker)
            elif worker.state == "busy" and self.timeout is not None and now - worker.since > self.timeout:
                worker.kill()
                worker.verdict = ("timeout", now + OUTPUT_GRACE_S)
            elif worker.state == "loading" and self.load_timeout is not None and now - worker.since > self.load_timeout:
                worker.kill()
                self._drain(worker)
                raise SpecError(f"loading the specs did not finish within {self.load_timeout:g} s (an import "
                                "that never returns? if it is only slow, raise --timeout)")

    def _on_death(self, worker: _Worker) -> None:
        """Its events pipe closed without a stop: the process is dying or dead."""
        self._release(worker, force=True)  # a result it sent before dying is still its verdict
        if worker.state == "loading":
            self._drain(worker)
            how = self._how_it_ended(worker)
            worker.close()
            raise SpecError(f"loading the specs: the worker process {how} (the spec's import, or code it ran, "
                            "ended the process)")
        worker.verdict = ("died", time.monotonic() + OUTPUT_GRACE_S)
        if not worker.output_open:
            self._retire(worker)

    def _how_it_ended(self, worker: _Worker) -> str:
        code = worker.exit_status(STOP_GRACE_S)
        if code is None:
            worker.kill()
            return "stopped reporting"
        if code < 0:
            return f"died with {signal_name(-code)}"
        return f"exited with code {code} without reporting"

    def _retire(self, worker: _Worker) -> None:
        """Give the case in flight its timeout or crash verdict; the worker is gone for good."""
        assert worker.verdict is not None
        why = worker.verdict[0]
        index = worker.case
        how = "" if why == "timeout" else self._how_it_ended(worker)
        user_phase = worker.user_phase()
        worker.close()
        self.deaths += 1
        if index is None or index in self.results:
            self.idle_deaths += 1
            if self.idle_deaths >= MAX_IDLE_DEATHS:
                raise SpecError(f"gradverify's worker processes keep dying outside any case (last: {how}): "
                                "does a spec start a thread or a timer that ends the process?")
            return
        self.idle_deaths = 0
        assert self.outlines is not None
        outline = self.outlines[index]
        duration = time.monotonic() - worker.since
        if why == "timeout":
            result = timeout_result(outline, worker.phase, user_phase, self.timeout or 0.0)
        else:
            result = crash_result(outline, worker.phase, user_phase, how)
        self._record(index, replace(result, output=worker.tail.text(), duration_s=duration))

