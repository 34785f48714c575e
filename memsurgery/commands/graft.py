"""`memsurgery graft CKPT OUT`: add a shared product-key memory to a dense checkpoint (docs/graft.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memsurgery.graft.defaults import DEFAULTS as D
from memsurgery.commands._common import allow_pickle_option, console, device_option, emit_json, progress, slots_text


def graft(
    ckpt: Path = typer.Argument(..., help="Dense source checkpoint (HF directory, .safetensors or .gguf)."),
    out: Path = typer.Argument(..., help="Output directory for the grafted checkpoint."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="graft.yaml with the same fields; flags override it."),
    layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 8,16,24, 'auto' (causal tracing) or 'default' (3 evenly spaced)."),
    slots: Optional[str] = typer.Option(None, "--slots", help=f"Memory slots, a perfect square: 64K, 1M (default {slots_text(D['slots'])})."),
    heads: Optional[int] = typer.Option(None, "--heads", help=f"Memory heads (default {D['heads']})."),
    knn: Optional[int] = typer.Option(None, "--knn", help=f"Slots read per head per token (default {D['knn']})."),
    k_dim: Optional[int] = typer.Option(None, "--k-dim", help=f"Query/key dimension, even (default {D['k_dim']})."),
    mode: Optional[str] = typer.Option(None, "--mode", help=f"parallel (beside the FFN) or replace (instead of it) (default {D['mode']})."),
    keys: Optional[str] = typer.Option(None, "--keys", help=f"faiss (k-means on activations) or random (default {D['keys']})."),
    query_init: Optional[str] = typer.Option(None, "--query-init", help=f"pca, orthogonal or random (default {D['query_init']})."),
    values: Optional[str] = typer.Option(None, "--values", help="zero | random | distill (default: zero for parallel, distill for replace)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="relevance | none (default: relevance for parallel, none for replace)."),
    value_dtype: Optional[str] = typer.Option(None, "--value-dtype", help=f"Value table dtype: float32 or bfloat16, fp32/bf16 accepted (default {D['value_dtype']})."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: .txt/.jsonl/.parquet (default: bundled general English)."),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help=f"Calibration tokens for key init (default {D['calib_tokens']})."),
    heldout_tokens: Optional[int] = typer.Option(None, "--heldout-tokens", help=f"Held-out tokens for usage stats and checks (default {D['heldout_tokens']})."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help=f"Joint optimizer steps over the replaced layers for --values distill (default {D['distill_steps']})."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Fact JSONL for --layers auto (default: bundled facts)."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Random seed (default {D['seed']})."),
    device: str = device_option("Where activations are captured and the graft checked"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT; skip the RAM check."),
    allow_pickle: bool = allow_pickle_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the graft report as JSON."),
) -> None:
    """Graft a shared product-key memory into a dense checkpoint (docs/graft.md)."""
    from memsurgery.graft.api import graft as run_graft
    from memsurgery.graft.plan import load_plan_file

    fields = load_plan_file(plan_file) if plan_file else {}
    flags = dict(layers=layers, slots=slots, heads=heads, knn=knn, k_dim=k_dim, mode=mode, keys=keys,
                 query_init=query_init, values=values, gate=gate, value_dtype=value_dtype, calib=calib,
                 calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, distill_steps=distill_steps,
                 trace_facts=trace, seed=seed)
    fields.update({k: v for k, v in flags.items() if v is not None})
    _, report = run_graft(ckpt, out, plan=fields, force=force, allow_pickle=allow_pickle, device=device,
                          log=progress(json_out))
    if json_out:
        emit_json(report)
    else:
        _render_graft(report)


def _render_graft(report: dict) -> None:
    from rich.table import Table

    out = console()
    table = Table(title="slot usage on held-out tokens (random vs faiss keys)")
    for col in ("layer", "random % used", "faiss % used", "random KL", "faiss KL", "faiss gini"):
        table.add_column(col, justify="right")
    for layer, u in report["usage"].items():
        r, f = u["random"], u.get("faiss")
        table.add_row(layer, f"{r['pct_used']:.2f}", f"{f['pct_used']:.2f}" if f else "-",
                      f"{r['kl_uniform_count']:.3f}", f"{f['kl_uniform_count']:.3f}" if f else "-",
                      f"{f['gini_count']:.3f}" if f else "-")
    out.print(table)
    out.print(f"check: {report['check']}")
    out.print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items()))
