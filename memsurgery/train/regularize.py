"""Regularizers of the recipe section `regularize` (docs/recipes.md).

Knowledge injection into a parallel-mode graft must not change what the model
says about everything else. Each step, besides the training batch, the loop runs
`batch_size` windows of general text (and, optionally, `batch_size` prompts that
were never trained) and adds, with the recipe's weights:

  gate   mean relevance gate sigmoid(w.x + b) over the real text tokens, averaged
         over memory layers (recomputed from the captured layer input, with grad:
         layer.last_gate is detached)
  l2     mean over real text tokens of ||memory output||^2, summed over memory layers
  kl     mean over real text positions of KL(base || model) between next-token
         distributions, base = the same network with every memory output zeroed
  neg    on the negative prompts' tokens: l2 (as above) + gate (when gate_penalty > 0)

Windows are drawn from their own generator seeded by (recipe seed, step), so the
draw does not touch the training RNG and a resumed run draws the same windows.
Under data parallelism each rank takes its slice of one global draw and the
per-rank means are averaged like the loss.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from memsurgery.errors import InputError
from memsurgery.hooks import capture_io, run_until_stopped
from memsurgery.train import data as D

# Logged penalties (unweighted), in the order of the tensor step() returns.
PARTS = ("reg/gate", "reg/l2", "reg/kl", "reg/neg", "reg/neg_gate")


@contextmanager
def memory_off(layers: dict):
    """Every memory layer outputs zeros: a parallel graft is then exactly its base model.

    The layer still runs (a memory-parallel table's collectives stay in step on every rank).
    """
    handles = [layer.register_forward_hook(lambda m, a, o: torch.zeros_like(o)) for layer in layers.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model, batch, device, autocast):
    """The batch's logits, or None when a capture hook stopped the forward early."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    with autocast():
        out = run_until_stopped(model, input_ids=ids, attention_mask=mask)
    return None if out is None else out.logits


def _gate(layer, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x.float() @ layer.gate_weight.float() + layer.gate_bias.float())


class Regularizer:
    """Holds the text windows and negative prompts; `step()` adds the penalties' gradients."""

    def __init__(self, recipe, core, tokenizer, pad_id: int, max_len: int | None, log=lambda m: None):
        from memsurgery.export import hf
        from memsurgery.train.recipe import DataSpec

        spec = recipe.regularize
        self.spec, self.seed, self.pad_id = spec, recipe.seed, pad_id
        self.core = core
        self.layers = hf.memory_layers(core)
        self.slots = core.memory_bank.values.weight.shape[0]
        if spec.gate_penalty > 0 and any(layer.gate_weight is None for layer in self.layers.values()):
            raise InputError("regularize.gate_penalty: the memory layers have no relevance gate "
                             "(graft with gate relevance, the parallel-mode default), or set it to 0")
        mode = (getattr(core.config, "memory", None) or {}).get("mode", "parallel")
        if spec.kl_to_base > 0 and mode != "parallel":
            raise InputError(f"regularize.kl_to_base: needs a parallel-mode graft (this one is {mode!r}: "
                             "zeroing its memory does not give the base model); set it to 0")
        self.text = None
        if spec.text_active:
            tspec = DataSpec(train=spec.text, format="text", text_field=recipe.data.text_field,
                             seq_len=spec.seq_len, packing=True, add_eos=recipe.data.add_eos,
                             cache_dir=recipe.data.cache_dir)
            self.text = D.load_sequences(spec.text, tokenizer, tspec, key="regularize.text", max_len=max_len,
                                         log=log)
        self.neg = None
        if spec.negatives_active:
            self.neg = _negative_prompts(spec.negatives, tokenizer, recipe.data, spec.seq_len)

    def info(self) -> dict:
        s = self.spec
        return {"text_windows": len(self.text) if self.text is not None else 0,
                "negative_prompts": len(self.neg) if self.neg is not None else 0,
                "gate_penalty": s.gate_penalty, "output_l2": s.output_l2, "kl_to_base": s.kl_to_base,
                "negative_weight": s.negative_weight if self.neg is not None else 0.0,
                "batch_size": s.batch_size, "seq_len": s.seq_len}

    def _draw(self, n: int, step: int, salt: int, dp, replace: bool) -> list[int]:
        """This rank's slice of the step's global draw (the same on every run and resume)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + salt) % (2**63))
        k = self.spec.batch_size
        total = k * dp.world
        if replace or n < total:
            idx = torch.randint(0, n, (total,), generator=g)
        else:
            idx = torch.randperm(n, generator=g)[:total]
        return idx[dp.rank * k:(dp.rank + 1) * k].tolist()

    def step(self, step: int, dp, device, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backpropagate the weighted penalties (divided by the data-parallel world, as gradients
        are summed over ranks); return the unweighted parts [len(PARTS)] (float64, this rank)
        and the slot counts the penalties' real tokens read (None when nothing was read)."""
        from memsurgery.train.smf import batch_slot_counts

        s = self.spec
        parts = torch.zeros(len(PARTS), dtype=torch.float64)
        total = None
        counts = None
        nl = len(self.layers)

        def add(t):
            nonlocal total
            total = t if total is None else total + t

        if self.text is not None:
            batch = D.collate(self.text, self._draw(len(self.text), step, 101, dp, replace=True), self.pad_id)
            mask = batch["attention_mask"].to(device).bool()
            base_lp = None
            if s.kl_to_base > 0:
                with torch.no_grad(), memory_off(self.layers):
                    base_lp = F.log_softmax(_forward(self.core, batch, device, autocast).float(), -1)
            # Without the KL term nothing after the last memory layer is needed.
            stop = max(self.layers) if base_lp is None else None
            with capture_io(self.layers, outputs=True, stop_after=stop) as cap:
                logits = _forward(self.core, batch, device, autocast)
            counts = batch_slot_counts(self.core, mask, self.slots)
            if s.gate_penalty > 0:
                gate = sum(_gate(self.layers[i], x)[mask].mean() for i, (x, _) in cap.items()) / nl
                add(s.gate_penalty * gate)
                parts[0] = float(gate.detach())
            if s.output_l2 > 0:
                l2 = sum(out.float().pow(2).sum(-1)[mask].mean() for _, out in cap.values())
                add(s.output_l2 * l2)
                parts[1] = float(l2.detach())
            if base_lp is not None:
                lp = F.log_softmax(logits.float(), -1)
                kl = (base_lp.exp() * (base_lp - lp)).sum(-1)[mask].mean()
                add(s.kl_to_base * kl)
                parts[2] = float(kl.detach())
            del cap

        if self.neg is not None:
            batch = D.collate(self.neg, self._draw(len(self.neg), step, 202, dp, replace=False), self.pad_id)
            mask = batch["attention_mask"].to(device).bool()
            with capture_io(self.layers, outputs=True, stop_after=max(self.layers)) as cap:
                _forward(self.core, batch, device, autocast)
            c = batch_slot_counts(self.core, mask, self.slots)
            counts = c if counts is None else counts + c
            neg = sum(out.float().pow(2).sum(-1)[mask].mean() for _, out in cap.values())
            if s.gate_penalty > 0:
                ng = sum(_gate(self.layers[i], x)[mask].mean() for i, (x, _) in cap.items()) / nl
                neg = neg + ng
                parts[4] = float(ng.detach())
            add(s.negative_weight * neg)
            parts[3] = float(neg.detach())
            del cap

        if total is not None and total.requires_grad:
            (total / dp.world).backward()
        return parts, counts


def _negative_prompts(source: str, tokenizer, data_spec, seq_len: int) -> D.SequenceSet:
    """Prompts of a fact source (its QA pairs'; builtin:people means its questions)."""
    from memsurgery.train.recipe import DataSpec

    src = source
    if src.startswith("builtin:people") and not src.startswith("builtin:people-qa"):
        src = "builtin:people-qa" + src[len("builtin:people"):]
    if src.startswith("builtin:corpus"):
        raise InputError("regularize.negatives: needs a fact source with prompts (builtin:people?n=30&seed=..., "
                         "builtin:people-qa?..., or a .jsonl with prompt/answer fields), not builtin:corpus")
    spec = DataSpec(train=src, format="qa", prompt_field=data_spec.prompt_field,
                    answer_field=data_spec.answer_field)
    records = D.load_records(src, spec, key="regularize.negatives")
    prompts = [r[data_spec.prompt_field] for r in records]
    # Tokenized like a qa training prompt (with the tokenizer's special tokens), no answer.
    ids = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    seqs = [(list(t)[:seq_len], list(t)[:seq_len]) for t in ids if len(t)]
    if not seqs:
        raise InputError(f"regularize.negatives: {source} has no non-empty prompts")
    return D.SequenceSet.from_lists(seqs, {"records": len(records)})
