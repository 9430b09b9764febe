"""The command line: options -> settings -> run -> render -> exit code. Only this module imports typer."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from gradverify.report import EXIT_INTERNAL, EXIT_USAGE

app = typer.Typer(
    name="gradverify",
    help="Check the hand-written backward of custom torch.autograd Functions, entry by entry.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

FORMATS = ("rich", "plain", "json")


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"gradverify: error: {message}\n")
    raise typer.Exit(code)


@app.callback()
def _root() -> None:
    """gradverify: is your backward right, and if not, which Jacobian entries are wrong and why."""


@app.command()
def check(
    paths: List[Path] = typer.Argument(..., help="Spec files (.py) or folders of specs.", show_default=False),
    op: List[str] = typer.Option([], "--op", help="Check only this Function (repeatable)."),
    shape: List[str] = typer.Option([], "--shape", help="Shape of every tensor input ('2,3,3'), or one per "
                                    "input ('4,3;5,3;5'). Repeat to sweep."),
    dtype: List[str] = typer.Option([], "--dtype", help="float64 (default), float32, float16, bfloat16. "
                                    "Repeat to sweep."),
    device: List[str] = typer.Option([], "--device", help="cpu (default), cuda, cuda:N, mps. Repeat to sweep."),
    seed: int = typer.Option(0, "--seed", help="Seed for every input (reproducible)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Input values: any, positive, negative, "
                                         "nonzero, unit, probability."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default per dtype)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default per dtype)."),
    gradcheck: str = typer.Option("fast", "--gradcheck", help="torch's own gradcheck: fast, slow or off."),
    max_entries: int = typer.Option(20, "--max-entries", help="Mismatched entries shown per failing check."),
    nondet_tol: float = typer.Option(0.0, "--nondet-tol", help="Allowed difference between two identical "
                                     "backward calls."),
    output_format: Optional[str] = typer.Option(None, "--format", help="rich (default), plain or json."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """Verify the backward of every autograd Function in the given spec files."""
    from gradverify.cases import check_domain
    from gradverify.config import GRADCHECK_MODES, Settings, parse_dtype, parse_shape_set
    from gradverify.errors import GradverifyError

    try:
        fmt = (output_format or os.environ.get("GRADVERIFY_FORMAT") or "rich").lower()
        if fmt not in FORMATS:
            raise _usage(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if gradcheck not in GRADCHECK_MODES:
            raise _usage(f"--gradcheck {gradcheck!r}: expected one of {', '.join(GRADCHECK_MODES)}")
        settings = Settings(
            shapes=tuple(parse_shape_set(s) for s in shape),
            dtypes=tuple(parse_dtype(d) for d in dtype) or ("float64",),
            devices=tuple(d.strip() for d in device) or ("cpu",),
            seed=seed,
            domain=check_domain(domain) if domain else None,
            atol=atol,
            rtol=rtol,
            gradcheck=gradcheck,
            ops=tuple(op),
            max_entries=max_entries,
            nondet_tol=nondet_tol,
        )
        from gradverify.api import check_paths

        report = check_paths(paths, settings)
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

    sys.stdout.write(_render(report, fmt, settings.max_entries))
    raise typer.Exit(report.exit_code)


def _usage(message: str) -> Exception:
    from gradverify.errors import UsageError

    return UsageError(message)


def _render(report, fmt: str, max_entries: int) -> str:  # type: ignore[no-untyped-def]
    from gradverify.render import render_json, render_plain, render_rich

    if fmt == "json":
        return render_json(report)
    width = max(100, shutil.get_terminal_size((120, 40)).columns)
    if fmt == "plain":
        return render_plain(report, width=width, max_entries=max_entries)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return render_rich(report, color=color, width=width, max_entries=max_entries)


def main() -> None:
    """Console-script entry point; `python -m gradverify` calls the same."""
    try:
        app(prog_name="gradverify")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        if not isinstance(code, int):
            code = EXIT_USAGE
        sys.exit(code)
