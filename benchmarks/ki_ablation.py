#!/usr/bin/env python
"""Knowledge-injection ablations through the library: one named run per setting, one table.

    python benchmarks/ki_ablation.py --run views-late --graft G --people 30 --seed 0 --steps 200
    python benchmarks/ki_ablation.py --run entity-mid --graft G-mid --set data.memory_positions=entity
    python benchmarks/ki_ablation.py --run base --model G          # probe only (the "before")
    python benchmarks/ki_ablation.py --table                       # every finished run, as markdown

A run trains `--recipe` (default recipes/knowledge-injection.yaml) on the structured facts
`builtin:people?n=N&seed=S` (the recipe's `data.format: facts` renders their training
views) with `memsurgery.train.run`, then probes the trained model with
`memsurgery.probe.api.run_probe`: each injected fact in `--probe-trained` trained and
`--probe-heldout` held-out phrasings, each never-trained look-alike's facts in
`--probe-unknown` held-out phrasings, `--world` known facts and `--ppl` held-out
perplexity tokens. Results: OUT/NAME/result.json (settings, metrics, timings); the
training run and the probe report sit beside it. Settings are chosen on seed 0; the
demo and benchmarks/knowledge_injection.py measure on seed 1.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEMSURGERY_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ki_ablation"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(args, run_dir: Path) -> dict:
    from memsurgery.train import run

    overrides = [f"model={args.graft}", f"output_dir={run_dir}",
                 f"data.train=builtin:people?n={args.people}&seed={args.seed}", f"train.steps={args.steps}",
                 f"checkpoint.every={args.steps}", "checkpoint.keep_last=1", "log.progress=off",
                 "eval.probe=null", *args.sets]
    t = time.perf_counter()
    summary = run(args.recipe, overrides=overrides, log=lambda m: log(f"train: {m}"))
    return dict(summary, wall_seconds=round(time.perf_counter() - t, 1), overrides=overrides)


def probe(args, model_dir: Path, out: Path) -> dict:
    from memsurgery.probe.api import run_probe

    people = (f"builtin:people?n={args.people}&seed={args.seed}&unknown={args.people}&phrasings=views"
              f"&train_per_fact={args.probe_trained}&heldout_per_fact={args.probe_heldout}"
              f"&unknown_per_fact={args.probe_unknown}")
    return run_probe(model_dir, facts=[people, f"builtin:world?limit={args.world}"], out=out, force=True,
                     ppl_tokens=args.ppl, residual_layer=args.residual_layer,
                     log=lambda m: log(f"probe: {m}"))


def metrics(report: dict) -> dict:
    """The numbers of one probe report that the ablation table shows."""
    from memsurgery.probe.knowledge import knowledge_numbers

    out = knowledge_numbers(report)
    sig = report.get("signals") or {}
    if sig:
        q = {n: s.get("auroc_questions") for n, s in sig["signals"].items() if s.get("auroc_questions") is not None}
        out["signal"] = sig["primary"]
        out["signal_auroc_questions"] = q.get(sig["primary"])
        best = max(q.items(), key=lambda kv: kv[1], default=(None, None))
        out["best_signal"], out["best_signal_auroc_questions"] = best
        ab = sig.get("abstention_questions") or {}
        out["abstain_wrong_after"] = ab.get("unknown_attempted_wrong_after")
        out["abstain_kept"] = ab.get("injected_correct_kept")
    rp = (report.get("residual_probe") or {}).get("questions") or {}
    out["linear_probe_auroc_questions"] = rp.get("auroc")
    return out


def run_one(args) -> dict:
    out = args.out / args.run
    out.mkdir(parents=True, exist_ok=True)
    summary = None
    model_dir = args.model
    if model_dir is None:
        summary = train(args, out / "train")
        model_dir = summary["final_dir"]
    t = time.perf_counter()
    report = probe(args, Path(model_dir), out / "probe")
    res = {"run": args.run, "graft": str(args.graft), "model": str(model_dir), "people": args.people,
           "seed": args.seed, "steps": args.steps if summary else None, "sets": args.sets,
           "recipe": str(args.recipe), "metrics": metrics(report), "probe_seconds": round(time.perf_counter() - t, 1),
           "train": None if summary is None else {k: summary.get(k) for k in (
               "seconds", "wall_seconds", "tokens", "tokens_per_s", "final_loss", "trainable_params")}}
    (out / "result.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def table(out: Path) -> str:
    rows = ["| run | settings | steps | reliability | generalization (questions / completions) | known | ppl "
            "| unknown q. wrong → abstaining (kept) | signal AUROC q. (best) | linear probe AUROC q. | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*/result.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(path.read_text(encoding="utf-8"))
        m = r["metrics"]
        settings = "; ".join(s for s in r["sets"]) or "recipe as is"
        settings = f"{Path(r['graft']).name if r['graft'] else ''}: {settings}"
        best = (f" ({m['best_signal']} {_num(m['best_signal_auroc_questions'])})"
                if m.get("best_signal") and m.get("best_signal") != m.get("signal") else "")
        rows.append(
            f"| {r['run']} | {settings} | {r['steps'] or '–'} | {_pct(m['reliability'])} "
            f"| {_pct(m['generalization'])} ({_pct(m['generalization_questions'])} / "
            f"{_pct(m['generalization_completions'])}) | {_pct(m['known'])} | {_num(m['perplexity'])} "
            f"| {_pct(m['unknown_attempted_wrong_questions'])} → {_pct(m.get('abstain_wrong_after'))} "
            f"({_pct(m.get('abstain_kept'))}) | {_num(m.get('signal_auroc_questions'))}{best} "
            f"| {_num(m.get('linear_probe_auroc_questions'))} "
            f"| {_num((r['train'] or {}).get('seconds'), '{:.0f}')} |")
    return "\n".join(rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="name of the run (a folder in --out)")
    ap.add_argument("--table", action="store_true", help="print the table of every finished run and exit")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--graft", type=Path, help="grafted model to train (parallel mode)")
    ap.add_argument("--model", type=Path, help="probe this model only (no training)")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "knowledge-injection.yaml")
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="people generator seed (0: the ablation seed)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override (repeatable)")
    ap.add_argument("--world", type=int, default=100, help="builtin:world known facts probed")
    ap.add_argument("--ppl", type=int, default=2048, help="held-out perplexity tokens")
    ap.add_argument("--probe-trained", type=int, default=1)
    ap.add_argument("--probe-heldout", type=int, default=5)
    ap.add_argument("--probe-unknown", type=int, default=2)
    ap.add_argument("--residual-layer", default="auto", help="decoder layer of the linear probe (auto: first memory layer)")
    args = ap.parse_args(argv)
    if not args.table and not args.run:
        ap.error("give --run NAME (with --graft or --model) or --table")
    if args.run and not (args.graft or args.model):
        ap.error("--run needs --graft (train, then probe) or --model (probe only)")
    if args.residual_layer != "auto":
        args.residual_layer = int(args.residual_layer)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    import torch

    torch.set_num_threads(int(os.environ["MEMSURGERY_THREADS"]))
    res = run_one(args)
    log(json.dumps(res["metrics"], indent=1))


if __name__ == "__main__":
    main()
