"""The worker process of a supervised run (started by gradverify/supervise.py, never by hand).

It loads the specs once, expands them into cases, reports the list, then runs the cases the
parent names, one at a time, reporting "started", each phase and the CaseResult. The user's
code runs here, so whatever it does to this process (os._exit, a segfault, an endless loop,
prints to fd 1) costs at most the case in flight: the parent sees the pipe close or the clock
run out and gives that case its verdict. See workerio.py for the pipes.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any, BinaryIO

from gradverify.workerio import PHASE_BLOCK_SIZE, marker, marker_prefix, receive_message, send_message

PARENT_PID_ENV = "GRADVERIFY_SUPERVISOR_PID"


def main(parent_pid: int | None = None) -> None:
    """Entry point: take over the standard descriptors before anything can print, then serve."""
    commands, events, output = _take_over_stdio()
    _quiet_start(parent_pid)
    try:
        init = receive_message(commands)
        if init is not None:
            Worker(init, commands, events, output).serve()
    finally:
        _flush_all()
        # Not a normal interpreter exit: a thread or an atexit hook left by the user's code must not
        # keep a finished worker alive.
        os._exit(0)


def _quiet_start(parent_pid: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle: it stops us
    _die_with_parent(int(os.environ.get(PARENT_PID_ENV, "0") or 0) if parent_pid is None else parent_pid)
    # torch without numpy warns at import; the supervisor has its own filter, and N workers must
    # not print it N times.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


def serve_forks() -> None:
    """The zygote (see launcher.py): import torch and the engine once, then fork workers on request.

    It never imports the user's code, and forks only while it is safe to: a single thread and
    CUDA not initialised (a forked CUDA context or a copied thread pool would break the child).
    """
    import socket
    import struct

    channel = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _quiet_start(None)
    import torch

    for module in ("gradverify.api", "gradverify.runner", "gradverify.checks", "gradverify.spec.python",
                   "gradverify.spec.yaml_spec"):
        try:
            __import__(module)
        except ImportError:
            pass
    reply = struct.Struct(">q")
    not_forked, still_running = -(2**62), 2**62
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(channel, 1, 3)
        except OSError:
            request, fds = b"", []
        if not request:
            os._exit(0)  # the supervisor closed the socket (or is gone)
        if request == b"S":
            setting = _read_setting(channel)
            safe = (len(fds) == 3 and setting is not None and threading.active_count() == 1
                    and _native_threads() == 1 and not torch.cuda.is_initialized())
            pid = os.fork() if safe else -1
            if pid == 0:
                assert setting is not None
                _become_worker(channel, fds, setting)
            for fd in fds:
                os.close(fd)
            channel.sendall(reply.pack(pid if pid > 0 else not_forked))
        elif request == b"W":
            data = b""
            while len(data) < 16:
                chunk = channel.recv(16 - len(data))
                if not chunk:
                    os._exit(0)
                data += chunk
            child, wait_s = struct.unpack(">qd", data)
            channel.sendall(reply.pack(_reap(child, wait_s, still_running)))


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _read_setting(channel: Any) -> dict[str, Any] | None:
    """The working folder and environment the next child takes on (see launcher.py)."""
    import json
    import struct

    data = b""
    try:
        while len(data) < 4:
            chunk = channel.recv(4 - len(data))
            if not chunk:
                os._exit(0)
            data += chunk
        (length,) = struct.unpack(">I", data)
        payload = b""
        while len(payload) < length:
            chunk = channel.recv(min(1 << 16, length - len(payload)))
            if not chunk:
                os._exit(0)
            payload += chunk
        setting = json.loads(payload)
    except (OSError, ValueError):
        return None
    return setting if isinstance(setting, dict) else None


def _become_worker(channel: Any, fds: list[int], setting: dict[str, Any]) -> None:
    """In the forked child: the run's folder and environment, its own session, the three pipes as
    fds 0/1/2, then a worker's life."""
    try:
        channel.close()
        os.chdir(setting["cwd"])
        os.environ.clear()
        os.environ.update(setting["env"])
        os.setsid()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        main(parent_pid=os.getppid())
    finally:
        os._exit(1)


def _reap(pid: int, wait_s: float, still_running: int) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return still_running  # not ours, or reaped already
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return still_running
        time.sleep(0.01)


def _take_over_stdio() -> tuple[BinaryIO, BinaryIO, int]:
    commands = os.dup(0)
    events = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # fd 1 and fd 2 both go to the output pipe
    output = os.dup(2)  # ours, to write markers and to put fd 1/2 back if the user's code moved them
    return os.fdopen(commands, "rb"), os.fdopen(events, "wb"), output


def _die_with_parent(parent_pid: int) -> None:
    """A SIGKILLed supervisor (CI timeout, OOM killer) runs no cleanup: the kernel must end us.

    Linux: PR_SET_PDEATHSIG. Other POSIX systems: a thread that notices being re-parented or the
    supervisor gone. Windows: the pipes closing (the worker exits at its next command).
    """
    initial = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            _watch_parent(initial, parent_pid)
    elif os.name == "posix":
        _watch_parent(initial, parent_pid)
    if os.name == "posix" and parent_pid and not _alive(parent_pid):
        os._exit(1)  # the supervisor died before the request above took effect


def _alive(pid: int) -> bool:
    """POSIX only (on Windows, os.kill(pid, 0) would terminate the process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def _watch_parent(initial: int, parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == initial and (not parent_pid or _alive(parent_pid)):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="gradverify-parent-watch", daemon=True).start()


def _flush_all() -> None:
    """Python's and C's buffered output, so it reaches the pipe before a marker."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    if os.name == "posix":
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass


class PhaseBoard:
    """The phase of user code running now ("" outside it), in memory the parent shares: after a
    hang or a crash it can still read whether forward, backward or gradverify itself was running."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.block = mmap.mmap(fd, PHASE_BLOCK_SIZE)
        finally:
            os.close(fd)

    def __call__(self, phase: str) -> None:
        data = phase.encode("utf-8", "replace")[:PHASE_BLOCK_SIZE - 1] + b"\0"
        self.block[:len(data)] = data


class Worker:
    """One worker's state: the settings, the expanded cases, the pipes."""

    def __init__(self, init: dict[str, Any], commands: BinaryIO, events: BinaryIO, output: int) -> None:
        self.commands = commands
        self.events = events
        self.output = output
        self.prefix = marker_prefix(init["nonce"])
        self.paths: list[str] = init["paths"]
        self.settings = init["settings"]
        self.board = PhaseBoard(init["phase_file"])
        self.recursion_limit = sys.getrecursionlimit()
        sys.path[:] = init["sys_path"]
        self.threads: int | None = init.get("threads")
        self.cases: list[Any] = []

    def send(self, message: Any) -> None:
        send_message(self.events, message)

    def serve(self) -> None:
        """Load, report the cases, run what the parent asks until it says stop (or goes away)."""
        from gradverify.errors import GradverifyError

        self.send(("hello", os.getpid()))
        try:
            self._load()
            while True:
                command = receive_message(self.commands)
                if command is None or command[0] == "stop":
                    return
                if command[0] == "threads":
                    self._set_threads(command[1])
                elif command[0] == "run":
                    self._run(command[1])
        except GradverifyError as exc:
            cls = type(exc)
            self.send(("error", [(c.__module__, c.__qualname__) for c in cls.__mro__], exc.message, exc.file,
                       exc.line, exc.col, exc.exit_code))
        except BaseException as exc:  # noqa: BLE001 - our own bug: the parent reports it as internal (exit 3)
            self.send(("internal", type(exc).__name__, str(exc), traceback.format_exc()))

    def _load(self) -> None:
        from pathlib import Path

        from gradverify.api import collect_cases

        self._set_threads(self.threads)
        self.cases = collect_cases([Path(p) for p in self.paths], self.settings)
        if sys.getrecursionlimit() < self.recursion_limit:
            sys.setrecursionlimit(self.recursion_limit)  # a spec lowered it at import
        self.send(("cases", tuple(case_outline(case, self.settings) for case in self.cases)))

    def _set_threads(self, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)

    def _restore_stdio(self) -> None:
        """fd 1/2 and sys.stdout/err back on the output pipe, whatever the last case did to them."""
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        os.dup2(self.output, 1)
        os.dup2(self.output, 2)

    def _run(self, index: int) -> None:
        from gradverify import usercode
        from gradverify.runner import run_case

        self.send(("started", index))
        self._restore_stdio()
        os.write(self.output, marker(self.prefix, "S", index))
        usercode.phase_listener = self.board
        try:
            result = run_case(self.cases[index], self.settings,
                              progress=lambda phase: self.send(("phase", index, phase)))
        finally:
            usercode.phase_listener = None
            self.board("")
            _flush_all()
            self._restore_stdio()
            os.write(self.output, marker(self.prefix, "E", index))
        self.send(("result", index, result))


def case_outline(case: Any, settings: Any) -> Any:
    """A CaseResult holding what identifies a case (op, inputs, dtype, repro, ...) and no verdict:
    the parent names cases with it and builds a timeout or crash verdict from it without torch."""
    from gradverify.cases import case_settings
    from gradverify.report import CaseResult, Status
    from gradverify.runner import _inputs, repro_command

    return CaseResult(
        op=case.op.name, kind=case.op.kind, file=case.op.file, line=case.op.line,
        backward_line=case.op.backward_line, spec_file=case.op.spec_file, spec_line=case.op.spec_line,
        shapes=case.shapes, dtype=case.dtype, device=case.device, seed=case.seed, domain=case.domain_label,
        repro=repro_command(case, case_settings(case, settings)), inputs=_inputs(case, None),
        input_names=tuple(p.name for p in case.tensor_inputs), status=Status.SKIPPED)


if __name__ == "__main__":
    main()
