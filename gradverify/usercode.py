"""The one place where calls into the user's code are made safe.

Everything the user wrote (forward, backward, a reference, a sampler) runs inside
`user_code(phase)`. Any exception it raises, SystemExit and other BaseExceptions included,
becomes a `UserCodeError` that the check reports as a failing case with the user's file:line.
KeyboardInterrupt always propagates (Ctrl-C must stop the run).

An exception that starts in gradverify's own code inside that block (one of our callbacks
that the user's code called, say) is *not* the user's: it propagates unchanged, so our bugs
surface as internal errors (exit 3) and are never reported as the user's backward raising.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
import traceback
from pathlib import Path
from types import CodeType
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# gradverify functions that call straight into the user's code (an adapter's `call`, a forward
# body, a raw backward): an exception that leaves one of them came from the user's side, even
# where no frame of the user's own is left on the stack (a builtin, a compiled kernel).
_BOUNDARIES: set[CodeType] = set()


def boundary(fn: F) -> F:
    """Mark `fn` as a call into user code (see raised_by_gradverify)."""
    _BOUNDARIES.add(fn.__code__)
    return fn

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep

# Told the phase on entering user code and the enclosing phase ("" outside user code) on leaving
# it. The supervised worker (gradverify/worker.py) keeps it where the supervising process can read
# it after a hang or a crash, to say "backward did not return" rather than name a whole check.
phase_listener: Callable[[str], None] | None = None
_active_phases: list[str] = []


def _torch_dir() -> str:
    import torch

    return str(Path(torch.__file__).resolve().parent) + os.sep


_STDLIB = tuple(str(Path(p).resolve()) + os.sep for p in {sysconfig.get_paths()["stdlib"],
                                                           sysconfig.get_paths()["platstdlib"]})


class UserCodeError(Exception):
    """The user's code raised: carries the original exception and the phase it happened in."""

    def __init__(self, phase: str, original: BaseException) -> None:
        super().__init__(f"{phase} raised {type(original).__name__}: {original}")
        self.phase = phase
        self.original = original


def frame_owner(filename: str) -> str:
    """'gradverify', 'torch', 'stdlib' or 'user' for a traceback frame's file."""
    if filename.startswith("<"):
        return "stdlib"
    try:
        path = str(Path(filename).resolve())
    except OSError:
        path = filename
    if path.startswith(_PACKAGE_DIR):
        return "gradverify"
    if path.startswith(_torch_dir()) or f"{os.sep}functorch{os.sep}" in path:
        return "torch"
    if path.startswith(_STDLIB) and "site-packages" not in path:
        return "stdlib"
    return "user"


def raised_by_gradverify(exc: BaseException) -> bool:
    """True when the innermost frame that is ours or the user's is ours and is not a boundary
    into user code. The traceback starts with the `user_code` generator (the exception was
    thrown into it) and the function holding the `with` block: neither is evidence."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    if frames and frames[0].f_code is user_code.__wrapped__.__code__:  # type: ignore[attr-defined]
        frames = frames[1:]
    frames = frames[1:]
    for frame in reversed(frames):
        owner = frame_owner(frame.f_code.co_filename)
        if owner == "user":
            return False
        if owner == "gradverify":
            return frame.f_code not in _BOUNDARIES
    return False


@contextlib.contextmanager
def user_code(phase: str) -> Iterator[None]:
    """Run the user's code; its exceptions become UserCodeError, ours propagate."""
    listener = phase_listener
    if listener is not None:
        _active_phases.append(phase)
        listener(phase)
    try:
        yield
    except UserCodeError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from the user's code must not end the run
        if isinstance(exc, Exception) and raised_by_gradverify(exc):
            raise
        raise UserCodeError(phase, exc) from exc
    finally:
        if listener is not None:
            _active_phases.pop()
            listener(_active_phases[-1] if _active_phases else "")


def user_frame(exc: BaseException, prefer: str | None = None) -> tuple[str | None, int | None]:
    """The file:line in the user's code where `exc` was raised.

    Prefers the deepest frame in `prefer` (the spec file); otherwise the deepest frame that is
    neither gradverify's nor torch's nor the standard library's.
    """
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno
    frames = traceback.extract_tb(exc.__traceback__)
    if prefer:
        preferred = str(Path(prefer).resolve())
        for frame in reversed(frames):
            try:
                if str(Path(frame.filename).resolve()) == preferred:
                    return frame.filename, frame.lineno
            except OSError:
                continue
    for frame in reversed(frames):
        if frame_owner(frame.filename) == "user":
            return frame.filename, frame.lineno
    return None, None
