"""Report -> JUnit XML, the test-report format GitLab, Jenkins and most CI dashboards read.

One `testcase` per case (op x inputs x dtype x device), named `ColumnNormalize[x(3,3) float64
cpu]`, so a dashboard keeps each case's history. A failing case carries a `failure` whose
message is the one-line summary and whose text is the plain report of that case; the user's
code raising is an `error`, a spec problem an `error` of type `spec`; unavailable devices and
declared failures are `skipped` with the reason; warnings are a `warning` property and are
written to `system-out`. Draws only; never computes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import PurePath

from gradverify.render.github import finding_place
from gradverify.render.terminal import render_plain
from gradverify.render.text import case_label, one_line
from gradverify.report import CaseResult, Report, Severity, Status

# XML 1.0 cannot carry most control characters (ANSI colour codes from a user's exception
# message, a stray NUL): drop them rather than write a file no parser accepts.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")

# The failure text is read in a CI dashboard, not a terminal: wider than 80 columns is fine.
TEXT_WIDTH = 100


def _clean(text: str) -> str:
    return _INVALID_XML.sub("", text)


def _classname(case: CaseResult) -> str:
    """`specs.column_normalize`: groups a file's tests; two specs defining the same op stay apart."""
    path = PurePath(case.spec_file or case.file)
    parts = [p for p in path.with_suffix("").parts if p not in ("/", "\\", "..", ".") and not p.endswith(":\\")]
    return ".".join(parts[-3:]) or case.op


def case_text(case: CaseResult, max_entries: int | None) -> str:
    """The plain report of one case: its summary rows, its finding, the repro line."""
    return render_plain(Report(cases=(case,)), width=TEXT_WIDTH, max_entries=max_entries)


def _warnings(case: CaseResult) -> list[str]:
    found = []
    for check in case.checks:
        if check.status is not Status.WARNED or not check.counts:
            continue
        found += [f"{check.name}: [{d.kind}] {d.message}" for d in check.diagnoses if d.severity is not Severity.ERROR]
        if not check.diagnoses:
            found.append(f"{check.name}: {check.message or check.summary}")
    return found


def _first_kind(case: CaseResult) -> str:
    for check in case.checks:
        if not check.ok:
            return next((d.kind for d in check.diagnoses if d.severity is Severity.ERROR), check.name)
    return case.status.value


def _testcase(suite: ET.Element, case: CaseResult, name: str, max_entries: int | None) -> None:
    failing = next((c for c in case.checks if not c.ok), None)
    if failing is None and case.status is not Status.SPEC:
        file, line = case.file, case.backward_line or case.line
    else:
        file, line = finding_place(case, failing)
    attrs = {"classname": _classname(case), "name": _clean(name), "file": _clean(file),
             "time": f"{case.duration_s:.3f}"}
    if line:
        attrs["line"] = str(line)
    element = ET.SubElement(suite, "testcase", attrs)
    warnings = _warnings(case)
    if warnings or case.status is Status.XPASS:
        properties = ET.SubElement(element, "properties")
        for text in warnings:
            ET.SubElement(properties, "property", name="warning", value=_clean(text))
        if case.status is Status.XPASS:
            ET.SubElement(properties, "property", name="xpass", value=_clean(case.message or one_line(case)))
    summary = _clean(one_line(case))
    if case.status is Status.FAILED:
        ET.SubElement(element, "failure", message=summary, type=_first_kind(case)).text = _clean(
            case_text(case, max_entries))
    elif case.status in (Status.ERROR, Status.SPEC):
        kind = "spec" if case.status is Status.SPEC else _first_kind(case)
        ET.SubElement(element, "error", message=summary, type=kind).text = _clean(case_text(case, max_entries))
    elif case.status is Status.SKIPPED:
        ET.SubElement(element, "skipped", message=_clean(case.message.removeprefix("skipped: ") or "skipped"))
    elif case.status is Status.XFAIL:
        reason = next((c.message for c in case.checks if c.status is Status.XFAIL and c.message), case.message)
        ET.SubElement(element, "skipped", type="xfail", message=_clean(f"expected failure: {reason}"))
    if case.status in (Status.WARNED, Status.XPASS):
        out = ET.SubElement(element, "system-out")
        lead = "declared as failing, but passed\n" if case.status is Status.XPASS else ""
        out.text = _clean(lead + case_text(case, max_entries))


def render_junit(report: Report, *, max_entries: int | None = 20, suite_name: str = "gradverify") -> str:
    """The whole report as one JUnit XML document (a `testsuites` root with one `testsuite`)."""
    root = ET.Element("testsuites", name=suite_name)
    suite = ET.SubElement(root, "testsuite", name=suite_name)
    seen: dict[tuple[str, str], int] = {}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for case in report.cases:
        name = case_label(case)
        key = (_classname(case), name)
        seen[key] = seen.get(key, 0) + 1
        _testcase(suite, case, name if seen[key] == 1 else f"{name} #{seen[key]}", max_entries)
        counts["tests"] += 1
        if case.status is Status.FAILED:
            counts["failures"] += 1
        elif case.status in (Status.ERROR, Status.SPEC):
            counts["errors"] += 1
        elif case.status in (Status.SKIPPED, Status.XFAIL):
            counts["skipped"] += 1
    total = f"{sum(case.duration_s for case in report.cases):.3f}"
    for element in (root, suite):
        for key, value in counts.items():
            element.set(key, str(value))
        element.set("time", total)
    if report.notes:
        ET.SubElement(suite, "system-out").text = _clean("\n".join(report.notes))
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


__all__ = ["case_text", "render_junit"]
