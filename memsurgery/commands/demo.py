"""`memsurgery fetch-demo` (the demo checkpoint, downloaded once) and `memsurgery demo` (the main job)."""

from __future__ import annotations

from pathlib import Path
import typer

# memsurgery.demo is light to import (torch comes in stage by stage): its sizes give the help text.
from memsurgery import demo as _demo
from memsurgery.commands._common import console, emit_json


def fetch_demo() -> None:
    """Download (once) and verify the demo checkpoint, SmolLM2-135M-Instruct GGUF; print its path."""
    from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

    print(fetch_demo_checkpoint(log=console().print))


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for everything the demo writes."),
    people: int = typer.Option(_demo.DEMO_PEOPLE, "--people", help="Fictional people to teach (6 facts each)."),
    steps: int = typer.Option(_demo.DEMO_STEPS, "--steps", help="Training steps."),
    world_limit: int = typer.Option(_demo.DEMO_WORLD_LIMIT, "--world-limit", help="Real-world facts probed."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the demo's result (summary, timings, output paths) as JSON on stdout; "
                              "progress goes to stderr."),
) -> None:
    """The main job: fetch SmolLM2-135M -> convert -> inspect -> graft -> train -> probe -> export."""
    from rich.console import Console

    # With --json, stdout carries only the JSON document: every stage prints to stderr.
    screen = Console(stderr=True) if json_out else console()
    result = _demo.run_demo(out, console=screen, people=people, steps=steps, world_limit=world_limit)
    if json_out:
        emit_json({k: result[k] for k in ("summary", "timings", "hf_dir", "probe_dir", "export_dir")})
