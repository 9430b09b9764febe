"""The checks, one module each, behind one `Check` protocol (checks/base.py), in one registry.

The runner iterates over CHECKS in this order and runs those that apply to a case and are
selected: `default` checks run unless skipped (--skip-check NAME), the others only when asked
for (--check NAME, a spec's `checks:`). Adding a check is one module and one line here.
"""

from __future__ import annotations

from gradverify.checks.base import CaseContext, Check
from gradverify.checks.compile import CompileCheck
from gradverify.checks.contracts import ContractsCheck
from gradverify.checks.ctx_hygiene import CtxHygieneCheck
from gradverify.checks.device import DeviceCheck
from gradverify.checks.forward_mode import ForwardModeCheck
from gradverify.checks.gradcheck import GradcheckCheck
from gradverify.checks.jacobian import JacobianCheck
from gradverify.checks.layout import LayoutCheck
from gradverify.checks.multi_output import MultiOutputCheck
from gradverify.checks.needs_input_grad import NeedsInputGradCheck
from gradverify.checks.nondeterminism import NondeterminismCheck
from gradverify.checks.opcheck import OpcheckCheck
from gradverify.checks.registration import RegistrationCheck
from gradverify.checks.second_order import SecondOrderCheck
from gradverify.checks.transforms import TransformsCheck

CHECKS: tuple[Check, ...] = (
    ContractsCheck(),
    JacobianCheck(),
    NeedsInputGradCheck(),
    LayoutCheck(),
    CtxHygieneCheck(),
    MultiOutputCheck(),
    NondeterminismCheck(),
    GradcheckCheck(),
    RegistrationCheck(),
    OpcheckCheck(),
    TransformsCheck(),
    ForwardModeCheck(),
    SecondOrderCheck(),
    DeviceCheck(),
    CompileCheck(),
)

# Checks that always run: the verdict rests on them.
CORE_CHECKS = ("contracts", "jacobian")


def check_names() -> tuple[str, ...]:
    return tuple(check.name for check in CHECKS)


def selected(names: tuple[str, ...] | None, add: tuple[str, ...], skip: tuple[str, ...]) -> list[Check]:
    """The checks to run: `names` (a spec's exact list) or the defaults, plus `add`, minus `skip`."""
    chosen = []
    for check in CHECKS:
        if check.name in CORE_CHECKS:
            on = True
        elif names is not None:
            on = check.name in names
        else:
            on = check.default
        if check.name in add:
            on = True
        if check.name in skip and check.name not in CORE_CHECKS:
            on = False
        if on:
            chosen.append(check)
    return chosen


__all__ = ["CHECKS", "CORE_CHECKS", "CaseContext", "Check", "check_names", "selected"]
