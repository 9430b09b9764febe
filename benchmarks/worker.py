"""One measurement in a fresh process: gradverify or torch's gradcheck on one benchmark case.

    python benchmarks/worker.py gradverify column_normalize_diagonal 4096 [--mode M] [--max-memory 256M]
    python benchmarks/worker.py gradcheck column_normalize_diagonal 4096
    python benchmarks/worker.py baseline - 0

Prints one JSON line: wall and CPU seconds of the call itself (imports, input creation and a
warm-up call on a 16-element input are not timed), the verdict, the entries gradverify names,
and what it says it guaranteed. The peak resident set size is not measured here: the parent
reads it from this process's rusage when it exits (os.wait4), so it covers everything, imports included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from functions import CASES

import gradverify


def parse_memory(text: str) -> int:
    """'256M' -> bytes (K, M, G suffixes, powers of 1024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def run_gradverify(fn: Any, inputs: tuple[torch.Tensor, ...], mode: str, max_memory: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"mode": mode}
    if max_memory:
        options["max_memory"] = parse_memory(max_memory)
    start, cpu = time.perf_counter(), time.process_time()
    report = gradverify.verify(fn, *inputs, **options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    check = next((c for c in report.cases[0].checks if c.name == "jacobian"), None)
    named = [f"d{m.output}{list(m.out_index)}/d{m.input}{list(m.in_index)}" for m in check.mismatches[:3]] \
        if check is not None else []
    details = dict(check.details) if check is not None else {}
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "verdict": "pass" if report.ok else "FAIL",
            "message": check.message if check is not None else report.cases[0].message,
            "count": check.mismatch_count if check is not None else 0,
            "lower_bound": bool(check.mismatch_count_is_lower_bound) if check is not None else False,
            "named": named, "mode": details.get("mode", ""), "auto": details.get("auto", ""),
            "finite_differences": details.get("finite differences", ""),
            "guarantee": check.guarantee if check is not None else ""}


def run_gradcheck(fn: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    args = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        ok = torch.autograd.gradcheck(fn.apply, args)
        verdict, message = ("pass" if ok else "FAIL"), ""
    except Exception as exc:  # noqa: BLE001 - a failing gradcheck raises GradcheckError
        verdict = "FAIL" if "Jacobian mismatch" in str(exc) else f"error {type(exc).__name__}"
        message = str(exc).splitlines()[0][:200]
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "verdict": verdict,
            "message": message}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=["gradverify", "gradcheck", "baseline"])
    parser.add_argument("case")
    parser.add_argument("size", type=int)
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--max-memory", default=None)
    args = parser.parse_args()
    if args.tool == "baseline":
        print(json.dumps({"seconds": 0.0, "cpu_seconds": 0.0, "verdict": "-"}))
        return 0
    fn, make = CASES[args.case]
    # Warm up on a tiny input first (imports, lazy initialisation, first kernels), for both tools
    # alike: the timed call is the one a user running many checks pays.
    if args.tool == "gradverify":
        run_gradverify(fn, make(16), args.mode, args.max_memory)
    else:
        run_gradcheck(fn, make(16))
    inputs = make(args.size)
    result = run_gradverify(fn, inputs, args.mode, args.max_memory) if args.tool == "gradverify" else \
        run_gradcheck(fn, inputs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
