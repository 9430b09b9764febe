"""Report -> JUnit XML, the test-report format GitLab, Jenkins and most CI dashboards read.

One `testcase` per case and check, so a dashboard lists "ColumnNormalize[x(3,3) float64 cpu]
jacobian" as its own test with its own history. A failing check carries a `failure` whose body is
the diff summary; a check that raised in the user's code an `error`; unavailable devices and
declared (expected) failures are `skipped`. Draws only; never computes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import PurePath

from gradverify.report import CaseResult, CheckResult, Report, Status, format_index

# XML 1.0 cannot carry most control characters (ANSI colour codes from a user's exception
# message, a stray NUL): drop them rather than write a file no parser accepts.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


# Checks about forward itself: point at the class, not at backward.
FORWARD_CHECKS = ("forward", "inplace", "case")


def _clean(text: str) -> str:
    return _INVALID_XML.sub("", text)


def case_label(case: CaseResult) -> str:
    """`Op[x(3,3) w(5,3) float64 cpu]`: what tells two cases of one op apart in a dashboard."""
    names = case.input_names or ("",) * len(case.shapes)
    shapes = " ".join(f"{name}({','.join(map(str, shape))})" for name, shape in zip(names, case.shapes))
    parts = [p for p in (shapes, case.dtype, case.device) if p]
    if case.seed:
        parts.append(f"seed{case.seed}")
    return f"{case.op}[{' '.join(parts)}]"


def _classname(case: CaseResult) -> str:
    """`specs.column_normalize`: groups a file's tests; two specs defining the same op stay apart."""
    path = PurePath(case.file)
    parts = [p for p in path.with_suffix("").parts if p not in ("/", "\\", "..", ".") and not p.endswith(":\\")]
    return ".".join(parts[-3:]) or case.op


def check_body(case: CaseResult, check: CheckResult, max_entries: int | None = None) -> str:
    """The failure text: the message, torch-style counts, every kept mismatch, diagnoses, repro."""
    lines: list[str] = [check.message or check.status.value]
    if check.total_entries:
        share = 100.0 * check.mismatch_count / check.total_entries
        lines.append(f"Mismatched elements: {check.mismatch_count} / {check.total_entries} ({share:.1f}%)")
    shown = check.mismatches if max_entries is None else check.mismatches[:max_entries]
    if shown:
        lines.append("entry | expected | got | |err|")
        for m in shown:
            entry = f"∂{format_index(m.output, m.out_index)} / ∂{format_index(m.input, m.in_index)}"
            lines.append(f"{entry} | {m.expected:.6g} | {m.got:.6g} | {m.abs_err:.4g}")
        rest = check.mismatch_count - len(shown)
        if rest > 0:
            lines.append(f"... and {rest} more (see the JSON report for every one)")
    for d in check.diagnoses:
        lines.append(f"diagnosis [{d.kind}] {d.message}")
        if d.evidence:
            lines.append(f"  evidence: {d.evidence}")
        if d.hint:
            lines.append(f"  hint: {d.hint}")
    for key, value in check.details:
        lines.append(f"{key}: {value}")
    where = f"{case.file}:{case.backward_line or case.line}" if (case.backward_line or case.line) else case.file
    lines.append(f"at: {where}")
    if case.repro:
        lines.append(f"reproduce: {case.repro}")
    return "\n".join(lines)


def _outcome(parent: ET.Element, status: Status, message: str, body: str, kind: str) -> None:
    if status is Status.FAILED:
        element = ET.SubElement(parent, "failure", message=_clean(message), type=kind)
        element.text = _clean(body)
    elif status is Status.ERROR:
        element = ET.SubElement(parent, "error", message=_clean(message), type=kind)
        element.text = _clean(body)
    elif status is Status.SKIPPED:
        ET.SubElement(parent, "skipped", message=_clean(message or "skipped"))
    elif status is Status.XFAIL:
        ET.SubElement(parent, "skipped", type="xfail", message=_clean(f"expected failure: {message}"))
    elif status is Status.XPASS:
        out = ET.SubElement(parent, "system-out")
        out.text = _clean(f"declared as failing, but passed: {message}")


def render_junit(report: Report, *, max_entries: int | None = None, suite_name: str = "gradverify") -> str:
    """The whole report as one JUnit XML document (a `testsuites` root with one `testsuite`)."""
    root = ET.Element("testsuites", name=suite_name)
    suite = ET.SubElement(root, "testsuite", name=suite_name)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seen: dict[tuple[str, str], int] = {}
    for case in report.cases:
        label = case_label(case)
        classname = _classname(case)
        # A case that never got to its checks (device unavailable, nothing ran) is still one test.
        rows: list[tuple[str, Status, str, str, str]] = []
        if not case.checks:
            rows.append(("case", case.status, case.message, case.message or case.status.value, "case"))
        for check in case.checks:
            rows.append((check.name, check.status, check.message or check.status.value,
                         check_body(case, check, max_entries), check.name))
        for check_name, status, message, body, kind in rows:
            name = f"{label} {check_name}"
            key = (classname, name)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                name = f"{name} #{seen[key]}"
            attrs = {"classname": classname, "name": _clean(name), "file": _clean(case.file)}
            line = case.line if check_name in FORWARD_CHECKS else (case.backward_line or case.line)
            if line:
                attrs["line"] = str(line)
            element = ET.SubElement(suite, "testcase", attrs)
            _outcome(element, status, message, body, kind)
            counts["tests"] += 1
            if status is Status.FAILED:
                counts["failures"] += 1
            elif status is Status.ERROR:
                counts["errors"] += 1
            elif status in (Status.SKIPPED, Status.XFAIL):
                counts["skipped"] += 1
    for element in (root, suite):
        for key, value in counts.items():
            element.set(key, str(value))
    if report.notes:
        out = ET.SubElement(suite, "system-out")
        out.text = _clean("\n".join(report.notes))
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
