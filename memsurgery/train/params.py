"""Parameter groups, optimizers, learning-rate schedule and gradient clipping.

Groups (by parameter name):
  values       memory_bank.values.weight            row-sparse: SparseRowAdam / SparseRowSGD
  keys         memory_bank.layers.*.keys            AdamW
  query        memory_bank.layers.*.query.weight    AdamW
  gates        relevance gate (gate_weight, gate_bias) and the SiLU gate_proj
  relevance_gate  gate_weight, gate_bias only: split off "gates" when the recipe
               sets optim.groups.relevance_gate.lr (gate_proj then stays in "gates")
  projections  memory_bank.layers.*.out_proj.weight
  norms        base parameters whose name contains "norm"
  base         every other base parameter (LoRA adapters, for method lora)
A group with lr 0 is frozen (requires_grad False); the schedule multiplies every
group's lr by the same factor, so the ratios between groups hold throughout.
"""

from __future__ import annotations

import math

import torch

from memsurgery.errors import InputError, MissingDependency
from memsurgery.train.recipe import PARAM_GROUPS, RELEVANCE_GATE

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "c_attn", "c_proj", "c_fc")


def group_of(name: str, split_relevance_gate: bool = False) -> str:
    if split_relevance_gate and "memory_bank." in name and name.endswith((".gate_weight", ".gate_bias")):
        return RELEVANCE_GATE
    if "lora_" in name:
        return "base"
    if "memory_bank." in name:
        if name.endswith("memory_bank.values.weight"):
            return "values"
        if name.endswith(".keys"):
            return "keys"
        if ".query." in name:
            return "query"
        if ".gate_proj." in name or name.endswith((".gate_weight", ".gate_bias")):
            return "gates"
        return "projections"
    last = name.rsplit(".", 2)[-2:] if "." in name else [name]
    return "norms" if any("norm" in p.lower() for p in last) else "base"


def apply_lora(model, spec):
    """Wrap `model` with peft LoRA adapters on the attention and MLP projections."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingDependency("method lora needs peft: pip install peft") from None
    names = list(LORA_TARGETS) if spec.target_modules == "auto" else list(spec.target_modules)
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "memory_bank" not in n}
    use = [n for n in names if n in present]
    if not use:
        raise InputError(f"lora.target_modules: none of {names} is a linear layer of this model "
                         f"(its linear layers: {sorted(present)[:12]})")
    # A regex, not a name list: a list would also match the memory layers' gate_proj.
    pattern = r"^(?!.*memory_bank).*\.(" + "|".join(use) + r")$"
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def select_trainable(model, recipe, grafted: bool) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Set requires_grad from the group learning rates; return {group: [(name, param)]} (trainable only)."""
    method = recipe.train.method
    if method in ("memory", "sparse_memory") and not grafted:
        raise InputError(f"model {recipe.model}: method {method} needs a grafted checkpoint "
                         "(run `memsurgery graft` first), or use method full / lora")
    groups: dict[str, list] = {g: [] for g in PARAM_GROUPS}
    split = recipe.split_relevance_gate
    for name, p in model.named_parameters():
        g = group_of(name, split)
        if method == "lora" and g == "base" and "lora_" not in name:
            p.requires_grad_(False)  # the base under LoRA stays frozen; adapters train
            continue
        on = recipe.lr(g) > 0
        p.requires_grad_(on)
        if on:
            groups[g].append((name, p))
    if not any(groups.values()):
        raise InputError("no parameter is trained: every group's lr is 0 for this model "
                         "(set optim.groups.<group>.lr)")
    return {g: v for g, v in groups.items() if v}


def all_group_counts(model, split_relevance_gate: bool = False) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = group_of(name, split_relevance_gate)
        out[g] = out.get(g, 0) + p.numel()
    return out


class Optimizers:
    """AdamW for dense groups plus a row-sparse optimizer for the value table."""

    def __init__(self, groups: dict, recipe):
        from memsurgery.optim.sparse import SparseRowAdam, SparseRowSGD

        o = recipe.optim
        self.dense = None
        self.values = None
        dense_groups = [
            {"params": [p for _, p in groups[g]], "lr": recipe.lr(g), "initial_lr": recipe.lr(g),
             "weight_decay": recipe.weight_decay(g), "name": g}
            for g in PARAM_GROUPS if g in groups and g != "values"
        ]
        if dense_groups:
            self.dense = torch.optim.AdamW(dense_groups, betas=tuple(o.betas), eps=o.eps, foreach=False)
        if "values" in groups:
            vp = [p for _, p in groups["values"]]
            lr = recipe.lr("values")
            if o.value_optimizer == "adam":
                self.values = SparseRowAdam(vp, lr=lr, betas=tuple(o.betas), eps=o.eps, chunk_rows=16384)
            else:
                self.values = SparseRowSGD(vp, lr=lr, chunk_rows=16384)
            for g in self.values.param_groups:
                g["initial_lr"] = lr
                g["name"] = "values"

    def all(self) -> list[tuple[str, torch.optim.Optimizer]]:
        return [(n, o) for n, o in (("dense", self.dense), ("values", self.values)) if o is not None]

    def set_multiplier(self, mult: float) -> dict[str, float]:
        lrs = {}
        for _, opt in self.all():
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
                lrs[g["name"]] = g["lr"]
        return lrs

    def step(self) -> None:
        for _, opt in self.all():
            opt.step()

    def zero_grad(self) -> None:
        for _, opt in self.all():
            opt.zero_grad(set_to_none=True)

    # ---- state without pickle: tensors -> safetensors, the rest -> JSON -----------

    def state_tensors_and_json(self) -> tuple[dict[str, torch.Tensor], dict]:
        from torch.distributed.tensor import DTensor

        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {}
        for oname, opt in self.all():
            sd = opt.state_dict()
            scalars: dict = {}
            for idx, st in sd["state"].items():
                for k, v in st.items():
                    if isinstance(v, DTensor):  # FSDP2 state: gathered (collective, same order on every rank)
                        v = v.full_tensor()
                    if isinstance(v, torch.Tensor):
                        tensors[f"{oname}.{idx}.{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars.setdefault(str(idx), {})[k] = v
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                      for g in sd["param_groups"]]
            meta[oname] = {"param_groups": groups, "scalars": scalars}
        return tensors, meta

    def load_tensors_and_json(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for oname, opt in self.all():
            if oname not in meta:
                raise InputError(f"checkpoint has no {oname} optimizer state; it belongs to another recipe")
            state: dict = {}
            prefix = f"{oname}."
            for key, t in tensors.items():
                if key.startswith(prefix):
                    idx, k = key[len(prefix):].split(".", 1)
                    state.setdefault(int(idx), {})[k] = t
            for idx, sc in meta[oname]["scalars"].items():
                state.setdefault(int(idx), {}).update(sc)
            params = [p for g in opt.param_groups for p in g["params"]]
            for idx, st in state.items():
                p = params[idx] if idx < len(params) else None
                if isinstance(p, DTensor):  # full-size state -> this rank's shard
                    for k, t in list(st.items()):
                        if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(p.shape):
                            st[k] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
            groups = []
            for g in meta[oname]["param_groups"]:
                g = dict(g)
                if "betas" in g:
                    g["betas"] = tuple(g["betas"])
                groups.append(g)
            opt.load_state_dict({"state": state, "param_groups": groups})


def schedule_multiplier(spec, step: int, total: int) -> float:
    """LR factor for optimizer step `step` (0-based) of `total`: warmup, then the decay."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.kind == "constant":
        return 1.0
    span = max(1, total - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    lo = spec.min_lr_ratio
    if spec.kind == "linear":
        return lo + (1.0 - lo) * (1.0 - progress)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def grad_norm_(params: list[torch.nn.Parameter], max_norm: float | None, *, sharded=(), reduce=None) -> float:
    """Global L2 norm of every gradient (dense and row-sparse), clipped to `max_norm` in place.

    Sparse gradients must be coalesced (each row once) so that the norm counts each
    row's summed gradient. `sharded` parameters hold only this rank's columns: their
    squared norms are summed over ranks with `reduce` (an in-place all-reduce).
    Returns the norm before clipping (inf/nan when non-finite).
    """
    from torch.distributed.tensor import DTensor

    # FSDP2 parameters (DTensors) are sharded too: each rank sums its local shard.
    shard_ids = {id(p) for p in sharded} | {id(p) for p in params if isinstance(p, DTensor)}
    parts: list[torch.Tensor] = []
    shard_parts: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        v = g._values() if g.is_sparse else g
        if isinstance(v, DTensor):
            v = v.to_local()
        (shard_parts if id(p) in shard_ids else parts).append(v.detach().double().pow(2).sum())
    any_grad = bool(parts or shard_parts)

    def _total(xs):  # one device sync per list, not one per parameter
        return torch.stack([x.to(xs[0].device) for x in xs]).sum().cpu() if xs else torch.zeros((), dtype=torch.float64)

    sq, sq_shard = _total(parts), _total(shard_parts)
    if shard_ids and reduce is not None:
        reduce(sq_shard)
    if not any_grad and not shard_ids:
        return 0.0
    total = float((sq + sq_shard).sqrt())
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                (p.grad._values() if p.grad.is_sparse else p.grad).mul_(coef)
    return total
