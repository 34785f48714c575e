"""Weighted embedding bag in Triton: forward, score gradient and row-sparse value gradient.

The "triton" backend (CUDA; on CPU only under `TRITON_INTERPRET=1`, which the
tests use). Same contract as `naive.py`: output in `scores.dtype`, fp32
accumulation (fp64 when an input is fp64), value gradient in the table's dtype.

Layering: `_*_kernel` Triton functions -> host launch functions (`bag_forward_triton`,
`bag_backward_triton`) -> `EmbeddingBagTriton` (autograd) -> `embedding_bag_triton`.

Kernels (N = bags * bag_size occurrences, U = unique rows among them):

- forward: grid (bags, dim blocks). A program loads `[BLOCK_K, BLOCK_D]` tiles of
  value rows (BLOCK_K rows of the bag at once, so many row reads are in flight),
  weights them by the scores into a `[BLOCK_K, BLOCK_D]` fp32 accumulator and reduces
  it once at the end. `dim` need not be a power of two: the last dim block is masked
  (576, 640, 896, 3072, 60 all work).
- score gradient: grid (bags, bag_size blocks); `grad_scores[b, j] =
  <grad_out[b], values[indices[b, j]]>`, reducing over dim blocks.
- value gradient, "reverse indices": the host sorts the flat indices (stable),
  finds the unique rows and each row's segment of occurrences; one program per
  (unique row, dim block) sums `score * grad_out[bag]` over its segment and writes
  the row once. Every output row has exactly one writer and its occurrences are
  summed in a fixed order, so there are no atomics and the result is bitwise
  deterministic run to run. Output is `[U, dim]` (-> coalesced sparse COO grad) or,
  with `sparse_grad=False`, written straight into a zeroed dense `[slots, dim]`.

Addresses: row ids are widened to int64 before `row * stride` (and bag ids before
`bag * stride`), so tables with more than 2**31 elements index correctly.

Index bounds are not checked (that would cost a device sync); out-of-range indices
read or write out of bounds. The torch and naive backends do check.

Performance intent (NOT yet measured on a GPU; `memsurgery.bench.kernels` and
`benchmarks/gpu_check.sh` measure it): bandwidth-bound everywhere; tiles of ~8K
elements with 16-byte-vectorizable row segments, fp32 accumulation in registers,
one pass over the gathered rows per kernel. The launch heuristics below are the
first thing to tune on hardware.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memsurgery.errors import BackendUnavailable
from memsurgery.ops.embedding_bag.naive import accumulate_dtype, check_inputs, output_dtype
from memsurgery.ops.embedding_bag.sparse import apply_bag, bag_function, row_sparse_grad

# ---------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------


@triton.jit
def _bag_fwd_kernel(
    idx_ptr,  # [bags, bag_size] int32/int64
    scores_ptr,  # [bags, bag_size] float
    values_ptr,  # [slots, dim] float
    out_ptr,  # [bags, dim] scores' dtype
    bag_size,
    dim,
    stride_ib,
    stride_ik,
    stride_sb,
    stride_sk,
    stride_vr,
    stride_vd,
    stride_ob,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    offs_k = tl.arange(0, BLOCK_K)
    # A [BLOCK_K, BLOCK_D] accumulator reduced once after the loop: reducing across
    # the BLOCK_K rows every iteration would cost a cross-warp (shared-memory) reduction
    # per tile and serialize the row loads behind it.
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for k0 in range(0, bag_size, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < bag_size
        rows = tl.load(idx_ptr + bag * stride_ib + k * stride_ik, mask=k_mask, other=0)
        # int64 before the multiply: row * stride overflows int32 past 2**31 elements.
        rows = rows.to(tl.int64)
        w = tl.load(scores_ptr + bag * stride_sb + k * stride_sk, mask=k_mask, other=0.0)
        v = tl.load(
            values_ptr + rows[:, None] * stride_vr + offs_d[None, :] * stride_vd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += v.to(ACC) * w.to(ACC)[:, None]
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + bag * stride_ob + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _bag_bwd_scores_kernel(
    idx_ptr,  # [bags, bag_size]
    values_ptr,  # [slots, dim]
    gout_ptr,  # [bags, dim] contiguous
    gscores_ptr,  # [bags, bag_size] contiguous, scores' dtype
    bag_size,
    dim,
    stride_ib,
    stride_ik,
    stride_vr,
    stride_vd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < bag_size
    rows = tl.load(idx_ptr + bag * stride_ib + k * stride_ik, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)  # reduced over dim once, after the loop
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        g = tl.load(gout_ptr + bag * dim + offs_d, mask=d_mask, other=0.0).to(ACC)
        v = tl.load(
            values_ptr + rows[:, None] * stride_vr + offs_d[None, :] * stride_vd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += v.to(ACC) * g[None, :]
    dots = tl.sum(acc, axis=1)
    tl.store(gscores_ptr + bag * bag_size + k, dots.to(gscores_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _bag_bwd_values_kernel(
    perm_ptr,  # [N] int64: flat occurrence ids, stably sorted by row
    seg_ptr,  # [U + 1] int64: occurrences of unique row u are perm[seg[u]:seg[u+1]]
    uniq_ptr,  # [U] unique row ids (read only when DENSE)
    scores_ptr,  # [N] flat scores, contiguous
    gout_ptr,  # [bags, dim] contiguous
    gvals_ptr,  # [U, dim] (sparse) or [slots, dim] (DENSE), table's dtype, contiguous
    bag_size,
    dim,
    DENSE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)  # reduced over occurrences after the loop
    for p0 in range(start, end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_mask = p < end
        occ = tl.load(perm_ptr + p, mask=p_mask, other=0).to(tl.int64)
        bag = occ // bag_size
        w = tl.load(scores_ptr + occ, mask=p_mask, other=0.0).to(ACC)
        g = tl.load(
            gout_ptr + bag[:, None] * dim + offs_d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += g.to(ACC) * w[:, None]
    grad = tl.sum(acc, axis=0)
    if DENSE:
        out_row = tl.load(uniq_ptr + u).to(tl.int64)
    else:
        out_row = u
    tl.store(gvals_ptr + out_row * dim + offs_d, grad.to(gvals_ptr.dtype.element_ty), mask=d_mask)


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def interpreter_state() -> str:
    """How this process's kernels would run: "compiled", "interpreted" or "mixed".

    `triton.jit` picks compiler or CPU interpreter when it *decorates* a function,
    from TRITON_INTERPRET at that moment. Our kernels are decorated when this module
    is imported, triton's own `tl.sum`/`tl.zeros` when triton is imported; both must
    agree, so TRITON_INTERPRET=1 has to be set before triton is first imported
    (tests do that in a fresh subprocess). "mixed" means it was set too late.
    """
    ours = _is_interpreted(_bag_fwd_kernel)
    theirs = _is_interpreted(tl.sum)
    if ours and theirs:
        return "interpreted"
    return "compiled" if not ours and not theirs else "mixed"


# ---------------------------------------------------------------------------------
# Launch parameters.
# ---------------------------------------------------------------------------------

# Heuristics, not yet tuned on hardware (no GPU was available when this was written;
# `python -m memsurgery.bench.kernels` on a GPU is the way to tune them). The idea:
# tiles of ~8K elements (16 KB of bf16 per load wave, 32 fp32 accumulators per thread
# at 8 warps) so each SM keeps enough independent row reads in flight to saturate HBM,
# and dim blocks of <= 512 so a bag's 128 rows are read as 16-row waves of 1 KB
# contiguous segments (fully coalesced) rather than few very wide rows.
_TILE = 8192  # elements per [BLOCK_K, BLOCK_D] tile
_MAX_BLOCK_D = 512  # forward and score-gradient kernels
_VALUES_MAX_BLOCK_D = 2048  # value-gradient kernel: one program per (padded) row
_VALUES_BLOCK_K = 2  # occurrences per step: most rows occur once or twice per batch


def _block_d(dim: int, max_block: int = _MAX_BLOCK_D, max_waste: float = 0.125) -> int:
    """Largest power of two <= max_block whose padding of `dim` wastes <= max_waste.

    With 512: 2048 -> 512, 3072 -> 512, 576 -> 128, 640 -> 128, 896 -> 128, 60 -> 64.
    Masked lanes cost no bandwidth but do cost issue slots, hence the bound.
    """
    block = max_block
    while block > 16:
        if math.ceil(dim / block) * block <= dim * (1 + max_waste):
            return block
        block //= 2
    return 16


def _acc_tl(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _warps(tile: int) -> int:
    return 8 if tile >= 8192 else 4


# ---------------------------------------------------------------------------------
# Host launch functions (2-D inputs).
# ---------------------------------------------------------------------------------


def bag_forward_triton(
    indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """indices/scores [bags, bag_size], values [slots, dim] -> [bags, dim] in scores' dtype."""
    bags, bag_size = indices.shape
    dim = values.shape[1]
    out = torch.empty(bags, dim, dtype=output_dtype(values, scores), device=values.device)
    if bags == 0 or dim == 0:
        return out
    if bag_size == 0:
        return out.zero_()
    block_d = _block_d(dim)
    block_k = max(1, min(triton.next_power_of_2(bag_size), _TILE // block_d))
    grid = (bags, triton.cdiv(dim, block_d))
    _bag_fwd_kernel[grid](
        indices, scores, values, out,
        bag_size, dim,
        indices.stride(0), indices.stride(1),
        scores.stride(0), scores.stride(1),
        values.stride(0), values.stride(1),
        out.stride(0),
        BLOCK_K=block_k, BLOCK_D=block_d, ACC=_acc_tl(accumulate_dtype(values, scores)),
        num_warps=_warps(block_k * block_d),
    )  # fmt: skip
    return out


def bag_backward_triton(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    need_values: bool = True,
    need_scores: bool = True,
    sparse_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad_values, grad_scores) for 2-D inputs; None where not needed.

    Args:
        grad_out: [bags, dim] gradient of the output (any float dtype).
    """
    bags, bag_size = indices.shape
    slots, dim = values.shape
    acc = _acc_tl(accumulate_dtype(values, scores))
    g = grad_out.contiguous()
    empty = indices.numel() == 0 or dim == 0

    grad_scores = None
    if need_scores:
        grad_scores = torch.zeros(bags, bag_size, dtype=scores.dtype, device=scores.device)
        if not empty:
            block_d = _block_d(dim)
            block_k = max(1, min(triton.next_power_of_2(bag_size), _TILE // block_d, 64))
            grid = (bags, triton.cdiv(bag_size, block_k))
            _bag_bwd_scores_kernel[grid](
                indices, values, g, grad_scores,
                bag_size, dim,
                indices.stride(0), indices.stride(1),
                values.stride(0), values.stride(1),
                BLOCK_K=block_k, BLOCK_D=block_d, ACC=acc,
                num_warps=_warps(block_k * block_d),
            )  # fmt: skip

    grad_values = None
    if need_values:
        # Reverse indices on the host: stable sort keeps each row's occurrences in
        # their original order, which fixes the summation order (determinism).
        flat = indices.reshape(-1)
        sorted_rows, perm = torch.sort(flat, stable=True)
        uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        n_uniq = uniq.numel()
        seg = torch.zeros(n_uniq + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(counts, 0, out=seg[1:])
        dense = not sparse_grad
        if dense:
            gvals = torch.zeros(slots, dim, dtype=values.dtype, device=values.device)
        else:
            gvals = torch.empty(n_uniq, dim, dtype=values.dtype, device=values.device)
        if n_uniq and dim:
            # Most rows occur once or twice per step, so a short occurrence block and
            # a wide dim block: one program handles a whole (padded) row where it can.
            # Programs here are short, so fewer of them beats fewer masked lanes:
            # 2048 -> 2048, 3072 -> 2048, 896 -> 1024, 576 -> 256 (3 blocks, 576 of 768 used).
            block_d = _block_d(dim, max_block=_VALUES_MAX_BLOCK_D, max_waste=0.34)
            block_k = _VALUES_BLOCK_K
            grid = (n_uniq, triton.cdiv(dim, block_d))
            _bag_bwd_values_kernel[grid](
                perm, seg, uniq, scores.reshape(-1).contiguous(), g, gvals,
                bag_size, dim,
                DENSE=dense, BLOCK_K=block_k, BLOCK_D=block_d, ACC=acc,
                num_warps=_warps(block_k * block_d),
            )  # fmt: skip
        grad_values = gvals if dense else row_sparse_grad(uniq, gvals, values, True)
    return grad_values, grad_scores


EmbeddingBagTriton = bag_function(
    "EmbeddingBagTriton", bag_forward_triton, bag_backward_triton,
    "autograd wrapper over the Triton forward and backward (row-sparse by default).",
)


def embedding_bag_triton(
    indices: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    sparse_grad: bool = True,
) -> torch.Tensor:
    """Weighted embedding bag with the Triton kernels (the "triton" backend).

    Args:
        indices: [..., bag_size] int32/int64 rows of `values` (not bounds-checked).
        values:  [slots, dim] value table; rows may be strided (e.g. a column shard view).
        scores:  [..., bag_size] per-row weights.
        sparse_grad: gradient of `values` as a coalesced sparse COO tensor (default)
            or dense.
    Returns:
        [..., dim] in `scores.dtype`.
    Raises:
        BackendUnavailable: tensors on CPU without TRITON_INTERPRET=1.
    """
    check_inputs(indices, values, scores)
    state = interpreter_state()
    if state == "mixed":
        raise BackendUnavailable(
            "embedding_bag backend 'triton': TRITON_INTERPRET was changed after triton was "
            "imported; set TRITON_INTERPRET=1 before the first `import triton` (a fresh process)"
        )
    if not values.is_cuda and state != "interpreted":
        raise BackendUnavailable(
            f"embedding_bag backend 'triton' needs CUDA tensors (values are on {values.device}); "
            "use backend='torch', or run with TRITON_INTERPRET=1 set before triton is imported "
            "to execute the kernels on CPU (slow)"
        )
    # Indices and scores are small next to the table: make them contiguous so the
    # flat occurrence id n = bag * bag_size + j holds in the backward.
    return apply_bag(EmbeddingBagTriton, indices, values, scores, sparse_grad, contiguous=True)
