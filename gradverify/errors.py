"""Errors the user can act on: each carries where it happened and maps to an exit code."""

from __future__ import annotations

from gradverify.report import EXIT_NOTHING, EXIT_USAGE


class GradverifyError(Exception):
    """A problem with the user's input (spec, options, config): exit code 2, one line, no traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.col = col

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.col is not None:
                    where += f":{self.col}"
            where += ": "
        return f"{where}{self.message}"


class SpecError(GradverifyError):
    """The spec file cannot be loaded or does not describe a checkable op."""


class NoFunctionError(SpecError):
    """A spec path holds no op: a .py that defines none, or a folder with no spec file. Nothing was
    checked, so exit 5 (as pytest when it collects no test), with the reason on one line; inside a
    folder such a .py is a helper module and is skipped."""

    exit_code = EXIT_NOTHING


class UsageError(GradverifyError):
    """A command-line option or configuration value is not valid."""


class OptionError(UsageError, ValueError):
    """A library option (`verify(gradcheck=...)`) the settings schema rejects.

    Also a ValueError, which is what a Python caller expects from a bad keyword value."""


class DeclarationError(SpecError, ValueError):
    """A `gv.check(...)` / `gv.tensor(...)` value the settings schema rejects, at the spec's line.

    A SpecError so that loading the spec reports it as `file:line: ...` (exit 2); a ValueError
    for code that imports the spec module on its own."""


def shorten(text: str, limit: int = 160) -> str:
    """`text` cut in the middle past `limit` characters (a 5000-character file name must not
    fill the screen; its start and end are what tell it apart)."""
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


def escape_terminal(text: str) -> str:
    """`text` safe to print on one terminal line: control characters (escape sequences, carriage
    returns, bidi overrides, NUL) and line breaks shown as `\\x1b`, `\\n`, ... instead of acting.

    Anything that reaches the terminal from the user's files (names, YAML values, messages of
    exceptions raised by their code) goes through this: a spec must not be able to clear the
    screen, rewrite earlier lines or hide text in a CI log."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)
