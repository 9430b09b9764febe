"""torch.library.opcheck as a second opinion on a custom op's registration, in one line.

opcheck tests the registrations (schema and mutations, autograd key, fake kernel, and with
`test_aot_dispatch_dynamic` a trace through AOTAutograd) on the sample it is given; it does not
check the gradient formula (its maintainers: it "just checks that the operators are correctly
registered", pytorch/pytorch#111931), so a wrong backward passes it: the Jacobian check is the
one that catches that, and both verdicts are shown side by side.

Its failures read "test_faketensor failed with ... (scroll up for stack trace)"; here each
failing utility is reduced to its name and the first meaningful line of what it raised. Whether
a failure counts is decided with the other checks' findings (runner.overrule_second_opinions):
one that the registration check explains is reported there; one that gradverify's own probes on
the same case do not confirm is shown but does not decide the verdict (opcheck can fail on its
own limits, pytorch/pytorch#142410).

By default only opcheck's registration utilities run (milliseconds); `test_aot_dispatch_dynamic`
(seconds: AOTAutograd tracing) joins them when opcheck or compile is asked for by name.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from gradverify.checks.base import CaseContext
from gradverify.checks.common import first_line, not_applicable_result, quiet_torch, requested
from gradverify.checks.registration import not_applicable, registered_op
from gradverify.numerics.forward import clone_args
from gradverify.report import CheckResult, Status

NAME = "opcheck"
CHEAP_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
FULL_UTILS = CHEAP_UTILS + ("test_aot_dispatch_dynamic",)

# opcheck's boilerplate around the line that says what broke.
_BOILERPLATE = (
    re.compile(r"^opcheck\(op, \.\.\.\): (\w+) failed with (.*?)(?: \(scroll up for stack trace\))?$", re.S),
)
# Exception types whose message says it all (others get their type name in front).
_SELF_EXPLAINING = ("AssertionError", "RuntimeError", "OpCheckError", "MetadataMismatchError")
_FAKE_PREFIX = re.compile(r"^When comparing the output of \S+ on FakeTensor and concrete Tensors, found\s*"
                          r"(?:mismatched tensor metadata(?: for output\[\d+\])?:\s*)?")


def summarise(utility: str, error: Any) -> str:
    """`utility: first meaningful line` for one failed opcheck utility (an exception or text)."""
    text = str(error).strip() if not isinstance(error, BaseException) else (str(error).strip()
                                                                             or type(error).__name__)
    for pattern in _BOILERPLATE:
        match = pattern.match(text)
        if match:
            utility, text = match.group(1), match.group(2).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else (type(error).__name__ if isinstance(error, BaseException) else "failed")
    line = _FAKE_PREFIX.sub("", line)
    if isinstance(error, BaseException) and type(error).__name__ not in _SELF_EXPLAINING:
        line = f"{type(error).__name__}: {line}" if not line.startswith(type(error).__name__) else line
    return f"{utility}: {line[:200].rstrip()}"


def summarise_message(message: str) -> str:
    """opcheck's raised message ("opcheck(op, ...): test_x failed with ... (scroll up ...)") in one line."""
    match = _BOILERPLATE[0].match(message.strip())
    if match:
        return summarise(match.group(1), match.group(2))
    return summarise("opcheck", message)


class OpcheckCheck:
    name = NAME
    default = True
    description = "torch.library.opcheck as a second opinion on the registration (its verdict in one line)"

    def applies(self, ctx: CaseContext) -> str | None:
        return not_applicable(ctx)

    def run(self, ctx: CaseContext) -> list[CheckResult]:
        reason = self.applies(ctx)
        if reason:
            return [not_applicable_result(NAME, reason)] if requested(ctx, NAME) else []
        op = registered_op(ctx)
        utils = FULL_UTILS if requested(ctx, NAME) or requested(ctx, "compile") else CHEAP_UTILS
        args = clone_args(ctx.args)
        for pos in ctx.diff_positions:
            args[pos].requires_grad_(True)
        positional, keywords = ctx.signature.split(args)
        try:
            with quiet_torch(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.case.seed)
                results = torch.library.opcheck(op.target, tuple(positional), keywords, test_utils=utils,
                                                raise_exception=False)
        except Exception as exc:  # noqa: BLE001 - opcheck itself could not handle the op: no verdict
            return [CheckResult(name=NAME, status=Status.SKIPPED, summary="not judged",
                                message=f"not judged: torch opcheck raised {type(exc).__name__}: {first_line(exc)}")]
        failed = {u: r for u, r in results.items() if not (isinstance(r, str) and r == "SUCCESS")}
        ran = ", ".join(results)
        details = tuple((u, "ok" if u not in failed else summarise(u, failed[u]).split(": ", 1)[1])
                        for u in results)
        if not failed:
            return [CheckResult(name=NAME, status=Status.PASSED, summary="passed",
                                message=f"torch opcheck passed ({ran}; it checks registration, not the gradient "
                                        "formula)", details=details)]
        lines = [summarise(u, r) for u, r in failed.items()]
        return [CheckResult(name=NAME, status=Status.FAILED, summary="failed: " + ", ".join(failed),
                            message="torch opcheck failed: " + "; ".join(lines),
                            details=details + (("failed", ", ".join(failed)),))]


__all__ = ["OpcheckCheck", "summarise", "summarise_message", "CHEAP_UTILS", "FULL_UTILS"]
