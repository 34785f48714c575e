"""`memsurgery inspect CKPT`: what a checkpoint is and what a graft would cost, from headers (docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memsurgery.commands._common import allow_pickle_option, console, emit_json, parse_layers, slots_text
from memsurgery.graft.defaults import DEFAULTS as D


def inspect_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint: HF directory, .safetensors file or .gguf file."),
    json_out: bool = typer.Option(False, "--json", help="Print the stable JSON report (docs/cli.md)."),
    slots: str = typer.Option(slots_text(D["slots"]), "--slots", help="Proposed memory slots (perfect square), e.g. 64K, 1M; graft's default."),
    heads: int = typer.Option(D["heads"], "--heads", help="Proposed memory heads."),
    knn: int = typer.Option(D["knn"], "--knn", help="Proposed top-k per head."),
    k_dim: int = typer.Option(D["k_dim"], "--k-dim", help="Proposed key dimension (even)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Proposed layers, e.g. 8,16,24 (default: 3 evenly spaced)."),
    allow_pickle: bool = allow_pickle_option(),
    trace: Optional[str] = typer.Option(None, "--trace", help="Also run causal tracing (loads the weights): a fact JSONL, or 'builtin'; prints the per-layer profile that graft --layers auto uses."),
) -> None:
    """Describe a checkpoint without loading its weights, plus a graft estimate."""
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.inspection import GraftProposal, inspect_checkpoint, parse_slots, render_inspect

    layer_list = parse_layers(layers)
    proposal = GraftProposal(slots=parse_slots(slots), heads=heads, knn=knn, k_dim=k_dim, layers=layer_list)
    src = open_checkpoint(ckpt, allow_pickle=allow_pickle)
    report = inspect_checkpoint(src, proposal)
    if trace is not None:
        from memsurgery.inspection.trace import trace_checkpoint

        report["trace"] = trace_checkpoint(src, trace, log=None if json_out else console().print)
    if json_out:
        emit_json(report)
    else:
        render_inspect(report, console())
        if trace is not None:
            from memsurgery.inspection.trace import render_trace

            render_trace(report["trace"], console(), chosen=report["trace"]["chosen"])
