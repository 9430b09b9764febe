"""-j N: independent cases in worker processes.

A Case holds an OpSpec whose Function class may not pickle (it lives in a spec module loaded by
path), so a worker gets (spec path, op name, index among that op's cases, settings) and expands
the spec itself; it checks that it rebuilt the same case (shapes, dtype, device, seed) before
running it. CaseResult objects are frozen dataclasses of plain values and travel back as they
are. Workers start with "spawn": a forked torch (its thread pools, an initialised CUDA) is not
safe to use, and spawn behaves the same on every platform.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

from gradverify.cases import Case
from gradverify.config import Settings
from gradverify.report import CaseResult

Task = tuple[str, str, int, tuple[tuple[int, ...], ...], str, str, int]


def _key(case: Case) -> tuple[tuple[tuple[int, ...], ...], str, str, int]:
    return (tuple(tuple(s) for s in case.shapes), case.dtype, case.device, case.seed)


def tasks_for(cases: Sequence[Case]) -> list[Task | None]:
    """What a worker needs to rebuild each case; None for a case that must run here (no spec file)."""
    seen: dict[tuple[str, str], int] = {}
    tasks: list[Task | None] = []
    for case in cases:
        file = case.op.file
        index = seen.get((file, case.op.name), 0)
        seen[(file, case.op.name)] = index + 1
        if not file or not Path(file).exists():
            tasks.append(None)
            continue
        tasks.append((file, case.op.name, index, *_key(case)))
    return tasks


def _init_worker(threads: int) -> None:
    import torch

    # N workers on C cores: C // N intra-op threads each, so they do not oversubscribe the CPU.
    torch.set_num_threads(max(1, threads))


def _run_task(task: Task, settings: Settings) -> CaseResult | None:
    """Rebuild the case from its spec and run it; None if the rebuilt case is not the same one."""
    from gradverify.api import collect_cases
    from gradverify.runner import run_case

    file, op_name, index, shapes, dtype, device, seed = task
    cases = [c for c in collect_cases([Path(file)], settings.with_(ops=(op_name,))) if c.op.name == op_name]
    if index >= len(cases) or _key(cases[index]) != (shapes, dtype, device, seed):
        return None
    return run_case(cases[index], settings)


def run_parallel(cases: Sequence[Case], settings: Settings, jobs: int,
                 progress: Callable[[CaseResult, int, int], None] | None = None) -> list[CaseResult]:
    """Results in the order of `cases`, computed by `jobs` spawned workers."""
    from gradverify.runner import run_case

    tasks = tasks_for(cases)
    results: list[CaseResult | None] = [None] * len(cases)
    done = 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    local = [k for k, t in enumerate(tasks) if t is None]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_run_task, task, settings): k for k, task in enumerate(tasks) if task is not None}
        for future in as_completed(futures):
            k = futures[future]
            result = future.result()
            if result is None:  # the worker rebuilt a different case: run this one here
                local.append(k)
                continue
            results[k] = result
            done += 1
            if progress is not None:
                progress(result, done, len(cases))
    for k in sorted(local):
        results[k] = run_case(cases[k], settings)
        done += 1
        if progress is not None:
            progress(results[k], done, len(cases))  # type: ignore[arg-type]
    return [r for r in results if r is not None]
