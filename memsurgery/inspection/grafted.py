"""`inspect` on memsurgery's own outputs: a grafted or exported checkpoint is its base family's
model plus a `memory` block (export/configuration_memsurgery.py) and `memory_bank.*` tensors.

`split_grafted(config)` gives the base family's config (what the architecture specs read) and
the block; `memory_section` describes the memory: mode, layers, shape, parameters, and how
many value rows are in use (non-zero). That count reads the value table itself, a chunk of
rows at a time (the only weight data `inspect` reads), so memory stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE_PREFIX = "memsurgery_"  # as in export/configuration_memsurgery.py (which needs transformers)
MEMORY_PREFIX = "memory_bank."
VALUES = "memory_bank.values.weight"
_ROWS_PER_CHUNK = 1 << 14


def split_grafted(config: dict) -> tuple[dict, dict | None]:
    """(the base family's config, the memory block) of a grafted config; (config, None) otherwise."""
    mt = config.get("model_type")
    block = config.get("memory")
    if not (isinstance(mt, str) and mt.startswith(MODEL_TYPE_PREFIX) and isinstance(block, dict)):
        return config, None
    base = {k: v for k, v in config.items() if k not in ("memory", "auto_map", "architectures")}
    base["model_type"] = mt[len(MODEL_TYPE_PREFIX):]
    return base, block


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def count_nonzero_rows(ckpt, name: str = VALUES) -> int | None:
    """Rows of a stored 2-D tensor with any non-zero entry (None when it cannot be read lazily)."""
    info = ckpt.tensors.get(name)
    if info is None or ckpt.format != "safetensors" or len(info.shape) != 2:
        return None
    from safetensors import safe_open

    rows = int(info.shape[0])
    used = 0
    with safe_open(str(Path(ckpt.root) / info.file), framework="pt") as fh:
        table = fh.get_slice(name)
        for r0 in range(0, rows, _ROWS_PER_CHUNK):
            chunk = table[r0:min(rows, r0 + _ROWS_PER_CHUNK)]
            used += int((chunk != 0).any(dim=1).sum())
    return used


def _graft_record(root) -> dict:
    try:
        data = json.loads((Path(root) / "graft.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def memory_section(ckpt, block: dict) -> dict:
    """The report's `memory` key for a grafted checkpoint (docs/cli.md)."""
    cfg = dict(block.get("config") or {})
    per_layer: dict[str, int] = {}
    table = 0
    for name, info in ckpt.tensors.items():
        if not name.startswith(MEMORY_PREFIX):
            continue
        if name == VALUES:
            table = _numel(info.shape)
            continue
        parts = name[len(MEMORY_PREFIX):].split(".")
        if len(parts) > 2 and parts[0] == "layers":
            per_layer[parts[1]] = per_layer.get(parts[1], 0) + _numel(info.shape)
    slots = cfg.get("slots")
    used = count_nonzero_rows(ckpt)
    graft = _graft_record(ckpt.root)
    init = graft.get("values")  # how graft.json says the table started (zero, random, distill), if recorded
    return {
        "base_model_type": ckpt.config["model_type"][len(MODEL_TYPE_PREFIX):],
        "mode": block.get("mode"),
        "layers": block.get("layers"),
        "config": cfg,
        "format_version": block.get("format_version"),
        "params": {"value_table": table, "per_layer": dict(sorted(per_layer.items(), key=lambda kv: int(kv[0]))),
                   "total": table + sum(per_layer.values())},
        "slots_used": None if used is None else {
            "nonzero_rows": used, "slots": slots, "fraction": used / slots if slots else None,
            # zero-initialized tables (parallel grafts) start empty: non-zero rows are the ones training wrote
            "value_init": init,
        },
        "graft": {k: graft.get(k) for k in ("source", "source_sha256", "base_model") if k in graft} or None,
    }
