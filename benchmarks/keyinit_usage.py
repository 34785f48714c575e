"""Slot usage of data-driven key init (faiss + PCA query) vs the reference random init.

Loads a causal LM (default: the SmolLM2-135M-Instruct GGUF of the demo cache),
captures MLP inputs at a few layers for calibration tokens and for DISJOINT
held-out tokens of the builtin corpus, initializes one memory layer per chosen
layer with each variant, and measures slot usage on the held-out tokens
(memsurgery.graft.keyinit.measure_usage). Writes results.json and results.md to
--out. The value table is never allocated (it lives on the meta device): key init
and selection read only the query and the keys.

    python benchmarks/keyinit_usage.py                       # 1M slots, 3 layers, 100k+100k tokens
    python benchmarks/keyinit_usage.py --slots 64K --calib-tokens 8000 --heldout-tokens 8000 \
        --layers 15 --niter 5                                # a small run (~1-2 minutes)
    python benchmarks/keyinit_usage.py --variants random,faiss,pca,pca+faiss,pca-nomean+faiss \
        --cache /tmp/acts                                    # design study; reuses captures

Variants (query init + key init): random (reference: both random), faiss (random
query, faiss keys), pca (PCA query, random keys), pca+faiss (the default graft
init), pca-nomean+faiss (PCA without projecting out the mean), pca-w0.5+faiss
(half whitening), orth+faiss (random orthogonal query).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _common import load_model, peak_rss_gb

from memsurgery.graft.calibration import (
    builtin_corpus,
    calibration_split,
    capture_mlp_inputs,
)
from memsurgery.graft.keyinit import init_memory_keys, measure_usage
from memsurgery.memory import MemoryConfig, ProductKeyMemory, SharedValueTable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = Path.home() / ".cache/memsurgery/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (query method, key method, extra init options)
VARIANTS = {
    "random": ("random", "random", {}),
    "faiss": ("random", "faiss", {}),
    "pca": ("pca", "random", {}),
    "pca+faiss": ("pca", "faiss", {}),
    "pca-mixed+faiss": ("pca", "faiss", {"halves": "mixed"}),
    "pca-mixed": ("pca", "random", {"halves": "mixed"}),
    "pca-nomean+faiss": ("pca", "faiss", {"project_mean": False}),
    "pca-w0.5+faiss": ("pca", "faiss", {"whiten": 0.5}),
    "orth+faiss": ("orthogonal", "faiss", {}),
}

COLUMNS = [
    ("pct_used", "% used", "{:.1f}"),
    ("kl_uniform_count", "KL count", "{:.3f}"),
    ("kl_uniform_weight", "KL weight", "{:.3f}"),
    ("gini_count", "Gini", "{:.3f}"),
    ("slots_for_50pct", "slots 50% w", "{:,}"),
    ("slots_for_90pct", "slots 90% w", "{:,}"),
]


class Timer:
    """Records wall seconds (`<name>_s`) and this process's CPU seconds (`<name>_cpu_s`).

    On a shared machine wall time depends on the neighbours; CPU seconds / threads is
    what the step would take with the cores to itself.
    """

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.timings[f"{self.name}_s"] = time.perf_counter() - self.wall
        self.timings[f"{self.name}_cpu_s"] = time.process_time() - self.cpu


def build_layer(cfg: MemoryConfig, seed: int) -> ProductKeyMemory:
    """A layer with the reference init of `seed` and a value table on the meta device."""
    values = SharedValueTable(cfg.slots, cfg.value_dim, device="meta")  # no 1M x d allocation
    torch.manual_seed(seed)
    return ProductKeyMemory(cfg, values)


def capture(args, timings: dict) -> tuple[dict, dict, int]:
    """({layer: calib acts}, {layer: held-out acts}, d), from --cache when it has them."""
    # One cache file per token budget and model, holding every layer captured for it;
    # a run asking for a subset of those layers reuses it.
    key = f"{Path(args.model).stem}_c{args.calib_tokens}_h{args.heldout_tokens}_T{args.seq_len}_s{args.seed}"
    cache = Path(args.cache) / f"{key}.pt" if args.cache else None
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        if set(args.layers) <= set(blob["calib"]):
            timings.update(blob["timings"])
            timings["from_cache"] = True
            pick = lambda acts: {i: acts[i] for i in args.layers}
            return (
                pick(blob["calib"]),
                pick(blob["heldout"]),
                blob["calib"][args.layers[0]].shape[1],
            )
        del blob

    with Timer(timings, "model_load"):
        model, tok = load_model(args.model)
    with Timer(timings, "tokenize"):
        calib_ids, held_ids = calibration_split(
            tok, builtin_corpus(), args.calib_tokens, args.heldout_tokens, args.seq_len, args.seed
        )
    with Timer(timings, "capture_calib"):
        calib = capture_mlp_inputs(model, args.layers, calib_ids, batch_size=args.batch_size)
    with Timer(timings, "capture_heldout"):
        held = capture_mlp_inputs(model, args.layers, held_ids, batch_size=args.batch_size)
    timings["calib_tokens"], timings["heldout_tokens"] = calib_ids.numel(), held_ids.numel()
    del model
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"calib": calib, "heldout": held, "timings": dict(timings)}, cache)
    return calib, held, calib[args.layers[0]].shape[1]


def markdown(result: dict) -> str:
    cfg, t = result["config"], result["timings"]
    lines = [
        f"# Key init: slot usage on held-out tokens ({cfg['model_name']})",
        "",
        (
            f"{cfg['slots']:,} slots (n_sub {cfg['n_sub']}), heads {cfg['heads']}, knn {cfg['knn']}, "
            f"k_dim {cfg['k_dim']}, qk_norm {cfg['qk_norm']}; {t['calib_tokens']:,} calibration + "
            f"{t['heldout_tokens']:,} disjoint held-out tokens (builtin corpus); "
            f"faiss niter {cfg['niter']}, {cfg['threads']} threads."
        ),
        "",
        "| layer | init | " + " | ".join(c[1] for c in COLUMNS) + " | init time (s) |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in result["rows"]:
        cells = [c[2].format(row["usage"][c[0]]) for c in COLUMNS]
        lines.append(
            f"| {row['layer']} | {row['variant']} | "
            + " | ".join(cells)
            + f" | {row['init_s']:.1f} |"
        )
    lines += ["", "Ratio of distinct slots used, each variant vs random:", ""]
    for layer, ratios in result["ratio_vs_random"].items():
        lines.append(f"- layer {layer}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    lines += [
        "",
        "Timings (s): "
        + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()),
    ]
    lines.append(f"Peak RSS: {result['peak_rss_gb']:.2f} GB")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_GGUF), help="HF directory or .gguf file")
    p.add_argument("--layers", default="5,15,25", help="comma-separated decoder layer indices")
    p.add_argument("--slots", default="1M")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=256)
    p.add_argument("--no-qk-norm", action="store_true")
    p.add_argument("--calib-tokens", type=int, default=100_000)
    p.add_argument("--heldout-tokens", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward during capture")
    p.add_argument("--niter", type=int, default=10)
    p.add_argument(
        "--max-points", type=int, default=None, help="k-means points cap (default 64*n_sub)"
    )
    p.add_argument(
        "--variants", default="random,pca+faiss", help=f"comma list of {', '.join(VARIANTS)}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch/faiss threads (default: torch's)"
    )
    p.add_argument("--cache", default=None, help="directory to save/reuse captured activations")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/keyinit_usage"))
    args = p.parse_args(argv)
    args.layers = [int(x) for x in args.layers.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    timings: dict = {}
    calib, held, d = capture(args, timings)
    cfg = MemoryConfig.build(
        slots=args.slots,
        heads=args.heads,
        knn=args.knn,
        k_dim=args.k_dim,
        qk_norm=not args.no_qk_norm,
    ).for_model(d)

    rows, init_total, init_cpu = [], {v: 0.0 for v in variants}, {v: 0.0 for v in variants}
    for layer_idx in args.layers:
        for name in variants:
            query, keys, opts = VARIANTS[name]
            layer = build_layer(
                cfg, args.seed + layer_idx
            )  # the same reference init for every variant
            t0, c0 = time.perf_counter(), time.process_time()
            kw = dict(opts)
            if keys == "faiss":
                kw.update(niter=args.niter, max_points=args.max_points)
            info = init_memory_keys(
                layer, calib[layer_idx], keys=keys, query=query, seed=args.seed, **kw
            )
            init_s = time.perf_counter() - t0
            init_total[name] += init_s
            init_cpu[name] += time.process_time() - c0
            t0 = time.perf_counter()
            usage = measure_usage(layer, held[layer_idx])
            rows.append(
                {
                    "layer": layer_idx,
                    "variant": name,
                    "init_s": init_s,
                    "measure_s": time.perf_counter() - t0,
                    "usage": usage,
                    "info": info,
                }
            )
            print(
                f"layer {layer_idx:>3} {name:<18} used {usage['pct_used']:5.1f}%  "
                f"KL {usage['kl_uniform_count']:.3f}  gini {usage['gini_count']:.3f}  "
                f"init {init_s:.1f}s",
                flush=True,
            )
            del layer

    ratios = {}
    for layer_idx in args.layers:
        by = {r["variant"]: r["usage"]["slots_used"] for r in rows if r["layer"] == layer_idx}
        if "random" in by:
            ratios[str(layer_idx)] = {
                k: v / max(1, by["random"]) for k, v in by.items() if k != "random"
            }
    for name, total in init_total.items():
        timings[f"key_init_{name}_all_layers_s"] = total
        timings[f"key_init_{name}_all_layers_cpu_s"] = init_cpu[name]
    # What a graft with this init costs: load + tokenize + calibration capture + key init.
    if "pca+faiss" in variants and not timings.get("from_cache"):
        for unit in ("s", "cpu_s"):
            timings[f"graft_equivalent_{unit}"] = (
                sum(
                    timings[f"{step}_{unit}"]
                    for step in ("model_load", "tokenize", "capture_calib")
                )
                + timings[f"key_init_pca+faiss_all_layers_{unit}"]
            )
    timings["total_s"] = time.perf_counter() - t_start

    config = {
        "model": args.model,
        "model_name": Path(args.model).name,
        "layers": args.layers,
        "slots": cfg.slots,
        "n_sub": cfg.n_sub,
        "heads": cfg.heads,
        "knn": cfg.knn,
        "k_dim": cfg.k_dim,
        "qk_norm": cfg.qk_norm,
        "niter": args.niter,
        "max_points": args.max_points,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "variants": variants,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result = {
        "config": config,
        "timings": timings,
        "peak_rss_gb": peak_rss_gb(),
        "rows": rows,
        "ratio_vs_random": ratios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
