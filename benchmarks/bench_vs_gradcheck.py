"""gradverify vs torch.autograd.gradcheck, in one process and one run.

    python benchmarks/bench_vs_gradcheck.py            # the whole table (several minutes)
    python benchmarks/bench_vs_gradcheck.py --quick    # sizes up to 1,024 only

What is timed:
* gradverify: `gradverify.verify(fn, *inputs)` exactly as a user calls it (mode auto, which is a
  full entry-by-entry check up to 2^28 Jacobian entries; contracts; torch's gradcheck in fast
  mode as its second opinion). Nothing is stripped.
* gradcheck default: `torch.autograd.gradcheck(fn.apply, inputs)` (slow mode, full Jacobians).
* gradcheck fast: the same with fast_mode=True.

Memory: the peak resident set size of this whole process while the measurement runs, sampled
every 5 ms from /proc/self/statm by a thread (so short spikes between samples can be missed),
after returning freed heap to the OS with malloc_trim so one measurement does not inherit the
previous one's heap. "+MiB" is that peak minus the RSS just before the measurement.

Timing: wall clock; a measurement under 2 s is repeated up to 3 times and the fastest kept (the
machine may be shared), for both tools alike.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradverify  # noqa: E402
from functions import (ColumnNormalize, MatMul, ScaleWithOneWrongEntry, SinTimesTanh, Softmax,  # noqa: E402
                       SoftmaxDiagonalOnly, wrong_linear_map)

PAGE = os.sysconf("SC_PAGE_SIZE")
# gradcheck's default mode at 16,384 elements, as measured in issue 6 on a 2-core machine.
GRADCHECK_16K_NOTE = "skipped (would take ~89 s / 15 GiB: measured in issue 6)"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Measurement:
    seconds: float
    peak_mib: float
    delta_mib: float
    verdict: str
    value: Any = None


# The machine this runs on may be shared: a measurement shorter than this is repeated (up to
# REPEATS times) and its fastest run kept, for gradverify and gradcheck alike.
REPEAT_BELOW_S = 2.0
REPEATS = 3


def measure(fn: Callable[[], Any], verdict_of: Callable[[Any], str]) -> Measurement:
    best = _measure_once(fn, verdict_of)
    runs = 1
    while best.seconds < REPEAT_BELOW_S and runs < REPEATS:
        again = _measure_once(fn, verdict_of)
        runs += 1
        if again.seconds < best.seconds:
            again.peak_mib = max(again.peak_mib, best.peak_mib)
            again.delta_mib = max(again.delta_mib, best.delta_mib)
            best = again
    return best


def _measure_once(fn: Callable[[], Any], verdict_of: Callable[[Any], str]) -> Measurement:
    trim()
    before = rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        value = fn()
        verdict = verdict_of(value)
    except Exception as exc:  # a failing gradcheck raises; anything else is reported as is
        value, verdict = exc, ("FAIL" if "Jacobian mismatch" in str(exc) or "GradcheckError" in type(exc).__name__
                               else f"error {type(exc).__name__}")
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    return Measurement(seconds, peak[0] / 2**20, (peak[0] - before) / 2**20, verdict, value)


def gv_verdict(report: gradverify.Report) -> str:
    return "pass" if report.ok else "FAIL"


def gc_verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def run_gradverify(fn: type, inputs: tuple[torch.Tensor, ...], **options: Any) -> Measurement:
    return measure(lambda: gradverify.verify(fn, *inputs, **options), gv_verdict)


def run_gradcheck(fn: type, inputs: tuple[torch.Tensor, ...], fast: bool) -> Measurement:
    def call() -> bool:
        args = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
        torch.manual_seed(0)
        return torch.autograd.gradcheck(fn.apply, args, fast_mode=fast)

    return measure(call, gc_verdict)


def cases(sizes: list[int]) -> list[tuple[str, type, int, Callable[[int], tuple[torch.Tensor, ...]]]]:
    gen = torch.Generator().manual_seed(0)

    def colnorm(size: int) -> tuple[torch.Tensor, ...]:
        n = int(round(math.sqrt(size)))
        return (torch.rand(n, n, generator=gen, dtype=torch.float64) + 0.5,)

    def softmax(size: int) -> tuple[torch.Tensor, ...]:
        cols = min(size, 64)
        return (torch.randn(size // cols, cols, generator=gen, dtype=torch.float64),)

    def matmul(size: int) -> tuple[torch.Tensor, ...]:
        s = max(2, int(round(math.sqrt(size / 2))))
        return (torch.randn(s, s, generator=gen, dtype=torch.float64),
                torch.randn(s, s, generator=gen, dtype=torch.float64))

    def elementwise(size: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(size, generator=gen, dtype=torch.float64),)

    table = []
    for size in sizes:
        table.append(("column_normalize", ColumnNormalize, size, colnorm))
        table.append(("softmax", Softmax, size, softmax))
        table.append(("matmul (2 inputs)", MatMul, size, matmul))
        table.append(("sin*tanh (elementwise)", SinTimesTanh, size, elementwise))
    return table


def fmt_time(m: Measurement | None) -> str:
    return "-" if m is None else f"{m.seconds:8.3f}s"


def fmt_mem(m: Measurement | None) -> str:
    return "-" if m is None else f"{m.peak_mib:6.0f} (+{m.delta_mib:.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes up to 1,024 elements only")
    parser.add_argument("--slow-cap", type=int, default=4096,
                        help="largest size at which gradcheck's default (slow) mode is run (default 4096)")
    args = parser.parse_args()
    sizes = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096, 16384]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, Python {platform.python_version()}")
    print("memory: peak RSS of the whole process during the measurement, MiB (+ increase over the RSS before)")
    # Warm up imports and kernels so the first row does not pay for them.
    gradverify.verify(ColumnNormalize, torch.rand(3, 3, dtype=torch.float64) + 0.5)
    header = (f"{'function':24} {'elems':>6} {'jac entries':>12} | {'gradverify':>10} {'peak MiB':>13} {'verdict':>7} | "
              f"{'gc default':>10} {'peak MiB':>13} {'verdict':>7} | {'gc fast':>9} {'verdict':>7} | "
              f"{'default/gv':>10} {'agree':>5}")
    print(header)
    print("-" * len(header))
    misses: list[str] = []
    for name, fn, size, make in cases(sizes):
        inputs = make(size)
        elems = sum(x.numel() for x in inputs)
        with torch.no_grad():
            out_numel = fn.apply(*inputs).numel()
        entries = elems * out_numel
        gv = run_gradverify(fn, inputs)
        slow = run_gradcheck(fn, inputs, fast=False) if size <= args.slow_cap else None
        fast = run_gradcheck(fn, inputs, fast=True)
        ratio = f"{slow.seconds / gv.seconds:9.1f}x" if slow else "-"
        verdicts = [gv.verdict, fast.verdict] + ([slow.verdict] if slow else [])
        agree = "yes" if len(set(verdicts)) == 1 else "NO"
        slow_time = fmt_time(slow) if slow else GRADCHECK_16K_NOTE if size == 16384 else "skipped"
        print(f"{name:24} {elems:>6} {entries:>12} | {fmt_time(gv):>10} {fmt_mem(gv):>13} {gv.verdict:>7} | "
              f"{slow_time:>10} {fmt_mem(slow):>13} {slow.verdict if slow else '-':>7} | "
              f"{fmt_time(fast):>9} {fast.verdict:>7} | {ratio:>10} {agree:>5}", flush=True)
        if slow and size == 4096 and slow.seconds / gv.seconds < 20:
            misses.append(f"4,096 target (>= 20x) missed for {name}: {slow.seconds / gv.seconds:.1f}x")
        if size == 16384:
            # Target: >= 10x faster than gradcheck's default (89 s in the issue) and < 1 GiB peak.
            if gv.seconds > 8.9:
                misses.append(f"16,384 target (<= 8.9 s, 10x under the issue's 89 s) missed for {name}: "
                              f"{gv.seconds:.1f} s")
            if gv.peak_mib >= 1024:
                misses.append(f"16,384 memory target (< 1 GiB) missed for {name}: {gv.peak_mib:.0f} MiB")
        del gv, slow, fast
        trim()

    print()
    print("fast-mode bugs (issue 6): gradverify --mode fast vs gradcheck fast and default mode")
    bugs: list[tuple[str, type, tuple[torch.Tensor, ...]]] = [
        ("softmax without off-diagonal terms, (16, 256)", SoftmaxDiagonalOnly,
         (torch.randn(16, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64),)),
        ("256x256 linear map, W[17, 203] off by 1.0", wrong_linear_map(256, 17, 203, 1.0),
         (torch.randn(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64),)),
    ]
    for name, fn, inputs in bugs:
        gv = run_gradverify(fn, inputs, mode="fast", gradcheck="off")
        gv_default = run_gradverify(fn, inputs, mode="fast")
        fast = run_gradcheck(fn, inputs, fast=True)
        slow = run_gradcheck(fn, inputs, fast=False)
        check = next(c for c in gv.value.cases[0].checks if c.name == "jacobian")
        named = ", ".join(f"d{m.output}{list(m.out_index)}/d{m.input}{list(m.in_index)}" for m in check.mismatches[:3])
        print(f"  {name}")
        print(f"    gradverify --mode fast: {gv.verdict} in {gv.seconds:.3f}s (jacobian check alone; "
              f"{gv_default.seconds:.3f}s with contracts and torch's fast gradcheck) - {check.message}")
        print(f"      names: {named}{' ...' if len(check.mismatches) > 3 else ''}")
        print(f"      {dict(check.details).get('guarantee', '')}")
        print(f"    gradcheck fast: {fast.verdict} in {fast.seconds:.3f}s;  gradcheck default: {slow.verdict} in "
              f"{slow.seconds:.3f}s")
        if fast.verdict != "pass":
            print("    (note: gradcheck's fast mode caught this one on this run)")
        if gv.verdict != "FAIL" or gv.seconds >= 1.0:
            misses.append(f"fast-mode target missed for {name}: {gv.verdict} in {gv.seconds:.2f} s")

    print()
    print("1,000,000 elements, one wrong entry (backward of y = 3x wrong at flat index "
          f"{ScaleWithOneWrongEntry.WRONG_INDEX}), gradverify default (--mode auto)")
    x = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gv = run_gradverify(ScaleWithOneWrongEntry, (x,))
    check = next(c for c in gv.value.cases[0].checks if c.name == "jacobian")
    named = ", ".join(f"d{m.output}{list(m.out_index)}/d{m.input}{list(m.in_index)} = {m.got:g} (expected "
                      f"{m.expected:g})" for m in check.mismatches[:3])
    print(f"  {gv.verdict} in {gv.seconds:.2f}s, peak {gv.peak_mib:.0f} MiB - {check.message}")
    print(f"  names: {named}")
    for key, value in check.details:
        if key in ("mode", "guarantee", "localisation"):
            print(f"  {key}: {value}")
    if gv.verdict != "FAIL" or gv.seconds >= 30:
        misses.append(f"1,000,000-element target missed: {gv.verdict} in {gv.seconds:.1f} s")

    print()
    if misses:
        print("targets missed:")
        for miss in misses:
            print(f"  - {miss}")
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
