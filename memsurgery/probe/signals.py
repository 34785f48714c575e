"""The memory's own signal: per-item scalars read from the memory layers at the last prompt token.

While `MemoryCapture` is active, every memory layer of a grafted model runs with
`record=True` (slots, softmax weights and gate per token) and a forward hook keeps
the layer's input and output at the last prompt position. Each registered signal
maps one layer's capture to one number per item; the probe reports each signal per
layer (`name@L`) and aggregated over layers (`name`, the max), with its AUROC as an
injected-vs-unknown detector.

Add a signal:

    from memsurgery.probe.signals import register_signal
    register_signal("my_signal", lambda cap, ctx: cap.weights[:, -1].amax(dim=(-1, -2)))

`cap` is a LayerCapture (tensors [B, T, ...] of the prompt pass, left padded so the
last prompt token is index -1); `ctx` a CaptureContext (the table's written-row mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from memsurgery.telemetry import UsageCounter


@dataclass
class LayerCapture:
    """What one memory layer saw in the prompt pass (B items, T positions, H heads, k picks)."""

    layer: int
    module: object  # the ProductKeyMemory
    indices: torch.Tensor  # [B, T, H, k] int64 slots read
    weights: torch.Tensor  # [B, T, H, k] softmax weights
    gate: torch.Tensor | None  # [B, T] relevance gate, None without one
    x_last: torch.Tensor  # [B, d] layer input at the last prompt token
    out_last: torch.Tensor  # [B, d] layer output at the last prompt token
    out_norms: torch.Tensor | None = None  # [B, T] norm of the layer output at every prompt token


@dataclass
class CaptureContext:
    written: torch.Tensor | None  # [slots] bool: value row differs from the reference
    entity_mask: torch.Tensor | None = None  # [B, T] bool: prompt tokens overlapping the item's entity
    first_layer: int | None = None  # the lowest memory layer


def _gate(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    if cap.gate is None:
        return torch.full((cap.indices.shape[0],), float("nan"))
    return cap.gate[:, -1].float()


@torch.no_grad()
def _top_score(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    # The raw product-key score of the best slot (before softmax): how well the
    # query matches any key at all, comparable across items of one model.
    scores, _ = cap.module.select(cap.x_last.to(cap.module.query.weight.dtype))
    return scores.float().amax(dim=(-1, -2))


def _top_weight(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    return cap.weights[:, -1].float().amax(dim=-1).mean(dim=-1)


def _out_norm(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    return cap.out_last.float().norm(dim=-1)


def _written_weight(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    # Softmax mass (mean over heads) on slots whose value row was written (differs
    # from the reference): training writes rows the injected facts route to.
    if ctx.written is None:
        return torch.full((cap.indices.shape[0],), float("nan"))
    idx = cap.indices[:, -1]  # [B, H, k]
    hit = ctx.written.to(idx.device)[idx].float()
    return (cap.weights[:, -1].float() * hit).sum(-1).mean(-1)


def _entity_max(values: torch.Tensor, ctx: CaptureContext) -> torch.Tensor:
    """Max of per-token values [B, T] over each row's entity tokens; NaN where a row has none."""
    if ctx.entity_mask is None:
        return torch.full((values.shape[0],), float("nan"))
    m = ctx.entity_mask.to(values.device)
    filled = torch.where(m, values.float(), torch.full_like(values, float("-inf"), dtype=torch.float32))
    best = filled.amax(dim=1)
    return torch.where(m.any(dim=1), best, torch.full_like(best, float("nan")))


def _entity_last(values: torch.Tensor, ctx: CaptureContext) -> torch.Tensor:
    """Per-token values [B, T] at each row's last entity token; NaN where a row has none."""
    if ctx.entity_mask is None:
        return torch.full((values.shape[0],), float("nan"))
    m = ctx.entity_mask.to(values.device)
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)
    got = values.float().gather(1, last.clamp_min(0)[:, None])[:, 0]
    return torch.where(last >= 0, got, torch.full_like(got, float("nan")))


def _entity_min(values: torch.Tensor, ctx: CaptureContext) -> torch.Tensor:
    """Min of per-token values [B, T] over each row's entity tokens; NaN where a row has none."""
    if ctx.entity_mask is None:
        return torch.full((values.shape[0],), float("nan"))
    return -_entity_max(-values.float(), ctx)


def _first_layer_only(fn):
    """The signal at the lowest memory layer only (NaN elsewhere, so the max over layers is its value)."""
    def signal(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
        if cap.layer != ctx.first_layer:
            return torch.full((cap.indices.shape[0],), float("nan"))
        return fn(cap, ctx)
    return signal


def _over_entity_norms(reduce):
    """A signal: the memory output norms over the entity's tokens, reduced by `reduce(values, ctx)`."""
    def signal(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
        if cap.out_norms is None:
            return torch.full((cap.indices.shape[0],), float("nan"))
        return reduce(cap.out_norms, ctx)
    return signal


# A zero-init parallel memory outputs ~0 until training writes the rows a token reads:
# a large output on the entity's name means "this name was taught".
_out_norm_entity = _over_entity_norms(_entity_max)
# The name's last token has read the whole name: a first name shared with a taught
# person lights up the first token only.
_out_norm_entity_last = _over_entity_norms(_entity_last)
# Every token of the name must read written rows.
_out_norm_entity_min = _over_entity_norms(_entity_min)
# At the lowest memory layer the name's own slots are read before later layers mix in the
# question; later layers' norms are on other scales, so a max over layers would mostly pick
# the last layer. Chosen on the ablation runs (docs/results.md).
_out_norm_entity_first = _first_layer_only(_out_norm_entity)


def _gate_entity(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    if cap.gate is None:
        return torch.full((cap.indices.shape[0],), float("nan"))
    return _entity_max(cap.gate, ctx)


def _written_weight_entity(cap: LayerCapture, ctx: CaptureContext) -> torch.Tensor:
    # Where the entity's name is read, the memory can key on who is asked about.
    if ctx.written is None:
        return torch.full((cap.indices.shape[0],), float("nan"))
    hit = ctx.written.to(cap.indices.device)[cap.indices].float()  # [B, T, H, k]
    return _entity_max((cap.weights.float() * hit).sum(-1).mean(-1), ctx)


SIGNALS: dict[str, Callable[[LayerCapture, CaptureContext], torch.Tensor]] = {
    "gate": _gate,
    "top_score": _top_score,
    "top_weight": _top_weight,
    "out_norm": _out_norm,
    "written_weight": _written_weight,
    "gate_entity": _gate_entity,
    "written_weight_entity": _written_weight_entity,
    "out_norm_entity": _out_norm_entity,
    "out_norm_entity_first": _out_norm_entity_first,
    "out_norm_entity_last": _out_norm_entity_last,
    "out_norm_entity_last_first": _first_layer_only(_out_norm_entity_last),
    "out_norm_entity_min": _out_norm_entity_min,
    "out_norm_entity_min_first": _first_layer_only(_out_norm_entity_min),
}
# The signal used for the memory-signal abstention policy unless the caller names another:
# the best known-vs-unknown detector in the ablations (docs/results.md), chosen there on
# people seed 0 and measured by the demo and benchmark on other people.
PRIMARY_SIGNAL = "out_norm_entity_first"


def register_signal(name: str, fn: Callable[[LayerCapture, CaptureContext], torch.Tensor]) -> None:
    """Add (or replace) a signal: fn(capture, context) -> [B] float tensor, higher = "memory knows"."""
    SIGNALS[name] = fn


def written_rows(model, reference: torch.Tensor | None = None) -> torch.Tensor:
    """[slots] bool: rows of the value table that differ from `reference` (default: all zeros).

    Parallel grafts start with a zero table, so the non-zero rows are the ones training wrote.
    """
    table = model.memory_bank.values.weight.detach()
    if reference is not None and tuple(reference.shape) != tuple(table.shape):
        reference = None
    out = torch.empty(table.shape[0], dtype=torch.bool)
    step = 1 << 16  # row chunks: a [1M, 576] comparison at once would allocate 576 MB of bools
    for i in range(0, table.shape[0], step):
        rows = table[i:i + step]
        ref = 0 if reference is None else reference[i:i + step].to(rows.device, rows.dtype)
        out[i:i + step] = rows.ne(ref).any(dim=-1).cpu()
    return out


@dataclass
class MemoryCapture:
    """Hooks + record on every memory layer; collect() turns one prompt pass into signals."""

    model: object
    reference: torch.Tensor | None = None
    signals: dict = field(default_factory=lambda: dict(SIGNALS))
    layers: dict = field(init=False)
    usage: dict = field(init=False)

    def __post_init__(self):
        from memsurgery.export import hf

        self.layers = hf.memory_layers(self.model)
        self.usage = {L: UsageCounter(m.config.slots) for L, m in self.layers.items()}
        self.context = CaptureContext(written=written_rows(self.model, self.reference),
                                      first_layer=min(self.layers) if self.layers else None)
        self._io: dict[int, tuple] = {}
        self._handles = []
        self.active = False

    def __enter__(self):
        for L, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._hook(L)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.set_active(False)

    def _hook(self, L):
        def hook(module, args, output):
            if self.active:
                x = args[0]
                out = output.detach()
                self._io[L] = (x[:, -1].detach(), out[:, -1], out.float().norm(dim=-1))
        return hook

    def set_active(self, on: bool) -> None:
        """Record only during the prompt pass: decode steps would overwrite the telemetry."""
        self.active = on
        for m in self.layers.values():
            m.record = on
            if not on:
                m.last_indices = m.last_scores = m.last_gate = None

    def collect(self, attention_mask: torch.Tensor, entity_mask: torch.Tensor | None = None) -> list[dict]:
        """Per item: {"signals": {name: v, name@L: v}, "slots": {L: distinct slots over prompt tokens}}."""
        B = attention_mask.shape[0]
        self.context.entity_mask = entity_mask
        per_item = [{"signals": {}, "slots": {}} for _ in range(B)]
        mask = attention_mask.bool().cpu()
        agg: dict[str, list[torch.Tensor]] = {name: [] for name in self.signals}
        for L, m in self.layers.items():
            x_last, out_last, out_norms = self._io[L]
            cap = LayerCapture(L, m, m.last_indices, m.last_scores, m.last_gate, x_last, out_last, out_norms)
            idx, w = cap.indices.cpu(), cap.weights.cpu()
            self.usage[L].update(idx[mask], w[mask], tokens=int(mask.sum()))
            for b in range(B):
                per_item[b]["slots"][str(L)] = int(idx[b][mask[b]].unique().numel())
            for name, fn in self.signals.items():
                v = fn(cap, self.context).detach().float().cpu()
                agg[name].append(v)
                for b in range(B):
                    per_item[b]["signals"][f"{name}@{L}"] = float(v[b])
        for name, vs in agg.items():
            stacked = torch.stack(vs)  # [layers, B]
            # Max over layers, NaN-aware: a layer without a gate does not hide another's.
            filled = torch.where(stacked.isnan(), torch.full_like(stacked, float("-inf")), stacked)
            best = filled.amax(0)
            best = torch.where(torch.isinf(best) & (best < 0), torch.full_like(best, float("nan")), best)
            for b in range(B):
                per_item[b]["signals"][name] = float(best[b])
        return per_item
