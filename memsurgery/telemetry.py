"""Memory usage statistics: how evenly a memory's slots are used.

Given the slot indices a memory layer selected (and optionally the softmax
weight each selection got), summarize usage the way Lample et al. (2019)
report it: the share of slots used at all, KL(usage || uniform) both
count-based and weight-based, the Gini coefficient, and how many slots carry
50 / 90 / 99 % of the total weight. Counting uses `bincount` over the table
size, so memory is O(slots) once, never O(tokens x slots).
"""

from __future__ import annotations

import math

import torch


class UsageCounter:
    """Accumulates per-slot access counts and weights over many batches."""

    def __init__(self, slots: int):
        self.slots = int(slots)
        self.counts = torch.zeros(self.slots, dtype=torch.float64)
        self.weights = torch.zeros(self.slots, dtype=torch.float64)
        self.tokens = 0

    def update(self, indices: torch.Tensor, scores: torch.Tensor | None = None, tokens: int | None = None) -> None:
        """indices: [..., k] slot ids chosen per token; scores: same shape, selection weights."""
        flat = indices.reshape(-1).to(torch.int64).cpu()
        self.counts += torch.bincount(flat, minlength=self.slots).to(torch.float64)
        if scores is not None:
            w = scores.reshape(-1).detach().to(torch.float64).cpu()
            self.weights += torch.bincount(flat, weights=w, minlength=self.slots)
        self.tokens += int(tokens if tokens is not None else (indices.shape[0] if indices.dim() > 1 else 1))

    def stats(self) -> dict:
        out = usage_stats(self.counts, self.weights if self.weights.sum() > 0 else None)
        out["tokens"] = self.tokens
        return out


def _kl_to_uniform(p: torch.Tensor) -> float:
    """KL(p || uniform) in nats: log(n) - H(p). 0 = perfectly even; log(n) = one slot."""
    total = p.sum()
    if total <= 0:
        return float("nan")
    q = p / total
    nz = q[q > 0]
    entropy = -(nz * nz.log()).sum().item()
    return math.log(p.numel()) - entropy


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative usage: 0 = all slots equal, ~1 = one slot takes all."""
    x = x.to(torch.float64).flatten()
    n = x.numel()
    total = x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    xs, _ = torch.sort(x)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * ranks - n - 1) * xs).sum().item() / (n * total.item())


def slots_for_mass(x: torch.Tensor, fractions=(0.5, 0.9, 0.99)) -> dict:
    """How many of the most-used slots hold each fraction of the total."""
    total = x.sum()
    if total <= 0:
        return {f"slots_for_{round(f * 100)}pct": 0 for f in fractions}
    cum = torch.cumsum(torch.sort(x.to(torch.float64), descending=True).values, 0) / total
    out = {}
    for f in fractions:
        out[f"slots_for_{round(f * 100)}pct"] = int(torch.searchsorted(cum, torch.tensor(f - 1e-12, dtype=torch.float64)).item()) + 1
    return out


def usage_stats(counts: torch.Tensor, weights: torch.Tensor | None = None) -> dict:
    """Summary of slot usage from per-slot access counts (and optional summed weights)."""
    counts = counts.to(torch.float64)
    n = counts.numel()
    used = int((counts > 0).sum().item())
    top1 = max(1, n // 100)
    mass = weights if weights is not None else counts
    out = {
        "slots": n,
        "accesses": int(counts.sum().item()),
        "slots_used": used,
        "pct_used": 100.0 * used / n if n else 0.0,
        "kl_uniform_count": _kl_to_uniform(counts),
        "gini_count": gini(counts),
        "top1pct_share_count": (torch.topk(counts, top1).values.sum() / counts.sum()).item()
        if counts.sum() > 0 else float("nan"),
    }
    if weights is not None:
        weights = weights.to(torch.float64)
        out["kl_uniform_weight"] = _kl_to_uniform(weights)
        out["gini_weight"] = gini(weights)
        out["top1pct_share_weight"] = (torch.topk(weights, top1).values.sum() / weights.sum()).item() \
            if weights.sum() > 0 else float("nan")
    out.update(slots_for_mass(mass))
    return out
