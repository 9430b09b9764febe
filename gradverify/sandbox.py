"""Global torch state around one case.

A spec runs code at import (`torch.set_grad_enabled(False)`, a low recursion limit, anomaly
mode) and a case's forward may change global state as it runs; neither may decide another
case's verdict. `torch_sandbox` saves that state before a case, sets what the checks need,
and puts everything back afterwards, so each case starts from the same state whichever
process or order runs it (-j 1 and -j N give the same report).

What is forced for the duration of the case, because the checks cannot work otherwise:
grad mode on, inference mode off, anomaly mode off (it turns a NaN in backward into an
exception, which would be reported as "backward raised" instead of the `nonfinite` finding),
a recursion limit of at least `recursion_floor`, and the global RNG seeded with the case's
seed (an op that draws from it behaves the same in every process). Everything else (default
dtype and device, deterministic algorithms, TF32 and matmul precision) is the user's choice:
it is kept as found and only restored afterwards, since forcing torch's defaults would change
what the user's own forward computes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

# CPython's default recursion limit: torch's autograd and tracing need at least this much.
DEFAULT_RECURSION_LIMIT = 1000


def _flags(torch: Any) -> dict[str, Any]:
    """The global settings restored after a case (each read only if this torch has it)."""
    backends = torch.backends
    found: dict[str, Any] = {
        "default_dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": backends.cuda.matmul.allow_tf32,
        "cudnn": (backends.cudnn.allow_tf32, backends.cudnn.deterministic, backends.cudnn.benchmark),
    }
    if hasattr(torch, "get_default_device"):
        found["default_device"] = torch.get_default_device()
    return found


def _restore_flags(torch: Any, saved: dict[str, Any]) -> None:
    now = _flags(torch)
    backends = torch.backends
    if now["default_dtype"] != saved["default_dtype"]:
        torch.set_default_dtype(saved["default_dtype"])
    if now["deterministic"] != saved["deterministic"]:
        mode, warn_only = saved["deterministic"]
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    if now["matmul_precision"] != saved["matmul_precision"]:
        torch.set_float32_matmul_precision(saved["matmul_precision"])
    if now["cuda_matmul_tf32"] != saved["cuda_matmul_tf32"]:
        backends.cuda.matmul.allow_tf32 = saved["cuda_matmul_tf32"]
    if now["cudnn"] != saved["cudnn"]:
        backends.cudnn.allow_tf32, backends.cudnn.deterministic, backends.cudnn.benchmark = saved["cudnn"]
    # Only when it changed: setting the default device installs a device mode even for "cpu".
    if "default_device" in saved and now.get("default_device") != saved["default_device"]:
        torch.set_default_device(saved["default_device"])


@contextlib.contextmanager
def torch_sandbox(seed: int | None = None, recursion_floor: int = DEFAULT_RECURSION_LIMIT) -> Iterator[None]:
    """Run one case with the global state the checks need, and leave the state as it was found."""
    import torch

    grad_enabled = torch.is_grad_enabled()
    anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
    recursion = sys.getrecursionlimit()
    flags = _flags(torch)
    cpu_rng = torch.get_rng_state()
    # Only a CUDA that is already initialised: reading its state must not initialise it.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            torch.set_grad_enabled(True)
            if anomaly[0]:
                torch.autograd.set_detect_anomaly(False)
            if recursion < recursion_floor:
                sys.setrecursionlimit(recursion_floor)
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        torch.set_grad_enabled(grad_enabled)
        if (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()) != anomaly:
            torch.autograd.set_detect_anomaly(anomaly[0], check_nan=anomaly[1])
        if sys.getrecursionlimit() != recursion:
            with contextlib.suppress(RecursionError):  # a limit below the current depth: keep ours
                sys.setrecursionlimit(recursion)
        _restore_flags(torch, flags)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
