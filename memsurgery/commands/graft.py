"""`memsurgery graft CKPT OUT`: add a shared product-key memory to a dense checkpoint (docs/graft.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memsurgery.commands._common import allow_pickle_option, console, emit_json, progress


def graft(
    ckpt: Path = typer.Argument(..., help="Dense source checkpoint (HF directory, .safetensors or .gguf)."),
    out: Path = typer.Argument(..., help="Output directory for the grafted checkpoint."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="graft.yaml with the same fields; flags override it."),
    layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 8,16,24, 'auto' (causal tracing) or 'default' (3 evenly spaced)."),
    slots: Optional[str] = typer.Option(None, "--slots", help="Memory slots, a perfect square: 64K, 1M (default 1M)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Memory heads (default 4)."),
    knn: Optional[int] = typer.Option(None, "--knn", help="Slots read per head per token (default 32)."),
    k_dim: Optional[int] = typer.Option(None, "--k-dim", help="Query/key dimension, even (default 256)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="parallel (beside the FFN, default) or replace (instead of it)."),
    keys: Optional[str] = typer.Option(None, "--keys", help="faiss (k-means on activations, default) or random."),
    query_init: Optional[str] = typer.Option(None, "--query-init", help="pca (default), orthogonal or random."),
    values: Optional[str] = typer.Option(None, "--values", help="zero | random | distill (default: zero for parallel, distill for replace)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="relevance | none (default: relevance for parallel, none for replace)."),
    value_dtype: Optional[str] = typer.Option(None, "--value-dtype", help="float32 (default) or bfloat16 value table."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: .txt/.jsonl/.parquet (default: bundled general English)."),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help="Calibration tokens for key init (default 32768)."),
    heldout_tokens: Optional[int] = typer.Option(None, "--heldout-tokens", help="Held-out tokens for usage stats and checks (default 16384)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="Joint optimizer steps over the replaced layers for --values distill (default 150)."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Fact JSONL for --layers auto (default: bundled facts)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
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
    _, report = run_graft(ckpt, out, plan=fields, force=force, allow_pickle=allow_pickle,
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
