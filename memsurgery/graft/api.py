"""`memsurgery.graft(...)`: dense checkpoint in, memory-augmented checkpoint out.

Steps (each timed in the report):
  1. open + validate the source, refuse an already-grafted one, check RAM
  2. choose layers (explicit, evenly spaced default, or `auto` = causal tracing)
  3. load weights + tokenizer; calibration / held-out token windows (disjoint)
  4. capture each chosen layer's MLP input (and output, for distillation)
  5. build the grafted model (base weights shared, not copied)
  6. per layer: reference init -> usage on held-out (the "random" column);
     query PCA + faiss k-means sub-keys -> usage again (the "faiss" column)
  7. values: zero (parallel: the function is preserved), random, or distill
  8. check: parallel -> logits vs base; replace -> held-out perplexity vs base
  9. write OUT atomically: weights, remote code, graft.json, model card
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from memsurgery import __version__
from memsurgery._atomic import atomic_output_dir, check_output_dir
from memsurgery.errors import InputError
from memsurgery.graft.plan import GraftPlan, build_plan

_GiB = 1 << 30


def _versions() -> dict:
    import transformers

    out = {"memsurgery": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import faiss

        out["faiss"] = getattr(faiss, "__version__", "unknown")
    except ImportError:
        out["faiss"] = None
    return out


def estimate_graft_bytes(n_params: int, plan: GraftPlan, hidden: int, n_layers: int) -> dict:
    """Peak bytes the graft will need, before anything is allocated."""
    elem = 2 if plan.value_dtype == "bfloat16" else 4
    table = plan.slots * hidden * elem
    acts_per_layer = (plan.calib_tokens + plan.heldout_tokens) * hidden * 4
    acts = acts_per_layer * n_layers * (2 if plan.effective_values == "distill" else 1)
    # Distillation trains the table with row-wise Adam: two fp32 moments per row.
    optim = 2 * plan.slots * hidden * 4 if plan.effective_values == "distill" else 0
    model = n_params * 4
    # Activations of one forward batch (8 x seq_len) plus logits are small next to these.
    total = model + table + acts + optim
    return {"model_fp32": model, "value_table": table, "activations": acts, "optimizer": optim,
            "total": total}


def _model_card(out_name: str, source: str, plan: GraftPlan, layers: list[int], report: dict) -> str:
    usage_rows = "\n".join(
        f"| {L} | {u['random']['pct_used']:.2f}% | {u['faiss']['pct_used']:.2f}% |"
        if u.get("faiss") else f"| {L} | {u['random']['pct_used']:.2f}% | – |"
        for L, u in ((int(k), v) for k, v in report["usage"].items())
    )
    check = report.get("check", {})
    return f"""---
library_name: transformers
tags:
- memsurgery
- memory-layers
- product-key-memory
base_model_relation: adapter
---

# {out_name}

A dense checkpoint with a shared product-key memory (Memory+) grafted in by
[memsurgery](https://pypi.org/project/memsurgery/) {__version__}.

- **Source:** `{source}` (weights SHA-256 `{report['source_sha256']}`)
- **Mode:** {plan.mode} at layers {', '.join(map(str, layers))}
- **Memory:** {plan.slots:,} slots shared by all memory layers, {plan.heads} heads, knn {plan.knn},
  k_dim {plan.k_dim}, qk-norm {plan.qk_norm}, SiLU gate {plan.swilu}, relevance gate {plan.effective_gate}
- **Init:** query {plan.query_init}, keys {plan.keys}, values {plan.effective_values}, seed {plan.seed}
- **Check:** {json.dumps(check)}

## Slot usage on held-out calibration tokens

| layer | random keys: % slots used | faiss keys: % slots used |
|---|---|---|
{usage_rows}

## Loading

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)
# or, with memsurgery installed (fast kernels, sparse value gradients, no remote code):
import memsurgery.export.hf as hf; model = hf.load_grafted("{out_name}")
```

`graft.json` holds the full plan, initialization statistics and library versions.
"""


def graft(
    ckpt: str | Path,
    out: str | Path | None = None,
    *,
    plan: GraftPlan | dict | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    log=lambda msg: None,
    **overrides: Any,
):
    """Graft a shared product-key memory into `ckpt`; write it to `out` when given.

    `plan` (a GraftPlan or dict of its fields) and keyword overrides (same names)
    choose what is grafted. Returns (model, report): the grafted model in eval mode
    and a JSON-serializable report (also saved as OUT/graft.json).
    """
    from memsurgery.arch import spec_for_config
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.export import hf
    from memsurgery.graft import calibration, keyinit
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    fields = dict(plan.model_dump() if isinstance(plan, GraftPlan) else (plan or {}))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    plan = build_plan(fields)

    # ---- 1. cheap checks before any weight is loaded
    if out is not None:
        check_output_dir(Path(out), force)
    src = open_checkpoint(ckpt, allow_pickle=allow_pickle)
    if hf.is_grafted_config(src.config):
        raise InputError(f"{ckpt}: is already grafted (config.json has a memory block); "
                         "graft the original dense checkpoint instead")
    spec = spec_for_config(src.config)
    src.validate()
    n_layers = spec.num_layers(src.config)
    hidden = spec.hidden_size(src.config)
    if out is not None and Path(out).absolute() in (Path(src.root).absolute(), *Path(src.root).absolute().parents):
        raise InputError(f"{out}: output must not be the source checkpoint or contain it")

    if isinstance(plan.layers, list):
        bad = [L for L in plan.layers if not 0 <= L < n_layers]
        if bad or not plan.layers or len(set(plan.layers)) != len(plan.layers):
            raise InputError(f"--layers {','.join(map(str, plan.layers))}: need distinct layer numbers in "
                             f"[0, {n_layers - 1}] (the model has {n_layers} layers)")
    n_mem = 3 if not isinstance(plan.layers, list) else len(plan.layers)
    n_params = sum(math_prod(t.shape) for t in src.tensors.values())
    need = estimate_graft_bytes(n_params, plan, hidden, n_mem)
    import psutil

    avail = psutil.virtual_memory().available
    if need["total"] > avail and not force:
        raise InputError(
            f"{ckpt}: this graft needs about {need['total'] / _GiB:.1f} GiB (model {need['model_fp32'] / _GiB:.1f}, "
            f"value table {need['value_table'] / _GiB:.1f}, activations {need['activations'] / _GiB:.1f}, "
            f"optimizer {need['optimizer'] / _GiB:.1f}) but {avail / _GiB:.1f} GiB is available; "
            "use fewer --slots, --calib-tokens or --value-dtype bfloat16, or pass --force"
        )

    # ---- 3. weights, tokenizer, calibration tokens
    t = time.perf_counter()
    log(f"loading {src.format} checkpoint {src.path}")
    base = src.load_model(dtype=torch.float32)
    tokenizer = src.load_tokenizer()
    if tokenizer is None:
        raise InputError(f"{ckpt}: has no tokenizer; graft needs one to read the calibration text")
    source_sha = src.weights_sha256()
    timings["load"] = time.perf_counter() - t

    # ---- 2. layers
    t = time.perf_counter()
    trace_profile = None
    if plan.layers == "auto":
        from memsurgery.inspection import trace

        log("choosing layers by causal tracing (--layers auto)")
        facts = trace.load_facts(plan.trace_facts)
        trace_profile = trace.trace_layers(base, tokenizer, facts, seed=plan.seed, log=log)
        layers = trace.choose_layers(trace_profile, k=3)
    elif plan.layers == "default":
        from memsurgery.inspection import default_memory_layers

        layers = list(default_memory_layers(n_layers))
    else:
        layers = sorted(plan.layers)
    timings["layers"] = time.perf_counter() - t
    log(f"memory layers: {layers}")

    t = time.perf_counter()
    texts = calibration.load_texts(plan.calib, field=plan.calib_field)
    calib_ids, heldout_ids = calibration.calibration_split(
        tokenizer, texts, plan.calib_tokens, plan.heldout_tokens, seq_len=plan.seq_len, seed=plan.seed)
    distill = plan.effective_values == "distill"
    log(f"capturing MLP inputs at layers {layers}: {calib_ids.numel():,} calibration + "
        f"{heldout_ids.numel():,} held-out tokens")
    calib_acts = calibration.capture_mlp_inputs(base, layers, calib_ids, with_outputs=distill)
    heldout_acts = calibration.capture_mlp_inputs(base, layers, heldout_ids, with_outputs=distill)
    timings["capture"] = time.perf_counter() - t

    # Reference logits / perplexity of the base, before the graft shares its weights.
    check_ids = heldout_ids[:1, : min(128, heldout_ids.shape[1])]
    with torch.no_grad():
        base_logits = base(check_ids).logits

    # ---- 5. the grafted model
    mcfg = MemoryConfig.build(slots=plan.slots, heads=plan.heads, knn=plan.knn, k_dim=plan.k_dim,
                              qk_norm=plan.qk_norm, swilu=plan.swilu, gate=plan.effective_gate,
                              value_dtype=plan.value_dtype)
    model = graft_model(base, mcfg, layers, plan.mode)
    mem = hf.memory_layers(model)

    # ---- 6. keys
    t = time.perf_counter()
    usage: dict[str, dict] = {}
    key_info: dict[str, dict] = {}
    for i, L in enumerate(layers):
        layer = mem[L]
        x_cal = calib_acts[L][0] if distill else calib_acts[L]
        x_held = heldout_acts[L][0] if distill else heldout_acts[L]
        torch.manual_seed(plan.seed * 1000 + i)
        layer.reset_parameters()
        usage[str(L)] = {"random": keyinit.measure_usage(layer, x_held), "faiss": None}
        if plan.keys == "faiss" or plan.query_init != "random":
            log(f"layer {L}: query {plan.query_init}, keys {plan.keys} on {x_cal.shape[0]:,} tokens")
            key_info[str(L)] = keyinit.init_memory_keys(layer, x_cal, keys=plan.keys, query=plan.query_init,
                                                        seed=plan.seed + i, niter=plan.kmeans_iters)
            if plan.keys == "faiss":
                usage[str(L)]["faiss"] = keyinit.measure_usage(layer, x_held)
        u = usage[str(L)]
        log(f"layer {L}: slots used on held-out tokens: random {u['random']['pct_used']:.2f}%"
            + (f", faiss {u['faiss']['pct_used']:.2f}%" if u["faiss"] else ""))
    timings["keys"] = time.perf_counter() - t

    # ---- 7. values
    t = time.perf_counter()
    values_mode = plan.effective_values
    distill_info = {}
    with torch.no_grad():
        if values_mode == "zero":
            model.memory_bank.values.zero_()
        elif values_mode == "random":
            torch.manual_seed(plan.seed)
            model.memory_bank.values.reset_parameters()
            if plan.mode == "parallel":
                # Random rows must not change the function: silence the output instead.
                for layer in mem.values():
                    layer.zero_output_()
    if values_mode == "distill":
        from memsurgery.train.distill import distill_memories

        # One joint fit: the layers share the value table, so fitting them one after
        # another would let each layer overwrite rows the previous one relied on.
        log(f"distilling layers {layers} jointly to imitate the removed FFNs ({plan.distill_steps} steps)")
        res = distill_memories({L: (mem[L], *calib_acts[L]) for L in layers},
                               steps=plan.distill_steps, seed=plan.seed,
                               heldout={L: heldout_acts[L] for L in layers}, log=log)
        distill_info = {k: res[k] for k in ("steps", "seconds", "value_optimizer", "layers") if k in res}
    timings["values"] = time.perf_counter() - t
    model.eval()

    # ---- 8. checks
    t = time.perf_counter()
    check: dict[str, Any] = {}
    with torch.no_grad():
        g_logits = model(check_ids).logits
    check["max_abs_logit_diff_vs_base"] = float((g_logits - base_logits).abs().max())
    if plan.mode == "replace":
        from memsurgery.probe.perplexity import perplexity

        ppl_ids = heldout_ids
        g_ppl = perplexity(model, ppl_ids)
        # The base shares every kept tensor with `model`, and is still intact.
        b_ppl = perplexity(base, ppl_ids)
        check.update(heldout_ppl=g_ppl, base_heldout_ppl=b_ppl, ppl_ratio=g_ppl / b_ppl,
                     heldout_tokens=int(ppl_ids.numel()))
        log(f"held-out perplexity {g_ppl:.3f} vs base {b_ppl:.3f} (x{g_ppl / b_ppl:.3f})")
    else:
        log(f"function check: max |logit diff| vs base = {check['max_abs_logit_diff_vs_base']:.2e}")
    timings["check"] = time.perf_counter() - t

    report = {
        "schema": "memsurgery.graft/1",
        "source": str(Path(ckpt).absolute()),
        "source_format": src.format,
        "source_sha256": source_sha,
        "plan": plan.model_dump(mode="json"),
        "layers": layers,
        "mode": plan.mode,
        "values": values_mode,
        "gate": plan.effective_gate,
        "memory_config": mcfg.for_model(hidden).model_dump(mode="json"),
        "memory_params": sum(p.numel() for p in model.memory_bank.parameters()),
        "usage": usage,
        "key_init": key_info,
        "distill": distill_info,
        "trace": trace_profile,
        "check": check,
        "calibration": {"source": plan.calib or "builtin", "calib_tokens": int(calib_ids.numel()),
                        "heldout_tokens": int(heldout_ids.numel()), "seq_len": plan.seq_len},
        "memory_estimate_bytes": need,
        "versions": _versions(),
        "seed": plan.seed,
        "timings": timings,
    }

    # ---- 9. write
    if out is not None:
        t = time.perf_counter()
        out = Path(out)
        log(f"writing {out}")
        with atomic_output_dir(out, force=force) as tmp:
            report["timings"]["write"] = 0.0
            extra = {"graft.json": json.dumps(report, indent=2, default=str) + "\n",
                     "README.md": _model_card(out.name, str(Path(ckpt).absolute()), plan, layers, report)}
            hf.save_grafted(model, tmp, tokenizer=tokenizer, extra_files=extra)
            timings["write"] = time.perf_counter() - t
            report["timings"] = timings
            (tmp / "graft.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    timings["total"] = time.perf_counter() - t_start
    report["timings"] = timings
    return model, report


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
