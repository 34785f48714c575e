"""`memsurgery fetch-demo` (the demo checkpoint, downloaded once) and `memsurgery demo` (the main job)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memsurgery.commands._common import console


def fetch_demo() -> None:
    """Download (once) and verify the demo checkpoint, SmolLM2-135M-Instruct GGUF; print its path."""
    from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

    print(fetch_demo_checkpoint(log=console().print))


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for everything the demo writes."),
    people: Optional[int] = typer.Option(None, "--people", help="Fictional people to teach (6 facts each; default 20)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default 150)."),
    world_limit: Optional[int] = typer.Option(None, "--world-limit", help="Real-world facts probed (default 200)."),
    json_out: bool = typer.Option(False, "--json", help="Print the inspect report as JSON."),
) -> None:
    """The main job: fetch SmolLM2-135M -> convert -> inspect -> graft -> train -> probe -> export."""
    from memsurgery.demo import run_demo

    run_demo(out, console=console(), json_out=json_out, people=people, steps=steps, world_limit=world_limit)
