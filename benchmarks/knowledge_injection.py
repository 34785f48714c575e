#!/usr/bin/env python
"""Knowledge-injection benchmark (issue #7): memory graft vs full finetuning vs LoRA.

    python benchmarks/knowledge_injection.py --people 30 --steps 200 --out bench-results/ki
    python benchmarks/knowledge_injection.py --people 5 --steps 10 --world-limit 50 --out /tmp/ki-small \
        --base demo-out/smollm2-135m
    python benchmarks/knowledge_injection.py --tiny --out /tmp/ki-tiny      # structure check, seconds

The same fictional people (`builtin:people?n=N&seed=S`, six facts each, rendered into
the same training views by `data.format: facts`), the same base checkpoint and the
same token budget (steps x sequences per step x seq_len) for each method:

    memory          parallel graft, memory-only training   recipes/knowledge-injection.yaml
    sparse_memory   parallel graft, TF-IDF top-t value rows recipes/sparse-memory-finetune.yaml
    full            dense base, every weight               recipes/full-finetune.yaml
    lora            dense base, LoRA adapters (merged)     recipes/lora.yaml

Only the model, output directory, training data, step count and the shared batch
shape are overridden; every other setting comes from the recipe files, so tuning
a recipe tunes the benchmark. The base model is probed once (the untrained
parallel graft has a zero value table and computes exactly the base function, so
it is the "before" of every method); each trained model is probed on the same
items: reliability (trained phrasings), generalization (held-out phrasings and
questions, never in any training text), locality (known facts, perplexity), and
unknown people asked in held-out phrasings, with the memory signal and a linear
probe on the residual stream as known-vs-unknown detectors on question-form prompts. Outputs in --out: results.json, results.md, learning_vs_forgetting.svg,
and per method <method>/train (the run directory) and <method>/probe (the full
probe report). Finished stages whose inputs are unchanged are reused (--fresh
redoes everything). Metrics are defined in docs/probe.md; docs/benchmarks.md
explains the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from html import escape
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEMSURGERY_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ.get("MEMSURGERY_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# method -> (recipe file, trains the grafted model)
METHODS: dict[str, tuple[str, bool]] = {
    "memory": ("knowledge-injection.yaml", True),
    "sparse_memory": ("sparse-memory-finetune.yaml", True),
    "full": ("full-finetune.yaml", False),
    "lora": ("lora.yaml", False),
}
# The batch shape every method shares comes from this recipe.
REFERENCE_METHOD = "memory"

# --tiny: a 2-layer random llama with a byte-level tokenizer and a small graft, so
# the whole benchmark structure runs in seconds (numbers are meaningless).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                  tie_word_embeddings=True, hidden_act="silu")
TINY_GRAFT = dict(slots=1024, heads=2, knn=4, k_dim=16, layers=[1], mode="parallel", keys="faiss",
                  calib_tokens=2048, heldout_tokens=512, seq_len=64, kmeans_iters=5, seed=0)
TINY_TRAIN_OVERRIDES = ["sparse.background_tokens=1024", "sparse.background_seq_len=64", "sparse.top_t=32"]
TINY_PPL_TOKENS = 512

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    from memsurgery._atomic import atomic_file

    with atomic_file(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(obj):
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _stage_done(stage_dir: Path, key: str, marker: str) -> dict | None:
    """The stage record of a finished stage with the same inputs, else None."""
    rec = stage_dir / "stage.json"
    if not (rec.is_file() and (stage_dir / marker).exists()):
        return None
    try:
        data = json.loads(rec.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def _fingerprint(model_dir: Path) -> dict:
    """What identifies a model directory's contents cheaply: config, graft report, weight file stats."""
    fp = {}
    for f in sorted(Path(model_dir).iterdir()):
        if f.name in ("config.json", "graft.json"):
            fp[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.suffix == ".safetensors":
            st = f.stat()
            fp[f.name] = [st.st_size, st.st_mtime_ns]
    return fp


# ---------------------------------------------------------------- base and graft


def build_tiny_base(out: Path) -> Path:
    """A deterministic tiny random llama + byte-level tokenizer (vocab = the 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    # ByteLevel's printable stand-ins: bytes that are printable Latin-1 map to themselves,
    # the rest to 256, 257, ... in byte order (the GPT-2 convention ByteLevel decodes).
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    shifted = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[1], eos_token=chars[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA), dtype=torch.float32)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_base(args, cache: Path) -> Path:
    """A dense HF directory: --base (a directory, or a .gguf converted once), the tiny model, or the demo."""
    from memsurgery.errors import InputError

    if args.base:
        base = Path(args.base).absolute()
        if base.is_dir():
            if not (base / "config.json").is_file():
                raise InputError(f"--base {args.base}: not a Hugging Face directory (no config.json)")
            return base
        if not base.is_file():
            raise InputError(f"--base {args.base}: no such file or directory")
        src = base  # a single-file checkpoint (GGUF): convert it once into the cache
    elif args.tiny:
        return build_tiny_base(cache / "tiny-llama")
    else:
        from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

        src = fetch_demo_checkpoint(log=log)
    from memsurgery._hashing import sha256_file
    from memsurgery.checkpoint.convert import convert_checkpoint

    digest = sha256_file(src)
    out = cache / f"base-{digest[:12]}"
    prov = out / "memsurgery-convert.json"
    if prov.is_file() and json.loads(prov.read_text()).get("source_weights_sha256") == digest:
        log(f"base: reusing {out} (converted earlier from the same file)")
        return out
    log(f"base: converting {src} -> {out}")
    convert_checkpoint(src, out, force=True, log=log)
    return out


def graft_plan(args) -> dict:
    if args.tiny:
        return dict(TINY_GRAFT)
    from memsurgery.demo import DEMO_GRAFT

    return dict(DEMO_GRAFT)


def _graft_report_plan(graft_dir: Path | None) -> dict | None:
    if graft_dir is None:
        return None
    try:
        return json.loads((graft_dir / "graft.json").read_text(encoding="utf-8")).get("plan")
    except (OSError, ValueError):
        return None


def _graft_matches(graft_dir: Path, base: Path, plan: dict) -> bool:
    try:
        done = json.loads((graft_dir / "graft.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if done.get("source") != str(base.absolute()) or any(done.get("plan", {}).get(k) != v
                                                          for k, v in plan.items()):
        return False
    # same path and plan; the base's weights must also be the ones grafted (a re-converted base is not)
    from memsurgery.checkpoint import open_checkpoint

    return open_checkpoint(base).weights_sha256() == done.get("source_sha256")


def resolve_graft(base: Path, plan: dict, cache: Path, fresh: bool) -> Path:
    """The parallel graft of `base`: a finished `<base>-memory` sibling (what the demo writes) or cache/graft."""
    import memsurgery

    sibling = base.parent / f"{base.name}-memory"
    if not fresh and _graft_matches(sibling, base, plan):
        log(f"graft: reusing {sibling} (same base weights and plan)")
        return sibling
    out = cache / "graft"
    if not fresh and _graft_matches(out, base, plan):
        log(f"graft: reusing {out}")
        return out
    log(f"graft: {plan}")
    memsurgery.graft(base, out, force=True, log=log, **plan)
    return out


def given_graft(graft_dir: Path, base: Path) -> Path:
    """--graft: must be a memsurgery graft; a graft of another base is refused (not the same starting point)."""
    from memsurgery.errors import InputError

    try:
        done = json.loads((graft_dir / "graft.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"--graft {graft_dir}: no readable graft.json; give a directory written by "
                         "`memsurgery graft`") from None
    if Path(done.get("source", "")).absolute() != base.absolute():
        raise InputError(f"--graft {graft_dir}: grafted from {done.get('source')}, not from the base {base}; "
                         "pass that base with --base")
    log(f"graft: using {graft_dir} (plan {done.get('plan')})")
    return graft_dir


# ---------------------------------------------------------------- facts


def fact_specs(args) -> tuple[str, str, list[str]]:
    """(training data spec, people probe spec, probe fact sets). World items are cut to --world-limit.

    Every method trains on the same structured facts (`data.format: facts` in the shipped
    recipes renders their training views); the probe asks each injected fact in
    `--probe-trained` trained and `--probe-heldout` held-out phrasings (rotating over the
    templates), and each unknown person's facts in `--probe-unknown` held-out phrasings."""
    train_spec = f"builtin:people?n={args.people}&seed={args.seed}"
    probe_people = (f"builtin:people?n={args.people}&seed={args.seed}&unknown={args.unknown}&phrasings=views"
                    f"&train_per_fact={args.probe_trained}&heldout_per_fact={args.probe_heldout}"
                    f"&unknown_per_fact={args.probe_unknown}")
    world = f"builtin:world?limit={args.world_limit}" if args.world_limit else "builtin:world"
    return train_spec, probe_people, [probe_people, world]


# ---------------------------------------------------------------- probe


def probe(model_dir: Path, facts: list[str], out: Path, args, key: str) -> dict:
    """run_probe on one model (no baseline: the base is probed once), reusing a finished report."""
    from memsurgery.probe.api import run_probe

    done = None if args.fresh else _stage_done(out, key, "report.json")
    if done is not None:
        log(f"probe: reusing {out}")
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    report = run_probe(model_dir, facts=facts, out=out, force=True, ppl_tokens=args.ppl_tokens,
                       batch_size=args.probe_batch, residual_layer=args.residual_layer,
                       log=lambda m: log(f"  probe: {m}"))
    # stage.json sits beside the report (the probe writes its directory atomically first).
    _write_json(out / "stage.json", {"key": key})
    return report


def _em(d: dict | None) -> float | None:
    return None if not d else d.get("exact_match")


def probe_metrics(report: dict) -> dict:
    """The knowledge triple, unknown-entity hallucination and both known-vs-unknown detectors."""
    from memsurgery.probe.knowledge import knowledge_numbers

    k, n = report["knowledge"], knowledge_numbers(report)
    gen = k.get("generalization") or {}
    out = {**{key: n[key] for key in ("reliability", "generalization", "generalization_questions",
                                      "generalization_completions")},
           "generalization_by_phrasing": {name: _em(d) for name, d in (gen.get("by_phrasing") or {}).items()},
           "known_em": n["known"], "perplexity": n["perplexity"],
           "unknown_attempted_wrong": k["hallucination"]["attempted_wrong"],
           "unknown_attempted_wrong_questions": n["unknown_attempted_wrong_questions"],
           "memory_signal": None, "abstention": None, "linear_probe": None}
    sig = report.get("signals")
    if sig:
        primary = sig["signals"].get(sig["primary"], {})
        out["memory_signal"] = {"name": sig["primary"], "auroc": primary.get("auroc_injected_vs_unknown"),
                                "auroc_questions": primary.get("auroc_questions"),
                                "all_auroc_questions": {n: v.get("auroc_questions") for n, v in sig["signals"].items()}}
        out["abstention"] = sig.get("abstention_questions")
    rp = report.get("residual_probe")
    if rp and rp.get("questions"):
        q = rp["questions"]
        out["linear_probe"] = {"layer": rp["layer"], "auroc_questions": q.get("auroc"),
                               "auroc": (rp.get("all") or {}).get("auroc"), "abstention": q.get("abstention")}
    return out


# ---------------------------------------------------------------- train


def batch_shape(args) -> dict:
    """Sequences per step and seq_len shared by every method (from the reference recipe)."""
    from memsurgery.train import load_recipe

    ref = load_recipe(RECIPES / METHODS[REFERENCE_METHOD][0])
    shape = {"train.batch_size": ref.train.batch_size, "train.grad_accum": ref.train.grad_accum,
             "data.seq_len": ref.data.seq_len}
    if args.batch_size:
        shape["train.batch_size"] = args.batch_size
    if args.seq_len:
        shape["data.seq_len"] = args.seq_len
    for method in args.methods:
        r = load_recipe(RECIPES / METHODS[method][0])
        own = {"train.batch_size": r.train.batch_size, "train.grad_accum": r.train.grad_accum,
               "data.seq_len": r.data.seq_len}
        diff = [f"{k} {own[k]} -> {v}" for k, v in shape.items() if own[k] != v]
        if diff:
            log(f"note: {METHODS[method][0]}: same token budget for every method: {', '.join(diff)}")
    return shape


def train(method: str, model_dir: Path, train_spec: str, shape: dict, args, out: Path) -> dict:
    from memsurgery.train import run

    recipe = RECIPES / METHODS[method][0]
    run_dir = out / method / "train"
    overrides = [f"model={model_dir}", f"output_dir={run_dir}", f"data.train={train_spec}",
                 f"train.steps={args.steps}", f"data.cache_dir={out / 'cache' / 'tokenized'}",
                 # one checkpoint at the end is enough here (they are deleted after probing)
                 f"checkpoint.every={args.steps}", "checkpoint.keep_last=1", "log.progress=off"]
    overrides += [f"{k}={v}" for k, v in shape.items()]
    overrides += args.method_sets[method]  # the user's --set last: it wins
    from memsurgery.train import load_recipe

    if load_recipe(recipe).eval.probe is not None:
        # the final probe measures recall; an in-training probe would only cost time here
        overrides.append("eval.probe=null")
    if args.tiny:
        overrides += TINY_TRAIN_OVERRIDES
    key = _key({"recipe": recipe.read_text(encoding="utf-8"), "overrides": overrides,
                "model": _fingerprint(model_dir)})
    done = None if args.fresh else _stage_done(run_dir, key, "summary.json")
    if done is not None:
        log(f"train {method}: reusing {run_dir}")
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return dict(summary, wall_seconds=done.get("wall_seconds"))
    if run_dir.exists():  # an unfinished or outdated run of this benchmark: start over
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    summary = run(recipe, overrides=overrides, log=lambda m: log(f"  train {method}: {m}"))
    # the whole stage: loading, data, sparse_memory's background pass, training, saving final/
    wall = round(time.perf_counter() - t, 3)  # same precision as the loop's own "seconds"
    if not args.keep_checkpoints:
        shutil.rmtree(Path(summary["run_dir"]) / "checkpoints", ignore_errors=True)
    _write_json(run_dir / "stage.json", {"key": key, "recipe": str(recipe), "overrides": overrides,
                                         "wall_seconds": wall})
    return dict(summary, wall_seconds=wall)


# ---------------------------------------------------------------- outputs


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def write_markdown(path: Path, res: dict) -> None:
    s, m = res["settings"], res["machine"]
    base = res["base"]
    lines = [
        "# Knowledge-injection benchmark",
        "",
        f"- date: {res['date']}",
        f"- machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch thread(s))"
        + (f", GPU {m['gpu']}" if m["gpu"] else ""),
        f"- base: `{res['base_model']}`" + (f"; memory methods: parallel graft `{res['graft_model']}`"
                                             if res.get("graft_model") else ""),
        f"- facts: {s['people']} injected people x 6 attributes = {6 * s['people']} facts, {s['unknown']} unknown "
        f"look-alikes, {base['n_known']} `builtin:world` known facts; held-out perplexity on {s['ppl_tokens']} tokens",
        f"- probe phrasings per fact: {s['probe_trained']} trained (reliability), {s['probe_heldout']} held out "
        f"(generalization; questions asked as `Q: ...\\nA:`), {s['probe_unknown']} held out per unknown fact",
        f"- budget per method: {s['steps']} steps x {s['sequences_per_step']} sequences x {s['seq_len']} "
        f"tokens = {s['token_budget']:,} tokens max (non-pad tokens actually trained: column `tokens`)",
        *(["- per-method recipe overrides: "
           + "; ".join(f"{k}: {', '.join(v)}" for k, v in s["method_overrides"].items())]
          if s.get("method_overrides") else []),
        f"- before (base model): reliability {_pct(base['reliability'])}, generalization "
        f"{_pct(base['generalization'])}, known EM {_pct(base['known_em'])}, perplexity {_num(base['perplexity'])}, "
        f"unknown attempted-wrong on questions {_pct(base['unknown_attempted_wrong_questions'])}",
        "",
        "| method | trainable params | reliability | generalization (questions / completions) "
        "| known EM before → after (Δ pts) | perplexity before → after (Δ) "
        "| unknown, questions: attempted-wrong before → after | detector AUROC on questions: memory signal / linear probe "
        "| abstaining on questions (memory signal): attempted-wrong / correct kept | train s (loop / stage) "
        "| tokens | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["methods"].items():
        k, p, h = r["known_em"], r["perplexity"], r["unknown_attempted_wrong_questions"]
        sig, lin = r["memory_signal"], r["linear_probe"]
        det = f"{_num(sig['auroc_questions']) if sig else '–'} / {_num(lin['auroc_questions']) if lin else '–'}"
        ab = r["abstention"]
        if ab and ab.get("threshold") is not None:
            ab_txt = f"{_pct(ab['unknown_attempted_wrong_after'])} / {_pct(ab['injected_correct_kept'])}"
        elif ab:
            ab_txt = "n/a: " + ab.get("note", "")
        else:
            ab_txt = "–"
        g = r["generalization"]
        dk = "–" if k["delta"] is None else f"{100 * k['delta']:+.1f}"
        dp = "–" if p["rel_change"] is None else f"{100 * p['rel_change']:+.1f}%"
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {_pct(r['reliability']['after'])} "
            f"| **{_pct(g['after'])}** ({_pct(r['generalization_questions']['after'])} / "
            f"{_pct(r['generalization_completions']['after'])}) "
            f"| {_pct(k['before'])} → {_pct(k['after'])} ({dk}) | {_num(p['before'])} → {_num(p['after'])} ({dp}) "
            f"| {_pct(h['before'])} → {_pct(h['after'])} | {det} | {ab_txt} "
            f"| {_num(r['train_seconds'], '{:.0f}')} / {_num(r.get('train_wall_seconds'), '{:.0f}')} "
            f"| {r['tokens']:,} | {_num(r['tokens_per_s'], '{:.1f}')} |")
    lines += ["", "Stage wall times (s; a stage reused from an earlier run shows about 0): "
              + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items()), "",
              "Plot: `learning_vs_forgetting.svg`. Per-method reports: `<method>/probe/report.{md,html,json}`; "
              "training runs: `<method>/train/`. Metric definitions: docs/probe.md; this table: docs/benchmarks.md.",
              ""]
    from memsurgery._atomic import atomic_file

    with atomic_file(path, "w") as fh:
        fh.write("\n".join(lines))


def learning_vs_forgetting_svg(res: dict) -> str:
    """Left: injected EM (x) vs known-accuracy change in points (y), one point per method.
    Right: relative perplexity change per method."""
    from memsurgery.probe.svg import PALETTE

    pts = [(name, r["generalization"]["after"], r["known_em"]["delta"], r["perplexity"]["rel_change"])
           for name, r in res["methods"].items()]
    W, H, pad = 420, 320, 50
    inner_w, inner_h = W - pad - 20, H - 2 * pad
    ys = [100 * d for _, _, d, _ in pts if d is not None]
    span = max([5.0] + [abs(v) for v in ys]) * 1.1  # symmetric y range around 0, at least +-5 points
    sx = lambda v: pad + v * inner_w
    sy = lambda v: pad + (span - v) / (2 * span) * inner_h
    title = (f"Learning vs forgetting ({res['settings']['people']} people, {res['settings']['steps']} steps, "
             f"{res['settings']['token_budget']:,} tokens)")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 20}" height="{H + 30}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{pad}" y="{pad}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#333"/>',
           f'<line x1="{pad}" y1="{sy(0):.1f}" x2="{pad + inner_w}" y2="{sy(0):.1f}" stroke="#aaa" '
           f'stroke-dasharray="4"/>',
           f'<text x="{pad + inner_w / 2}" y="{H - 12}" font-size="11" text-anchor="middle">generalization: '
           f'injected facts, held-out phrasings</text>',
           f'<text x="14" y="{pad + inner_h / 2}" font-size="11" text-anchor="middle" '
           f'transform="rotate(-90 14 {pad + inner_h / 2})">known-fact accuracy change (points)</text>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<text x="{sx(t):.1f}" y="{pad + inner_h + 14}" font-size="10" text-anchor="middle">'
                   f'{int(100 * t)}%</text>')
    for t in (-span, -span / 2, 0, span / 2, span):
        out.append(f'<text x="{pad - 4}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end">{t:+.1f}</text>')
    placed: list[tuple[float, float]] = []  # label positions so far: coinciding points get stacked labels
    for i, (name, x, d, _) in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        if x is None or d is None:
            out.append(f'<text x="{pad + 6}" y="{pad + 14 + 14 * i}" font-size="10" fill="{color}">'
                       f'{escape(name)}: n/a</text>')
            continue
        cx, cy = sx(x), sy(100 * d)
        ly = cy + 4
        while any(abs(ly - py) < 12 and abs(cx - px) < 60 for px, py in placed):
            ly += 12
        placed.append((cx, ly))
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{color}" fill-opacity="0.8"><title>'
                   f'{escape(name)}: generalization {100 * x:.1f}%, known {100 * d:+.1f} pts</title></circle>'
                   f'<text x="{cx + 9:.1f}" y="{ly:.1f}" font-size="11" fill="{color}">{escape(name)}</text>')
    # right panel: perplexity change, one bar per method around a zero line
    x0 = W + 20
    rel = [100 * r for _, _, _, r in pts if r is not None]
    pspan = max([2.0] + [abs(v) for v in rel]) * 1.1
    bar_w = inner_w / max(1, len(pts)) * 0.6
    zy = pad + inner_h / 2
    out.append(f'<rect x="{x0 + pad}" y="{pad}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#333"/>'
               f'<line x1="{x0 + pad}" y1="{zy}" x2="{x0 + pad + inner_w}" y2="{zy}" stroke="#aaa"/>'
               f'<text x="{x0 + pad + inner_w / 2}" y="{pad - 8}" font-size="11" text-anchor="middle">'
               f'general-text perplexity change (%)</text>'
               f'<text x="{x0 + pad - 4}" y="{pad + 4}" font-size="10" text-anchor="end">+{pspan:.1f}</text>'
               f'<text x="{x0 + pad - 4}" y="{pad + inner_h + 4}" font-size="10" text-anchor="end">-{pspan:.1f}</text>')
    for i, (name, _, _, r) in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        cx = x0 + pad + (i + 0.5) * inner_w / max(1, len(pts))
        out.append(f'<text x="{cx:.1f}" y="{pad + inner_h + 14}" font-size="10" text-anchor="middle">'
                   f'{escape(name)}</text>')
        if r is None:
            continue
        h = abs(100 * r) / pspan * inner_h / 2
        y = zy - h if r > 0 else zy
        out.append(f'<rect x="{cx - bar_w / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                   f'fill="{color}"><title>{escape(name)}: {100 * r:+.2f}%</title></rect>'
                   f'<text x="{cx:.1f}" y="{(y - 3 if r > 0 else y + h + 11):.1f}" font-size="10" '
                   f'text-anchor="middle">{100 * r:+.1f}%</text>')
    out.append("</svg>")
    return "".join(out)


def method_result(method: str, model_dir: Path, summary: dict, rep: dict, base: dict, probe_s: float,
                  out: Path) -> dict:
    after = probe_metrics(rep)

    def ba(key):
        b, a = base[key], after[key]
        return {"before": b, "after": a, "delta": None if a is None or b is None else a - b}

    ppl = ba("perplexity")
    ppl["rel_change"] = (ppl["after"] / ppl["before"] - 1) if ppl["before"] and ppl["after"] is not None else None
    ab = after["abstention"]
    before_wrong = base["unknown_attempted_wrong_questions"]
    if ab and ab.get("threshold") is not None:
        ab = dict(ab, base_unknown_attempted_wrong=before_wrong,
                  reduction_vs_base=(1 - ab["unknown_attempted_wrong_after"] / before_wrong) if before_wrong else None)
    return {
        "recipe": f"recipes/{METHODS[method][0]}",
        "trained_from": str(model_dir),
        **{key: ba(key) for key in ("reliability", "generalization", "generalization_questions",
                                    "generalization_completions", "known_em", "unknown_attempted_wrong",
                                    "unknown_attempted_wrong_questions")},
        "perplexity": ppl,
        "generalization_by_phrasing": after["generalization_by_phrasing"],
        "memory_signal": after["memory_signal"], "abstention": ab, "linear_probe": after["linear_probe"],
        "trainable_params": summary["trainable_params"], "train_seconds": summary["seconds"],
        "train_wall_seconds": summary.get("wall_seconds"),
        "probe_seconds": probe_s, "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary["final_loss"], "steps": summary["steps"],
        "run_dir": f"{method}/train", "probe_dir": f"{method}/probe",
    }


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=30, help="injected people (6 facts each; the recipe's default 30)")
    ap.add_argument("--unknown", type=int, default=None, help="never-trained look-alikes (default: --people)")
    ap.add_argument("--probe-trained", type=int, default=1, help="trained phrasings asked per injected fact")
    ap.add_argument("--probe-heldout", type=int, default=5,
                    help="held-out phrasings asked per injected fact (5 = all of the builtin templates)")
    ap.add_argument("--probe-unknown", type=int, default=2, help="held-out phrasings asked per unknown fact")
    ap.add_argument("--residual-layer", type=int, default=None,
                    help="decoder layer of the linear probe (default: the graft's first memory layer)")
    ap.add_argument("--steps", type=int, default=200,
                    help="optimizer steps per method (same for all; 16 passes over 30 people's views = 1440)")
    ap.add_argument("--out", required=True, type=Path, help="results directory")
    ap.add_argument("--base", help="dense HF directory or .gguf (default: the demo SmolLM2-135M)")
    ap.add_argument("--graft", help="use this grafted directory for the memory methods (a graft of --base) "
                                    "instead of grafting with the demo plan")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--world-limit", type=int, default=None,
                    help="known facts probed: at most K builtin:world items, round-robin over relations")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="held-out perplexity tokens (default 4096)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the shared batch size")
    ap.add_argument("--seq-len", type=int, default=None, help="override the shared sequence length")
    ap.add_argument("--probe-batch", type=int, default=64, help="prompts per probe batch")
    ap.add_argument("--seed", type=int, default=1,
                    help="people generator seed (default 1: seed 0 chose the recipe settings, docs/results.md)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random llama + small graft: checks the structure in seconds (numbers meaningless)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a recipe override for one method, e.g. sparse_memory:sparse.top_t=8192 (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="redo every stage (default: reuse finished ones)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the training checkpoints")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    args.method_sets = {m: [] for m in METHODS}
    for item in args.sets:
        method, _, kv = item.partition(":")
        if method not in METHODS or "=" not in kv:
            ap.error(f"--set {item}: give METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        args.method_sets[method].append(kv)
    if args.unknown is None:
        args.unknown = args.people
    if args.ppl_tokens is None:
        args.ppl_tokens = TINY_PPL_TOKENS if args.tiny else 4096
    for name in ("people", "steps", "probe_trained", "probe_heldout"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    timings: dict[str, float] = {}

    def stage(name):
        t = time.perf_counter()
        log(f"== {name}")
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t, 1)) or log(
            f"== {name} done in {timings[name]:.1f} s")

    done = stage("base")
    base = resolve_base(args, cache)
    done()
    graft_dir = None
    if any(METHODS[m][1] for m in args.methods):
        done = stage("graft")
        if args.graft:
            graft_dir = given_graft(Path(args.graft).absolute(), base)
        else:
            graft_dir = resolve_graft(base, graft_plan(args), cache, args.fresh)
        done()

    if args.residual_layer is None:  # the linear probe reads where the memory methods' first memory layer is
        args.residual_layer = min((_graft_report_plan(graft_dir) or graft_plan(args))["layers"])
    train_spec, _, facts = fact_specs(args)
    shape = batch_shape(args)
    per_step = shape["train.batch_size"] * shape["train.grad_accum"]

    done = stage("probe base")
    probe_key = _key({"facts": facts, "world": Path(facts[1]).read_text() if Path(facts[1]).is_file() else None,
                      "ppl_tokens": args.ppl_tokens, "batch": args.probe_batch, "residual": args.residual_layer})
    base_key = _key({"model": _fingerprint(base), "probe": probe_key})
    base_rep = probe(base, facts, out / "base" / "probe", args, base_key)
    base_m = probe_metrics(base_rep)
    base_m["n_known"] = sum(n for name, n in base_rep["fact_sets"].items() if not name.startswith("builtin:people"))
    done()

    results = {}
    for method in args.methods:
        model_dir = graft_dir if METHODS[method][1] else base
        done = stage(f"train {method}")
        summary = train(method, model_dir, train_spec, shape, args, out)
        done()
        done = stage(f"probe {method}")
        t = time.perf_counter()
        rep = probe(Path(summary["final_dir"]), facts, out / method / "probe", args,
                    _key({"trained": json.loads((out / method / "train" / "stage.json").read_text())["key"],
                          "probe": probe_key}))
        done()
        results[method] = method_result(method, model_dir, summary, rep, base_m, round(time.perf_counter() - t, 1),
                                        out)
        r = results[method]
        log(f"{method}: reliability {_pct(r['reliability']['after'])}, generalization "
            f"{_pct(r['generalization']['after'])}, known {_pct(r['known_em']['before'])} -> "
            f"{_pct(r['known_em']['after'])}, ppl {_num(r['perplexity']['before'])} -> "
            f"{_num(r['perplexity']['after'])}")

    res = _clean({
        "schema": "memsurgery.bench.knowledge_injection/1",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "base_model": str(base), "graft_model": str(graft_dir) if graft_dir else None,
        "graft_plan": _graft_report_plan(graft_dir),
        "settings": {"people": args.people, "unknown": args.unknown, "probe_trained": args.probe_trained,
                     "probe_heldout": args.probe_heldout, "probe_unknown": args.probe_unknown,
                     "seed": args.seed, "steps": args.steps, "sequences_per_step": per_step,
                     "seq_len": shape["data.seq_len"], "token_budget": args.steps * per_step * shape["data.seq_len"],
                     "world_limit": args.world_limit, "ppl_tokens": args.ppl_tokens, "tiny": args.tiny,
                     "train_data": train_spec, "probe_facts": facts, "shared_overrides": shape,
                     "method_overrides": {m: v for m, v in args.method_sets.items() if v and m in args.methods}},
        "base": base_m,
        "methods": results,
        "timings": timings,
    })
    _write_json(out / "results.json", res)
    write_markdown(out / "results.md", res)
    from memsurgery._atomic import atomic_file

    with atomic_file(out / "learning_vs_forgetting.svg", "w") as fh:
        fh.write(learning_vs_forgetting_svg(res))
    log(f"wrote {out / 'results.json'}, results.md, learning_vs_forgetting.svg")
    print((out / "results.md").read_text(encoding="utf-8"))
    return res


if __name__ == "__main__":
    from memsurgery.errors import MemsurgeryError

    try:
        main()
    except MemsurgeryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
