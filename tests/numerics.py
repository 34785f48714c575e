"""Float tolerances derived from the error of the operation compared, not from one machine.

Two fp32 evaluations of the same quantity that differ only in the order of their sums
(another CPU's SIMD width or BLAS blocking, another thread count, a gradient all-reduced
over ranks instead of summed in one process, another padding of the batch, a reference
implementation against a fused one) differ by rounding alone. Each evaluation's rounding
error is a sum of n roundings of relative size <= u = eps/2, n the number of roundings on
the dependency path to the value (the lengths of the chained sums: dot products, softmax
and norm reductions, the sum over tokens of a gradient). Rounding errors behave like
independent random variables, so with probability >= 1 - 2 exp(-lam^2 / 2) the error is at
most lam * sqrt(n) * u of the scale of the terms (Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), where the worst case
would be n * u. Two evaluations, each within that bound, differ by at most
lam * sqrt(n) * eps; lam = 6 (tail 3e-8 per value) gives REORDER_K = 6, rounded up to 8 for
the few roundings outside the sums (scalings, the final division of a mean).

The scale is the tensor's scale, not each element's own value: an element that is a small
difference of large terms carries the error of the large terms. So comparisons here are
normwise, |a - b| <= tol * max|b|, never elementwise-relative (an elementwise rtol fails on
whichever entries happen to be near zero on a given machine).

Training: Adam's update lr * m / (sqrt(v) + eps) is scale-invariant, so a relative error
delta in a gradient becomes an error of about lr * delta in the update; after S steps the
weights moved by ~S * lr while their error is ~S * lr * delta, i.e. delta relative to the
scale the run gave them: the same bound, normwise against max|w|.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 = 1.19e-7
REORDER_K = 8.0


def reorder_rtol(*chain: int, k: float = REORDER_K) -> float:
    """Normwise relative difference expected between two fp32 evaluations that differ only
    in summation order; `chain` the lengths of the sums on the value's dependency path
    (n = their total; see the module docstring)."""
    n = sum(int(c) for c in chain)
    return k * EPS32 * math.sqrt(max(1, n))


def forward_chain(cfg: dict, seq_len: int, memory: dict | None = None) -> int:
    """Roundings on the longest path through a forward pass of a tiny decoder (tests/tiny.py
    configs) to its log-probabilities: per layer q/k/v projection (d), q.k (head_dim),
    attention-weighted sum (seq_len), o_proj (d), gate/up (d), down (intermediate); a memory
    layer's query (d), sub-key scores (k_dim/2), knn softmax and weighted sum of its
    heads * knn rows, output projection (d); then lm_head (d) and the log-softmax (vocab)."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    n = cfg["num_hidden_layers"] * (d + head_dim + seq_len + d + d + inter)
    if memory:
        n += memory_chain(d, memory)
    return n + d + cfg["vocab_size"]


def memory_chain(d: int, memory: dict) -> int:
    """Roundings on the longest path through one memory layer (MemoryConfig.build fields):
    query projection (d), sub-key scores (k_dim/2), knn softmax (knn), weighted sum of the
    heads * knn picked rows, output projection (v_dim, default d)."""
    knn, heads = memory["knn"], memory["heads"]
    return d + memory["k_dim"] // 2 + knn + heads * knn + (memory.get("v_dim") or d)


def assert_close_normwise(actual, expected, rtol: float, msg: str = "") -> None:
    """max|actual - expected| <= rtol * max|expected| (plus the smallest normal fp32
    number, for tensors that are exactly zero on both sides)."""
    a = torch.as_tensor(actual).detach()
    b = torch.as_tensor(expected).detach()
    a = (a.to_dense() if a.is_sparse else a).double()
    b = (b.to_dense() if b.is_sparse else b).double()
    assert a.shape == b.shape, (msg, tuple(a.shape), tuple(b.shape))
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), (msg, "non-finite values")
    if b.numel() == 0:
        return
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    bound = rtol * scale + torch.finfo(torch.float32).tiny
    assert diff <= bound, (f"{msg}: max |diff| {diff:.3e} > {bound:.3e} "
                           f"(= {rtol:.2e} x max |expected| {scale:.3e}; ratio {diff / bound:.2f})")
