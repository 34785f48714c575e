"""`memsurgery probe CKPT`: fact-set reports on a checkpoint (definitions and outputs: docs/probe.md).

A thin wrapper: parse flags, call memsurgery.probe.api.run_probe (or api.explain for
--explain), print a short summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memsurgery._vocab import DTYPES
from memsurgery.commands._common import device_option, dtype_option, emit_json


def _print(msg: str) -> None:
    # Progress on stdout: stderr carries only the one-line error (docs/cli.md).
    print(msg, flush=True)


def _summary_lines(report: dict) -> list[str]:
    lines = []
    for tmpl, summ in report["summary"].items():
        base = (report.get("baseline") or {}).get("summary", {}).get(tmpl)
        for group in ("kinds", "relations"):
            for key, m in summ[group].items():
                em = m["exact_match"]
                line = f"[{tmpl}] {key:<32} n={m['n']:<5} EM {100 * em:5.1f}%  F1 {m['f1']:.3f}"
                if base and key in base[group]:
                    b = base[group][key]["exact_match"]
                    line += f"  baseline {100 * b:5.1f}%  delta {100 * (em - b):+5.1f} pt"
                lines.append(line)
    h = report["hallucination"]
    if h.get("n"):
        lines.append(f"unknown items: attempted {100 * h['attempted']:.1f}%, hallucinated {100 * h['incorrect']:.1f}%, "
                     f"abstained {100 * h['not_attempted']:.1f}%")
    cal = report["calibration"]
    if cal["ece"] is not None:
        au = cal["selective_auroc"]
        lines.append(f"calibration: ECE {cal['ece']:.3f}, selective AUROC {'n/a' if au is None else f'{au:.3f}'}")
    sig = report.get("signals")
    if sig:
        for name, v in sig["signals"].items():
            if "@" not in name and v["auroc_injected_vs_unknown"] is not None:
                lines.append(f"signal {name}: AUROC injected vs unknown {v['auroc_injected_vs_unknown']:.3f}")
        ab = sig["abstention"]
        if ab.get("threshold") is not None:
            lines.append(f"memory abstention ({ab['signal']} >= {ab['threshold']:.4g}): unknown attempted-wrong "
                         f"{100 * ab['unknown_attempted_wrong_before']:.1f}% -> "
                         f"{100 * ab['unknown_attempted_wrong_after']:.1f}%")
    if report.get("retention"):
        lines.append(f"held-out perplexity {report['retention']['perplexity']:.3f}")
    from memsurgery.probe.sections import lm_eval_rows

    for task, metric, value, base in lm_eval_rows(report):
        lines.append(f"lm-eval {task} {metric}: {value}" + (f" (baseline {base})" if base else ""))
    return lines


def probe(
    ckpt: Path = typer.Argument(..., help="Checkpoint: grafted or dense HF dir, train run dir, or .gguf."),
    facts: Optional[List[str]] = typer.Option(
        None, "--facts", help="Fact set: builtin:world, builtin:people[?n=20&seed=0&unknown=20&paraphrases=3], "
                              "or a JSONL path; repeatable (default builtin:world)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Second checkpoint, reported side by side with deltas."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write report.json, samples.jsonl, report.md, report.html here."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per fact set (round-robin over kind/relation)."),
    device: str = device_option(),
    dtype: str = dtype_option("float32", DTYPES, "Weights and activations while probing"),
    template: str = typer.Option("auto", "--template", help="qa, completion, both, or auto (completion when a prompt exists)."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", help="Greedy tokens per answer."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per batch (decoding is memory-bound on CPU: larger batches read the weights fewer times)."),
    ppl_tokens: int = typer.Option(4096, "--ppl-tokens", help="Held-out tokens for perplexity (0 = skip)."),
    signal: Optional[str] = typer.Option(None, "--signal", help="Memory signal for the abstention policy (default out_norm_entity_first)."),
    explain_text: Optional[str] = typer.Option(None, "--explain", help="List the slots each memory layer reads for this question, then exit."),
    lm_eval_tasks: Optional[str] = typer.Option(
        None, "--lm-eval-tasks", metavar="TASKS", help="Also run these lm-evaluation-harness tasks (comma-separated) "
                                                       "on the model (and the baseline), in this process."),
    lm_eval_include: Optional[Path] = typer.Option(
        None, "--lm-eval-include", help="Directory of local lm-eval task YAMLs (offline machines)."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="At most N documents per lm-eval task."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the report (or --explain result) as JSON."),
) -> None:
    """Probe facts, hallucination, calibration, memory signals and retention (docs/probe.md)."""
    from memsurgery.errors import InputError
    from memsurgery.probe import api

    if max_new_tokens < 1 or batch_size < 1 or ppl_tokens < 0:
        raise InputError("--max-new-tokens and --batch-size must be >= 1, --ppl-tokens >= 0")
    if explain_text is not None:
        from memsurgery._vocab import torch_dtype

        model, tok, _ = api.load_model(ckpt, device=device, dtype=torch_dtype(dtype))
        res = api.explain(model, tok, explain_text)
        if json_out:
            emit_json(res, default=None)
        else:
            _print_explain(res)
        return
    report = api.run_probe(ckpt, facts=facts or ["builtin:world"], baseline=baseline, out=out, limit=limit,
                           device=device, template=template, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, ppl_tokens=ppl_tokens, primary_signal=signal,
                           force=force, dtype=dtype, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include,
                           lm_eval_limit=lm_eval_limit, log=(lambda m: None) if json_out else _print)
    if json_out:
        from memsurgery.probe.report import _clean

        emit_json(_clean(report), default=None)
    else:
        print("\n".join(_summary_lines(report)))
        if out is not None:
            print(f"reports in {out}/ (report.html, report.md, report.json, samples.jsonl)")


def _print_explain(res: dict) -> None:
    print(f"prompt: {res['prompt']!r} -> {res['generation']!r} (log-prob {res['logprob_sum']:.2f})")
    for L, info in res["layers"].items():
        gate = "n/a" if info["gate"] is None else f"{info['gate']:.4f}"
        print(f"layer {L}: gate {gate}")
        for r in info["slots"]:
            print(f"  slot {r['slot']:>8}  head {r['head']}  score {r['score']:+.4f}  weight {r['weight']:.4f}"
                  f"{'  written' if r['written'] else ''}")
