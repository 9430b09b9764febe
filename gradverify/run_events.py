"""What a supervised run reports while it runs (supervise.run_supervised's `on_event`), for live displays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gradverify.report import CaseResult


@dataclass(frozen=True)
class LoadingSpecs:
    """The run began: a worker is importing torch and the specs at `paths`."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class CasesListed:
    """The worker expanded the specs: what will be checked, in report order."""

    titles: tuple[str, ...]


@dataclass(frozen=True)
class CaseStarted:
    """A worker began case `index`; `worker` is its process id."""

    index: int
    title: str
    worker: int


@dataclass(frozen=True)
class PhaseChanged:
    """Case `index` moved on to `phase` ("forward", then each check's name)."""

    index: int
    title: str
    phase: str


@dataclass(frozen=True)
class CaseFinished:
    """Case `index` has its verdict; `done` of `total` cases have one."""

    index: int
    result: CaseResult
    done: int
    total: int


Event = LoadingSpecs | CasesListed | CaseStarted | PhaseChanged | CaseFinished
EventHandler = Callable[[Event], None]
