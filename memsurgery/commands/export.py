"""`memsurgery export SRC OUT`: the merged checkpoint with its reports, verified by a clean reload."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from memsurgery.commands._common import emit_json


def export_cmd(
    src: Path = typer.Argument(..., help="Grafted or dense HF directory, or a train run directory (uses final/)."),
    out: Path = typer.Argument(..., help="Output directory."),
    probe_report: Optional[List[Path]] = typer.Option(
        None, "--probe-report", "--report", help="Probe --out directory to copy into OUT/reports/ (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (fp32) or bfloat16 (bf16)."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard, e.g. 2GB or 500MB."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the clean-process reload check (not advised)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print export.json (with the verification) as JSON."),
) -> None:
    """Write a standalone HF directory with reports, model card and SHA256SUMS; verify it by reloading."""
    from memsurgery.export import export

    log = (lambda m: None) if json_out else (lambda m: sys.stderr.write(m + "\n"))
    prov = export(src, out, probe_reports=probe_report or [], dtype=dtype, force=force,
                  max_shard_size=shard_size, verify=not no_verify, log=log)
    if json_out:
        emit_json(prov)
    else:
        v = prov.get("verification")
        print(f"exported {out} ({prov['dtype']}, {'grafted' if prov['grafted'] else 'dense'})"
              + (f"; verified: {v['manifest_files']} files hashed, max |logit diff| {v['max_abs_logit_diff']:.2e}"
                 if v else "; not verified"))
