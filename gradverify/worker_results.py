"""Verdicts and errors the supervisor writes for a worker that could not report them itself.

A case whose worker was killed at the time limit or died gets an ERROR result built here from
the case's outline (what identifies it; no torch needed) and what is known of where it was: the
check that was running (the worker's last phase event) and the phase of user code it was in
(the shared phase board, "" when gradverify's own code was running). A spec error or an internal
error raised in a worker is rebuilt here so the command line reports it as if raised in-process.
"""

from __future__ import annotations

import sys

import signal
from dataclasses import replace

from gradverify.errors import GradverifyError
from gradverify.report import CaseResult, CheckResult, Diagnosis, Status

# How a phase of user code (usercode.user_code's names) reads in a sentence.
_USER_PHASES = {"reference": "the declared reference", "jvp": "the forward-mode jvp"}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def rebuild_error(mro: list[tuple[str, str]], message: str, file: str | None, line: int | None,
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


def internal_error(type_name: str, message: str, trace: str) -> Exception:
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
    note = f"raised in a gradverify worker process:\n{trace}"
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # what add_note does; 3.10's traceback does not print notes, the log writer does
        error.__notes__ = [note]  # type: ignore[attr-defined]
    return error


def _check_name(phase: str) -> str:
    return phase or "case"


def timeout_result(outline: CaseResult, phase: str, user_phase: str, limit: float) -> CaseResult:
    """The verdict of a case stopped at the time limit; `phase` the check, `user_phase` the user's code."""
    if user_phase:
        message = f"{_USER_PHASES.get(user_phase, user_phase)} did not return within {limit:g} s"
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
        message = f"the process running {_USER_PHASES.get(user_phase, user_phase)} {how}"
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
