"""Verdicts the supervisor writes for a worker that could not: they name what was running, and
never blame the user's code for time or a crash spent in gradverify's own."""

from __future__ import annotations

from gradverify.errors import GradverifyError, SpecError, UsageError
from gradverify.report import CaseResult, Status
from gradverify.worker_results import crash_result, internal_error, rebuild_error, signal_name, timeout_result

OUTLINE = CaseResult(op="RowSoftmax", file="ops.py", shapes=((1000, 1000),), dtype="float64", device="cpu", seed=0,
                     status=Status.SKIPPED, repro="gradverify check ops.py --op RowSoftmax")


def test_a_timeout_in_user_code_names_the_phase_and_the_check() -> None:
    result = timeout_result(OUTLINE, "jacobian", "backward", 120.0)
    assert result.status is Status.ERROR and result.repro == OUTLINE.repro
    assert result.message == "backward did not return within 120 s (in the jacobian check)"
    (check,) = result.checks
    assert check.name == "jacobian" and check.diagnoses[0].kind == "timeout"
    assert timeout_result(OUTLINE, "forward", "forward", 3).message == "forward did not return within 3 s"
    assert timeout_result(OUTLINE, "contracts", "reference", 3).message.startswith(
        "the declared reference did not return")


def test_a_timeout_in_gradverifys_own_computation_does_not_blame_the_user() -> None:
    message = timeout_result(OUTLINE, "jacobian", "", 120.0).message
    assert message.startswith("the jacobian check did not finish within 120 s in gradverify's own computation")
    assert "not in your code" in message


def test_crashes_name_the_signal_or_the_exit_code() -> None:
    crash = crash_result(OUTLINE, "contracts", "backward", f"died with {signal_name(11)}")
    assert crash.message == "the process running backward died with SIGSEGV (in the contracts check)"
    assert crash.checks[0].diagnoses[0].kind == "crashed"
    ours = crash_result(OUTLINE, "jacobian", "", f"died with {signal_name(9)}")
    assert ours.message == "the worker process died with SIGKILL during the jacobian check, outside your code"
    assert signal_name(200) == "signal 200"


def test_errors_from_a_worker_are_rebuilt_as_the_same_class() -> None:
    error = rebuild_error([("gradverify.errors", "SpecError"), ("gradverify.errors", "GradverifyError")],
                          "expected a Function", "spec.py", 3, None, 2)
    assert type(error) is SpecError and str(error) == "spec.py:3: expected a Function" and error.exit_code == 2
    usage = rebuild_error([("gradverify.errors", "UsageError")], "bad --arg", None, None, None, 2)
    assert type(usage) is UsageError
    unknown = rebuild_error([("plugin", "Custom"), ("gradverify.errors", "GradverifyError")], "m", None, None,
                            None, 2)
    assert type(unknown) is GradverifyError
    bug = internal_error("KeyError", "'x'", "Traceback ...")
    assert type(bug) is KeyError and "Traceback ..." in bug.__notes__[0]
    assert type(internal_error("SomeOwnError", "boom", "tb")) is RuntimeError
