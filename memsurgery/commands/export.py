"""`memsurgery export SRC OUT`: the merged checkpoint (or the memory alone, as an adapter) with its
reports, verified by a reload; optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memsurgery._vocab import DTYPES
from memsurgery.commands._common import device_option, dtype_option, emit_json


def export_cmd(
    src: str = typer.Argument(..., help="Grafted or dense HF directory, a train run directory (uses final/), "
                                        "a memory adapter, or a Hub id of one."),
    out: Path = typer.Argument(..., help="Output directory."),
    probe_report: Optional[List[Path]] = typer.Option(
        None, "--probe-report", "--report", help="Probe --out directory to copy into OUT/reports/ (repeatable)."),
    format: str = typer.Option("merged", "--format", help="merged (a full checkpoint) or memory-adapter (the "
                                                          "memory alone, over the unchanged base)."),
    dtype: str = dtype_option("float32", DTYPES, "Weight dtype written"),
    base: Optional[str] = typer.Option(None, "--base", help="The base checkpoint (path or Hub id): for "
                                                            "--format memory-adapter, or to merge an adapter SRC "
                                                            "(default: the one the graft recorded)."),
    no_check_base: bool = typer.Option(False, "--no-check-base", help="Accept a base whose weights' SHA-256 "
                                                                      "differs from the recorded one."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id for the model card's base_model "
                                                                        "(default: recorded by convert/graft)."),
    license: Optional[str] = typer.Option(None, "--license", help="Model card license (default: the base's "
                                                                  "when recorded, else other)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO",
                                              help="Upload OUT to this Hub repository (owner/name) when done."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard, e.g. 2GB or 500MB."),
    device: str = device_option("Where the verification runs the model"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the reload check (not advised)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print export.json (with the verification) as JSON."),
) -> None:
    """Write a standalone HF directory (or memory adapter) with reports, model card and SHA256SUMS; verify it."""
    from memsurgery.export import export

    # Progress on stdout (stderr carries only the one-line error); --json: stdout is the document alone.
    log = (lambda m: None) if json_out else (lambda m: print(m, flush=True))
    prov = export(src, out, probe_reports=probe_report or [], dtype=dtype, force=force, format=format,
                  max_shard_size=shard_size, verify=not no_verify, device=device, base=base,
                  check_base=not no_check_base, base_model=base_model, license=license,
                  push_to_hub=push_to_hub, private=private, log=log)
    if json_out:
        emit_json(prov)
        return
    v = prov.get("verification")
    what = "memory adapter" if prov["format"] == "memory-adapter" else ("grafted" if prov["grafted"] else "dense")
    print(f"exported {out} ({prov['dtype']}, {what})"
          + (f"; verified: {v['manifest_files']} files hashed, max |logit diff| {v['max_abs_logit_diff']:.2e}"
             if v else "; not verified")
          + (f"; pushed to {prov['hub']['url']}" if prov.get("hub") else ""))
