"""Perplexity of a causal LM over token windows: the held-out metric of graft checks and probes.

`memsurgery graft` reports it for a replace-mode graft (base vs grafted, on held-out
calibration windows); `memsurgery probe` reports it as retention (probe/api.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memsurgery.errors import InputError


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of a causal LM over token windows input_ids [B, T].

    Every position but the first of each window is predicted (B * (T - 1) tokens), no
    padding, no cache, fp32 log-softmax. Runs in eval mode (restored after).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise InputError(
            f"perplexity: input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise InputError(f"perplexity: batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
