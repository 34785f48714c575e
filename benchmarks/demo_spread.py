"""The demo under three CPU code paths, side by side: how far its numbers move across machines.

    python benchmarks/demo_spread.py                         # the full demo, 3 x (~12 min)
    python benchmarks/demo_spread.py --out /tmp/spread -- --people 5 --steps 20 --world-limit 20

Runs `memsurgery demo` once per variant, each into its own folder under --out, in a fresh
process whose environment selects the code path another CPU would take:

  native   whatever this CPU uses (AVX512 on the machines this was written on)
  avx2     ATEN_CPU_CAPABILITY=avx2,    MKL_ENABLE_INSTRUCTIONS=AVX2,   ONEDNN_MAX_CPU_ISA=AVX2,
           FAISS_SIMD_LEVEL=AVX2
  default  ATEN_CPU_CAPABILITY=default, MKL_ENABLE_INSTRUCTIONS=SSE4_2, ONEDNN_MAX_CPU_ISA=SSE41,
           FAISS_SIMD_LEVEL=NONE

(ATEN_CPU_CAPABILITY picks torch's own vectorized kernels; the MKL and oneDNN variables cap
the instruction set of the matrix products, which ATEN_CPU_CAPABILITY does not touch; faiss
(k-means of the graft's keys) picks its SIMD level by FAISS_SIMD_LEVEL.)
Threads: $MEMSURGERY_THREADS / $OMP_NUM_THREADS, default 1, as the Makefile sets them.

Time: the portable `default` path has no SIMD in torch's kernels and SSE4.2 matrix products;
at --people 5 --steps 20 on a loaded 2-vCPU machine it took 56 min against 14 min native.

Then it prints the demo's summary metrics side by side, and a fingerprint of each stage's
output (converted weights, grafted memory keys/query, trained values, the training losses,
the probe's generations): "=" where a variant's stage output is bit-identical to the first
variant's, so the first stage that differs is the one to look at. Arguments after `--` go
to `memsurgery demo` (e.g. `--people 5 --steps 20` for a quick look). Nothing is written
outside --out; a second run reuses each variant's finished stages (the demo's own reuse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FAISS_SIMD_LEVEL": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41", "FAISS_SIMD_LEVEL": "NONE"},
}


def _tensor_hash(folder: Path, keep=lambda name: True) -> str | None:
    """SHA-256 over the (name, dtype, shape, bytes) of the selected tensors of every
    *.safetensors file in `folder`, in name order: independent of file metadata and sharding."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    tensors = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            tensors += [(k, f) for k in fh.keys() if keep(k)]
    if not tensors:
        return None
    for name, f in sorted(tensors):
        with safe_open(str(f), framework="pt") as fh:
            t = fh.get_tensor(name).contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def fingerprints(out: Path) -> dict:
    """Per stage, a short hash of what the stage produced (None where it is missing)."""
    fp: dict[str, str | None] = {}
    fp["convert: weights"] = _tensor_hash(out / "smollm2-135m")
    graft = out / "smollm2-135m-memory"
    fp["graft: memory query"] = _tensor_hash(graft, lambda k: k.startswith("memory_bank") and k.endswith(".query.weight"))
    fp["graft: memory keys"] = _tensor_hash(graft, lambda k: k.startswith("memory_bank") and k.endswith(".keys"))
    fp["graft: other memory"] = _tensor_hash(
        graft, lambda k: k.startswith("memory_bank") and not k.endswith((".keys", ".query.weight")))
    metrics = out / "train-run" / "metrics.jsonl"
    losses = ([json.loads(x).get("loss") for x in metrics.read_text().splitlines() if '"loss"' in x]
              if metrics.is_file() else None)
    fp["train: losses"] = _json_hash(losses) if losses else None
    fp["train: first loss"] = f"{losses[0]:.6f}" if losses else None
    fp["train: memory values"] = _tensor_hash(out / "train-run" / "final", lambda k: k.endswith("values.weight"))
    samples = out / "probe" / "samples.jsonl"
    if samples.is_file():
        rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
        for model in ("baseline", "trained"):
            sel = [r for r in rows if (r.get("model") == "baseline") == (model == "baseline")]
            fp[f"probe: {model} generations"] = _json_hash([[r.get(k) for k in ("id", "template", "raw")] for r in sel])
        fp["probe: trained memory signals"] = _json_hash([r.get("signals") for r in rows if r.get("model") != "baseline"])
    return fp


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if "perplexity" in key or "auroc" in key or "seconds" in key or "per_s" in key or abs(v) > 1:
        return f"{v:.3f}"
    return f"{100 * v:.1f}%"  # shares: exact match, attempted & wrong, kept


def summary_rows(summaries: dict) -> list[list[str]]:
    """Every number of the demo's summary (demo-summary.json), one row each: base / trained
    pairs as two rows, scalars as one; whatever keys this version of the demo writes."""
    keys: list[str] = []
    for s in summaries.values():
        keys += [k for k in (s or {}) if k not in keys and k not in ("people", "steps", "train_seconds")]
    rows = []
    for key in keys:
        vals = [(s or {}).get(key) for s in summaries.values()]
        if any(isinstance(v, dict) for v in vals):
            subs = []
            for v in vals:
                subs += [k for k in (v or {}) if k not in subs]
            rows += [[f"{key} ({sub})"] + [_fmt(key, (v or {}).get(sub)) for v in vals] for sub in subs]
        else:
            rows.append([key] + [_fmt(key, v) for v in vals])
    return rows


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-spread", help="one folder per variant goes here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--report-only", action="store_true", help="do not run; compare what --out holds")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("MEMSURGERY_THREADS", "1")
    walls: dict[str, float | None] = {}
    for name in names:
        if args.report_only:
            walls[name] = None
            continue
        env = dict(os.environ, MEMSURGERY_THREADS=threads, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads),
                   **VARIANTS[name])
        cmd = [sys.executable, "-m", "memsurgery", "demo", "--out", str(out / name), *demo_args]
        print(f"[{name}] {' '.join(f'{k}={v}' for k, v in VARIANTS[name].items())} {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        walls[name] = time.perf_counter() - t0
        print(f"[{name}] exit {rc} after {walls[name]:.0f} s; log {out / f'{name}.log'}", flush=True)
        if rc != 0:
            print((out / f"{name}.log").read_text()[-2000:], file=sys.stderr)
            return rc
    summaries, timings = {}, {}
    for name in names:
        f = out / name / "demo-summary.json"
        doc = json.loads(f.read_text()) if f.is_file() else {}
        summaries[name], timings[name] = doc.get("summary"), doc.get("timings") or {}
    print()
    print(f"demo summary by CPU code path ({threads} torch thread(s)):")
    _print_table(["metric", *names], summary_rows(summaries))
    stages = [k for k in ("convert", "graft", "train", "probe", "export", "total") if any(k in t for t in timings.values())]
    if stages:
        print()
        print("stage seconds (as each demo measured them; a reused stage is short):")
        _print_table(["stage", *names], [[k] + [f"{timings[n][k]:.0f}" if k in timings[n] else "-" for n in names]
                                         for k in stages])
    if any(walls.values()):
        print("wall: " + ", ".join(f"{n} {w:.0f} s" for n, w in walls.items() if w))
    print()
    print(f"stage outputs (\"=\": bit-identical to {names[0]}):")
    fps = {n: fingerprints(out / n) for n in names}
    rows = []
    for stage in fps[names[0]]:
        first = fps[names[0]][stage]
        rows.append([stage, first or "-"] + [
            "-" if fps[n].get(stage) is None else ("=" if fps[n][stage] == first else fps[n][stage])
            for n in names[1:]])
    _print_table(["stage", *names], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
