"""gradverify against torch.autograd.gradcheck, right and failing ops, time and memory.

    python benchmarks/bench_vs_gradcheck.py                  # everything (~20 minutes on 2 cores)
    python benchmarks/bench_vs_gradcheck.py --only speed     # or: memory, cli
    python benchmarks/bench_vs_gradcheck.py --gradcheck-16k  # also gradcheck at 16,384 (~15 GiB)

Every measurement runs in a fresh process (benchmarks/worker.py, or the command line itself):
its peak resident set size is that process's ru_maxrss (os.wait4), imports and all; its time is
the call alone after a warm-up call on a 16-element input (worker), or the whole command
(command line). Wall and CPU time are both printed: on a shared machine the wall clock also
counts the other processes, CPU time mostly does not (torch's threads add up in it).

Sections:
1. speed: gradverify.verify (defaults: --mode auto, contracts, torch's fast gradcheck as second
   opinion) vs torch.autograd.gradcheck (default, slow mode) on right and failing ops at 4,096 and
   16,384 elements; same verdicts, entries named. gradcheck's default mode at 16,384 elements
   needs ~15 GiB: it runs only with --gradcheck-16k, and only when the machine has the memory.
2. memory: size x mode x --max-memory -> peak RSS, right and failing ops; the target is the
   baseline (Python + torch + gradverify imported) plus 1.25 x --max-memory.
3. cli: `python -m gradverify check benchmarks/specs/row_softmax.py --shape N,N`, row softmax
   right and with a diagonal-only backward, at 1000x1000 and 3000x3000, default and 256M budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = "benchmarks/specs/row_softmax.py"
GiB = 2**30


def measure_worker(args: list[str], address_limit: int | None = None) -> dict[str, Any]:
    return run_measured([sys.executable, str(HERE / "worker.py"), *args], address_limit)


def run_measured(argv: list[str], address_limit: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run argv in a fresh process (RLIMIT_AS at address_limit, killed after timeout): its exit
    code, wall time, output, the JSON line it printed last (worker), and its peak RSS from its
    own rusage (os.wait4 reaps it, so no other process counts)."""
    def limit() -> None:
        if address_limit:
            resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))

    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=limit if address_limit else None)
    chunks = []
    deadline = start + timeout
    assert proc.stdout is not None
    while True:
        data = proc.stdout.read(65536)
        if not data:
            break
        chunks.append(data)
        if time.perf_counter() > deadline:
            proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = b"".join(chunks).decode(errors="replace")
    result: dict[str, Any] = {"exit": proc.returncode, "process_wall": time.perf_counter() - start,
                              "peak_mib": usage.ru_maxrss / 1024, "text": text}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                result.update(json.loads(line))
            except json.JSONDecodeError:
                pass
            break
    return result


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> list[str]:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
    lines = [line.strip() for line in lscpu.splitlines() if line.strip().startswith(keep)]
    lines.append(f"torch {torch.__version__} (threads {torch.get_num_threads()}), Python {platform.python_version()}, "
                 f"CUDA not run (no GPU on this machine)")
    lines.append(f"memory available at start {mem_available() / GiB:.1f} GiB; load average {os.getloadavg()}")
    return lines


# --- 1. speed ----------------------------------------------------------------------------------

RIGHT = ["column_normalize", "softmax", "matmul", "sin_tanh"]
FAILING = ["column_normalize_diagonal", "column_normalize_scaled", "column_normalize_one_wrong", "softmax_diagonal"]


def speed(sizes: list[int], gradcheck_16k: bool, misses: list[str]) -> None:
    print("\n## 1. gradverify vs torch.autograd.gradcheck (default mode), fresh process each\n")
    print("| op | elements | gradverify | wall s | CPU s | peak MiB | gradcheck | wall s | CPU s | peak MiB | "
          "x wall | x CPU | gradverify says |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for size in sizes:
        for name in RIGHT + FAILING:
            gv = measure_worker(["gradverify", name, str(size)])
            gc: dict[str, Any] | None = None
            if size <= 4096:
                gc = measure_worker(["gradcheck", name, str(size)])
            elif gradcheck_16k and name in ("column_normalize", "column_normalize_diagonal"):
                if mem_available() >= 20 * GiB:
                    gc = measure_worker(["gradcheck", name, str(size)], address_limit=19 * GiB)
                else:
                    gc = {"verdict": f"not run ({mem_available() / GiB:.0f} GiB free)"}
            says = _says(gv)
            ratio_wall = ratio_cpu = "-"
            if gc and "seconds" in gc and "seconds" in gv:
                ratio_wall = f"{gc['seconds'] / gv['seconds']:.1f}"
                ratio_cpu = f"{gc['cpu_seconds'] / gv['cpu_seconds']:.1f}"
                same = gc.get("verdict") == gv.get("verdict")
                target = 20 if name in RIGHT and size <= 4096 else 10
                if not same:
                    misses.append(f"{name} at {size}: verdicts differ (gradverify {gv.get('verdict')}, gradcheck "
                                  f"{gc.get('verdict')})")
                if gc["seconds"] / gv["seconds"] < target:
                    misses.append(f"{name} at {size}: {ratio_wall}x faster than gradcheck by the wall clock "
                                  f"({ratio_cpu}x by CPU time), target {target}x")
            if size > 4096 and gv.get("peak_mib", 0) >= 1024:
                misses.append(f"{name} at {size}: peak {gv['peak_mib']:.0f} MiB (target < 1 GiB)")
            print(f"| {name} | {size} | {gv.get('verdict', 'error')} | {_f(gv, 'seconds')} | {_f(gv, 'cpu_seconds')} | "
                  f"{_f(gv, 'peak_mib', 0)} | {gc.get('verdict', '-') if gc else 'not run'} | "
                  f"{_f(gc, 'seconds')} | {_f(gc, 'cpu_seconds')} | {_f(gc, 'peak_mib', 0)} | {ratio_wall} | "
                  f"{ratio_cpu} | {says} |", flush=True)


def _f(result: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    if not result or key not in result:
        return "-"
    return f"{result[key]:.{digits}f}"


def _says(gv: dict[str, Any]) -> str:
    if "verdict" not in gv:
        return "error: " + gv.get("text", "")[-200:].replace("\n", " ")
    mode = "auto: " + gv.get("auto", "").split(" (")[0] if gv.get("auto") else gv.get("mode", "")[:20]
    if gv["verdict"] == "pass":
        return f"{mode}; " + (gv.get("guarantee") or gv.get("message", ""))[:90]
    named = ", ".join(gv.get("named", [])[:2])
    return f"{mode}; {gv.get('message', '')}; named {named}; FD: {gv.get('finite_differences', '')[:90]}"


# --- 2. memory ---------------------------------------------------------------------------------

def memory(baseline: float, misses: list[str]) -> None:
    print("\n## 2. Peak RSS by size x mode x --max-memory (fresh process each)\n")
    print(f"baseline (Python + torch + gradverify imported, nothing run): {baseline:.0f} MiB; "
          "target: baseline + 1.25 x --max-memory\n")
    print("| op | elements | mode | --max-memory | verdict | wall s | CPU s | peak MiB | target MiB | within |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    plan = []
    for size in (4096, 16384):
        for mode in ("auto", "full", "fast"):
            plan.append((size, mode))
    for size in (262144, 1000000):
        plan.append((size, "auto"))  # auto is projections at these sizes; full would take hours
    for size, mode in plan:
        for budget in ("256M", "512M"):
            for name in ("column_normalize", "column_normalize_diagonal"):
                gv = measure_worker(["gradverify", name, str(size), "--mode", mode, "--max-memory", budget])
                mib = int(budget[:-1])
                target = baseline + 1.25 * mib
                within = gv.get("peak_mib", 1e9) <= target
                if not within:
                    misses.append(f"memory: {name} {size} {mode} --max-memory {budget}: peak {gv.get('peak_mib', 0):.0f}"
                                  f" MiB > {target:.0f} MiB")
                print(f"| {name} | {size} | {mode} | {budget} | {gv.get('verdict', 'error')} | {_f(gv, 'seconds')} | "
                      f"{_f(gv, 'cpu_seconds')} | {_f(gv, 'peak_mib', 0)} | {target:.0f} | {'yes' if within else 'NO'} |",
                      flush=True)


# --- 3. command line ---------------------------------------------------------------------------

ENTRY = re.compile(r"∂out\[[0-9, ]+\]\s*/\s*∂x\[[0-9, ]+\]")


def cli(baseline: float, misses: list[str]) -> None:
    print("\n## 3. The command line: row softmax, right and diagonal-only backward\n")
    cli_baseline = run_measured([sys.executable, "-c", "import torch, gradverify.cli"])["peak_mib"]
    print(f"Whole process: Python start-up and imports included (the command line's own baseline, Python + "
          f"torch + gradverify.cli imported: {cli_baseline:.0f} MiB; the issue's target for --max-memory 256M "
          f"is 270 + 320 MiB).\n")
    print("| op | shape | --max-memory | exit | verdict | wall s | peak MiB | entries named (first) |")
    print("|---|---|---:|---:|---|---:|---:|---|")
    for shape in ("1000,1000", "3000,3000"):
        for budget in (None, "256M"):
            for op in ("RowSoftmax", "RowSoftmaxDiagonalOnly"):
                argv = [sys.executable, "-m", "gradverify", "check", SPEC, "--op", op, "--shape", shape]
                if budget:
                    argv += ["--max-memory", budget]
                result = run_measured(argv)
                text = result["text"]
                named = list(dict.fromkeys(ENTRY.findall(text)))  # each entry once (table and diagnosis)
                verdict = {0: "pass", 1: "FAIL"}.get(result["exit"], f"exit {result['exit']}")
                print(f"| {op} | {shape} | {budget or 'default (512M)'} | {result['exit']} | {verdict} | "
                      f"{result['process_wall']:.1f} | {result['peak_mib']:.0f} | {len(named)}: "
                      f"{', '.join(named[:2])} |", flush=True)
                wrong = op.endswith("DiagonalOnly")
                if (verdict != ("FAIL" if wrong else "pass")) or (wrong and not named):
                    misses.append(f"cli {op} {shape} {budget or ''}: {verdict}, {len(named)} entries named")
                if shape == "1000,1000" and budget is None:
                    if result["process_wall"] >= 30:
                        misses.append(f"cli {op} {shape}: {result['process_wall']:.1f} s (target < 30 s)")
                    if result["peak_mib"] >= 1024:
                        misses.append(f"cli {op} {shape}: {result['peak_mib']:.0f} MiB (target < 1 GiB)")
                if budget == "256M" and shape == "1000,1000" and result["peak_mib"] > 270 + 320:
                    misses.append(f"cli {op} {shape} --max-memory 256M: {result['peak_mib']:.0f} MiB (target <= 590)")
    sample = run_measured([sys.executable, "-m", "gradverify", "check", SPEC, "--op", "RowSoftmaxDiagonalOnly",
                         "--shape", "1000,1000"])
    print("\nOutput of `python -m gradverify check benchmarks/specs/row_softmax.py --op RowSoftmaxDiagonalOnly "
          "--shape 1000,1000` (its last 30 lines):\n")
    print("```")
    print("\n".join(sample["text"].rstrip().splitlines()[-30:]))
    print("```")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["speed", "memory", "cli"], default=None)
    parser.add_argument("--gradcheck-16k", action="store_true",
                        help="also run gradcheck's default mode at 16,384 elements (needs ~15 GiB free)")
    args = parser.parse_args()
    print("# gradverify benchmark\n")
    for line in machine():
        print(f"* {line}")
    baseline = measure_worker(["baseline", "-", "0"]).get("peak_mib", 0.0)
    misses: list[str] = []
    started = time.perf_counter()
    if args.only in (None, "speed"):
        speed([4096, 16384], args.gradcheck_16k, misses)
    if args.only in (None, "memory"):
        memory(baseline, misses)
    if args.only in (None, "cli"):
        cli(baseline, misses)
    print(f"\nload average at the end {os.getloadavg()}; {time.perf_counter() - started:.0f} s in all\n")
    print("## Targets missed\n" if misses else "## All targets met\n")
    for miss in misses:
        print(f"* {miss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
