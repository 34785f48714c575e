"""Replace mode: how much perplexity does a memory that replaces MLPs cost, per value init?

Loads a causal LM (default: the SmolLM2-135M-Instruct GGUF of the demo cache), cuts
calibration and DISJOINT held-out windows from the builtin corpus, and for each set of
layers grafts a replace-mode memory (the MLPs at those layers removed) and measures
held-out perplexity relative to the base model for:

    removed      the MLPs simply removed (memory output zeroed)
    random       faiss/PCA keys, reference-init values and projections
    smoother     closed form init="smoother": neutral gate, identity W_o, each slot the
                 mean of the targets of the tokens routed to it (no Adam)
    closed_form  closed form init="dense": values 1/H, the gated path an affine fit
                 (no Adam)
    distill      closed_form + Adam steps (the `--values distill` default)

plus per layer: held-out fraction of MLP-output variance explained (FVE) and timings.
Layer sets: --layers (e.g. "5,15,25"; several sets separated by ";") and/or
--auto-layers K, which measures each layer's removal damage (perplexity with that one
MLP zeroed, on the first --scan-tokens calibration tokens, so held-out tokens never
steer the choice) and adds the K least damaging layers as a set.

    python benchmarks/replace_distill.py                          # 5,15,25 + auto 3, 100k/20k tokens
    python benchmarks/replace_distill.py --layers 15 --auto-layers 0 --slots 4K \
        --calib-tokens 8000 --heldout-tokens 2000 --steps 20 --niter 4   # a quick run

Speed: perplexity of a variant is computed from the residual stream cached at the
input of the set's first grafted layer (the layers below are unchanged), which is
exact for families whose decoder stack starts from inputs_embeds unscaled (checked
against the full forward once; the full forward is used otherwise).
Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import load_model, log, peak_rss_gb
from torch import nn

from memsurgery.arch import spec_for_config
from memsurgery.export.hf import is_grafted_model, memory_layers
from memsurgery.graft.calibration import (
    builtin_corpus,
    calibration_split,
    capture_mlp_inputs,
)
from memsurgery.graft.keyinit import init_memory_keys
from memsurgery.graft.surgery import graft_model
from memsurgery.memory import MemoryConfig
from memsurgery.train.distill import DEFAULTS, distill_memories

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = Path.home() / ".cache/memsurgery/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("removed", "random", "smoother", "closed_form", "distill")


# ------------------------------------------------------------------ residual-stream tricks


def decoder_stack(model) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) of the model's decoder layers."""
    if is_grafted_model(model):
        layers = model.decoder_layers()
    else:
        layers = spec_for_config(model.config.to_dict()).get_layers(model)
    path = next(n for n, m in model.named_modules() if m is layers)
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path), attr, layers


@contextmanager
def from_layer(model, k: int):
    """Run only decoder layers k.. (feed their input as inputs_embeds)."""
    parent, attr, full = decoder_stack(model)
    setattr(parent, attr, nn.ModuleList(list(full)[k:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


@torch.no_grad()
def window_nll(
    model, ids: torch.Tensor, batch_size: int, start: int = 0, resid=None
) -> torch.Tensor:
    """Summed next-token NLL per window [B] (T-1 predictions each), optionally from layer `start`
    with the cached residual `resid` [B*T, d] at its input."""
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    T = ids.shape[1]
    for i in range(0, ids.shape[0], batch_size):
        b = ids[i : i + batch_size]
        if resid is None:
            logits = model(input_ids=b, use_cache=False).logits
        else:
            emb = resid[i * T : (i + b.shape[0]) * T].view(b.shape[0], T, -1)
            with from_layer(model, start):
                logits = model(inputs_embeds=emb, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(), reduction="none"
        )
        out[i : i + b.shape[0]] = nll.view(b.shape[0], T - 1).double().sum(1)
    return out


@torch.no_grad()
def base_pass(model, ids, batch_size, resid_layers, mlp_layers):
    """One full forward: per-window NLL, residual at the input of `resid_layers`, and
    the MLP inputs/outputs at `mlp_layers` (all [B*T, d], fp32, CPU)."""
    spec = spec_for_config(model.config.to_dict())
    _, _, layers = decoder_stack(model)
    n, d, T = ids.numel(), spec.hidden_size(model.config.to_dict()), ids.shape[1]
    resid = {k: torch.empty(n, d) for k in resid_layers}
    mlp = {k: (torch.empty(n, d), torch.empty(n, d)) for k in mlp_layers}
    cur = [0, 0]
    handles = []

    def put(buf, h):
        buf[cur[0] : cur[1]].copy_(h.reshape(-1, d))

    for k in resid_layers:
        handles.append(
            layers[k].register_forward_pre_hook(
                lambda m, a, kw, k=k: put(resid[k], a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            )
        )
    for k in mlp_layers:
        m_ = spec.get_mlp(model, k)
        handles.append(m_.register_forward_pre_hook(lambda m, a, k=k: put(mlp[k][0], a[0])))
        handles.append(m_.register_forward_hook(lambda m, a, o, k=k: put(mlp[k][1], o)))
    nll = torch.empty(ids.shape[0], dtype=torch.float64)
    try:
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size]
            cur[0], cur[1] = i * T, (i + b.shape[0]) * T
            logits = model(input_ids=b, use_cache=False).logits
            x = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(), reduction="none"
            )
            nll[i : i + b.shape[0]] = x.view(b.shape[0], T - 1).double().sum(1)
    finally:
        for h in handles:
            h.remove()
    return nll, resid, mlp


def ppl(nll: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(float(nll.sum()) / (ids.shape[0] * (ids.shape[1] - 1)))


@contextmanager
def mlp_zeroed(model, k: int):
    mlp = spec_for_config(model.config.to_dict()).get_mlp(model, k)
    h = mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        yield
    finally:
        h.remove()


def removal_scan(model, ids, batch_size, suffix_ok: bool) -> dict:
    """{layer: perplexity with that layer's MLP zeroed} on windows `ids`, plus the base."""
    n_layers = len(decoder_stack(model)[2])
    t0 = time.perf_counter()
    nll, resid, _ = base_pass(
        model, ids, batch_size, list(range(n_layers)) if suffix_ok else [], []
    )
    base = ppl(nll, ids)
    scan = {}
    for k in range(n_layers):
        with mlp_zeroed(model, k):
            if suffix_ok:
                nk = window_nll(model, ids, batch_size, k, resid[k])
            else:
                nk = window_nll(model, ids, batch_size)
        scan[k] = ppl(nk, ids)
        log(f"scan: layer {k} MLP removed -> ppl {scan[k]:.3f} ({scan[k] / base:.4f}x)")
    return {
        "base_ppl": base,
        "ppl": scan,
        "tokens": ids.numel(),
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------ main


def parse_sets(text: str) -> list[list[int]]:
    sets = []
    for part in (text or "").split(";"):
        part = part.strip()
        if part:
            sets.append(sorted(int(x) for x in part.split(",")))
    return sets


def run(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    timings["model_load_s"] = time.perf_counter() - t0
    calib_ids, held_ids = calibration_split(
        tok, builtin_corpus(), args.calib_tokens, args.heldout_tokens, args.seq_len, args.seed
    )
    log(f"windows: calib {tuple(calib_ids.shape)}, held-out {tuple(held_ids.shape)}")

    # Is "run from layer k with inputs_embeds = residual" exact for this family?
    first = held_ids[: min(2, held_ids.shape[0])]
    _, r, _ = base_pass(model, first, args.batch_size, [1], [])
    full = window_nll(model, first, args.batch_size)
    part = window_nll(model, first, args.batch_size, 1, r[1])
    suffix_ok = bool(torch.allclose(full, part, rtol=1e-4, atol=1e-3))
    log(f"suffix evaluation {'exact' if suffix_ok else 'NOT exact: using full forwards'}")

    sets = parse_sets(args.layers)
    scan = None
    if args.auto_layers:
        t0 = time.perf_counter()
        scan_ids = calib_ids[: max(1, math.ceil(args.scan_tokens / args.seq_len))]
        scan = removal_scan(model, scan_ids, args.batch_size, suffix_ok)
        timings["scan_s"] = time.perf_counter() - t0
        best = sorted(scan["ppl"], key=lambda k: scan["ppl"][k])[: args.auto_layers]
        best = sorted(best)
        log(f"auto layers (least removal damage): {best}")
        if best not in sets:
            sets.append(best)
    if not sets:
        raise SystemExit("no layer set: give --layers and/or --auto-layers")
    union = sorted({k for s in sets for k in s})
    firsts = sorted({s[0] for s in sets})

    t0 = time.perf_counter()
    base_nll, resid, held = base_pass(
        model, held_ids, args.batch_size, firsts if suffix_ok else [], union
    )
    timings["base_heldout_pass_s"] = time.perf_counter() - t0
    base_ppl = ppl(base_nll, held_ids)
    log(f"base held-out ppl {base_ppl:.4f} ({timings['base_heldout_pass_s']:.0f}s)")
    t0 = time.perf_counter()
    calib = capture_mlp_inputs(
        model, union, calib_ids, batch_size=args.batch_size, with_outputs=True
    )
    timings["capture_calib_s"] = time.perf_counter() - t0
    log(f"captured calibration MLP pairs at {union} ({timings['capture_calib_s']:.0f}s)")

    mem_cfg = MemoryConfig.build(
        slots=args.slots, heads=args.heads, knn=args.knn, k_dim=args.k_dim, swilu=not args.no_swilu
    )
    results = []
    for layers in sets:
        rec = {"layers": layers, "ppl": {}, "ratio": {}, "seconds": {}}
        start = layers[0]

        def evaluate(name: str, m, rec=rec, start=start, layers=layers) -> None:
            t = time.perf_counter()
            if suffix_ok:
                nll = window_nll(m, held_ids, args.batch_size, start, resid[start])
            else:
                nll = window_nll(m, held_ids, args.batch_size)
            rec["ppl"][name] = ppl(nll, held_ids)
            rec["ratio"][name] = rec["ppl"][name] / base_ppl
            rec["seconds"][f"eval_{name}"] = time.perf_counter() - t
            log(
                f"layers {layers}: {name} ppl {rec['ppl'][name]:.4f} = {rec['ratio'][name]:.4f}x base"
            )

        torch.manual_seed(args.seed)
        model_g = graft_model(model, mem_cfg, layers, "replace")
        mems = memory_layers(model_g)
        t = time.perf_counter()
        for k in layers:
            init_memory_keys(mems[k], calib[k][0], seed=args.seed, niter=args.niter)
        rec["seconds"]["key_init"] = time.perf_counter() - t
        if "random" in args.variants:
            evaluate("random", model_g)
        if "removed" in args.variants:
            saved = {k: mems[k].out_proj.weight.detach().clone() for k in layers}
            for k in layers:
                mems[k].zero_output_()
            evaluate("removed", model_g)
            with torch.no_grad():
                for k in layers:
                    mems[k].out_proj.weight.copy_(saved[k])
        jobs = {str(k): (mems[k], calib[k][0], calib[k][1]) for k in layers}
        heldout = {str(k): held[k] for k in layers}
        prefix = f"layers {layers}: "
        kw = {
            "batch_tokens": args.batch_tokens,
            "lr_values": args.lr_values,
            "lr_dense": args.lr_dense,
            "seed": args.seed,
            "heldout": heldout,
            "train_routing": args.train_routing,
            "log": lambda s, prefix=prefix: log(prefix + s),
        }
        rec["fve"] = {str(k): {} for k in layers}
        if "smoother" in args.variants:
            sm = distill_memories(jobs, steps=0, init="smoother", **kw)
            rec["seconds"]["smoother"] = sm["seconds"]
            for k, v in sm["layers"].items():
                rec["fve"][k]["random"] = v.get("heldout_fve_initial")
                rec["fve"][k]["smoother"] = v.get("heldout_fve_final")
            evaluate("smoother", model_g)
        if "closed_form" in args.variants or "distill" in args.variants:
            cf = distill_memories(jobs, steps=0, init="dense", **kw)
            rec["seconds"]["closed_form"] = cf["seconds"]
            for k, v in cf["layers"].items():
                rec["fve"][k].setdefault("random", v.get("heldout_fve_initial"))
                rec["fve"][k]["closed_form"] = v.get("heldout_fve_final")
            rec["closed_form_info"] = cf["layers"]
            if "closed_form" in args.variants:
                evaluate("closed_form", model_g)
        if "distill" in args.variants:
            ds = distill_memories(
                jobs, steps=args.steps, init="none", eval_every=args.eval_every, **kw
            )
            rec["seconds"]["adam"] = ds["adam_seconds"]
            rec["seconds"]["distill_total"] = ds["seconds"] + rec["seconds"]["closed_form"]
            rec["value_optimizer"] = ds["value_optimizer"]
            rec["curve"] = ds["curve"]
            for k, v in ds["layers"].items():
                rec["fve"][k]["distill"] = v.get("heldout_fve_final")
                rec["fve"][k]["train_distill"] = v.get("train_fve_final")
            rec["distill_info"] = ds["layers"]
            evaluate("distill", model_g)
        results.append(rec)
        del model_g, mems

    return {
        "config": {
            "model": str(args.model),
            "memory": mem_cfg.model_dump(mode="json"),
            "calib_tokens": calib_ids.numel(),
            "heldout_tokens": held_ids.numel(),
            "seq_len": args.seq_len,
            "steps": args.steps,
            "batch_tokens": args.batch_tokens,
            "lr_values": args.lr_values,
            "lr_dense": args.lr_dense,
            "train_routing": args.train_routing,
            "niter": args.niter,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "base_ppl": base_ppl,
        "suffix_eval": suffix_ok,
        "scan": scan,
        "sets": results,
        "timings": timings,
        "peak_rss_gb": peak_rss_gb(),
    }


def markdown(res: dict) -> str:
    c = res["config"]
    m = c["memory"]
    lines = [
        f"# Replace mode: held-out perplexity vs base ({Path(c['model']).name})",
        "",
        (
            f"{m['slots']:,} slots, heads {m['heads']}, knn {m['knn']}, k_dim {m['k_dim']}, "
            f"swilu {m['swilu']}; {c['calib_tokens']:,} calibration + {c['heldout_tokens']:,} "
            f"disjoint held-out tokens (builtin corpus); distill {c['steps']} steps x "
            f"{c['batch_tokens']} tokens per layer, lr values {c['lr_values']}, dense "
            f"{c['lr_dense']}, train routing {c['train_routing']}; faiss niter {c['niter']}; "
            f"{c['threads']} threads."
        ),
        "",
        f"Base held-out perplexity: {res['base_ppl']:.4f}",
        "",
        "| layers | " + " | ".join(VARIANTS) + " | distill time (s) |",
        "|---|" + "---|" * len(VARIANTS) + "---|",
    ]
    for s in res["sets"]:
        cells = [f"{s['ratio'][v]:.4f}x" if v in s["ratio"] else "-" for v in VARIANTS]
        t = s["seconds"].get("distill_total")
        t_cell = "-" if t is None else f"{t:.0f} ({t / len(s['layers']):.0f}/layer)"
        lines.append(
            f"| {','.join(map(str, s['layers']))} | " + " | ".join(cells) + f" | {t_cell} |"
        )
    lines += [
        "",
        "Held-out fraction of MLP-output variance explained, per layer:",
        "",
        "| layers | layer | random | smoother | closed form | distill | distill (train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in res["sets"]:
        for k, f in s.get("fve", {}).items():
            cells = [
                f.get(x) for x in ("random", "smoother", "closed_form", "distill", "train_distill")
            ]
            lines.append(
                f"| {','.join(map(str, s['layers']))} | {k} | "
                + " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
                + " |"
            )
    if res.get("scan"):
        sc = res["scan"]
        lines += [
            "",
            f"Removal damage (one MLP zeroed; {sc['tokens']:,} calibration tokens, base ppl {sc['base_ppl']:.3f}):",
            "",
        ]
        lines.append(", ".join(f"{k}: {v / sc['base_ppl']:.3f}x" for k, v in sc["ppl"].items()))
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())]
    for s in res["sets"]:
        lines.append(
            f"- {s['layers']}: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items())
        )
    lines.append(f"Peak RSS: {res['peak_rss_gb']:.2f} GB")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_GGUF), help="HF directory or .gguf file")
    p.add_argument(
        "--layers", default="5,15,25", help="layer set(s): '5,15,25' or '5,15,25;3,20,27'"
    )
    p.add_argument(
        "--auto-layers", type=int, default=3, help="add the K least-damaging layers (0: off)"
    )
    p.add_argument("--scan-tokens", type=int, default=4096)
    p.add_argument("--slots", default="64K")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--no-swilu", action="store_true")
    p.add_argument("--calib-tokens", type=int, default=100_000)
    p.add_argument("--heldout-tokens", type=int, default=20_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--niter", type=int, default=20, help="faiss k-means iterations (key init)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-tokens", type=int, default=DEFAULTS["batch_tokens"])
    p.add_argument("--lr-values", type=float, default=DEFAULTS["lr_values"])
    p.add_argument("--lr-dense", type=float, default=DEFAULTS["lr_dense"])
    p.add_argument("--train-routing", action="store_true", help="train query/keys too (slower)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out FVE curve every N steps")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/replace_distill"))
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
