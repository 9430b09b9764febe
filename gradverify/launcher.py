"""Starting, killing and reaping worker processes (stdlib only: the supervising process never imports torch).

On Linux, workers are forked from a zygote: a process that imported torch and gradverify's engine
once, and never runs the user's code. A second worker (-j N) or the replacement of a worker that
crashed is then ready in milliseconds plus the specs' own import, instead of a fresh interpreter
importing torch (seconds). The zygote forks only while it is safe to: one thread, CUDA not
initialised. Elsewhere (fork after importing torch is not safe on macOS; Windows has no fork), or
when the zygote cannot fork, each worker is a fresh interpreter.

Every worker runs in its own session (process group), so a timeout kills whatever the user's code
started too, and dies with its parent (gradverify/worker.py: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

# The zygote's protocol: b"S" carrying three descriptors (the commands pipe's read end, the events
# and output pipes' write ends), then a length-prefixed JSON {"cwd", "env"} the child takes on
# (the zygote outlives one run: in a test session or a library caller each run has its own working
# folder and environment) -> the child's pid, or NOT_FORKED; b"W" + (pid, seconds) -> the
# child's exit status (>= 0 a code, < 0 minus a signal) after waiting up to that long, or
# STILL_RUNNING. Every reply is one signed 64-bit integer.
_REPLY = struct.Struct(">q")
_LENGTH = struct.Struct(">I")
_WAIT = struct.Struct(">qd")
NOT_FORKED = -(2**62)
STILL_RUNNING = 2**62


def interpreter_command(entry: str) -> list[str]:
    """This interpreter, with its flags, running `gradverify.worker.<entry>()` from the same gradverify."""
    root = str(Path(__file__).resolve().parent.parent)
    flags: list[str] = []
    try:
        flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    except AttributeError:
        pass
    boot = f"import sys; sys.path.insert(0, {root!r}); from gradverify.worker import {entry}; {entry}()"
    # -u: what the user's code prints is in the pipe at once, so a crash cannot swallow it.
    return [sys.executable, *flags, "-u", "-c", boot]


class WorkerProcess:
    """A started worker: its pid and the supervisor's ends of its three pipes (see workerio.py)."""

    pid: int
    commands: BinaryIO
    events: BinaryIO
    output: BinaryIO

    def kill(self) -> None:
        """SIGKILL its whole process group (what the user's code started dies with it)."""
        for kill in (os.killpg, os.kill) if os.name == "posix" else ():
            try:
                kill(self.pid, signal.SIGKILL)
                return
            except OSError:
                continue

    def exit_status(self, wait_s: float) -> int | None:
        """Its exit code (minus the signal that killed it), waiting up to `wait_s`; None if still running."""
        raise NotImplementedError

    def close_pipes(self) -> None:
        for stream in (self.commands, self.events, self.output):
            try:
                stream.close()
            except OSError:
                pass


class SpawnedProcess(WorkerProcess):
    """A fresh interpreter."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(interpreter_command("main"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, start_new_session=os.name == "posix")
        self.pid = self.proc.pid
        self.commands, self.events, self.output = self.proc.stdin, self.proc.stdout, self.proc.stderr  # type: ignore[assignment]

    def kill(self) -> None:
        if self.proc.returncode is not None:
            return  # reaped: its pid may belong to someone else now
        if os.name == "posix":
            super().kill()
        else:
            self.proc.kill()

    def exit_status(self, wait_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None


class ForkedProcess(WorkerProcess):
    """A child of the zygote: the zygote reaps it and tells its exit status."""

    def __init__(self, zygote: Zygote, pid: int, commands: BinaryIO, events: BinaryIO, output: BinaryIO) -> None:
        self.zygote = zygote
        self.pid = pid
        self.commands, self.events, self.output = commands, events, output
        self.status: int | None = None

    def kill(self) -> None:
        if self.status is None:
            super().kill()

    def exit_status(self, wait_s: float) -> int | None:
        if self.status is None:
            self.status = self.zygote.wait(self.pid, wait_s)
        return self.status


class Zygote:
    """The forking process, driven synchronously from the supervisor's thread over a socket pair."""

    def __init__(self, env: dict[str, str], start_timeout: float) -> None:
        self.lock = threading.Lock()  # one request and its reply at a time
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(interpreter_command("serve_forks"), stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        finally:
            theirs.close()
        self.sock = ours
        self.start_timeout = start_timeout
        self.alive = True

    def fork(self, env: dict[str, str]) -> ForkedProcess | None:
        """A new worker in this process's working folder with `env`, or None if the zygote cannot
        fork one (the caller spawns one instead)."""
        with self.lock:
            return self._fork(env)

    def _fork(self, env: dict[str, str]) -> ForkedProcess | None:
        if not self.alive:
            return None
        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        output_in, output_out = os.pipe()
        pid = NOT_FORKED
        try:
            # The first request waits for the zygote to import torch: as long as a worker's load may take.
            self.sock.settimeout(self.start_timeout)
            socket.send_fds(self.sock, [b"S"], [commands_in, events_out, output_out])
            payload = json.dumps({"cwd": os.getcwd(), "env": env}).encode()
            self.sock.sendall(_LENGTH.pack(len(payload)) + payload)
            pid = self._reply()
        except OSError:
            self.close()
        finally:
            for fd in (commands_in, events_out, output_out):  # the child holds them now
                os.close(fd)
        if pid == NOT_FORKED:
            for fd in (commands_out, events_in, output_in):
                os.close(fd)
            return None
        return ForkedProcess(self, pid, os.fdopen(commands_out, "wb"), os.fdopen(events_in, "rb"),
                             os.fdopen(output_in, "rb"))

    def wait(self, pid: int, wait_s: float) -> int | None:
        with self.lock:
            return self._wait(pid, wait_s)

    def _wait(self, pid: int, wait_s: float) -> int | None:
        if not self.alive:
            return None
        try:
            self.sock.settimeout(wait_s + 10.0)
            self.sock.sendall(b"W" + _WAIT.pack(pid, wait_s))
            status = self._reply()
        except OSError:
            self.close()
            return None
        return None if status == STILL_RUNNING else status

    def _reply(self) -> int:
        data = b""
        while len(data) < _REPLY.size:
            chunk = self.sock.recv(_REPLY.size - len(data))
            if not chunk:
                raise ConnectionError("the zygote is gone")
            data += chunk
        return int(_REPLY.unpack(data)[0])

    def close(self) -> None:
        """It exits when its socket closes; its remaining children die with it (PR_SET_PDEATHSIG)."""
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# One zygote per process, reused by every run in it (a test session, a library caller that checks
# many times): starting one costs a torch import, forking from it milliseconds. It exits with this
# process (its socket closes), taking its children with it.
# A forked worker takes its run's environment, but what torch and its libraries read once, when
# the zygote imported them (thread counts, allocator and backend switches), stays the zygote's: a
# run whose variables of that kind differ from the zygote's gets a new zygote.
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "PYTORCH_", "CUDA_", "LD_",
                        "PYTHON")
_shared: Zygote | None = None
_shared_import_env: dict[str, str] = {}
_shared_lock = threading.Lock()


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` that a process reads when it starts or imports torch."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def _shared_zygote(env: dict[str, str], start_timeout: float) -> Zygote:
    global _shared, _shared_import_env
    wanted = import_time_env(env)
    with _shared_lock:
        if _shared is not None and _shared_import_env != wanted:
            _shared.close()
            _shared = None
        if _shared is None or not _shared.alive or _shared.proc.poll() is not None:
            _shared = Zygote(env, start_timeout)
            _shared_import_env = wanted
        return _shared


@atexit.register
def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


class Launcher:
    """Starts workers for one run: forked from the process's zygote where possible, fresh
    interpreters otherwise."""

    def __init__(self, env: dict[str, str], start_timeout: float) -> None:
        self.env = env
        self.start_timeout = start_timeout
        self.use_zygote = sys.platform.startswith("linux") and hasattr(socket, "send_fds")
        self.forked = 0  # workers of this run forked from the zygote (the others were spawned)

    def start(self) -> WorkerProcess:
        if self.use_zygote:
            forked = _shared_zygote(self.env, self.start_timeout).fork(self.env)
            if forked is not None:
                self.forked += 1
                return forked
            self.use_zygote = False  # it cannot fork safely (or died): fresh interpreters from now on
        return SpawnedProcess(self.env)

    def close(self) -> None:
        """Nothing to release: the zygote stays for the next run of this process."""
