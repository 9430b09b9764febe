"""The one error handler at the command line's boundary (as pre-commit's error_handler).

* A GradverifyError (a bad spec, option or configuration value) is one line,
  `gradverify: error: file:line:col: ...`, and its exit code (2).
* Ctrl-C is `gradverify: interrupted` and exit 130.
* Anything else is a bug in gradverify: exit 3, with a paste-ready log (versions of
  gradverify, torch, Python, the platform, the command, the traceback) written to a new file in
  the temporary folder, whose name the one line gives. On CI (`CI` set) the log follows on
  stderr too, since the temporary folder of a CI job is gone when anyone reads the log.
* `--debug` shows the traceback of any of these.

Every line written here goes through `escape_terminal`: a message may quote a spec's text.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from gradverify.errors import GradverifyError, escape_terminal, shorten
from gradverify.report import EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past the command-line framework (which would turn a
    KeyboardInterrupt into a silent exit)."""


class OutputClosed(Exception):
    """stdout was closed under us (`gradverify check ... | head`)."""


def error_line(message: str) -> None:
    sys.stderr.write(f"gradverify: error: {escape_terminal(message)}\n")
    sys.stderr.flush()


def _version_of(package: str) -> str:
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import PackageNotFoundError, version as installed
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return installed(package)
    except PackageNotFoundError:
        return "not installed"


def crash_report(exc: BaseException, argv: list[str]) -> str:
    """A Markdown block ready to paste into a bug report."""
    from gradverify import __version__

    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (
        "### gradverify crash report\n\n"
        f"- gradverify: {__version__}\n"
        f"- torch: {_version_of('torch')}\n"
        f"- Python: {sys.version.split()[0]} ({sys.executable})\n"
        f"- platform: {platform.platform()}\n"
        f"- command: `{shlex.join(['gradverify', *argv])}`\n"
        f"- working directory: {os.getcwd()}\n\n"
        "### error\n\n"
        f"{type(exc).__name__}: {exc}\n\n"
        "### traceback\n\n"
        f"```\n{trace}```\n"
    )


def write_crash_log(text: str) -> Path | None:
    """A new file in the temporary folder ($TMPDIR): never in the user's project, never over
    another run's log. None if it cannot be written."""
    try:
        fd, name = tempfile.mkstemp(prefix="gradverify-crash-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError:
        return None
    return Path(name)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
        pass


def guarded(body: Callable[[], int], argv: list[str]) -> int:
    """Run `body` (a command); turn whatever escapes it into one line and an exit code."""
    debug = "--debug" in argv
    try:
        return body()
    except GradverifyError as exc:
        if debug:
            traceback.print_exc()
        error_line(str(exc))
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted):
        if debug:
            traceback.print_exc()
        sys.stderr.write("\ngradverify: interrupted\n")
        return EXIT_INTERRUPTED
    except (BrokenPipeError, OutputClosed):
        _quiet_stdout()
        return EXIT_FAILED
    except SystemExit as exc:  # a library deep down called sys.exit: keep its code, never a traceback
        return exc.code if isinstance(exc.code, int) else EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - a bug in gradverify itself
        if debug:
            traceback.print_exc()
        report = crash_report(exc, argv)
        log = write_crash_log(report)
        where = f"the log for a bug report is in {log}" if log else "the log follows"
        error_line(f"internal error (a bug in gradverify, not in your code): {type(exc).__name__}: "
                   f"{shorten(str(exc), 300)}; {where}")
        if log is None or os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            sys.stderr.write(report)
        return EXIT_INTERNAL
