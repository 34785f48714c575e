"""Product-key top-k: the knn best of n_sub**2 slots from two searches over n_sub sub-keys.

A slot s = i1 * n_sub + i2 is the pair (sub-key i1 of half 1, sub-key i2 of half 2),
and its score is the sum of the two half scores:

    score(s) = <q1, keys1[i1]> + <q2, keys2[i2]>

Scoring every slot would cost n_sub**2 dot products per query; the two-stage search
costs 2 * n_sub + knn**2 and returns exactly the same top-knn.

Why two stages are exact (knn <= n_sub). Let T1, T2 be the top-knn sub-keys of each
half and let (a, b) be a slot of the true top-knn. Suppose a is not in T1. Then T1 holds
knn sub-keys a' with s1(a') > s1(a), and each pair (a', b) scores
s1(a') + s2(b) > s1(a) + s2(b): knn distinct slots strictly better than (a, b), so (a, b)
is not in the top-knn. Contradiction; likewise b is in T2. So every true top-knn slot is
among the knn**2 candidates T1 x T2, and the top-knn of the candidates is the true
top-knn. With exact ties the multiset of returned scores is still exact; only which of
two equal-scored slots is returned may differ from a brute-force search.

Gradients flow to q1, q2, keys1, keys2 through the returned scores (the selection
itself is piecewise constant). The per-half search has a custom backward: only the
knn picked sub-keys of each (token, head) get a gradient, so the backward gathers and
scatters N*H*knn rows of K2 (constant in the table size) instead of multiplying the
dense [N, H, n_sub] score gradient back through the search matmul (which grows with
sqrt(slots)). The forward search itself, N*H*n_sub*K2 per half, is the one cost that
grows with the table: sqrt(slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Rows of K2 per chunk when scattering the sub-key gradient (bounds a [rows, K2] temporary).
_SCATTER_CHUNK_ELEMENTS = 1 << 20


def half_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores of each query half against its sub-keys.

    q: [N, H, K2] query halves; keys: [H, n_sub, K2] sub-keys -> [N, H, n_sub].
    """
    # One batched matmul over heads: [H, N, K2] @ [H, K2, n_sub] -> [H, N, n_sub].
    return torch.bmm(q.transpose(0, 1), keys.transpose(1, 2)).transpose(0, 1)


class _HalfTopK(torch.autograd.Function):
    """(vals, idx) = top-knn of half_scores(q, keys); backward touches only the picked sub-keys."""

    @staticmethod
    def forward(ctx, q, keys, knn):
        vals, idx = half_scores(q, keys).topk(knn, dim=-1)  # [N, H, knn]; scores freed here
        ctx.save_for_backward(q, keys, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    @once_differentiable
    def backward(ctx, g_vals, _g_idx):
        q, keys, idx = ctx.saved_tensors
        n, h, k2 = q.shape
        n_sub, knn = keys.shape[1], idx.shape[-1]
        # Global row of each pick in keys viewed as [H*n_sub, K2]; bags are (token, head).
        rows = (idx + torch.arange(h, device=idx.device).mul_(n_sub).view(1, h, 1)).view(n * h, knn)
        g = g_vals.reshape(n * h, knn).to(q.dtype)
        flat_keys = keys.reshape(h * n_sub, k2)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            # grad_q[n, h] = sum_j g[n, h, j] * keys[h, idx[n, h, j]]: a weighted bag.
            grad_q = F.embedding_bag(rows, flat_keys, per_sample_weights=g, mode="sum").view(
                n, h, k2
            )
        if ctx.needs_input_grad[1]:
            # grad_keys[h, s] = sum over picks of s: g * q[n, h]; scattered chunk by chunk.
            grad_keys = torch.zeros_like(flat_keys)
            qf = q.reshape(n * h, 1, k2)
            step = max(1, _SCATTER_CHUNK_ELEMENTS // (knn * k2))
            for a in range(0, n * h, step):
                contrib = g[a : a + step].unsqueeze(-1) * qf[a : a + step]  # [c, knn, K2]
                grad_keys.index_add_(0, rows[a : a + step].reshape(-1), contrib.reshape(-1, k2))
            grad_keys = grad_keys.view(h, n_sub, k2)
        return grad_q, grad_keys, None


def product_key_topk(
    q1: torch.Tensor,
    q2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    knn: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-knn slots per (token, head) by product-key search.

    q1, q2:       [N, H, K2]      the two halves of each head's query (K2 = k_dim / 2)
    keys1, keys2: [H, n_sub, K2]  each head's sub-keys for the two halves
    knn:          slots to return per head, 1 <= knn <= n_sub

    Returns (scores [N, H, knn], indices [N, H, knn] int64), sorted by descending
    score; index = i1 * n_sub + i2 in [0, n_sub**2).
    """
    n_sub = keys1.shape[1]
    if keys2.shape[1] != n_sub:
        raise ValueError(f"keys1 has {n_sub} sub-keys but keys2 has {keys2.shape[1]}")
    if not 1 <= knn <= n_sub:
        raise ValueError(f"knn={knn} must be in [1, n_sub={n_sub}]")

    s1, i1 = _HalfTopK.apply(q1, keys1, knn)  # [N, H, knn] each
    s2, i2 = _HalfTopK.apply(q2, keys2, knn)

    # knn**2 candidate pairs: cand[n, h, a, b] = s1[n, h, a] + s2[n, h, b].
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [N, H, knn*knn]
    scores, flat = cand.topk(knn, dim=-1)  # [N, H, knn]

    # Position in the candidate grid -> the sub-key ids of the two halves.
    a = torch.div(flat, knn, rounding_mode="floor")
    b = flat - a * knn
    indices = i1.gather(-1, a) * n_sub + i2.gather(-1, b)
    return scores, indices


def brute_force_topk(
    q1: torch.Tensor,
    q2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    knn: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n_sub**2 slots and take the top-knn (same shapes as above).

    Memory is N * H * n_sub**2: for tests and small tables only.
    """
    s1 = half_scores(q1, keys1)  # [N, H, n_sub]
    s2 = half_scores(q2, keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [N, H, n_sub**2], index i1*n_sub+i2
    return full.topk(knn, dim=-1)
