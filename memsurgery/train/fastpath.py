"""Cheaper training forwards that give the same loss.

Two savings, both exact up to float rounding:

* Logits only where the loss reads them. A QA batch with answer-only loss has a
  few target positions per row, but a plain forward projects every position onto
  the vocabulary (49K columns for SmolLM2: as much work as eight decoder layers).
  `loss_sum` passes transformers' boolean `logits_to_keep`, so the LM head runs on
  the target positions only.

* A prefix cache for memory-only training. When nothing below the first memory
  layer trains (and nothing there is random), the input of that layer is a fixed
  function of each training sequence. `PrefixCache` computes it once per sequence,
  in index order and fixed chunks (so a resumed run builds the same cache), and
  each step then runs the network from that layer up.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from memsurgery.hooks import capture_io, run_until_stopped
from memsurgery.train import data as D

# Config keys whose positive value means dropout somewhere in the network.
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(m).forward).parameters


def loss_sum(model, batch: dict, device, autocast, *, keep: bool, prefix: PrefixCache | None = None,
             idx: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's targets, and how many there are.

    `keep`: compute logits at the target positions only. `prefix` (with the batch's
    sequence indices `idx`): start from the cached input of the first memory layer."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    tgt = labels[:, 1:]
    has_tgt = tgt != D.IGNORE
    kw = {}
    if keep:
        # position t predicts token t + 1; the last position predicts nothing
        kw["logits_to_keep"] = F.pad(has_tgt, (0, 1), value=False)
    with autocast(), memory_positions(model, batch.get("memory_mask")):
        if prefix is not None:
            logits = prefix.forward(model, idx, mask, **kw)
        else:
            logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    if logits.dim() == 2:  # the kept positions, row-major: the same order as tgt[has_tgt]
        loss = F.cross_entropy(logits.float(), tgt[has_tgt], reduction="sum")
    else:
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                               ignore_index=D.IGNORE, reduction="sum")
    return loss, int(has_tgt.sum())


@contextmanager
def memory_positions(model, mask: torch.Tensor | None):
    """Let the memory layers act only where `mask` [B, T] is True (None: everywhere)."""
    if mask is None:
        yield
        return
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [layer for _, layer in core.memory_bank] if hasattr(core, "memory_bank") else []
    mask = mask.to(next(core.parameters()).device)
    for layer in layers:
        layer.token_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


def _layers_parent(core) -> tuple[nn.Module, str]:
    path = (getattr(core.config, "memory", None) or {}).get("layers_path", "model.layers")
    *head, name = path.split(".")
    parent = core
    for part in head:
        parent = getattr(parent, part)
    return parent, name


@contextmanager
def from_layer(core, first: int):
    """Inside, the model's decoder stack starts at layer `first` (give it `inputs_embeds`)."""
    parent, name = _layers_parent(core)
    full = getattr(parent, name)
    setattr(parent, name, full[first:])
    try:
        yield
    finally:
        setattr(parent, name, full)


def why_not(recipe, core, trainable: list[tuple[str, nn.Parameter]], grafted: bool, n_sequences: int,
            n_tokens: int) -> tuple[int | None, str]:
    """(first memory layer, "") when the prefix cache applies, else (None, the reason)."""
    t = recipe.train
    if not t.prefix_cache:
        return None, "train.prefix_cache is off"
    if not grafted or t.method not in ("memory", "sparse_memory"):
        return None, f"method {t.method} trains the layers below the memory"
    if recipe.memory_parallel > 1 or recipe.fsdp:
        return None, "not combined with memory_parallel or fsdp"
    first = min(core.memory_layers())
    if first == 0:
        return None, "the first memory layer is layer 0: nothing below it to cache"
    emb = core.get_input_embeddings()
    if emb is not None and emb.weight.requires_grad:
        return None, "the input embeddings train"
    for name, p in trainable:
        m = _LAYER_RE.search("." + name)
        if "memory_bank" not in name and m and int(m.group(1)) < first:
            return None, f"{name} trains below the first memory layer ({first})"
    cfg = core.config
    drop = [k for k in _DROPOUT_KEYS if isinstance(getattr(cfg, k, None), float) and getattr(cfg, k) > 0]
    parent, name = _layers_parent(core)
    lower = list(getattr(parent, name)[:first]) + ([emb] if emb is not None else [])
    if drop or any(isinstance(m, nn.Dropout) and m.p > 0 for mod in lower for m in mod.modules()):
        return None, "the model uses dropout (" + (", ".join(drop) or "nn.Dropout") + ")"
    if len(set(getattr(cfg, "layer_types", None) or [])) > 1:
        return None, "the model mixes attention layer types"
    per_step = t.batch_size * t.grad_accum
    if per_step * t.steps < 2 * n_sequences:
        return None, "each training sequence is read fewer than twice: caching would not pay"
    mb = n_tokens * cfg.hidden_size * 4 / 2**20
    if mb > t.prefix_cache_max_mb:
        return None, f"it would take {mb:,.0f} MB (train.prefix_cache_max_mb {t.prefix_cache_max_mb})"
    return first, ""


class PrefixCache:
    """The input of decoder layer `first` for every sequence of a SequenceSet."""

    def __init__(self, core, first: int, seqs, batch_size: int, pad_id: int, device, autocast):
        self.core, self.first = core, first
        parent, name = _layers_parent(core)
        target = getattr(parent, name)[first]
        rows: list[torch.Tensor] = []
        was_training = core.training
        core.eval()
        try:
            with torch.no_grad(), capture_io({first: target}, stop_after=first) as seen:
                for start in range(0, len(seqs), batch_size):
                    idx = list(range(start, min(start + batch_size, len(seqs))))
                    b = D.collate(seqs, idx, pad_id)
                    with autocast():
                        run_until_stopped(core, input_ids=b["input_ids"].to(device),
                                          attention_mask=b["attention_mask"].to(device))
                    h = seen[first]
                    for r, n in enumerate(b["attention_mask"].sum(1).tolist()):
                        rows.append(h[r, :n].detach().clone())
        finally:
            core.train(was_training)
        self.lengths = [r.shape[0] for r in rows]
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.flat = torch.cat(rows) if rows else torch.zeros(0, core.config.hidden_size, device=device)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def hidden(self, idx: list[int], width: int) -> torch.Tensor:
        """[len(idx), width, hidden]: each sequence's cached states, zeros after its end (padding)."""
        out = self.flat.new_zeros(len(idx), width, self.flat.shape[1])
        for r, i in enumerate(idx):
            out[r, :self.lengths[i]] = self.flat[self.offsets[i]:self.offsets[i + 1]]
        return out

    def forward(self, model, idx: list[int], mask: torch.Tensor, **kw) -> torch.Tensor:
        h = self.hidden(idx, mask.shape[1])
        with from_layer(self.core, self.first):
            return model(inputs_embeds=h, attention_mask=mask, **kw).logits


def agrees(model, prefix: PrefixCache, seqs, idx: list[int], pad_id: int, device, autocast,
           keep: bool, rtol: float) -> tuple[bool, float]:
    """Whether one batch's loss is the same through the cache as through the whole network.

    Guards architectures whose forward does more with `inputs_embeds` than pass it to
    the first layer (Gemma scales it, GPT-2 adds position embeddings)."""
    b = D.collate(seqs, idx, pad_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full, _ = loss_sum(model, b, device, autocast, keep=keep)
            cached, _ = loss_sum(model, b, device, autocast, keep=keep, prefix=prefix, idx=idx)
    finally:
        model.train(was_training)
    diff = abs(float(full) - float(cached)) / max(abs(float(full)), 1e-12)
    return diff <= rtol, diff
