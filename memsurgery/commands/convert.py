"""`memsurgery convert SRC OUT`: any readable checkpoint -> a Hugging Face directory (docs/cli.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from memsurgery._vocab import DTYPES
from memsurgery.commands._common import allow_pickle_option, console, dtype_option, emit_json, progress


def convert(
    src: Path = typer.Argument(..., help="GGUF file, HF directory, or .safetensors file beside a config.json."),
    out: Path = typer.Argument(..., help="Output directory (must not exist or be empty unless --force)."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard, e.g. 2GB, 500MB."),
    dtype: str = dtype_option("float32", DTYPES, "Weight dtype written"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    allow_pickle: bool = allow_pickle_option(),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    """Convert a checkpoint (GGUF or safetensors) into a standard Hugging Face directory."""
    from memsurgery.checkpoint.convert import convert_checkpoint

    # Progress goes to stdout so that stderr carries nothing but the one-line error.
    report = convert_checkpoint(src, out, shard_size=shard_size, dtype=dtype, force=force,
                                allow_pickle=allow_pickle, log=progress(json_out))
    if json_out:
        emit_json(report)
    else:
        console().print(f"[green]converted[/] {report['source']} -> {report['out']} "
                        f"({len(report['files'])} files, {report['total_seconds']} s)")
