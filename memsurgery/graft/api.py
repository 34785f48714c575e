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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memsurgery import __version__
from memsurgery._atomic import atomic_output_dir, check_output_dir
from memsurgery._vocab import resolve_device
from memsurgery.checkpoint.hub import describe_source, origin
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
    from memsurgery.export.card import front_matter, portable

    head = "\n".join(front_matter(base_model=report.get("base_model"), license=report.get("license"),
                                  relation="finetune", library="transformers",
                                  tags=["memsurgery", "memory-layers", "product-key-memory"]))
    source = portable(source)
    return head + f"""

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
    device: str = "auto",
    log=lambda msg: None,
    **overrides: Any,
):
    """Graft a shared product-key memory into `ckpt`; write it to `out` when given.

    `plan` (a GraftPlan or dict of its fields) and keyword overrides (same names) choose
    what is grafted; `device` (auto | cpu | cuda) is where capture and checks run. Returns
    (model on `device`, eval mode; a JSON-serializable report, also OUT/graft.json).
    """
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    fields = dict(plan.model_dump() if isinstance(plan, GraftPlan) else (plan or {}))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    plan = build_plan(fields)
    dev = resolve_device(device)

    src, n_layers, hidden, need = _open_source(ckpt, out, plan, force, allow_pickle)  # 1
    with _timed(timings, "load"):  # 3
        base, tokenizer, source_sha = _load_base(src, ckpt, log, dev)
    with _timed(timings, "layers"):  # 2
        layers, trace_profile = _choose_layers(plan, base, tokenizer, n_layers, log)
    log(f"memory layers: {layers}")
    with _timed(timings, "capture"):  # 4
        cal = _calibrate(plan, base, tokenizer, layers, log)
    # Reference logits of the base, before the graft shares its weights.
    check_ids = cal.heldout_ids[:1, : min(128, cal.heldout_ids.shape[1])].to(dev)
    with torch.no_grad():
        base_logits = base(check_ids).logits
    mcfg = MemoryConfig.build(slots=plan.slots, heads=plan.heads, knn=plan.knn, k_dim=plan.k_dim,
                              qk_norm=plan.qk_norm, swilu=plan.swilu, gate=plan.effective_gate,
                              value_dtype=plan.value_dtype)
    model = graft_model(base, mcfg, layers, plan.mode)  # 5
    with _timed(timings, "keys"):  # 6
        usage, key_info = _init_keys(plan, model, layers, cal, log)
    with _timed(timings, "values"):  # 7
        distill_info = _init_values(plan, model, layers, cal, log)
    model.eval()
    with _timed(timings, "check"):  # 8
        check = _check(plan, model, base, check_ids, base_logits, cal.heldout_ids, log)

    report = {
        "schema": "memsurgery.graft/1",
        "source": describe_source(ckpt), "source_format": src.format, "source_sha256": source_sha,
        **origin(src.root),  # base_model (a Hub id) and license, for the model cards downstream
        "plan": plan.model_dump(mode="json"),
        "layers": layers,
        "mode": plan.mode,
        "values": plan.effective_values,
        "gate": plan.effective_gate,
        "memory_config": mcfg.for_model(hidden).model_dump(mode="json"),
        "memory_params": sum(p.numel() for p in model.memory_bank.parameters()),
        "usage": usage,
        "key_init": key_info,
        "distill": distill_info,
        "trace": trace_profile,
        "check": check,
        "calibration": {"source": plan.calib or "builtin", "calib_tokens": int(cal.calib_ids.numel()),
                        "heldout_tokens": int(cal.heldout_ids.numel()), "seq_len": plan.seq_len},
        "memory_estimate_bytes": need, "device": str(dev),
        "versions": _versions(),
        "seed": plan.seed,
        "timings": timings,
    }
    if out is not None:  # 9
        _write(Path(out), ckpt, model, tokenizer, plan, layers, report, force, log)
    timings["total"] = time.perf_counter() - t_start
    report["timings"] = timings
    return model, report


@contextmanager
def _timed(timings: dict[str, float], step: str):
    """Record the seconds the block takes as timings[step]."""
    t = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - t


def _open_source(ckpt, out, plan: GraftPlan, force: bool, allow_pickle: bool):
    """Step 1, cheap checks before any weight is loaded: (checkpoint, layers, hidden, memory estimate)."""
    from memsurgery.arch import spec_for_config
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.export import hf

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
    return src, n_layers, hidden, _check_ram(ckpt, src, plan, hidden, force)


def _check_ram(ckpt, src, plan: GraftPlan, hidden: int, force: bool) -> dict:
    """The graft's memory estimate; InputError when it exceeds the available RAM (unless force)."""
    import psutil

    n_mem = 3 if not isinstance(plan.layers, list) else len(plan.layers)
    n_params = sum(math_prod(t.shape) for t in src.tensors.values())
    need = estimate_graft_bytes(n_params, plan, hidden, n_mem)
    avail = psutil.virtual_memory().available
    if need["total"] > avail and not force:
        raise InputError(
            f"{ckpt}: this graft needs about {need['total'] / _GiB:.1f} GiB (model {need['model_fp32'] / _GiB:.1f}, "
            f"value table {need['value_table'] / _GiB:.1f}, activations {need['activations'] / _GiB:.1f}, "
            f"optimizer {need['optimizer'] / _GiB:.1f}) but {avail / _GiB:.1f} GiB is available; "
            "use fewer --slots, --calib-tokens or --value-dtype bfloat16, or pass --force"
        )
    return need


def _load_base(src, ckpt, log, device):
    """Step 3: (base model in fp32 on `device`, tokenizer, SHA-256 of the source weights)."""
    log(f"loading {src.format} checkpoint {src.path}")
    base = src.load_model(dtype=torch.float32).to(device)
    tokenizer = src.load_tokenizer()
    if tokenizer is None:
        raise InputError(f"{ckpt}: has no tokenizer; graft needs one to read the calibration text")
    return base, tokenizer, src.weights_sha256()


def _choose_layers(plan: GraftPlan, base, tokenizer, n_layers: int, log) -> tuple[list[int], dict | None]:
    """Step 2: (memory layers, causal-tracing profile or None): explicit, default or `auto`."""
    if plan.layers == "auto":
        from memsurgery.inspection import trace

        log("choosing layers by causal tracing (--layers auto)")
        facts = trace.load_facts(plan.trace_facts)
        profile = trace.trace_layers(base, tokenizer, facts, seed=plan.seed, log=log)
        return trace.choose_layers(profile, k=3), profile
    if plan.layers == "default":
        from memsurgery.inspection import default_memory_layers

        return list(default_memory_layers(n_layers)), None
    return sorted(plan.layers), None


@dataclass
class _Calibration:
    """Step 4's token windows and what each memory layer's MLP saw on them."""

    calib_ids: torch.Tensor  # [n, T]
    heldout_ids: torch.Tensor  # [m, T], disjoint from calib_ids
    calib_acts: dict  # {layer: inputs [N, d]}, or (inputs, outputs) when distilling
    heldout_acts: dict
    with_outputs: bool

    def inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibration, held-out) MLP inputs of one layer."""
        if self.with_outputs:
            return self.calib_acts[layer][0], self.heldout_acts[layer][0]
        return self.calib_acts[layer], self.heldout_acts[layer]


def _calibrate(plan: GraftPlan, base, tokenizer, layers: list[int], log) -> _Calibration:
    """Step 4: calibration and held-out windows; each layer's MLP input (and output, to distill)."""
    from memsurgery.graft import calibration

    texts = calibration.load_texts(plan.calib, field=plan.calib_field)
    calib_ids, heldout_ids = calibration.calibration_split(
        tokenizer, texts, plan.calib_tokens, plan.heldout_tokens, seq_len=plan.seq_len, seed=plan.seed)
    distill = plan.effective_values == "distill"
    log(f"capturing MLP inputs at layers {layers}: {calib_ids.numel():,} calibration + "
        f"{heldout_ids.numel():,} held-out tokens")
    calib_acts = calibration.capture_mlp_inputs(base, layers, calib_ids, with_outputs=distill)
    heldout_acts = calibration.capture_mlp_inputs(base, layers, heldout_ids, with_outputs=distill)
    return _Calibration(calib_ids, heldout_ids, calib_acts, heldout_acts, distill)


def _init_keys(plan: GraftPlan, model, layers: list[int], cal: _Calibration, log) -> tuple[dict, dict]:
    """Step 6, per layer: reference init -> usage on held-out (the "random" column); query
    init + faiss k-means sub-keys -> usage again (the "faiss" column). (usage, key-init info)."""
    from memsurgery.export import hf
    from memsurgery.graft import keyinit

    mem = hf.memory_layers(model)
    usage: dict[str, dict] = {}
    key_info: dict[str, dict] = {}
    for i, L in enumerate(layers):
        layer = mem[L]
        x_cal, x_held = cal.inputs(L)
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
    return usage, key_info


def _init_values(plan: GraftPlan, model, layers: list[int], cal: _Calibration, log) -> dict:
    """Step 7: zero values (parallel: the function is preserved), random, or distilled. Distill info."""
    from memsurgery.export import hf

    mem = hf.memory_layers(model)
    values_mode = plan.effective_values
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
    if values_mode != "distill":
        return {}
    from memsurgery.train.distill import distill_memories

    # One joint fit: the layers share the value table, so fitting them one after
    # another would let each layer overwrite rows the previous one relied on.
    log(f"distilling layers {layers} jointly to imitate the removed FFNs ({plan.distill_steps} steps)")
    res = distill_memories({L: (mem[L], *cal.calib_acts[L]) for L in layers},
                           steps=plan.distill_steps, seed=plan.seed,
                           heldout={L: cal.heldout_acts[L] for L in layers}, log=log)
    return {k: res[k] for k in ("steps", "seconds", "value_optimizer", "layers") if k in res}


def _check(plan: GraftPlan, model, base, check_ids, base_logits, heldout_ids, log) -> dict[str, Any]:
    """Step 8: parallel -> logits vs base; replace -> held-out perplexity vs base."""
    check: dict[str, Any] = {}
    with torch.no_grad():
        g_logits = model(check_ids).logits
    check["max_abs_logit_diff_vs_base"] = float((g_logits - base_logits).abs().max())
    if plan.mode == "replace":
        from memsurgery.probe.perplexity import perplexity

        g_ppl = perplexity(model, heldout_ids)
        # The base shares every kept tensor with `model`, and is still intact.
        b_ppl = perplexity(base, heldout_ids)
        check.update(heldout_ppl=g_ppl, base_heldout_ppl=b_ppl, ppl_ratio=g_ppl / b_ppl,
                     heldout_tokens=int(heldout_ids.numel()))
        log(f"held-out perplexity {g_ppl:.3f} vs base {b_ppl:.3f} (x{g_ppl / b_ppl:.3f})")
    else:
        log(f"function check: max |logit diff| vs base = {check['max_abs_logit_diff_vs_base']:.2e}")
    return check


def _write(out: Path, ckpt, model, tokenizer, plan: GraftPlan, layers: list[int], report: dict, force: bool,
           log) -> None:
    """Step 9: OUT written atomically: weights, remote code, graft.json, model card."""
    from memsurgery.export import hf

    timings = report["timings"]
    t = time.perf_counter()
    log(f"writing {out}")
    with atomic_output_dir(out, force=force) as tmp:
        report["timings"]["write"] = 0.0
        extra = {"graft.json": json.dumps(report, indent=2, default=str) + "\n",
                 "README.md": _model_card(out.name, report["source"], plan, layers, report)}
        hf.save_grafted(model, tmp, tokenizer=tokenizer, extra_files=extra)
        timings["write"] = time.perf_counter() - t
        report["timings"] = timings
        (tmp / "graft.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
