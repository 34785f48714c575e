"""`memsurgery train RECIPE.yaml [--set key=value ...] [--resume] [--dry-run]` (docs/recipes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memsurgery.commands._common import emit_json


def train(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (YAML); see recipes/ and docs/recipes.md.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set train.steps=50 (value parsed as YAML); repeatable.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in output_dir from its last good checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate, resolve and print the plan; train nothing.")] = False,
    device: Annotated[str | None, typer.Option(
        "--device", help="Shorthand for --set train.device=...: auto (cuda when available), cpu or cuda "
                         "(default: the recipe's train.device, auto unless it says otherwise).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the summary (or the dry-run plan) as JSON.")] = False,
) -> None:
    """Train a grafted (or dense) checkpoint from a YAML recipe: memory, sparse_memory, full or lora."""
    import os

    from rich.console import Console

    from memsurgery.train import run

    # With --json, stdout carries only the JSON document; messages go to stderr.
    console = Console(stderr=json_out)

    def log(msg) -> None:
        console.print(str(msg), markup=False, highlight=False)

    overrides = list(set_ or []) + ([f"train.device={device}"] if device is not None else [])
    summary = run(recipe, overrides, resume=resume, dry_run=dry_run, log=log)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    if json_out:
        emit_json(summary)
    elif dry_run:
        _render_plan(console, summary["plan"])
    else:
        console.print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s "
                      f"(final loss {summary['final_loss']:.4f}"
                      + (f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else "")
                      + f"); model in {summary['final_dir']}", markup=False)


def _render_plan(console, plan: dict) -> None:
    from rich.table import Table

    d = plan["data"]
    console.print(f"model: {plan['model']} ({'grafted' if plan['grafted'] else 'dense'}), method {plan['method']}, "
                  f"{plan['device']} {plan['precision']}, {plan['world_size']} process(es)", markup=False)
    console.print(f"data: {d['train']} ({d['format']}): {d['train_sequences']} sequences, {d['train_tokens']:,} "
                  f"tokens, seq_len {d['seq_len']}, packing {d['packing']}; eval {d['eval_sequences']} sequences",
                  markup=False)
    if d.get("memory_positions", "all") != "all":
        console.print(f"memory acts only at the entity's tokens during training (data.memory_positions: "
                      f"{d['memory_positions']})",
                      markup=False)
    if d.get("views"):
        _render_views(console, d["views"])
    table = Table(title="parameters by group")
    for col in ("group", "params", "trainable", "lr", "weight decay", "optimizer"):
        table.add_column(col, justify="right")
    for g, r in plan["groups"].items():
        table.add_row(g, f"{r['params']:,}", f"{r['trainable']:,}", f"{r['lr']:g}", f"{r['weight_decay']:g}",
                      r["optimizer"] if r["trainable"] else "frozen")
    console.print(table)
    console.print(f"trainable {plan['trainable_params']:,} of {plan['total_params']:,} parameters; "
                  f"{plan['steps']} steps x {plan['sequences_per_step']} sequences "
                  f"(<= {plan['tokens_per_step_max']:,} tokens/step, <= {plan['tokens_total_max']:,} in all, "
                  f"{plan['epochs']} epochs)", markup=False)


def _render_views(console, v: dict) -> None:
    """What `format: facts` generated: counts per phrasing and one fact's wordings."""
    console.print(f"views: {v['facts']} facts of {v['entities']} entities -> {v['qa_pairs']} QA pairs, "
                  f"{v['documents']} documents", markup=False)
    console.print("  phrasings trained: " + ", ".join(f"{k} x{n}" for k, n in v["phrasings"].items()),
                  markup=False)
    ex = v["example"]
    console.print(f"  example fact: {ex['entity']} / {ex['relation']} -> {ex['answer']!r}", markup=False)
    for text in ex["trained"]:
        console.print(f"    trained:  {text!r}", markup=False)
    for text in ex["documents"]:
        console.print(f"    document: {text!r}", markup=False)
    for text in ex["held_out_never_trained"]:
        console.print(f"    held out: {text!r}  (never trained; the probe asks it)", markup=False)
