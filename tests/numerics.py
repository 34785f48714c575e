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

Adam-trained weights: the update lr * m / (sqrt(v) + eps) divides each entry's gradient by
that entry's own gradient RMS. A gradient error of tol x (the tensor's gradient scale) is
therefore amplified by max_j sqrt(v_j) / sqrt(v_i) on an entry whose gradient is small, up
to 2 lr per step where a gradient at the rounding level flips sign. Measured on the 2-process
tests under AVX2 kernels: the worst value entry had a gradient RMS 722x below the largest
and differed by 3.7e-5 of max|w| (0.8 of the bound) while the tensor as a whole differed by
9e-7 in the 2-norm. So Adam-trained weights are compared in the 2-norm (norm="fro"):
|| a - b || <= tol x || b ||, where those few amplified entries count by their share; a real
error (a rank's gradient dropped, a row updated twice) moves many entries by ~lr, far above
tol x || b ||. Losses and other logged means are compared in the max-norm.
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


def normwise_error(actual, expected, norm: str = "max") -> tuple[float, float]:
    """(||actual - expected||, ||expected||) in the max-norm or the 2-norm ("fro")."""
    a = torch.as_tensor(actual).detach()
    b = torch.as_tensor(expected).detach()
    a = (a.to_dense() if a.is_sparse else a).double()
    b = (b.to_dense() if b.is_sparse else b).double()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    if b.numel() == 0:
        return 0.0, 0.0
    if norm == "max":
        return float((a - b).abs().max()), float(b.abs().max())
    if norm == "fro":
        return float((a - b).norm()), float(b.norm())
    raise ValueError(norm)


def assert_close_normwise(actual, expected, rtol: float, msg: str = "", norm: str = "max") -> None:
    """||actual - expected|| <= rtol * ||expected|| (plus the smallest normal fp32 number,
    for tensors that are exactly zero on both sides); the max-norm, or the 2-norm for
    Adam-trained weights (norm="fro", see the module docstring)."""
    try:
        diff, scale = normwise_error(actual, expected, norm)
    except AssertionError as err:
        raise AssertionError(f"{msg}: {err}") from None
    bound = rtol * scale + torch.finfo(torch.float32).tiny
    name = "max |diff|" if norm == "max" else "||diff||"
    assert diff <= bound, (f"{msg}: {name} {diff:.3e} > {bound:.3e} "
                           f"(= {rtol:.2e} x {norm}-norm of expected {scale:.3e}; ratio {diff / bound:.2f})")
