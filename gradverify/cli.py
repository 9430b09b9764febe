"""The command line: the typer app and its options. Only this module imports typer.

Each command collects its flags as typed (strings: the settings schema parses them, so a bad
value gets the same message as in pyproject.toml or a YAML spec) and hands them to its
implementation in gradverify/commands/. `main` is the entry point (console script and
`python -m gradverify`); everything that escapes a command meets the one error handler there.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Annotated
from collections.abc import Iterator

import typer

from gradverify.commands.error_handler import Interrupted, OutputClosed, guarded
from gradverify.errors import UsageError
from gradverify.schema import STDOUT_FORMATS, GradcheckMode, Mode, OutputFormat, values

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors  # type: ignore[no-redef, import-not-found, unused-ignore]

app = typer.Typer(
    name="gradverify",
    help="Check the hand-written backward of custom PyTorch ops, entry by entry, and name the bug.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_help_option=False,
)

WHAT, HOW, REPORT, HOOKS = "What to check", "How to check", "Report", "Hooks (pre-commit)"


def _choices(choices: type) -> str:
    return "|".join(values(choices))


@contextmanager
def _boundary() -> Iterator[None]:
    """Ctrl-C and a closed stdout inside a command, carried past typer (which would turn them
    into a silent exit) to the error handler."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted() from None
    except BrokenPipeError:
        raise OutputClosed() from None


def _print_help(ctx: typer.Context, value: bool) -> None:
    if value:
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(0)


# typer's own --help shows a `<bool>` type column; this one shows nothing there.
HelpFlag = Annotated[bool, typer.Option("--help", metavar="", callback=_print_help, is_eager=True, expose_value=True,
                                        help="Show this message and exit.")]


def _print_version(value: bool) -> None:
    if value:
        from gradverify import __version__

        sys.stdout.write(f"gradverify {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    help: HelpFlag = False,
) -> None:
    """gradverify: is your backward right, and if not, which Jacobian entries are wrong and why."""


@app.command(add_help_option=False)
def check(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH", hidden=True)] = None,
    # what to check
    op: Annotated[list[str], typer.Option("--op", metavar="NAME", rich_help_panel=WHAT,
                                          help="Only this op (repeatable).")] = [],  # noqa: B006
    shape: Annotated[list[str], typer.Option(
        "--shape", metavar="S", rich_help_panel=WHAT,
        help="Shape of every tensor input (2,3,3) or one per input ('4,3;5,3;5'); () is 0-d. Repeat to sweep.")] = [],  # noqa: B006,E501
    dtype: Annotated[list[str], typer.Option("--dtype", metavar="D", rich_help_panel=WHAT,
                                             help="float64 (default), float32, float16, bfloat16, complex128, "
                                             "complex64. Repeat to sweep.")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", metavar="D", rich_help_panel=WHAT,
                                              help="cpu (default), cuda, cuda:N, mps. Repeat to sweep.")] = [],  # noqa: B006,E501
    seed: Annotated[str | None, typer.Option("--seed", metavar="N", rich_help_panel=WHAT,
                                                help="Seed of every input (default 0).")] = None,
    domain: Annotated[list[str], typer.Option(
        "--domain", metavar="DOMAIN", rich_help_panel=WHAT,
        help="Input values: any, positive, nonzero, unit, probability, spd, simplex, ... or module:function; "
        "NAME=DOMAIN for one input.")] = [],  # noqa: B006
    arg: Annotated[list[str], typer.Option("--arg", metavar="NAME=VALUE", rich_help_panel=WHAT,
                                           help="A plain value of one parameter (--arg dim=1).")] = [],  # noqa: B006
    # how to check
    atol: Annotated[str | None, typer.Option("--atol", metavar="X", rich_help_panel=HOW,
                                                help="Absolute tolerance (default per dtype).")] = None,
    rtol: Annotated[str | None, typer.Option("--rtol", metavar="X", rich_help_panel=HOW,
                                                help="Relative tolerance (default per dtype).")] = None,
    gradcheck: Annotated[str | None, typer.Option(
        "--gradcheck", metavar=_choices(GradcheckMode), rich_help_panel=HOW,
        help="torch's own gradcheck as a second opinion (default fast).")] = None,
    order: Annotated[str | None, typer.Option("--order", metavar="1|2", rich_help_panel=HOW,
                                                 help="2 also checks the double backward.")] = None,
    check_names: Annotated[list[str], typer.Option("--check", metavar="NAME", rich_help_panel=HOW,
                                                   help="Also run this optional check (repeatable).")] = [],  # noqa: B006,E501
    skip_check: Annotated[list[str], typer.Option("--skip-check", metavar="NAME", rich_help_panel=HOW,
                                                  help="Do not run this check (repeatable).")] = [],  # noqa: B006
    strict: Annotated[bool | None, typer.Option("--strict/--no-strict", metavar="", rich_help_panel=HOW, show_default=False,
                                                   help="Warnings (engine-repaired findings, entries not "
                                                   "judged) fail the run.")] = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", metavar=_choices(Mode), rich_help_panel=HOW,
        help="full: every Jacobian entry; fast: random projections; auto (default): full when estimated under 40 CPU s, else fast.")] = None,  # noqa: E501
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", rich_help_panel=HOW,
                                                      help="Memory budget, e.g. 512M (default) or 2G.")] = None,
    nondet_tol: Annotated[str | None, typer.Option("--nondet-tol", metavar="X", rich_help_panel=HOW,
                                                      help="Allowed difference between two identical backward "
                                                      "calls (default 0).")] = None,
    retries: Annotated[str | None, typer.Option("--retries", metavar="N", rich_help_panel=HOW,
                                                   help="Re-draws of inputs near a kink (default 2).")] = None,
    jobs: Annotated[str | None, typer.Option("-j", "--jobs", metavar="N", rich_help_panel=HOW,
                                                help="Worker processes (default 1).")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", metavar="SECONDS", rich_help_panel=HOW,
                                                   help="Stop and report a case that runs longer (default "
                                                   "120).")] = None,
    require_device: Annotated[bool | None, typer.Option(
        "--require-device/--no-require-device", metavar="", rich_help_panel=HOW, show_default=False,
        help="An unavailable device fails the run instead of being skipped.")] = None,
    # report
    output_format: Annotated[str | None, typer.Option(
        "--format", metavar="|".join(STDOUT_FORMATS), rich_help_panel=REPORT,
        help="The report on stdout (default rich; env GRADVERIFY_FORMAT).")] = None,
    output: Annotated[list[str], typer.Option(
        "--output", metavar="FORMAT:FILE", rich_help_panel=REPORT,
        help=f"Also write the report to FILE; FORMAT one of {', '.join(values(OutputFormat))} (or from the "
        "suffix). Repeatable.")] = [],  # noqa: B006
    html: Annotated[str | None, typer.Option("--html", metavar="FILE", rich_help_panel=REPORT,
                                                help="Same as --output html:FILE.")] = None,
    max_entries: Annotated[str | None, typer.Option("--max-entries", metavar="N", rich_help_panel=REPORT,
                                                       help="Mismatched entries shown per failing check (default "
                                                       "20).")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", metavar="", rich_help_panel=REPORT,
                                        help="Only failing cases and the counts.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", metavar="", rich_help_panel=REPORT,
                                          help="Also how each check decided.")] = False,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", metavar="", rich_help_panel=REPORT,
                                            help="Exit 0 even when checks fail (usage errors still exit "
                                            "2).")] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", rich_help_panel=REPORT,
                                        help="Show Python tracebacks for errors.")] = False,
    # hooks
    changed: Annotated[bool, typer.Option("--changed", metavar="", rich_help_panel=HOOKS,
                                          help="PATHS are changed files: check the specs among them and those "
                                          "covering them.")] = False,
    specs_in: Annotated[list[str], typer.Option("--specs-in", metavar="DIR", rich_help_panel=HOOKS,
                                                help="With --changed: look for covering specs only here.")] = [],  # noqa: B006,E501
    help: HelpFlag = False,
) -> int:
    """Verify the backward of every op in the spec files or folders PATH.

    PATH: spec files (.py, .yaml) or folders of them; default: `paths` in \\[tool.gradverify]
    of pyproject.toml.
    """
    from gradverify.commands.check import CheckArgs, run_check

    with _boundary():
        return run_check(CheckArgs(
            paths=list(paths or []), ops=op, shapes=shape, dtypes=dtype, devices=device, seed=seed, domains=domain,
            args=arg, checks=check_names, skip_checks=skip_check, strict=strict, atol=atol, rtol=rtol,
            gradcheck=gradcheck, order=order, mode=mode, max_memory=max_memory, nondet_tol=nondet_tol,
            retries=retries, jobs=jobs, timeout=timeout, require_device=require_device, output_format=output_format,
            outputs=output, html=html, max_entries=max_entries, quiet=quiet, verbose=verbose, exit_zero=exit_zero,
            changed=changed, specs_in=specs_in, debug=debug))


@app.command("list", add_help_option=False)
def list_command(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH", hidden=True)] = None,
    op: Annotated[list[str], typer.Option("--op", metavar="NAME", help="Only this op (repeatable).")] = [],  # noqa: B006
    shape: Annotated[list[str], typer.Option("--shape", metavar="S", help="As for check.")] = [],  # noqa: B006
    dtype: Annotated[list[str], typer.Option("--dtype", metavar="D", help="As for check.")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", metavar="D", help="As for check.")] = [],  # noqa: B006
    seed: Annotated[str | None, typer.Option("--seed", metavar="N", help="As for check.")] = None,
    require_device: Annotated[bool | None, typer.Option("--require-device/--no-require-device", metavar="",
                                                           show_default=False, help="As for check.")] = None,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show Python tracebacks for errors.")] = False,
) -> int:
    """List the ops in PATH, their inputs, and the cases and checks `check` would run.

    PATH: spec files or folders; default: `paths` in \\[tool.gradverify] of pyproject.toml.
    """
    from gradverify.commands.list_ops import run_list

    with _boundary():
        return run_list(paths or [], op, shape, dtype, device, seed, require_device)


@app.command("init", add_help_option=False)
def init_command(
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False, hidden=True)],
    kind: Annotated[str, typer.Option("--kind", metavar="python|yaml|both",
                                      help="python (NAME.py), yaml (NAME.yaml + the op in NAME.py) or both.")]
    = "python",
    help: HelpFlag = False,
) -> int:
    """Write a commented starter spec that passes as written; never overwrites a file.

    NAME: the spec to create, e.g. my_op or specs/my_op (NAME.py, NAME.yaml or both).
    """
    from gradverify.commands.init import run_init

    with _boundary():
        return run_init(name, kind)


def _usage_message(exc: click_errors.UsageError) -> str:
    """typer's usage errors in gradverify's one-line style (no box, no usage block)."""
    if isinstance(exc, click_errors.NoSuchOption):
        import difflib

        message = f"no such option {exc.option_name}"
        close = difflib.get_close_matches(exc.option_name, list(exc.possibilities or ()), n=1, cutoff=0.5)
        if close:
            message += f" (did you mean {close[0]}?)"
    else:
        message = exc.format_message().strip().rstrip(".")
        message = message[:1].lower() + message[1:]
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "gradverify"
    return f"{message} (see '{command} --help')"


def _run_app(argv: list[str]) -> int:
    try:
        result = app(args=argv, prog_name="gradverify", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n")
        return 0
    except click_errors.UsageError as exc:
        raise UsageError(_usage_message(exc)) from None
    except typer.Abort:
        raise Interrupted() from None
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """The entry point: console script (`sys.exit(main())`), `python -m gradverify`, and tests
    (`main(["check", ...])`). Returns the exit code; never raises."""
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    # torch without numpy installed warns at import; gradverify needs no numpy, and that line
    # would be the first thing on stderr before every one-line error.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    return guarded(lambda: _run_app(args), args)
