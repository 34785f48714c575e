"""What grafting a memory into a checkpoint would cost: the proposal and its estimate.

`GraftProposal` is the memory a user proposes (`inspect --slots --heads --knn --k-dim
--layers`); `graft_estimate` turns a resolved proposal and the model's sizes into
parameters, bytes, FLOPs per token and whether training fits in RAM, without touching
any weight. The `graft_estimate` block of the inspect report (see report.py) is its
return value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from memsurgery._vocab import DEFAULT_HEADS, DEFAULT_K_DIM, DEFAULT_KNN, DEFAULT_SLOTS
from memsurgery.errors import InputError

# ---------------------------------------------------------------- proposal


@dataclass
class GraftProposal:
    """The memory a user proposes to graft; the defaults are `memsurgery graft`'s.

    `layers=None` means 3 evenly spaced layers (see `default_memory_layers`);
    `v_dim=None` means the model's hidden size.
    """

    slots: int = DEFAULT_SLOTS
    heads: int = DEFAULT_HEADS
    knn: int = DEFAULT_KNN
    k_dim: int = DEFAULT_K_DIM
    layers: list[int] | None = None
    v_dim: int | None = None

    @property
    def n_sub(self) -> int:
        return math.isqrt(self.slots) if self.slots > 0 else 0

    def resolve(self, num_layers: int, hidden_size: int) -> GraftProposal:
        """A validated copy with `layers` and `v_dim` filled in; InputError names the bad flag."""
        slots = _as_int(self.slots, "--slots")
        if slots <= 0:
            raise InputError(f"--slots {slots}: must be positive, e.g. 64K or 1M")
        n_sub = math.isqrt(slots)
        if n_sub * n_sub != slots:
            lo, hi = n_sub * n_sub, (n_sub + 1) ** 2
            raise InputError(
                f"--slots {slots}: must be a perfect square (slots = n_sub^2); "
                f"nearest: {lo} ({n_sub}^2) or {hi} ({n_sub + 1}^2)"
            )
        heads = _as_int(self.heads, "--heads")
        if heads < 1:
            raise InputError(f"--heads {heads}: must be at least 1")
        k_dim = _as_int(self.k_dim, "--k-dim")
        if k_dim < 2 or k_dim % 2:
            raise InputError(
                f"--k-dim {k_dim}: must be even and at least 2 (each query is split in two halves)"
            )
        knn = _as_int(self.knn, "--knn")
        if not 1 <= knn <= n_sub:
            raise InputError(f"--knn {knn}: must be between 1 and n_sub = sqrt(slots) = {n_sub}")
        v_dim = hidden_size if self.v_dim is None else _as_int(self.v_dim, "--v-dim")
        if v_dim < 1:
            raise InputError(f"--v-dim {v_dim}: must be at least 1")
        if self.layers is None:
            layers = default_memory_layers(num_layers)
        else:
            layers = [_as_int(x, "--layers") for x in self.layers]
            if not layers:
                raise InputError("--layers: give at least one layer, e.g. 8,16,24")
            bad = [x for x in layers if not 0 <= x < num_layers]
            if bad:
                raise InputError(
                    f"--layers {','.join(map(str, layers))}: layer {bad[0]} is out of range; "
                    f"this model has {num_layers} layers (0..{num_layers - 1})"
                )
            if len(set(layers)) != len(layers):
                raise InputError(f"--layers {','.join(map(str, layers))}: a layer is listed twice")
            layers = sorted(layers)
        return replace(
            self, slots=slots, heads=heads, knn=knn, k_dim=k_dim, v_dim=v_dim, layers=layers
        )


def _as_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{flag} {value!r}: expected an integer") from None
    return value


def default_memory_layers(num_layers: int, count: int = 3) -> list[int]:
    """`count` layers at the centres of equal slices of the stack.

    24 layers -> 4, 12, 20 (the Memory+ reference placement); 30 -> 5, 15, 25;
    fewer layers than `count` -> every layer.
    """
    n = min(count, num_layers)
    return [((2 * k + 1) * num_layers) // (2 * n) for k in range(n)]


_SLOTS_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")


def parse_slots(text) -> int:
    """Slot count from "65536", "64K" (65536) or "1M" (1048576): binary K/M/G suffixes.

    Anything else raises InputError naming --slots.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = _SLOTS_RE.match(str(text))
    if not m:
        raise InputError(
            f"--slots {text!r}: expected an integer or a K/M suffix (binary), e.g. 65536, 64K, 1M"
        )
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if value <= 0:
        raise InputError(f"--slots {text!r}: must be positive")
    return value


# ---------------------------------------------------------------- estimate


def graft_estimate(
    proposal: GraftProposal,
    *,
    hidden_size: int,
    intermediate_size: int,
    dense_params: int,
    dense_flops_per_token: int,
    ram_bytes: int | None = None,
) -> dict:
    """Parameters, bytes, FLOPs/token and RAM fit of a *resolved* proposal (see report.py).

    One value table (slots x v_dim) is shared by all memory layers; each memory
    layer owns its query projection, sub-keys, SiLU gate W_g, output W_o and a
    scalar relevance gate. FLOPs count multiply-adds as 2 and leave out top-k
    selection and softmax (comparisons, not matmuls) and attention scores (which
    depend on context length).
    """
    if proposal.layers is None or proposal.v_dim is None:
        raise ValueError("graft_estimate needs a resolved proposal (GraftProposal.resolve)")
    n_mem = len(proposal.layers)
    table = proposal.slots * proposal.v_dim
    layer = _layer_params(proposal, hidden_size)
    mem_total = table + n_mem * layer["total"]
    adam = 2 * 4 * table  # row-wise Adam: two fp32 copies of the table
    return {
        "proposal": {
            "slots": proposal.slots,
            "n_sub": proposal.n_sub,
            "heads": proposal.heads,
            "knn": proposal.knn,
            "k_dim": proposal.k_dim,
            "v_dim": proposal.v_dim,
            "layers": list(proposal.layers),
        },
        "params": {
            "value_table": table,
            "per_layer": layer,
            "all_layers": n_mem * layer["total"],
            "total": mem_total,
            "dense_model": dense_params,
        },
        "bytes": {
            "fp32": 4 * mem_total,
            "bf16": 2 * mem_total,
            "adam_state_fp32": adam,
            "fp32_with_adam": 4 * mem_total + adam,
        },
        "flops_per_token": _flops(proposal, hidden_size, intermediate_size, dense_flops_per_token),
        "fits_ram": _fits_ram(ram_bytes, 4 * dense_params, 4 * mem_total, adam),
    }


def _layer_params(proposal: GraftProposal, d: int) -> dict:
    """Parameters one memory layer owns (the shared table not included)."""
    H, k_dim, v_dim = proposal.heads, proposal.k_dim, proposal.v_dim
    layer = {
        "query": d * H * k_dim,
        "sub_keys": H * 2 * proposal.n_sub * (k_dim // 2),
        "gate": d * v_dim,  # W_g: silu gate on the bag output
        "out": v_dim * d,  # W_o
        "relevance_gate": d + 1,  # scalar gate per token (weight + bias)
    }
    layer["total"] = sum(layer.values())
    return layer


def _flops(proposal: GraftProposal, d: int, inter: int, dense_flops_per_token: int) -> dict:
    """FLOPs per token a memory layer adds, what replace mode removes, and the net change."""
    H, k_dim, knn, v_dim = proposal.heads, proposal.k_dim, proposal.knn, proposal.v_dim
    n_mem = len(proposal.layers)
    added = {
        "query_proj": 2 * d * H * k_dim,
        "sub_key_scores": 2 * H * 2 * proposal.n_sub * (k_dim // 2),
        "candidates": H * knn * knn,  # knn^2 candidate sums per head
        "bag": 2 * H * knn * v_dim,  # weighted sum of knn value rows per head
        "gates": 2 * 2 * d * v_dim,  # W_g and W_o
        "relevance_gate": 2 * d,
    }
    added["total"] = sum(added.values())
    removed = 2 * 3 * d * inter  # the gated MLP: gate, up, down
    net_parallel = n_mem * added["total"]
    net_replace = n_mem * (added["total"] - removed)

    def relative(net: int) -> float | None:
        return round(net / dense_flops_per_token, 6) if dense_flops_per_token else None

    return {
        "added_per_layer": added,
        "removed_per_layer_replace": removed,
        "net_parallel": net_parallel,
        "net_replace": net_replace,
        "dense_model": dense_flops_per_token,
        "relative_to_dense": {"parallel": relative(net_parallel), "replace": relative(net_replace)},
    }


def _fits_ram(ram_bytes: int | None, model_fp32: int, mem_fp32: int, adam: int) -> dict:
    """Whether the model, the memory and its Adam state fit in RAM (default: this machine's)."""
    if ram_bytes is None:
        import psutil

        ram_bytes = psutil.virtual_memory().total
    required = model_fp32 + mem_fp32 + adam
    return {
        "ram_bytes": int(ram_bytes),
        "model_fp32_bytes": model_fp32,
        "memory_fp32_bytes": mem_fp32,
        "adam_state_bytes": adam,
        "required_bytes": required,
        "fits": required <= ram_bytes,
    }
