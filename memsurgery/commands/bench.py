"""`memsurgery bench kernels|throughput|layer`: the benchmarks of memsurgery/bench/ (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memsurgery.commands._common import (
    console,
    device_option,
    emit_json,
    parse_layers,
    progress,
    quick_option,
    slots_text,
)
from memsurgery.graft.defaults import DEFAULTS as D

HELP = "Benchmarks (timings are ratios measured side by side in one run)."


def kernels(
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = quick_option(),
    device: str = device_option("Where the kernels run"),
) -> None:
    """Embedding-bag forward/backward: ours vs torch.nn.functional.embedding_bag, GB/s side by side."""
    from memsurgery.bench.kernels import run_kernel_bench

    # run_kernel_bench prints its own table, or the JSON document with json_out.
    run_kernel_bench(device=device, json_out=json_out, quick=quick)


def throughput(
    ckpt: Optional[Path] = typer.Argument(None, help="Dense checkpoint (default: the demo SmolLM2)."),
    slots: str = typer.Option(slots_text(D["slots"]), "--slots", help="Memory slots of the grafts measured."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Memory layers (default 3 evenly spaced)."),
    reps: int = typer.Option(3, "--reps", help="Timed repetitions per model."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = quick_option(),
) -> None:
    """Tokens/s of grafted (parallel, replace) vs base: batch-1 decode and 8x256 prefill, one run."""
    from memsurgery.bench.throughput import render, run_throughput_bench
    from memsurgery.memory import parse_slots

    result = run_throughput_bench(ckpt, slots=parse_slots(slots), layers=parse_layers(layers), reps=reps,
                                  quick=quick, log=progress(json_out))
    if json_out:
        emit_json(result)
    else:
        render(result, console())


def layer(
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = quick_option(),
) -> None:
    """One memory layer's step (fwd+bwd+sparse optimizer) at small vs large tables: time ratio, peak RSS."""
    from memsurgery.bench.layer import run_layer_bench

    run_layer_bench(json_out=json_out, quick=quick)  # prints a table, or the JSON with json_out
