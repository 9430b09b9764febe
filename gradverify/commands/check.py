"""`gradverify check`: flags -> settings -> run -> report -> exit code.

Plain Python (the typer layer in cli.py only collects the flags): every value is parsed by
the settings schema, every problem is raised as a GradverifyError (one line, exit 2) for the
error handler, and the exit code is returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradverify.commands.emit import View, emit, on_ci, parse_outputs
from gradverify.errors import UsageError, shorten
from gradverify.report import EXIT_FAILED, EXIT_OK, Report
from gradverify.schema import OutputFormat


@dataclass
class CheckArgs:
    """The flags of `gradverify check` as typed (strings; None or [] when not given)."""

    paths: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    seed: str | None = None
    domains: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    skip_checks: list[str] = field(default_factory=list)
    strict: bool | None = None
    atol: str | None = None
    rtol: str | None = None
    gradcheck: str | None = None
    order: str | None = None
    mode: str | None = None
    max_memory: str | None = None
    nondet_tol: str | None = None
    retries: str | None = None
    jobs: str | None = None
    timeout: str | None = None
    require_device: bool | None = None
    output_format: str | None = None
    outputs: list[str] = field(default_factory=list)
    html: str | None = None
    max_entries: str | None = None
    quiet: bool = False
    verbose: bool = False
    exit_zero: bool = False
    changed: bool = False
    specs_in: list[str] = field(default_factory=list)
    debug: bool = False


def check_readable(paths: list[Path]) -> None:
    """A spec path that cannot even be looked at (a name too long, a symlink loop, no
    permission) is a one-line error here, before anything tries to load it."""
    for path in paths:
        try:
            os.stat(path)
        except FileNotFoundError:
            continue  # the loader says "file not found" with the same words for every spec kind
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot read: {reason}", file=shorten(str(path))) from None


def _cli_values(a: CheckArgs) -> dict[str, Any]:
    """Flags by Settings field, raw: the schema parses them (and names the flag when it refuses)."""
    every_domain = [d for d in a.domains if "=" not in d]
    return {
        "shapes": a.shapes, "dtypes": a.dtypes, "devices": a.devices, "seed": a.seed, "ops": a.ops,
        "domain": every_domain[-1] if every_domain else None,
        "input_domains": [d for d in a.domains if "=" in d], "args": a.args,
        "add_checks": a.checks, "skip_checks": a.skip_checks, "strict": a.strict, "atol": a.atol,
        "rtol": a.rtol, "gradcheck": a.gradcheck, "order": a.order, "mode": a.mode,
        "max_memory": a.max_memory, "nondet_tol": a.nondet_tol, "retries": a.retries, "jobs": a.jobs,
        "timeout": a.timeout, "require_device": a.require_device, "output_format": a.output_format,
        "max_entries": a.max_entries,
    }


def run_check(a: CheckArgs) -> int:
    """What `gradverify check` does; returns the exit code."""
    from gradverify.config import parse_value, resolve_settings

    if a.quiet and a.verbose:
        raise UsageError("-q/--quiet and -v/--verbose: expected at most one of them, found both")
    paths = [Path(p) for p in a.paths]
    if not a.changed:
        check_readable(paths)
    for value in [d for d in a.domains if "=" not in d][:-1]:  # the last one wins; each must be valid
        parse_value("domain", value, "--domain")
    settings = resolve_settings(_cli_values(a), paths[0] if paths else Path.cwd())
    fmt = OutputFormat(settings.output_format)
    outputs = parse_outputs(a.outputs + ([f"html:{a.html}"] if a.html is not None else []))
    view = View(verbosity=-1 if a.quiet else 1 if a.verbose else 0, max_entries=settings.max_entries,
                ci=on_ci(), top_entries=settings.max_entries if settings.is_explicit("max_entries") else None)
    if a.changed:
        # Decided from the files' text before torch is imported: most commits touch no spec.
        from gradverify.precommit import select_specs

        paths = select_specs(paths, [Path(p) for p in a.specs_in])
        if not paths:
            # pre-commit runs on every commit: a commit that touches no spec is not a failure.
            return emit(Report(cases=()), fmt, view, outputs, nothing_to_check=True) or EXIT_OK
    if not paths:
        paths = [Path(p) for p in settings.paths]
        if not paths:
            raise UsageError("no spec path given: pass PATH (a spec file or folder) or set `paths` in "
                             "[tool.gradverify] of pyproject.toml")
        check_readable(paths)
    # Every case runs in a worker process (timeouts, crashes and prints contained); this process
    # never imports the user's code.
    from gradverify.progress import LiveProgress
    from gradverify.supervise import run_supervised

    progress = LiveProgress()
    try:
        report = run_supervised(paths, settings, on_event=progress)
    finally:
        progress.close()
    written = emit(report, fmt, view, outputs)
    if written:
        return written
    code = report.exit_code
    return EXIT_OK if a.exit_zero and code == EXIT_FAILED else code
