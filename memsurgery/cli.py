"""The `memsurgery` command line: a Typer app whose commands are thin wrappers.

Each command parses flags, calls one library function and renders its result.
`main()` turns every MemsurgeryError (and click usage errors) into a single
line on stderr with exit code 2 (bad input) or 1 (runtime failure); `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.2x vendors click; older releases use click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

_Abort = getattr(_click_exc, "Abort", None) or typer.Abort
_Exit = getattr(_click_exc, "Exit", None) or typer.Exit
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())

from memsurgery.errors import InputError, MemsurgeryError, one_line

app = typer.Typer(
    name="memsurgery",
    help="Graft shared product-key memory layers into dense transformer checkpoints.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(help="Benchmarks (timings are ratios measured side by side in one run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_STATE = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _STATE["debug"] = debug or os.environ.get("MEMSURGERY_DEBUG") == "1"


def _console():
    from rich.console import Console

    return Console()


def _emit_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------- commands


@app.command()
def version() -> None:
    """Print the memsurgery version."""
    from memsurgery import __version__

    print(__version__)


# ------------------------------------------------------------------------ entry


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point with one-line errors and exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEMSURGERY_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="memsurgery", standalone_mode=False)
    except MemsurgeryError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(str(err))}\n")
        sys.exit(err.exit_code)
    except _Exit as err:
        sys.exit(getattr(err, "exit_code", 0))
    except _Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(1)
    except _NoArgsIsHelp as err:  # bare group: show its help, usage exit code
        ctx = getattr(err, "ctx", None)
        sys.stderr.write((ctx.get_help() if ctx else "see memsurgery --help") + "\n")
        sys.exit(2)
    except _click_exc.ClickException as err:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(err.format_message())} (see memsurgery --help)\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; no output was written\n")
        sys.exit(130)
    except MemoryError:
        if debug:
            raise
        sys.stderr.write("error: out of memory; use a smaller configuration\n")
        sys.exit(1)
    except Exception as err:  # an unexpected bug: still one line unless --debug
        if debug:
            raise
        sys.stderr.write(
            f"error: internal error: {type(err).__name__}: {one_line(str(err))} "
            "(rerun with --debug for the traceback)\n"
        )
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
