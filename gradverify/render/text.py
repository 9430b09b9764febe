"""What every format shows, decided once: numbers, names, which cases and checks get details.

Stdlib only. The terminal, Markdown, HTML, JUnit and GitHub renderers all draw from these
helpers so that a number or a verdict reads the same in every format. Nothing here computes a
result: it only chooses and formats what the report already holds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gradverify.report import CaseResult, CheckResult, Diagnosis, Heatmap, Report, Severity, Status, Shape

# Case statuses that get a detail block: something the reader must act on or know about.
DETAILED_STATUSES = (Status.FAILED, Status.ERROR, Status.SPEC, Status.WARNED, Status.XPASS)

# torch's own checks are second opinions of ours: when the primary check already failed, their
# failure only confirms it, so it is said in the summary table and not again below it.
SECOND_OPINIONS = {"gradcheck": "jacobian", "gradgradcheck": "second_order"}

# Significant digits of expected / got / |err|: 4 reads at a glance and, unlike fixed decimals,
# never prints 1e-6 as 0.0000. When 4 digits print two different values the same (a precision
# failure off in the 6th digit), more are used, up to float64's 17.
DIGITS = 4

GLYPH_WORDS = {"X": "mismatch", "o": "agrees", ".": "zero", "?": "not judged"}

STATUS_WORDS = {
    Status.PASSED: ("passed", "passed"),
    Status.WARNED: ("warned", "warned"),
    Status.FAILED: ("failed", "failed"),
    Status.ERROR: ("error", "errors"),
    Status.SPEC: ("spec problem", "spec problems"),
    Status.SKIPPED: ("skipped", "skipped"),
    Status.XFAIL: ("expected failure", "expected failures"),
    Status.XPASS: ("unexpectedly passed", "unexpectedly passed"),
}


def num(value: float | None, digits: int = DIGITS) -> str:
    """`-0.09493`, `1e-6`, `1.235e5`, `0`, `inf`: significant digits, short exponents."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    mantissa, marker, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if marker else text


def num_pair(expected: float, got: float) -> tuple[str, str]:
    """Both values with enough digits that different values never print the same."""
    for digits in range(DIGITS, 18):
        a, b = num(expected, digits), num(got, digits)
        if a != b or expected == got or (math.isnan(expected) and math.isnan(got)):
            return a, b
    return num(expected, 17), num(got, 17)


def shape_text(shape: Shape) -> str:
    """`(3,3)`; a 0-d tensor is `(scalar)`."""
    return f"({','.join(map(str, shape))})" if shape else "(scalar)"


def heatmap_title(h: Heatmap) -> str:
    """`∂out (3,3) / ∂x (3,3)`: the block's names and shapes, shapes outside any index brackets."""
    return f"∂{h.output} {shape_text(h.out_shape)} / ∂{h.input} {shape_text(h.in_shape)}"


def heatmap_glyphs(h: Heatmap) -> list[tuple[str, str]]:
    """The legend: (glyph, meaning) for the glyphs this heatmap uses, mismatches first."""
    used = set("".join(h.rows))
    return [(glyph, word) for glyph, word in GLYPH_WORDS.items() if glyph in used]


def inputs_text(case: CaseResult) -> str:
    """`x(3,3) w(5,3)`: the tensor inputs, or the bare shapes of an older report."""
    tensors = " ".join(i.text for i in case.inputs if i.kind == "tensor")
    return tensors or " ".join(shape_text(s) for s in case.shapes)


def case_variant(case: CaseResult) -> str:
    """What tells two cases of one op apart: `x(3,3) float64 cpu`."""
    return " ".join(p for p in (inputs_text(case), case.dtype, case.device) if p)


def case_label(case: CaseResult) -> str:
    """`Op[x(3,3) float64 cpu]`: a case's name in dashboards and annotation titles."""
    parts = [case_variant(case)]
    if case.seed:
        parts.append(f"seed{case.seed}")
    return f"{case.op}[{' '.join(p for p in parts if p)}]"


def spec_location(case: CaseResult) -> str:
    """Where a YAML spec declared the op (`specs/ln.yaml:12`), or empty for a Python spec."""
    if not case.spec_file:
        return ""
    return f"{case.spec_file}:{case.spec_line}" if case.spec_line else case.spec_file


def where_text(case: CaseResult) -> str:
    """`specs/op.py:24` (backward's line), with the YAML spec first for an op declared in one;
    nothing for an op whose source file is unknown (a builtin, a lambda at the prompt)."""
    where = "" if case.file.startswith("<") else case.location
    if case.spec_file:
        return f"{spec_location(case)}, op at {where}" if where else spec_location(case)
    return where


def footer(report: Report) -> str:
    """`3 cases: 1 passed, 1 failed, 1 skipped`: the last line of every text format."""
    counts: dict[Status, int] = {}
    for case in report.cases:
        counts[case.status] = counts.get(case.status, 0) + 1
    parts = [f"{counts[s]} {STATUS_WORDS[s][counts[s] != 1]}" for s in STATUS_WORDS if counts.get(s)]
    n = len(report.cases)
    text = f"{n} case{'s' if n != 1 else ''}: " + (", ".join(parts) if parts else "nothing was checked")
    if report.cases and not report.checked_anything:
        text += " (nothing was checked)"
    return text


def counted_label(check: CheckResult) -> str:
    """The verdict word of a check; `(FAIL)` when it was overruled and does not count."""
    return check.status.label if check.counts else f"({check.status.label})"


def shows_max_err(check: CheckResult) -> bool:
    """A projected pass compared no entry one by one: a max |err| of 0 there would be a claim."""
    return check.max_abs_err is not None and not (check.guarantee and check.status is Status.PASSED)


def check_result_text(check: CheckResult) -> str:
    """The summary cell: the check's own summary, else its status; never a raw entry count of a
    projected check (the engine's summary says `4 projections agree`)."""
    text = check.summary or check.message or check.status.value
    if not check.summary and len(text) > 60:
        text = text[:59] + "…"
    if check.unverifiable_count and "not judged" not in text:  # never folded into a pass
        text += f", {check.unverifiable_count} not judged"
    return text


def is_detailed(case: CaseResult, verbosity: int = 0) -> bool:
    """Whether a case gets a detail block below the summary table."""
    if case.status in DETAILED_STATUSES:
        return True
    return verbosity >= 1 and (case.status is Status.XFAIL or any(not c.counts for c in case.checks))


def detailed_checks(case: CaseResult, verbosity: int = 0) -> list[CheckResult]:
    """The checks of a case whose findings are written out below the table, in run order."""
    failed = {c.name for c in case.checks if c.counts and c.status in (Status.FAILED, Status.ERROR)}
    shown: list[CheckResult] = []
    for check in case.checks:
        if check.status is Status.PASSED or (check.status is Status.SKIPPED and verbosity < 1):
            continue
        if (not check.counts or check.status is Status.XFAIL) and verbosity < 1:
            continue
        primary = SECOND_OPINIONS.get(check.name)
        if primary in failed and not check.diagnoses and verbosity < 1:
            continue  # a confirmation: the summary table already says it failed too
        shown.append(check)
    return shown


_COUNT_MESSAGE = re.compile(r"^\d+\+? / \d+ .*mismatched( \(at least\))?$")


def message_is_redundant(check: CheckResult) -> bool:
    """True when the check's message only repeats its diagnoses or its summary cell (each fact once)."""
    message = check.message.strip()
    if not message:
        return True
    texts = [d.message for d in check.diagnoses]
    if texts and all(any(part.strip() in text for text in texts) for part in message.split("; ")):
        return True
    if check.guarantee and message == check.guarantee:
        return True
    return bool(check.mismatch_count and _COUNT_MESSAGE.match(message))


def ordered_diagnoses(check: CheckResult) -> list[Diagnosis]:
    """Errors first, then warnings, then notes; the engine's order within each."""
    rank = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.NOTE: 2}
    return sorted(check.diagnoses, key=lambda d: rank[d.severity])


def entries_shown(check: CheckResult, limit: int | None) -> int:
    """How many of the kept mismatches to list."""
    kept = len(check.mismatches)
    return kept if limit is None else max(0, min(kept, limit))


def more_entries_text(check: CheckResult, shown: int, *, ci: bool, verbose_limit: int | None = None) -> str:
    """`… 13 more: --format json lists all 18`, with the true count (a lower bound says so).

    verbose_limit: how many `-v` would list, mentioned when that is more than shown now."""
    total = max(check.mismatch_count, len(check.mismatches))
    rest = total - shown
    if rest <= 0:
        return ""
    plus = "+" if check.mismatch_count_is_lower_bound else ""
    where = "--output json:FILE" if ci else "--format json"
    more = min(len(check.mismatches), verbose_limit) if verbose_limit is not None else len(check.mismatches)
    if ci or more <= shown:
        return f"… {rest}{plus} more: {where} lists all {total}{plus}"
    if more >= total:
        return f"… {rest} more: -v lists all {total}"
    return f"… {rest}{plus} more: -v lists {more}, {where} all {total}{plus}"


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _shape_free(text: str) -> str:
    """A message with its numbers blanked: counts and indices differ between a sweep's shapes."""
    return _NUMBER.sub("#", text)


def finding_signature(case: CaseResult) -> tuple[object, ...]:
    """Equal for two cases of a sweep that failed the same way (same checks, kinds and wording)."""
    items: list[tuple[object, ...]] = []
    for check in case.checks:
        if check.ok and check.status is not Status.WARNED:
            continue
        diagnoses = tuple((d.kind, d.severity.value, _shape_free(d.message), _shape_free(d.hint))
                          for d in check.diagnoses)
        items.append((check.name, check.status.value, diagnoses, "" if diagnoses else _shape_free(check.message)))
    return (case.op, case.file, case.status.value, _shape_free(case.message) if not items else "", tuple(items))


@dataclass(frozen=True)
class CaseGroup:
    """Cases of one op with the same finding: the first is shown in full, the others are listed."""

    cases: tuple[CaseResult, ...]

    @property
    def first(self) -> CaseResult:
        return self.cases[0]

    @property
    def others(self) -> tuple[CaseResult, ...]:
        return self.cases[1:]


def detail_groups(report: Report, verbosity: int = 0) -> list[CaseGroup]:
    """The detail blocks, in report order; a sweep's repeated finding becomes one block."""
    groups: dict[tuple[object, ...], list[CaseResult]] = {}
    for case in report.cases:
        if is_detailed(case, verbosity):
            groups.setdefault(finding_signature(case), []).append(case)
    return [CaseGroup(tuple(cases)) for cases in groups.values()]


def same_finding_text(group: CaseGroup) -> str:
    """`the same finding in 3 more cases: x(4,5) float64 cpu; ...` for a grouped block."""
    others = group.others
    if not others:
        return ""
    n = len(others)
    return f"the same finding in {n} more case{'s' if n != 1 else ''}: " + "; ".join(case_variant(c) for c in others)


@dataclass(frozen=True)
class Note:
    """A note about passing cases, said once for every case it applies to."""

    text: str
    cases: tuple[CaseResult, ...]

    @property
    def who(self) -> str:
        ops = list(dict.fromkeys(c.op for c in self.cases))
        if len(self.cases) == 1:
            return self.cases[0].op + " " + case_variant(self.cases[0])
        if len(ops) == 1:
            return f"{ops[0]}, {len(self.cases)} cases"
        return ", ".join(ops)


def passing_notes(report: Report, verbosity: int = 0) -> list[Note]:
    """Notes of the cases without a detail block that a reader should not miss: how the case was
    set up (default shape, re-drawn inputs, guesses), what a projected pass guarantees, and
    (verbose) every check's notes."""
    found: dict[str, list[CaseResult]] = {}
    for case in report.cases:
        if is_detailed(case, verbosity):
            continue
        texts = list(case.notes)
        for check in case.checks:
            if check.guarantee and check.status is Status.PASSED:
                texts.append(f"{check.name}: {check.guarantee}")
            if not check.counts and check.status is Status.FAILED and " -- not counted: " in check.message:
                # A second opinion overruled next to a pass: say why once, or it reads as a doubt.
                texts.append(f"{check.name} failed, not counted: {check.message.split(' -- not counted: ', 1)[1]}")
            if verbosity >= 1:
                texts += [f"{check.name}: {n}" for n in check.notes]
        for text in dict.fromkeys(texts):
            found.setdefault(text, []).append(case)
    return [Note(text, tuple(cases)) for text, cases in found.items()]


def one_line(case: CaseResult) -> str:
    """`ColumnNormalize x(3,3) float64 cpu: jacobian 18 / 81 [missing_offdiag]; gradcheck (fast) failed`:
    the first line of a failure in JUnit, pytest and annotations."""
    parts: list[str] = []
    for check in case.checks:
        if check.ok and check.status is not Status.WARNED:
            continue
        if check.status in (Status.ERROR, Status.SPEC):
            text = f"{check.name}: {check.message or check.summary}"
        else:
            text = f"{check.name} {check_result_text(check)}"
        kinds = [d.kind for d in check.diagnoses if d.severity is Severity.ERROR] or [d.kind for d in check.diagnoses]
        if kinds and check.status not in (Status.ERROR, Status.SPEC):
            text += " [" + ", ".join(dict.fromkeys(kinds)) + "]"
        parts.append(text)
    if not parts:
        parts.append(case.message or case.status.value)
    return f"{case.op} {case_variant(case)}: " + "; ".join(parts)


__all__ = ["CaseGroup", "Note", "case_label", "case_variant", "check_result_text", "counted_label",
           "detail_groups", "detailed_checks", "entries_shown", "finding_signature", "footer", "heatmap_glyphs",
           "heatmap_title", "inputs_text", "is_detailed", "message_is_redundant", "more_entries_text", "num",
           "num_pair", "one_line", "ordered_diagnoses", "passing_notes", "same_finding_text", "shape_text",
           "shows_max_err", "spec_location", "where_text"]
