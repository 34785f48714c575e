"""Training fast paths, side by side: plain forwards vs logits at the target positions
vs that plus the frozen-prefix cache (memsurgery/train/fastpath.py).

Each variant trains the shipped recipe from the same start for the same steps in
this one process, so the ratios compare like with like on this machine. Reported
per variant: loop seconds, tokens/s, setup seconds (loading, data, cache build),
and the largest per-step loss difference from the plain run (the fast paths change
float rounding only). Writes results.json and results.md to --out.

    python benchmarks/train_fastpath.py --out bench-results/train-fastpath
    python benchmarks/train_fastpath.py --tiny --out /tmp/fp     # structure only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("MEMSURGERY_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# (name, recipe, method needs a graft, logits at targets, prefix cache)
VARIANTS = [
    ("memory / plain", "knowledge-injection.yaml", True, False, False),
    ("memory / logits at targets", "knowledge-injection.yaml", True, True, False),
    ("memory / logits at targets + prefix cache", "knowledge-injection.yaml", True, True, True),
    ("full / plain", "full-finetune.yaml", False, False, False),
    ("full / logits at targets", "full-finetune.yaml", False, True, False),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_variant(recipe: Path, overrides: list[str], at_targets: bool, cache: bool) -> dict:
    from memsurgery.train import loop, run

    real = loop.keeps_logits
    if not at_targets:
        loop.keeps_logits = lambda model: False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            s = run(recipe, overrides=overrides + [f"output_dir={tmp}/run", f"train.prefix_cache={cache}"],
                    log=lambda m: None)
            wall = time.perf_counter() - t
            plan = json.loads((Path(s["run_dir"]) / "plan.json").read_text(encoding="utf-8"))
    finally:
        loop.keeps_logits = real
    if cache and not plan["prefix_cache"]["enabled"]:
        raise SystemExit(f"the prefix cache did not apply ({plan['prefix_cache']['why_not']}); raise --steps")
    return {"losses": s["losses"], "loop_seconds": s["seconds"], "setup_seconds": round(wall - s["seconds"], 2),
            "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"], "prefix_cache": plan["prefix_cache"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30, help="steps per memory variant (the cache needs each "
                                                          "sequence read twice: 30 x 16 >= 2 x 144 training views)")
    ap.add_argument("--people", type=int, default=3, help="fictional people trained on (6 facts x 8 training "
                                                          "views each)")
    ap.add_argument("--full-steps", type=int, default=20, help="steps per full-finetuning variant")
    ap.add_argument("--base", default="demo-out/smollm2-135m", help="dense model directory")
    ap.add_argument("--graft", default="demo-out/smollm2-135m-memory", help="its parallel graft")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama and graft (numbers meaningless)")
    args = ap.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    base, graft = Path(args.base), Path(args.graft)
    extra: list[str] = ["log.progress=off", "eval.probe=null", f"data.train=builtin:people?n={args.people}&seed=1"]
    if args.tiny:
        from knowledge_injection import (  # this folder's sibling script
            TINY_TRAIN_OVERRIDES,
            build_tiny_base,
        )

        from memsurgery.graft import graft as do_graft

        base = build_tiny_base(out / "tiny-base")
        graft = out / "tiny-graft"
        if not (graft / "graft.json").is_file():
            do_graft(base, graft, plan={"layers": [1], "slots": 256, "heads": 2, "knn": 4, "k_dim": 16,
                                        "calib_tokens": 512, "heldout_tokens": 256, "seq_len": 32,
                                        "kmeans_iters": 3})
        extra += TINY_TRAIN_OVERRIDES
    for p in (base, graft):
        if not (p / "config.json").is_file():
            raise SystemExit(f"{p}: no model directory (run `make demo` first, or give --base/--graft)")

    results = {}
    for name, recipe, grafted, at_targets, cache in VARIANTS:
        steps = args.steps if grafted else args.full_steps
        over = [f"model={(graft if grafted else base).absolute()}", f"train.steps={steps}",
                f"checkpoint.every={steps}", "checkpoint.keep_last=1"] + extra
        log(f"{name}: {steps} steps")
        results[name] = run_variant(RECIPES / recipe, over, at_targets, cache)
        r = results[name]
        log(f"{name}: {r['tokens_per_s']:.1f} tok/s, loop {r['loop_seconds']:.0f} s, setup {r['setup_seconds']:.0f} s")
    for name, r in results.items():
        ref = results[name.split(" / ")[0] + " / plain"]
        r["speedup_vs_plain"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["max_loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        # Step 1 runs the same parameters on the same batch: only summation order differs. Later
        # steps drift further (Adam turns rounding-level gradient differences into lr-sized moves
        # of the dense query), so the first step is the one that checks a fast path is exact.
        r["first_loss_rel_diff_vs_plain"] = abs(r["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0])
    res = {"schema": "memsurgery.bench.train_fastpath/1",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "platform": platform.platform(), "torch": torch.__version__},
           "tiny": args.tiny, "steps": args.steps, "full_steps": args.full_steps,
           "variants": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in results.items()}}
    lines = ["# Training fast paths, side by side", "",
             f"- date: {res['date']}; {res['machine']['cpu_count']} cores, {res['machine']['torch_threads']} "
             f"torch thread(s)" + (f", GPU {res['machine']['gpu']}" if res["machine"]["gpu"] else ""),
             f"- recipes as shipped (knowledge-injection, full-finetune) on the training views of {args.people} "
             f"people; {args.steps} steps per memory variant, {args.full_steps} per full variant", "",
             "| variant | tokens/s | speed-up vs plain | loop s | setup s | step-1 loss rel. diff vs plain "
             "| max per-step loss diff vs plain |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_plain']:.2f}x | {r['loop_seconds']:.0f} "
                     f"| {r['setup_seconds']:.0f} | {r['first_loss_rel_diff_vs_plain']:.1e} "
                     f"| {r['max_loss_diff_vs_plain']:.1e} |")
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
