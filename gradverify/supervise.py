"""A supervised run: every case gets a verdict, whatever the user's code does to its process.

`run_supervised(paths, settings)` is what `gradverify check` runs. This process never imports the
user's code (nor torch): worker processes (gradverify/worker.py) load the specs once each, expand
the cases and run the ones they are handed, one at a time, reporting back over pipes. Here:

* a case that runs past `settings.timeout` has its worker killed and becomes an ERROR with a
  `timeout` diagnosis naming what was running ("backward did not return within 120 s");
* a worker that dies (os._exit, a signal, a segfault in compiled code) makes its case an ERROR
  with a `crashed` diagnosis ("the process running backward died with SIGSEGV");
* a fresh worker then takes the next case, so the other cases still run and are reported;
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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from gradverify.config import Settings
from gradverify.errors import GradverifyError, SpecError
from gradverify.report import CaseResult, CheckResult, Diagnosis, Report, Status
from gradverify.workerio import (PHASE_BLOCK_SIZE, MarkerSplitter, OutputTail, marker_prefix, receive_message,
                                 send_message)

DEFAULT_TIMEOUT = 120.0
# The least time a worker gets to import torch and load the specs (see Supervisor.load_timeout).
MIN_LOAD_TIMEOUT = 60.0
# After a worker was killed or died: how long to wait for the rest of what it printed (the pipe
# stays open while a child process it started holds it) before giving the verdict without it.
OUTPUT_GRACE_S = 1.0
# A worker asked to stop has this long to exit before it is killed.
STOP_GRACE_S = 2.0
# Workers that die outside any case (a thread of the spec calling os._exit, say) are replaced;
# this many in a row means they will keep dying, and the run stops with an error.
MAX_IDLE_DEATHS = 3


@dataclass(frozen=True)
class LoadingSpecs:
    """The run began: a worker is importing torch and the specs at `paths`."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class CasesListed:
    """The worker expanded the specs: what will be checked, in report order."""

    titles: tuple[str, ...]


@dataclass(frozen=True)
class CaseStarted:
    """A worker began case `index`; `worker` is its process id."""

    index: int
    title: str
    worker: int


@dataclass(frozen=True)
class PhaseChanged:
    """Case `index` moved on to `phase` ("forward", then each check's name)."""

    index: int
    title: str
    phase: str


@dataclass(frozen=True)
class CaseFinished:
    """Case `index` has its verdict; `done` of `total` cases have one."""

    index: int
    result: CaseResult
    done: int
    total: int


Event = Union[LoadingSpecs, CasesListed, CaseStarted, PhaseChanged, CaseFinished]
EventHandler = Callable[[Event], None]


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


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _worker_command() -> list[str]:
    """The interpreter running us, with its flags, importing the same gradverify we are."""
    root = str(Path(__file__).resolve().parent.parent)
    flags: list[str] = []
    try:
        flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    except AttributeError:
        pass
    boot = f"import sys; sys.path.insert(0, {root!r}); from gradverify.worker import main; main()"
    # -u: what the user's code prints is in the pipe at once, so a crash cannot swallow it.
    return [sys.executable, *flags, "-u", "-c", boot]


class _Worker:
    """One worker process as the supervisor sees it."""

    def __init__(self, number: int, init: dict[str, Any], inbox: queue.Queue, prefix: bytes) -> None:
        from gradverify.worker import PARENT_PID_ENV

        self.number = number
        fd, self.phase_file = tempfile.mkstemp(prefix="gradverify-phase-")
        try:
            os.write(fd, bytes(PHASE_BLOCK_SIZE))
            self.board = mmap.mmap(fd, PHASE_BLOCK_SIZE)
        finally:
            os.close(fd)
        posix = os.name == "posix"
        self.proc = subprocess.Popen(
            _worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
            # Its own process group: a timeout kills whatever the user's code started too.
            start_new_session=posix)
        self.pid = self.proc.pid
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
        for target, stream in ((self._read_events, self.proc.stdout), (self._read_output, self.proc.stderr)):
            threading.Thread(target=target, args=(stream, inbox), daemon=True,
                             name=f"gradverify-worker-{number}").start()

    def command(self, message: Any) -> None:
        try:
            send_message(self.proc.stdin, message)  # type: ignore[arg-type]
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
        if self.proc.returncode is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except OSError:
            pass

    def exit_status(self, wait_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self, grace_s: float = 0.0) -> None:
        """Give it `grace_s` to exit, kill it (and what it started) if it is still there, reap it,
        and free what it held."""
        if grace_s:
            self.exit_status(grace_s)
        self.kill()
        self.exit_status(STOP_GRACE_S)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
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


def _rebuild_error(mro: list[tuple[str, str]], message: str, file: str | None, line: int | None,
                   col: int | None, exit_code: int) -> GradverifyError:
    """The worker's GradverifyError as the same class here (the first of its bases we know)."""
    from gradverify import errors

    cls: type[GradverifyError] = GradverifyError
    for module, name in mro:
        found = getattr(errors, name, None) if module == errors.__name__ else None
        if isinstance(found, type) and issubclass(found, GradverifyError):
            cls = found
            break
    try:
        error = cls(message, file=file, line=line, col=col)
    except TypeError:
        error = GradverifyError(message, file=file, line=line, col=col)
    if error.exit_code != exit_code:
        error.exit_code = exit_code
    return error


def _internal_error(type_name: str, message: str, trace: str) -> Exception:
    """Our own bug in a worker, raised here as an exception of the same builtin type if there is one."""
    import builtins

    cls = getattr(builtins, type_name, None)
    error: Exception
    try:
        error = cls(message) if isinstance(cls, type) and issubclass(cls, Exception) else None  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 - a builtin that takes other arguments
        error = None  # type: ignore[assignment]
    if error is None:
        error = RuntimeError(f"{type_name}: {message}")
    error.add_note(f"raised in a gradverify worker process:\n{trace}")
    return error


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
        worker = _Worker(self.spawned, init, self.inbox, self.prefix)
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
        # loaded the specs, so the next crash does not wait for a fresh interpreter.
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
            raise _rebuild_error(*message[1:])
        elif kind == "internal":
            self._drain(worker)
            raise _internal_error(*message[1:])

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
                                "that never returns?)")

    def _on_death(self, worker: _Worker) -> None:
        """Its events pipe closed without a stop: the process is dying or dead."""
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
            return f"died with {_signal_name(-code)}"
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


def _check_name(phase: str) -> str:
    return phase or "case"


def timeout_result(outline: CaseResult, phase: str, user_phase: str, limit: float) -> CaseResult:
    """The verdict of a case stopped at the time limit; `phase` the check, `user_phase` the user's code."""
    if user_phase:
        message = f"{user_phase} did not return within {limit:g} s"
        if phase and phase not in ("forward", user_phase):
            message += f" (in the {phase} check)"
        hint = "an endless loop, a deadlock or a wait on something that never comes; if it is only slow, " \
               "raise --timeout"
    else:
        what = "forward" if phase == "forward" else f"the {phase} check" if phase else "the case"
        message = (f"{what} did not finish within {limit:g} s in gradverify's own computation, not in your code "
                   "(a large case?)")
        hint = "raise --timeout, or try --mode fast or a smaller --shape"
    check = CheckResult(name=_check_name(phase), status=Status.ERROR, message=message, summary="timeout",
                        diagnoses=(Diagnosis("timeout", message, hint=hint),))
    return replace(outline, status=Status.ERROR, checks=(check,), message=message)


def crash_result(outline: CaseResult, phase: str, user_phase: str, how: str) -> CaseResult:
    """The verdict of a case whose process died under it."""
    if user_phase:
        message = f"the process running {user_phase} {how}"
        if phase and phase not in ("forward", user_phase):
            message += f" (in the {phase} check)"
        hint = "os._exit(), a signal, or a crash in compiled code (a C/C++/CUDA extension) ended the process"
    else:
        where = f" during the {phase} check" if phase else ""
        message = f"the worker process {how}{where}, outside your code"
        hint = "a crash in torch or gradverify, or a thread or signal handler of the spec; please report it " \
               "with the reproduce line"
    check = CheckResult(name=_check_name(phase), status=Status.ERROR, message=message, summary="crashed",
                        diagnoses=(Diagnosis("crashed", message, hint=hint),))
    return replace(outline, status=Status.ERROR, checks=(check,), message=message)
