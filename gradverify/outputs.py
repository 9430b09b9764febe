"""Writing report files without harming whatever is at the path.

* A regular file, or a path where nothing is yet, is written atomically: a temporary file in
  the same folder, renamed over the target, so a CI job never publishes half a JUnit file.
  A file that exists keeps its permission bits.
* A symlink is followed to its target, which is written as above: the link stays a link.
* Anything else at the path (a device such as /dev/null or /dev/full, a FIFO, a terminal) is
  opened and written, never replaced: renaming a file over /dev/full as root would replace
  the device node itself.
* /dev/stdout, /dev/stderr, /dev/fd/1, /dev/fd/2 and `-` write to this process's own streams
  (reopening /proc/self/fd/1 would truncate a redirected file, or not exist in a container).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import TextIO

_STREAMS = {"-": "stdout", "/dev/stdout": "stdout", "/dev/fd/1": "stdout", "/proc/self/fd/1": "stdout",
            "/dev/stderr": "stderr", "/dev/fd/2": "stderr", "/proc/self/fd/2": "stderr"}


class OutputError(OSError):
    """A report file that cannot be written (a folder at the path, a parent that is a file...)."""


def stream_for(path: Path) -> TextIO | None:
    """This process's stdout or stderr when `path` names one of them, else None."""
    name = _STREAMS.get(str(path))
    if name is None:
        return None
    stream: TextIO = sys.stdout if name == "stdout" else sys.stderr
    return stream


def check_target(path: Path) -> None:
    """Before the run: refuse a path that can never be written, so a long run does not end in
    'cannot write'. What only writing can tell (a full disk, permissions) is found then."""
    if stream_for(path) is not None:
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # a symlink loop, a name too long, a parent that is a file
        raise OutputError(exc.errno, exc.strerror) from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(0, "it is a folder")
        return
    # Nothing there yet (or a dangling symlink): the nearest existing ancestor must be a folder.
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(os.path.abspath(path))
    for parent in target.parents:
        try:
            info = os.stat(parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from None
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(0, f"{parent} is not a folder")
        return


def write_output(path: Path, text: str) -> None:
    """Write `text` to `path` as the module docstring says; OSError if it cannot be written."""
    stream = stream_for(path)
    if stream is not None:
        stream.write(text)
        stream.flush()
        return
    try:
        info: os.stat_result | None = os.stat(path)  # follows symlinks: the target's kind
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise OutputError(0, "it is a folder")
    if info is not None and not stat.S_ISREG(info.st_mode):
        _write_in_place(path, text)  # a device, a FIFO, a terminal: written, never replaced
        return
    target = Path(os.path.realpath(path))  # a symlink (or a chain of them) -> the file it names
    _write_atomic(target, text, mode=stat.S_IMODE(info.st_mode) if info is not None else None)


def _write_in_place(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _write_atomic(target: Path, text: str, mode: int | None) -> None:
    """Whole or not at all: a temporary file beside the target, renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # A short fixed prefix: the target's own name may already be near the file system's limit.
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".gradverify-", suffix=".tmp")
    except PermissionError:
        if mode is None:
            raise
        _write_in_place(target, text)  # a writable file in a folder we may not add files to
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask  # as open() would create it; mkstemp's 0600 would hide the artifact
            os.chmod(temp, mode)
            handle.write(text)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
