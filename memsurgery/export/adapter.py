"""The memory adapter: a graft's memory alone, as a delta over an unchanged base model.

    save_memory_adapter(grafted_model, out_dir, base_weights_sha256=..., base_model="owner/name")
    model = load_memory_adapter("owner/name" or base_dir, adapter_dir)     # the grafted model again

Files (like a PEFT adapter, but for memory layers):

    memory_adapter.safetensors   every `memory_bank.*` tensor: the shared value table and each
                                 memory layer's query, keys, gates and output projection
    memory_adapter.json          {"schema": "memsurgery.memory_adapter/1", "base_model" (Hub id or
                                 null), "base_weights_sha256", "base_model_type", "memory" (the
                                 config.json memory block: config, layers, mode, where the MLPs sit),
                                 "parameters", "dtype", "tensors", "memsurgery"}

A memory-only training run (`method: memory` / `sparse_memory`) leaves the base bit for bit
unchanged, so base + adapter is the trained model exactly. Loading checks the base's weight
files against the recorded SHA-256 (the same hash `graft` records as the source's), so an
adapter is never silently put on another base; `check_base=False` skips that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memsurgery.errors import InputError

ADAPTER_WEIGHTS = "memory_adapter.safetensors"
ADAPTER_CONFIG = "memory_adapter.json"
SCHEMA = "memsurgery.memory_adapter/1"
PREFIX = "memory_bank."


def is_memory_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def memory_state(model) -> dict[str, torch.Tensor]:
    """The grafted model's memory tensors, named as in its state dict (memory_bank.*)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX)}


def base_differences(grafted, base, atol: float = 0.0) -> list[str]:
    """Names of the grafted model's non-memory tensors that differ from the base's.

    Empty for a memory-only training run. Replace-mode grafts drop the base's MLP at their
    memory layers; those tensors are simply absent from the grafted model."""
    base_state = base.state_dict()
    diff = []
    for name, t in grafted.state_dict().items():
        if name.startswith(PREFIX):
            continue
        b = base_state.get(name)
        if b is None or b.shape != t.shape or not torch.allclose(t.float().cpu(), b.float().cpu(), rtol=0, atol=atol):
            diff.append(name)
    return diff


def save_memory_adapter(model, out_dir, *, base_weights_sha256: str, base_model: str | None = None,
                        license: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write the adapter files into `out_dir` (normally a temp dir of an atomic output); return the JSON."""
    from safetensors.torch import save_file

    from memsurgery import __version__

    out_dir = Path(out_dir)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in memory_state(model).items()}
    if not state:
        raise InputError(f"{type(model).__name__} has no memory tensors: a memory adapter needs a grafted model")
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt", "schema": SCHEMA})
    meta = {"schema": SCHEMA, "base_model": base_model, "license": license,
            "base_weights_sha256": base_weights_sha256, "base_model_type": model.config.base_model_type,
            "memory": json.loads(json.dumps(model.config.memory)),
            "parameters": int(sum(v.numel() for v in state.values())), "tensors": len(state),
            "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."), "memsurgery": __version__}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_adapter_config(adapter) -> dict:
    path = Path(adapter) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{adapter}: not a memory adapter (cannot read {ADAPTER_CONFIG}: {err}); "
                         "make one with memsurgery export --format memory-adapter") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema {meta.get('schema') if isinstance(meta, dict) else None!r} is not "
                         f"{SCHEMA}; upgrade memsurgery or re-export the adapter")
    return meta


def load_memory_adapter(base, adapter, *, check_base: bool = True, dtype: torch.dtype = torch.float32):
    """The grafted model: `base` (a path, a Hub id, a loaded dense model, or None for the
    adapter's recorded base_model) with the adapter's memory attached; eval mode, on the CPU
    (or on the base model's device when a model is given)."""
    from safetensors.torch import load_file

    from memsurgery.checkpoint.hub import resolve_checkpoint
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    adapter = resolve_checkpoint(adapter, what="memory adapter")
    meta = read_adapter_config(adapter)
    if base is None:
        base = meta.get("base_model")
        if not base:
            raise InputError(f"{adapter}: the adapter names no base model; pass the base checkpoint (--base)")
    base_model = base if isinstance(base, torch.nn.Module) else _open_base(base, meta, check_base)
    block = meta["memory"]
    try:
        model = graft_model(base_model, MemoryConfig(**block["config"]), block["layers"], block["mode"])
    except InputError as err:
        raise InputError(f"{adapter}: does not fit this base model ({err})") from None
    for key in ("layers_path", "mlp_module"):
        if block.get(key) and model.config.memory.get(key) != block[key]:
            raise InputError(f"{adapter}: memory.{key} is {block[key]!r}, this base has "
                             f"{model.config.memory.get(key)!r}; it was made for another architecture")
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    bank = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    device = next(model.parameters()).device
    result = model.memory_bank.load_state_dict({k: v.to(device) for k, v in bank.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{adapter}: memory tensors do not match the memory block (missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.to(dtype).eval()


def _open_base(base, meta: dict, check_base: bool):
    from memsurgery.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    if check_base and meta.get("base_weights_sha256"):
        got = ck.weights_sha256()
        if got != meta["base_weights_sha256"]:
            raise InputError(f"{base}: weights SHA-256 {got[:12]}... is not the adapter's base "
                             f"({meta['base_weights_sha256'][:12]}...); give the base it was made on, or "
                             "skip the check (check_base=False, --no-check-base)")
    return ck.load_model(dtype=torch.float32).eval()
