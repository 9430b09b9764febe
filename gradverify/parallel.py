"""-j N for cases this process already expanded (the library's `check_paths(..., Settings(jobs=N))`).

The command line uses `supervise.run_supervised` directly. Here the caller holds Case objects,
whose ops live in spec modules loaded by path and do not pickle; so the workers load the spec
files those cases came from (once per worker), and each case is matched to the worker's own
expansion by what identifies it (op, file, shapes, dtype, device, seed, repro line). A case with
no spec file to load, or not found in the workers' expansion, runs here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from gradverify.cases import Case, case_settings
from gradverify.config import Settings
from gradverify.errors import GradverifyError
from gradverify.report import CaseResult

Key = tuple[Any, ...]


def case_key(case: Case, settings: Settings) -> Key:
    """What identifies a case in a worker's expansion (the same fields supervise.py compares)."""
    from gradverify.runner import repro_command

    return (case.op.name, case.op.file, case.shapes, case.dtype, case.device, case.seed,
            repro_command(case, case_settings(case, settings)))


def outline_key(outline: CaseResult) -> Key:
    return (outline.op, outline.file, outline.shapes, outline.dtype, outline.device, outline.seed, outline.repro)


def run_parallel(cases: Sequence[Case], settings: Settings, jobs: int,
                 progress: Callable[[CaseResult, int, int], None] | None = None) -> list[CaseResult]:
    """Results in the order of `cases`, computed by up to `jobs` supervised workers."""
    from gradverify.runner import run_case
    from gradverify.supervise import CaseFinished, Event, Supervisor

    files: list[str] = []
    for case in cases:
        file = case.op.spec_file or case.op.file
        if file and Path(file).is_file() and file not in files:
            files.append(file)
    keys = [case_key(case, settings) for case in cases]
    placed: dict[int, int] = {}  # position in `cases` -> index in the workers' expansion

    def select(outlines: tuple[CaseResult, ...]) -> list[int]:
        free: dict[Key, list[int]] = {}
        for index, outline in enumerate(outlines):
            free.setdefault(outline_key(outline), []).append(index)
        for position, key in enumerate(keys):
            if free.get(key):
                placed[position] = free[key].pop(0)
        return sorted(placed.values())

    done = 0
    total = len(cases)

    def on_event(event: Event) -> None:
        nonlocal done
        if isinstance(event, CaseFinished) and progress is not None:
            done += 1
            progress(event.result, done, total)

    results: list[CaseResult | None] = [None] * total
    if files:
        try:
            supervised = Supervisor(files, settings.with_(jobs=jobs), on_event=on_event).run(select)
        except GradverifyError:
            placed.clear()  # these files alone do not load as the caller's paths did: run here
        else:
            by_index = dict(zip(sorted(placed.values()), supervised))
            for position, index in placed.items():
                results[position] = by_index[index]
    for position, case in enumerate(cases):
        if results[position] is None:
            results[position] = run_case(case, settings)
            done += 1
            if progress is not None:
                progress(results[position], done, total)  # type: ignore[arg-type]
    return [result for result in results if result is not None]
