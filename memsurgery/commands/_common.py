"""What the CLI commands share: console and JSON output, the --layers parser, common options.

Kept free of heavy imports: `memsurgery --help` imports every command module.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from memsurgery.errors import InputError


def console():
    """A rich console on stdout (progress goes to stdout: stderr carries only the error)."""
    from rich.console import Console

    return Console()


def progress(json_out: bool):
    """The `log` callback of a library call: the console, or silence when stdout carries JSON."""
    return (lambda m: None) if json_out else console().print


def emit_json(obj, default=str) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=default) + "\n")


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    """'8,16,24' -> [8, 16, 24]; empty or None -> None (the library's default layers)."""
    if text is None or text.strip() == "":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated layer numbers, e.g. 8,16,24") from None


def allow_pickle_option():
    return typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin inputs (pickle).")


def quick_option():
    return typer.Option(False, "--quick", help="Tiny sizes (seconds), for smoke tests.")


def device_option(what: str = "Where the model runs"):
    from memsurgery._vocab import DEFAULT_DEVICE

    return typer.Option(DEFAULT_DEVICE, "--device", help=f"{what}: auto (cuda when available), cpu or cuda.")


def dtype_option(default: str, allowed: tuple[str, ...], what: str):
    """--dtype with its canonical names; the aliases fp32/bf16/fp16 are accepted too."""
    return typer.Option(default, "--dtype", help=f"{what}: {', '.join(allowed)} (fp32/bf16/fp16 accepted).")


def slots_text(n: int) -> str:
    """1048576 -> '1M', 65536 -> '64K': a slot count the way --slots is written."""
    for suffix, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)
