"""Small helpers the registration, opcheck, transforms, compile and forward_mode checks share."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

from gradverify.checks.base import CaseContext
from gradverify.report import CheckResult, Status

# Loggers torch writes tracebacks and notices to while we probe (a fake kernel that raises, a
# graph break): each finding is reported by the check itself, once, in the report.
_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")


def requested(ctx: CaseContext, name: str) -> bool:
    """The user asked for this check by name (--check NAME, a spec's `checks:`)."""
    return name in ctx.settings.add_checks or name in (ctx.settings.checks or ())


def not_applicable_result(name: str, reason: str) -> CheckResult:
    return CheckResult(name=name, status=Status.SKIPPED, summary="not applicable", message=f"not applicable: {reason}")


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Keep torch's logged tracebacks and warnings off the user's terminal while a check probes
    (computation never prints); the check reports what it found."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type name when it has no text), at most 240 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:240]


__all__ = ["first_line", "not_applicable_result", "quiet_torch", "requested"]
