"""pytest plugin (entry point `pytest11`): keep gradient checks in a test suite.

    def test_normalize_backward(gradverify_check):
        gradverify_check(Normalize, torch.rand(3, 4, dtype=torch.float64) + 0.1)

On failure the test fails with the plain gradverify report (diff table, heatmap, diagnosis) as
its message. pytest loads this module in every session of an environment where gradverify is
installed, so it imports neither torch nor the engine until a check actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from gradverify.report import Report

CheckFn = Callable[..., "Report"]


def check_backward(fn: Any, *inputs: Any, **options: Any) -> Report:
    """Run `gradverify.verify(fn, *inputs, **options)`; fail the current test if it finds a problem.

    Returns the Report, so a test can assert more (e.g. on a diagnosis kind) when it passes.
    `pytrace=False` keeps pytest's output to the report itself: a traceback into gradverify
    says nothing about the user's backward.
    """
    from gradverify.api import explain, verify
    from gradverify.errors import GradverifyError

    try:
        report = verify(fn, *inputs, **options)
    except GradverifyError as exc:
        pytest.fail(f"gradverify: {exc}", pytrace=False)
    if not report.ok:
        pytest.fail(explain(report), pytrace=False)
    return report


@pytest.fixture
def gradverify_check() -> CheckFn:
    """`gradverify_check(Function, *inputs, **options)`: verify the backward, fail the test on a mismatch."""
    return check_backward
