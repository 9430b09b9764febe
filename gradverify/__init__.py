"""gradverify: is your custom autograd Function's backward right, and if not, where and why?"""

from __future__ import annotations

from gradverify.declare import check, tensor
from gradverify.report import CaseResult, CheckResult, Diagnosis, Mismatch, Report, Status

__version__ = "0.1.0"


def verify(fn, *inputs, **options):  # type: ignore[no-untyped-def]
    """Check `fn` (a torch.autograd.Function) at `inputs`; see gradverify.api.verify."""
    from gradverify.api import verify as _verify

    return _verify(fn, *inputs, **options)


def explain(report: Report) -> str:
    """The plain-text report for a Report, e.g. as an assertion message."""
    from gradverify.api import explain as _explain

    return _explain(report)


__all__ = ["check", "tensor", "verify", "explain", "Report", "CaseResult", "CheckResult", "Diagnosis",
           "Mismatch", "Status", "__version__"]
