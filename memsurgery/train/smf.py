"""Slot access counting and sparse memory finetuning (Lin et al. 2025, arXiv:2510.15103).

Every memory layer of a grafted model reads the same value table, so slot counts
are summed over layers into one [slots] vector. Sparse memory finetuning ranks
the slots a batch read by TF-IDF against a background corpus:

    tf(i)  = accesses of slot i by the batch's real (non-pad) tokens
    df(i)  = background sequences in which slot i was read at least once (D sequences)
    idf(i) = log((1 + D) / (1 + df(i)))
    score  = tf * idf; only the top-t slots with score > 0 receive a value update.

Slots read by (almost) every background sequence score ~0: they hold general
knowledge, and leaving them alone is what limits forgetting.
"""

from __future__ import annotations

import math

import torch


def batch_slot_counts(model, attention_mask: torch.Tensor, slots: int) -> torch.Tensor:
    """Accesses per slot in the last forward (layers must have `record = True`), pads excluded."""
    counts = torch.zeros(slots, dtype=torch.float64, device=attention_mask.device)
    keep = attention_mask.bool()
    for _, layer in model.memory_bank:
        idx = layer.last_indices
        if idx is None:
            continue
        sel = idx[keep] if idx.shape[: keep.dim()] == keep.shape else idx
        counts += torch.bincount(sel.reshape(-1), minlength=slots).to(counts.dtype)
    return counts


@torch.no_grad()
def background_idf(model, tokenizer, spec, slots: int, device, log=lambda m: None) -> tuple[torch.Tensor, dict]:
    """IDF [slots] (float64) from the background corpus, plus a small info dict."""
    from memsurgery.graft.calibration import load_texts

    texts = load_texts(None if spec.background == "builtin" else spec.background, field=spec.background_field)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(texts), 64):
        for ids in tokenizer(texts[start:start + 64], add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(list(ids) + ([eos] if eos is not None else []))
        if len(stream) >= spec.background_tokens:
            break
    n_seq = max(1, min(len(stream), spec.background_tokens) // spec.background_seq_len)
    L = min(spec.background_seq_len, len(stream))
    ids = torch.tensor(stream[: n_seq * L], dtype=torch.int64).view(n_seq, L)
    df = torch.zeros(slots, dtype=torch.float64)
    was_training = model.training
    model.eval()
    bank = model.memory_bank
    bank.set_record(True)
    try:
        for a in range(0, n_seq, 8):
            batch = ids[a:a + 8].to(device)
            model(input_ids=batch)
            for r in range(batch.shape[0]):
                seen = torch.zeros(slots, dtype=torch.bool, device=device)
                for _, layer in bank:
                    seen[layer.last_indices[r].reshape(-1)] = True
                df += seen.to("cpu", torch.float64)
    finally:
        bank.set_record(False)
        model.train(was_training)
    idf = torch.log((1.0 + n_seq) / (1.0 + df))
    info = {"background": spec.background, "sequences": n_seq, "seq_len": L,
            "slots_seen": int((df > 0).sum()), "max_idf": math.log(1.0 + n_seq)}
    log(f"sparse memory finetuning: background {spec.background}: {n_seq} sequences x {L} tokens read "
        f"{info['slots_seen']:,} of {slots:,} slots")
    return idf, info


def top_slots(counts: torch.Tensor, idf: torch.Tensor, top_t: int) -> torch.Tensor:
    """Indices (sorted) of the top-t slots by tf * idf among slots with a positive score."""
    score = counts.to(torch.float64) * idf.to(counts.device)
    n_pos = int((score > 0).sum())
    if n_pos == 0:
        return torch.zeros(0, dtype=torch.int64, device=counts.device)
    k = min(top_t, n_pos)
    # Ties are broken by slot index (stable sort on -score), so every rank and every
    # rerun picks the same slots.
    order = torch.sort(-score, stable=True).indices[:k]
    return torch.sort(order).values


def mask_sparse_rows(param: torch.nn.Parameter, keep: torch.Tensor) -> int:
    """Restrict a coalesced row-sparse grad to rows where keep[row] is True; returns rows kept."""
    g = param.grad
    if g is None:
        return 0
    if not g.is_sparse:  # dense table grad (a wrapper turned sparse grads off)
        g.mul_(keep.to(g.dtype).unsqueeze(-1))
        return int(keep.sum())
    rows = g._indices()[0]
    sel = keep[rows]
    idx = g._indices()[:, sel]
    vals = g._values()[sel]
    param.grad = torch.sparse_coo_tensor(idx, vals, g.shape, is_coalesced=True, check_invariants=False)
    return int(sel.sum())
