"""The command line: options -> settings -> run -> render -> exit code. Only this module imports typer."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from gradverify.report import EXIT_FAILED, EXIT_INTERNAL, EXIT_USAGE

app = typer.Typer(
    name="gradverify",
    help="Check the hand-written backward of custom torch.autograd Functions, entry by entry.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

FORMATS = ("rich", "plain", "json", "junit", "github")
# Formats a report file may have (`--output FORMAT:FILE`); html only makes sense in a file.
OUTPUT_FORMATS = FORMATS + ("html",)
SUFFIX_FORMATS = {".xml": "junit", ".json": "json", ".html": "html", ".htm": "html", ".txt": "plain",
                  ".log": "plain", ".md": "github"}


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"gradverify: error: {message}\n")
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from gradverify import __version__

        sys.stdout.write(f"gradverify {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """gradverify: is your backward right, and if not, which Jacobian entries are wrong and why."""


@app.command()
def check(
    paths: Optional[List[Path]] = typer.Argument(None, help="Spec files (.py, .yaml) or folders of specs "
                                                 "(default: `paths` in \\[tool.gradverify]).", show_default=False),
    op: List[str] = typer.Option([], "--op", help="Check only this Function (repeatable)."),
    shape: List[str] = typer.Option([], "--shape", help="Shape of every tensor input ('2,3,3'), or one per "
                                    "input ('4,3;5,3;5'). Repeat to sweep."),
    dtype: List[str] = typer.Option([], "--dtype", help="float64 (default), float32, float16, bfloat16. "
                                    "Repeat to sweep."),
    device: List[str] = typer.Option([], "--device", help="cpu (default), cuda, cuda:N, mps. Repeat to sweep."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for every input (reproducible; default 0)."),
    domain: List[str] = typer.Option([], "--domain", help="Input values: any, positive, negative, nonzero, "
                                     "unit, probability, spd, symmetric, simplex, unit_norm, distinct, one_hot, "
                                     "or module:function; NAME=DOMAIN for one input. Repeatable."),
    arg: List[str] = typer.Option([], "--arg", help="A plain value for one of the op's parameters, NAME=VALUE in "
                                  "Python literal syntax (--arg dim=1 --arg eps=1e-5). Repeatable."),
    check_names: List[str] = typer.Option([], "--check", help="Also run this optional check. Repeatable."),
    skip_check: List[str] = typer.Option([], "--skip-check", help="Do not run this check. Repeatable."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Warnings (findings the autograd "
                                          "engine repairs, entries not judged) fail the run."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default per dtype)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default per dtype)."),
    gradcheck: Optional[str] = typer.Option(None, "--gradcheck", help="torch's own gradcheck: fast (default), "
                                            "slow or off."),
    max_entries: Optional[int] = typer.Option(None, "--max-entries", help="Mismatched entries shown per failing "
                                              "check (default 20)."),
    nondet_tol: Optional[float] = typer.Option(None, "--nondet-tol", help="Allowed difference between two "
                                               "identical backward calls (default 0)."),
    require_device: Optional[bool] = typer.Option(None, "--require-device/--no-require-device",
                                                  help="An unavailable device fails the run instead of being "
                                                  "skipped (for CI machines that must have the GPU)."),
    order: int = typer.Option(1, "--order", help="2 also checks the double backward (and runs gradgradcheck)."),
    retries: int = typer.Option(2, "--retries", help="Re-draw inputs this many times when they land near a "
                                "non-differentiable point."),
    output_format: Optional[str] = typer.Option(None, "--format", help="Report on stdout: rich (default), plain, "
                                                "json, junit or github. Env: GRADVERIFY_FORMAT."),
    output: List[str] = typer.Option([], "--output", help="Also write the report to a file: FORMAT:FILE "
                                     "(junit:report.xml) or FILE with the format from its suffix (.xml .json "
                                     ".html .txt). Repeatable. stdout then gets a short summary unless --format "
                                     "is given."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the full report as one HTML page "
                                        "(same as --output html:FILE)."),
    exit_zero: bool = typer.Option(False, "--exit-zero", help="Exit 0 even when checks fail (usage errors "
                                   "still exit 2)."),
    changed: bool = typer.Option(False, "--changed", help="PATHS are changed files (pre-commit): check the "
                                 "specs among them and the specs covering them; ignore the rest."),
    specs_in: List[Path] = typer.Option([], "--specs-in", help="With --changed: look for covering specs only "
                                        "here (file or folder; repeatable). Default: the whole repository."),
    mode: Optional[str] = typer.Option(None, "--mode", help="auto (default): every Jacobian entry up to "
                                       "2^28 entries, random projections with localisation beyond; full; fast."),
    jobs: Optional[int] = typer.Option(None, "-j", "--jobs", help="Run independent cases in this many worker "
                                       "processes (default 1)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget of Jacobian chunks, "
                                             "e.g. 512M or 2G (default 512M)."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """Verify the backward of every autograd Function in the given spec files."""
    if order not in (1, 2):
        _fail(f"--order {order}: expected 1 (gradients) or 2 (also the double backward)", EXIT_USAGE)
    if retries < 0:
        _fail(f"--retries {retries}: expected 0 or more", EXIT_USAGE)
    # Precedence: these flags > GRADVERIFY_* variables > [tool.gradverify] in pyproject.toml > defaults.
    all_domain, per_input = _domains(domain)
    settings = _resolve_or_exit({
        "shapes": shape, "dtypes": dtype, "devices": device, "seed": seed, "domain": all_domain,
        "input_domains": per_input, "args": _args(arg), "add_checks": _check_list(check_names, "--check"),
        "skip_checks": _check_list(skip_check, "--skip-check"), "strict": strict, "atol": atol,
        "rtol": rtol, "gradcheck": gradcheck, "ops": op, "max_entries": max_entries, "nondet_tol": nondet_tol,
        "require_device": require_device, "retries": retries,
        "order": order if order != 1 else None,  # 1 is the flag's default: let a spec's `checks` decide
        **_scale_options(mode, jobs, max_memory),
    }, paths, debug)
    fmt, full, outputs = _choose_formats(output_format or _configured_format(settings), output, html)
    if changed:
        # Decided from the files' text before torch is imported: most commits touch no spec.
        from gradverify.precommit import select_specs
        from gradverify.report import Report

        paths = select_specs(paths or [], specs_in)
        if not paths:
            _emit(Report(cases=()), fmt, full, outputs, settings.max_entries, nothing_to_check=True)
            raise typer.Exit(0)
    if not paths:
        paths = [Path(p) for p in settings.paths]
        if not paths:
            _fail("no spec path given: pass PATH (a spec file or folder) or set `paths` in [tool.gradverify] "
                  "of pyproject.toml", EXIT_USAGE)
    from gradverify.errors import GradverifyError

    try:
        from gradverify.progress import LiveProgress
        from gradverify.supervise import run_supervised

        # The user's code runs in worker processes (timeouts, crashes and prints contained);
        # what is being checked shows live on a terminal's stderr.
        progress = LiveProgress()
        try:
            report = run_supervised(paths, settings, on_event=progress)
        finally:
            progress.close()
    except GradverifyError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERNAL)
    except Exception as exc:  # a bug in gradverify itself
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_INTERNAL)

    _emit(report, fmt, full, outputs, settings.max_entries)
    code = report.exit_code
    raise typer.Exit(0 if exit_zero and code == EXIT_FAILED else code)


def _domains(values: List[str]) -> tuple[Optional[str], tuple[tuple[str, str], ...]]:
    """--domain DOMAIN (every input) and --domain NAME=DOMAIN (one input)."""
    from gradverify.cases import check_domain
    from gradverify.errors import UsageError

    every: Optional[str] = None
    per_input: list[tuple[str, str]] = []
    try:
        for value in values:
            name, sep, domain_name = value.partition("=")
            if sep:
                per_input.append((name.strip(), check_domain(domain_name.strip())))
            else:
                every = check_domain(value.strip())
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    return every, tuple(per_input)


def _args(values: List[str]) -> tuple[tuple[str, object], ...]:
    """--arg NAME=VALUE, VALUE read as a Python literal (1, 1e-5, [0, 1], True, None, 'mean');
    anything that is not a literal is taken as a string."""
    import ast

    parsed: list[tuple[str, object]] = []
    for value in values:
        name, sep, text = value.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            _fail(f"--arg {value!r}: expected NAME=VALUE, e.g. --arg dim=1", EXIT_USAGE)
        try:
            literal: object = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            literal = text.strip()
        parsed.append((name, literal))
    return tuple(parsed)


def _check_list(values: List[str], flag: str) -> tuple[str, ...]:
    from gradverify.checks import check_names
    from gradverify.config import did_you_mean

    names = check_names()
    for value in values:
        if value not in names:
            _fail(f"{flag} {value!r}: expected one of {', '.join(names)}" + did_you_mean(value, names), EXIT_USAGE)
    return tuple(values)


def _usage(message: str) -> Exception:
    from gradverify.errors import UsageError

    return UsageError(message)


MODES = ("auto", "full", "fast")


def _scale_options(mode: Optional[str], jobs: Optional[int], max_memory: Optional[str]) -> dict[str, object]:
    """--mode, -j and --max-memory as Settings fields (None when not given); exit 2 if bad."""
    if mode is not None and mode.lower() not in MODES:
        _fail(f"--mode {mode!r}: expected one of {', '.join(MODES)}", EXIT_USAGE)
    if jobs is not None and jobs < 1:
        _fail(f"-j/--jobs {jobs}: expected a positive number of worker processes", EXIT_USAGE)
    budget = None
    if max_memory is not None:
        text = max_memory.strip().upper().removesuffix("B").removesuffix("I")
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            budget = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(float(text))
        except ValueError:
            _fail(f"--max-memory {max_memory!r}: expected a size like 512M, 2G or a number of bytes", EXIT_USAGE)
        if budget < 2**20:
            _fail(f"--max-memory {max_memory!r}: at least 1M", EXIT_USAGE)
    return {"mode": mode.lower() if mode else None, "jobs": jobs, "max_memory": budget}


def _resolve_or_exit(cli: dict[str, object], paths: Optional[List[Path]], debug: bool):  # type: ignore[no-untyped-def]
    """Settings from flags, GRADVERIFY_* and the pyproject.toml nearest the first spec (or cwd); exit 2 if bad."""
    from gradverify.config import resolve_settings
    from gradverify.errors import GradverifyError

    try:
        return resolve_settings(cli, Path(paths[0]) if paths else Path.cwd())
    except GradverifyError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)


def _configured_format(settings) -> Optional[str]:  # type: ignore[no-untyped-def]
    """The output format pyproject.toml asks for (flags and GRADVERIFY_FORMAT are read by _choose_formats)."""
    if settings.extra.get("sources", {}).get("output_format") == "pyproject.toml":
        return str(settings.output_format)
    return None


class ProgressBar:
    """A transient rich progress bar while cases run; does nothing when output is not a terminal."""

    def __init__(self, enabled: bool, console: object | None = None) -> None:
        self.enabled = enabled
        self.console = console
        self.bar = None
        self.task = None

    def __call__(self, result, done: int, total: int) -> None:  # type: ignore[no-untyped-def]
        if not self.enabled:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.description}"),
                                console=self.console or Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done, total=total,
                        description=f"{result.op} {result.dtype} {result.device}: {result.status.value}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _on_ci() -> bool:
    """CI logs are read after the fact: never cut a diff table there (`CI` is set by every major CI)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _choose_formats(output_format: Optional[str], output: List[str],
                    html: Optional[Path]) -> tuple[str, bool, list[tuple[str, Path]]]:
    """(stdout format, whether stdout gets the full report, report files); checked before any work."""
    explicit = output_format or os.environ.get("GRADVERIFY_FORMAT")
    fmt = (explicit or "rich").strip().lower()
    if fmt not in FORMATS:
        where = "--format" if output_format else "GRADVERIFY_FORMAT"
        _fail(f"{where} {fmt!r}: expected one of {', '.join(FORMATS)}", EXIT_USAGE)
    outputs = _parse_outputs(output + ([f"html:{html}"] if html is not None else []))
    # Report files given and no format asked for: the log gets a short summary, not the report twice.
    return fmt, bool(explicit) or not outputs, outputs


def _parse_outputs(specs: List[str]) -> list[tuple[str, Path]]:
    """`junit:report.xml` or `report.xml` -> (format, path); bad ones are usage errors (exit 2)."""
    outputs: list[tuple[str, Path]] = []
    for spec in specs:
        head, sep, tail = spec.partition(":")
        if sep and head.strip().lower() in OUTPUT_FORMATS:
            fmt, target = head.strip().lower(), tail
        elif sep and len(head) > 1 and head.isidentifier():  # 'C:\\...' is a drive, 'foo:x' a format
            _fail(f"--output {spec!r}: unknown format {head!r} (expected one of {', '.join(OUTPUT_FORMATS)})",
                  EXIT_USAGE)
        else:
            fmt, target = SUFFIX_FORMATS.get(Path(spec).suffix.lower(), ""), spec
            if not fmt:
                _fail(f"--output {spec!r}: say the format as FORMAT:FILE, FORMAT one of "
                      f"{', '.join(OUTPUT_FORMATS)} (or use a .xml, .json, .html, .txt file name)", EXIT_USAGE)
        if not target.strip():
            _fail(f"--output {spec!r}: no file name after the format", EXIT_USAGE)
        path = Path(target)
        if path.is_dir():
            _fail(f"--output {spec!r}: {target} is a folder", EXIT_USAGE)
        outputs.append((fmt, path))
    return outputs


def _render(report, fmt: str, max_entries: int | None, *, to_file: bool = False) -> str:  # type: ignore[no-untyped-def]
    from gradverify import render

    if fmt == "json":
        return render.render_json(report)
    if fmt == "junit":
        return render.render_junit(report, max_entries=max_entries)
    if fmt == "github":
        return render.render_github(report, workspace=os.environ.get("GITHUB_WORKSPACE") or os.getcwd())
    if fmt == "html":
        return render.render_html(report, max_entries=max_entries)
    width = 120 if to_file else max(100, shutil.get_terminal_size((120, 40)).columns)
    if fmt == "plain":
        return render.render_plain(report, width=width, max_entries=max_entries)
    color = not to_file and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return render.render_rich(report, color=color, width=width, max_entries=max_entries)


def _write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: a CI job must never publish half a JUnit file."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's 0600 would hide the artifact from other users
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _emit(report, fmt: str, full: bool, outputs: list[tuple[str, Path]], max_entries: int,  # type: ignore[no-untyped-def]
          nothing_to_check: bool = False) -> None:
    """Report files first, then stdout: the full report in `fmt`, or a short summary when files got it."""
    from gradverify.render.terminal import footer

    for out_fmt, path in outputs:
        try:
            _write_atomic(path, _render(report, out_fmt, None, to_file=True))
        except OSError as exc:
            _fail(f"cannot write the {out_fmt} report to {path}: {exc.strerror or exc}", EXIT_USAGE)
        sys.stderr.write(f"gradverify: wrote the {out_fmt} report to {path}\n")
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    github_chosen = (full and fmt == "github") or any(f == "github" for f, _ in outputs)
    if summary_path and github_chosen:
        from gradverify.render import render_github_summary

        try:
            with open(summary_path, "a", encoding="utf-8") as handle:
                handle.write(render_github_summary(report, max_entries=max_entries))
        except OSError as exc:
            sys.stderr.write(f"gradverify: warning: cannot write the job summary to {summary_path}: {exc}\n")
    if nothing_to_check and fmt in ("rich", "plain", "github"):
        sys.stdout.write("gradverify: nothing to check (no spec among the files, none covers them)\n")
    elif full:
        sys.stdout.write(_render(report, fmt, None if _on_ci() else max_entries))
    else:
        for case in report.failing_cases():
            where = f"{case.file}:{case.backward_line or case.line}" if case.line else case.file
            sys.stdout.write(f"{case.status.value.upper()} {case.op} {case.dtype} {case.device}: "
                             f"{case.message or case.status.value} ({where})\n")
        sys.stdout.write(footer(report) + "\n")


@app.command("list")
def list_command(
    paths: Optional[List[Path]] = typer.Argument(None, help="Spec files or folders (default: `paths` in "
                                                 "\\[tool.gradverify]).", show_default=False),
    op: List[str] = typer.Option([], "--op", help="Only this Function (repeatable)."),
    shape: List[str] = typer.Option([], "--shape", help="As for check."),
    dtype: List[str] = typer.Option([], "--dtype", help="As for check."),
    device: List[str] = typer.Option([], "--device", help="As for check."),
    seed: Optional[int] = typer.Option(None, "--seed", help="As for check."),
    require_device: Optional[bool] = typer.Option(None, "--require-device/--no-require-device",
                                                  help="As for check."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """List the ops a spec path holds, their inputs, and the cases and checks `check` would run."""
    settings = _resolve_or_exit({"shapes": shape, "dtypes": dtype, "devices": device, "seed": seed, "ops": op,
                                 "require_device": require_device}, paths, debug)
    targets = list(paths or []) or [Path(p) for p in settings.paths]
    if not targets:
        _fail("no spec path given: pass PATH or set `paths` in [tool.gradverify] of pyproject.toml", EXIT_USAGE)
    from gradverify.commands.list_ops import list_ops
    from gradverify.errors import GradverifyError

    try:
        text = list_ops(targets, settings)
    except GradverifyError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    sys.stdout.write(text)


@app.command("init")
def init_command(
    name: str = typer.Argument(..., help="Name of the spec to create, e.g. my_op or specs/my_op.", show_default=False),
    kind: str = typer.Option("python", "--kind", help="python (NAME.py), yaml (NAME.yaml + the op in NAME.py) "
                             "or both."),
) -> None:
    """Write a commented starter spec that passes as written; never overwrites a file."""
    from gradverify.commands.init import write_starter
    from gradverify.errors import GradverifyError

    try:
        written = write_starter(name, kind)
    except GradverifyError as exc:
        _fail(str(exc), exc.exit_code)
    for path in written:
        sys.stdout.write(f"wrote {path}\n")
    sys.stdout.write(f"next: gradverify check {written[-1]}\n")


def main() -> None:
    """Console-script entry point; `python -m gradverify` calls the same."""
    import warnings

    # torch without numpy installed warns at import; gradverify needs no numpy, and that line
    # would be the first thing on stderr before every one-line error.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        app(prog_name="gradverify")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        if not isinstance(code, int):
            code = EXIT_USAGE
        sys.exit(code)
