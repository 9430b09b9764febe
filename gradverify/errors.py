"""Errors the user can act on: each carries where it happened and maps to an exit code."""

from __future__ import annotations

from gradverify.report import EXIT_USAGE


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
    """A Python file defines no autograd Function: an error for a spec, a helper module in a folder."""


class UsageError(GradverifyError):
    """A command-line option or configuration value is not valid."""
