"""The `memsurgery` command line: the Typer app, its shared options and its error handling.

The commands themselves are in memsurgery/commands/, a module per command (or group):
each parses flags, calls one library function and renders its result. `main()` turns
every MemsurgeryError (and click usage errors) into a single line on stderr with exit
code 2 (bad input) or 1 (runtime failure); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

try:  # typer >= 0.2x vendors click; older releases use click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

_Abort = getattr(_click_exc, "Abort", None) or typer.Abort
_Exit = getattr(_click_exc, "Exit", None) or typer.Exit
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())

from memsurgery.commands import bench, convert, demo, export, graft, inspection, probe, train, version
from memsurgery.errors import InputError, MemsurgeryError, one_line

app = typer.Typer(
    name="memsurgery",
    help="Graft shared product-key memory layers into dense transformer checkpoints.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(help=bench.HELP, no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_STATE = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch (default: $MEMSURGERY_THREADS, else torch's default)."),
) -> None:
    _STATE["debug"] = debug or os.environ.get("MEMSURGERY_DEBUG") == "1"
    threads = threads or (int(os.environ["MEMSURGERY_THREADS"]) if os.environ.get("MEMSURGERY_THREADS") else None)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads {threads}: must be at least 1")
        import torch

        # On small shared VMs, torch's 2-thread pool can be slower than one thread
        # (measured here: SmolLM2 decode 17 vs 2.2 tok/s); let users choose.
        torch.set_num_threads(threads)
        os.environ["MEMSURGERY_THREADS"] = str(threads)  # child processes (bench children) use it too


# --------------------------------------------------------------------- commands
# Registered in the order `memsurgery --help` lists them; each lives in memsurgery/commands/.

app.command()(version.version)
app.command()(convert.convert)
app.command("inspect")(inspection.inspect_cmd)
app.command()(graft.graft)
app.command("fetch-demo")(demo.fetch_demo)
app.command()(demo.demo)
bench_app.command("kernels")(bench.kernels)
bench_app.command("throughput")(bench.throughput)
bench_app.command("layer")(bench.layer)
app.command()(train.train)
app.command()(probe.probe)
app.command("export")(export.export_cmd)


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
