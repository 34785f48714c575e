"""Peak RSS of `memsurgery inspect` vs the size of the checkpoint it describes.

inspect reads headers only (safetensors header, GGUF metadata), so its peak
RSS should be the interpreter's baseline, independent of checkpoint size. We
measure each run in a fresh child process (`ru_maxrss` of RUSAGE_CHILDREN in a
wrapper, so earlier children never pollute the figure) and also report the
baseline of a process that only imports memsurgery's inspect dependencies.

    python benchmarks/inspect_rss.py [--gguf PATH] [--hf DIR] [--big-gb 1.0] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_WRAPPER = (
    "import resource, subprocess, sys; "
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
    "sys.stderr.write(p.stderr.decode()[-500:]) if p.returncode else None; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, p.returncode)"
)


def peak_rss(cmd: list[str]) -> int:
    """Peak resident set size in bytes of `cmd`, run as a fresh process (Linux)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    rss, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd} failed: {out.stderr}")
    return int(rss)


def make_big_checkpoint(root: Path, target_gb: float) -> Path:
    """A random llama-shaped checkpoint of about `target_gb` GB (fp32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_gb * 1e9 / 4 - vocab * hidden) / per_layer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                      tie_word_embeddings=True)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg)
    out = root / "big"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="GGUF checkpoint (default: the cached demo checkpoint)")
    ap.add_argument("--hf", type=Path, help="a converted HF directory to measure too")
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the generated random checkpoint")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    args = ap.parse_args()

    if args.gguf is None:
        from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

        args.gguf = fetch_demo_checkpoint(log=lambda m: None)
    results = {}
    results["baseline_import"] = peak_rss([sys.executable, "-c",
                                           "import memsurgery.checkpoint, memsurgery.inspection"])
    targets = {"smollm2_gguf": args.gguf}
    if args.hf:
        targets["smollm2_hf"] = args.hf
    with tempfile.TemporaryDirectory() as tmp:
        if args.big_gb > 0:
            targets["random_big"] = make_big_checkpoint(Path(tmp), args.big_gb)
        for name, path in targets.items():
            rss = peak_rss([sys.executable, "-m", "memsurgery", "inspect", str(path), "--json"])
            size = dir_size(path)
            results[name] = {"checkpoint_bytes": size, "inspect_peak_rss_bytes": rss,
                             "rss_over_size": round(rss / size, 3),
                             "rss_above_baseline_bytes": rss - results["baseline_import"]}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
