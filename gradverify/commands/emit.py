"""Where a report goes: the terminal report on stdout, report files, the GitHub job summary.

`render` is the one place the command line calls the renderers; `emit` writes what they make.
The report on stdout and report files are independent: writing files never hides the
terminal report (only --quiet shortens it).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gradverify.errors import UsageError, escape_terminal
from gradverify.report import EXIT_USAGE, Report
from gradverify.schema import OutputFormat


@dataclass(frozen=True)
class View:
    """How the report on stdout should look: verbosity -1 (--quiet), 0 or 1 (--verbose);
    `top_entries` the entries listed per failing check in the default terminal report (None:
    the renderer's own default, the worst few; an explicit --max-entries sets it)."""

    verbosity: int = 0
    max_entries: int | None = 20
    ci: bool = False
    top_entries: int | None = None


def on_ci() -> bool:
    """`CI` is set by every major CI service (GitHub, GitLab, CircleCI, Azure, Jenkins...)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def render(report: Report, fmt: OutputFormat, view: View, *, to_file: bool = False) -> str:
    """`report` as text in `fmt`: the single call site of the renderers."""
    from gradverify import render as renderers

    if fmt is OutputFormat.JSON:
        return renderers.render_json(report)
    if fmt is OutputFormat.JUNIT:
        return renderers.render_junit(report, max_entries=view.max_entries)
    if fmt is OutputFormat.GITHUB:
        return renderers.render_github(report, workspace=os.environ.get("GITHUB_WORKSPACE") or os.getcwd())
    if fmt is OutputFormat.MD:
        return renderers.render_markdown(report, max_entries=view.max_entries)
    if fmt is OutputFormat.HTML:
        return renderers.render_html(report)
    if to_file:  # read after the fact in an editor or a CI artifact: wider, up to --max-entries entries
        return renderers.render_plain(report, width=100, max_entries=view.max_entries, verbosity=view.verbosity)
    color = fmt is OutputFormat.RICH and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    extra = {"top_entries": view.top_entries} if view.top_entries is not None else {}
    return renderers.render_terminal(report, width=shutil.get_terminal_size((80, 24)).columns, color=color,
                                     verbosity=view.verbosity, max_entries=view.max_entries, ci=view.ci, **extra)


def parse_outputs(specs: list[str]) -> list[tuple[OutputFormat, Path]]:
    """`--output junit:report.xml` or `--output report.xml` -> (format, path), each checked
    before the run (UsageError, exit 2)."""
    from gradverify.outputs import OutputError, check_target
    from gradverify.schema import did_you_mean

    names = [f.value for f in OutputFormat]
    outputs: list[tuple[OutputFormat, Path]] = []
    for spec in specs:
        head, sep, tail = spec.partition(":")
        if sep and head.strip().lower() in names:
            fmt, target = OutputFormat(head.strip().lower()), tail
        elif sep and len(head) > 1 and head.isidentifier():  # 'C:\\...' is a drive, 'foo:x' a format
            raise UsageError(f"--output {spec!r}: unknown format {head!r} (expected one of {', '.join(names)})"
                             + did_you_mean(head, names))
        else:
            found = OutputFormat.from_suffix(Path(spec).suffix)
            if found is None:
                raise UsageError(f"--output {spec!r}: say the format as FORMAT:FILE, FORMAT one of {', '.join(names)} "
                                 "(or use a .xml, .json, .html, .md or .txt file name)")
            fmt, target = found, spec
        if not target.strip():
            raise UsageError(f"--output {spec!r}: no file name after the format")
        if target.endswith(("/", os.sep)):
            raise UsageError(f"--output {spec!r}: expected a file name, found a folder name (ending in /)")
        path = Path(target)
        try:
            check_target(path)
        except OutputError as exc:
            raise UsageError(f"--output {spec!r}: cannot write there: {exc.strerror or exc}") from None
        outputs.append((fmt, path))
    return outputs


def emit(report: Report, fmt: OutputFormat, view: View, outputs: list[tuple[OutputFormat, Path]],
         nothing_to_check: bool = False) -> int:
    """Report files, the GitHub job summary, then the report on stdout. Returns EXIT_USAGE if
    a report file could not be written (after everything else was), else 0."""
    from gradverify.outputs import write_output

    failures: list[str] = []
    for out_fmt, path in outputs:
        try:
            write_output(path, render(report, out_fmt, view, to_file=True))
        except OSError as exc:
            failures.append(f"cannot write the {out_fmt.value} report to {path}: {exc.strerror or exc}")
            continue
        sys.stderr.write(escape_terminal(f"gradverify: wrote the {out_fmt.value} report to {path}") + "\n")
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path and (fmt is OutputFormat.GITHUB or any(f is OutputFormat.GITHUB for f, _ in outputs)):
        try:
            with open(summary_path, "a", encoding="utf-8") as handle:
                handle.write(render(report, OutputFormat.MD, view))
        except OSError as exc:
            sys.stderr.write(escape_terminal(f"gradverify: warning: cannot write the job summary to {summary_path}: "
                                             f"{exc.strerror or exc}") + "\n")
    if nothing_to_check and fmt in (OutputFormat.RICH, OutputFormat.PLAIN, OutputFormat.GITHUB):
        sys.stdout.write("gradverify: nothing to check (no spec among the files, none covers them)\n")
    else:
        sys.stdout.write(render(report, fmt, view))
    sys.stdout.flush()
    for failure in failures:
        sys.stderr.write(f"gradverify: error: {escape_terminal(failure)}\n")
    return EXIT_USAGE if failures else 0
