"""-j 2 gives the same report as -j 1."""

from __future__ import annotations

from pathlib import Path

from gradverify.api import check_paths
from gradverify.config import Settings
from gradverify.report import to_dict

SPECS = Path(__file__).resolve().parent.parent / "specs"


def test_two_workers_give_the_same_report() -> None:
    paths = [SPECS / "column_normalize.py", SPECS / "column_normalize_buggy.py", SPECS / "linear.py"]
    serial = check_paths(paths, Settings(gradcheck="off"))
    parallel = check_paths(paths, Settings(gradcheck="off", jobs=2))
    assert len(serial.cases) >= 3
    def timeless(report: dict) -> dict:  # type: ignore[type-arg]
        for case in report["cases"]:
            case.pop("duration_s")
        return report

    assert timeless(to_dict(serial)) == timeless(to_dict(parallel))
