"""`memsurgery bench throughput`: inference speed of a grafted model vs its base, side by side.

Both models run in the same process, interleaved rep by rep (base, parallel,
replace, base, ...), so machine noise hits all of them alike; the report gives
tokens/s and the ratio to the base for batch-1 greedy decode with the KV cache
and for batch-8 x 256 prefill. The grafted models are built directly with
`graft_model` (reference init, non-zero values so the memory really runs);
key placement does not change the cost.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def _timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_throughput_bench(ckpt: str | Path | None = None, *, slots: int = 1 << 20, layers=None,
                         heads: int = 4, knn: int = 32, k_dim: int = 256, decode_tokens: int = 64,
                         prefill_batch: int = 8, prefill_len: int = 256, reps: int = 3,
                         quick: bool = False, log=print) -> dict:
    from memsurgery.arch import spec_for_config
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.graft.surgery import graft_model
    from memsurgery.inspection import default_memory_layers
    from memsurgery.memory import MemoryConfig

    if ckpt is None:
        from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

        ckpt = fetch_demo_checkpoint(log=log)
    from memsurgery.bench import bench_threads, load_average

    torch.set_num_threads(bench_threads())  # $MEMSURGERY_THREADS (set by --threads), else 1
    if quick:
        slots, decode_tokens, prefill_batch, prefill_len, reps = 4096, 8, 2, 32, 1
    src = open_checkpoint(ckpt)
    spec = spec_for_config(src.config)
    layers = list(layers or default_memory_layers(spec.num_layers(src.config)))
    base = src.load_model().eval()
    vocab = spec.vocab_size(src.config)
    cfg = MemoryConfig.build(slots=slots, heads=heads, knn=min(knn, int(slots ** 0.5)), k_dim=k_dim,
                             gate="none")
    models = {"base": base}
    # Each graft shares the base's weight tensors, so three models cost one model's memory
    # plus the tables. Replace mode must not remove the MLPs the base still uses: it builds
    # a new module tree and only drops references in the grafted copy.
    models["parallel"] = graft_model(base, cfg, layers, "parallel")
    models["replace"] = graft_model(base, cfg, layers, "replace")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    prefill = torch.randint(0, vocab, (prefill_batch, prefill_len), generator=gen)

    def decode(m):
        m.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                   use_cache=True, pad_token_id=0)

    def fwd(m):
        m(prefill, use_cache=False)

    times = {name: {"decode": [], "prefill": []} for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            decode(m) if not quick else None
            fwd(m)
        for _ in range(reps):
            for name, m in models.items():
                times[name]["decode"] += _timeit(lambda: decode(m), 1)
                times[name]["prefill"] += _timeit(lambda: fwd(m), 1)
    result = {"checkpoint": str(ckpt), "layers": layers, "slots": slots, "heads": heads, "knn": cfg.knn,
              "k_dim": k_dim, "reps": reps, "threads": torch.get_num_threads(), "loadavg_1min": load_average(),
              "models": {}}
    for name, t in times.items():
        dec = decode_tokens / statistics.median(t["decode"])
        pre = prefill_batch * prefill_len / statistics.median(t["prefill"])
        result["models"][name] = {"decode_tokens_per_s": dec, "prefill_tokens_per_s": pre}
    b = result["models"]["base"]
    for name in ("parallel", "replace"):
        m = result["models"][name]
        m["decode_ratio_vs_base"] = m["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        m["prefill_ratio_vs_base"] = m["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
    return result


def render(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"inference throughput, {result['slots']:,} slots at layers {result['layers']}",
                  caption=f"x base = tokens/s ratio; {result['threads']} torch thread(s), "
                          f"1-min load average {result['loadavg_1min']:.2f}")
    for col in ("model", "decode tok/s (b=1)", "x base", "prefill tok/s (8x256)", "x base"):
        table.add_column(col, justify="right")
    for name, m in result["models"].items():
        table.add_row(name, f"{m['decode_tokens_per_s']:.1f}", f"{m.get('decode_ratio_vs_base', 1.0):.3f}",
                      f"{m['prefill_tokens_per_s']:.0f}", f"{m.get('prefill_ratio_vs_base', 1.0):.3f}")
    console.print(table)
