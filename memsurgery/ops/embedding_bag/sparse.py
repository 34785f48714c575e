"""Weighted embedding bag in plain PyTorch ops, with a row-sparse value gradient.

The "torch" backend: runs on any device (CPU in CI, CUDA when Triton is missing).
Same contract as `naive.py` (output in `scores.dtype`, fp32 accumulation, fp64 when
an input is fp64), but built for the memory layer's shapes: a value table of
millions of rows of which one step touches a small fraction.

- Forward: `F.embedding_bag(mode="sum")`, which never materializes the
  `[bags, bag_size, dim]` gather and accumulates in fp32 also for bf16/fp16 tables,
  whenever that is lossless: fp32/fp64 tables, or scores in the table's dtype. A
  bf16/fp16 table with fp32 scores (PyTorch would need the scores rounded to bf16)
  is gathered and reduced chunk by chunk of bags in fp32 (`bmm`) instead, bounding
  the temporary to ~`_CHUNK_BYTES`: correct everywhere, but several times slower than
  PyTorch's kernel on CPU.
- Backward for `values`: a coalesced `torch.sparse_coo_tensor` holding only the
  unique rows touched (`indices [1, U]`, `values [U, dim]` in the table's dtype),
  like `nn.Embedding(sparse=True)`, so `param.grad` is sparse and the sparse
  optimizer updates only those rows. Reverse indices: a stable sort groups each
  row's occurrences, and an embedding bag *over grad_out* (one bag per unique row,
  weighted by the scores) sums them into `[U, dim]`. Cost grows with rows touched,
  never with table size. `sparse_grad=False` scatters the same rows into a dense grad.
- Backward for `scores`: `grad_scores[b, j] = <grad_out[b], values[indices[b, j]]>`
  (PyTorch's per-sample-weights backward where lossless, chunked gather otherwise).

Note that a sparse gradient can only flow into a leaf table (or ops that accept
sparse gradients), exactly as with `nn.Embedding(sparse=True)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from memsurgery.ops.embedding_bag.naive import accumulate_dtype, check_inputs, output_dtype

# Upper bound on the fp32 rows gathered per chunk of bags (the half-table, fp32-score
# case): small, so the two reused buffers stay cache-sized and cheap to allocate;
# large enough that per-op overhead stays small next to the gather itself.
_CHUNK_BYTES = 2 << 20


def _gathered_chunks(indices: torch.Tensor, values: torch.Tensor, acc: torch.dtype):
    """Yield (bag slice, rows [c, bag_size, dim] in `acc`) over chunks of bags.

    The rows are gathered into two buffers allocated once and reused by every chunk
    (table dtype, then `acc`): fresh multi-MB allocations each chunk would pay page
    faults on CPU, which dominated this path in measurements. The yielded view is
    overwritten by the next chunk.
    """
    bags, bag_size = indices.shape
    dim = values.shape[1]
    step = max(1, _CHUNK_BYTES // max(1, bag_size * dim * 4))
    first = min(step, bags) * bag_size
    raw = torch.empty(first, dim, dtype=values.dtype, device=values.device)
    wide = raw if values.dtype == acc else torch.empty(first, dim, dtype=acc, device=values.device)
    for start in range(0, bags, step):
        sl = slice(start, min(bags, start + step))
        n = (sl.stop - sl.start) * bag_size
        torch.index_select(values, 0, indices[sl].reshape(-1), out=raw[:n])
        if wide is not raw:
            wide[:n].copy_(raw[:n])
        yield sl, wide[:n].view(-1, bag_size, dim)


def row_sparse_grad(
    rows: torch.Tensor, grad_rows: torch.Tensor, values: torch.Tensor, sparse_grad: bool
) -> torch.Tensor:
    """Turn per-unique-row gradients into the gradient of the whole table.

    Args:
        rows:      [U] sorted unique row ids (any int dtype).
        grad_rows: [U, dim] gradient of those rows, already in `values.dtype`.
        values:    [slots, dim] the table (for shape, dtype, device).
        sparse_grad: True -> coalesced sparse COO [slots, dim] (no dense allocation);
            False -> dense [slots, dim] with the rows scattered in.
    """
    rows = rows.long()
    if sparse_grad:
        # `rows` come from a sorted unique, so the tensor is coalesced by construction;
        # declaring it saves the sort a later `.coalesce()` would do.
        return torch.sparse_coo_tensor(
            rows.unsqueeze(0),
            grad_rows,
            values.shape,
            is_coalesced=True,
            check_invariants=False,
        )
    dense = torch.zeros(values.shape, dtype=values.dtype, device=values.device)
    dense.index_copy_(0, rows, grad_rows)  # rows are unique: a copy, no accumulation
    return dense


def _native_ok(values: torch.Tensor, other: torch.Tensor) -> bool:
    """Can PyTorch's kernels (which need `other` in the table's dtype) run losslessly?

    Yes when the table is in the accumulation dtype (upcasting `other` is exact) or
    `other` already has the table's dtype. The exception is a half table with fp32
    scores: rounding the scores to bf16 would lose precision, so that case gathers
    chunk by chunk in fp32 instead (slower on CPU).
    """
    return values.dtype == accumulate_dtype(values, other) or values.dtype == other.dtype


def bag_forward(indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Forward on 2-D inputs: indices/scores [bags, bag_size], values [slots, dim] -> [bags, dim]."""
    acc = accumulate_dtype(values, scores)
    out_dtype = output_dtype(values, scores)
    bags = indices.shape[0]
    dim = values.shape[1]
    if indices.numel() == 0:
        return scores.new_zeros(bags, dim, dtype=out_dtype)
    if _native_ok(values, scores):
        # PyTorch's fused kernel reads each row once, never builds the gather, and
        # accumulates in fp32 (fp64 for fp64), also for bf16/fp16 tables (fbgemm on
        # CPU, acc_type on CUDA; `test_half_tables_accumulate_in_fp32` checks it).
        out = F.embedding_bag(
            indices, values, per_sample_weights=scores.to(values.dtype), mode="sum"
        )
        return out.to(out_dtype)
    out = torch.empty(bags, dim, dtype=acc, device=values.device)
    w = scores.to(acc)
    for sl, rows in _gathered_chunks(indices, values, acc):  # rows [c, k, dim]
        out[sl] = torch.bmm(w[sl].unsqueeze(1), rows).squeeze(1)
    return out.to(out_dtype)


def _score_grad(
    grad_out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, acc: torch.dtype
) -> torch.Tensor:
    """grad_scores[b, j] = <grad_out[b], values[indices[b, j]]>, as [bags, bag_size].

    `grad_out` is in the output's (= scores') dtype. Where `_native_ok`, PyTorch's own
    per-sample-weights backward does it reading each row once, no temporaries, with
    fp32 accumulation; otherwise we gather and reduce chunk by chunk in `acc`.
    """
    bags, bag_size = indices.shape
    if _native_ok(values, grad_out):
        try:
            flat = indices.reshape(-1)
            offsets = torch.arange(0, flat.numel(), bag_size, dtype=flat.dtype, device=flat.device)
            offset2bag = torch.arange(bags, dtype=flat.dtype, device=flat.device)
            offset2bag = offset2bag.repeat_interleave(bag_size)
            out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out.to(values.dtype),
                values,
                flat,
                offsets,
                offset2bag,
                0,  # mode 0 = sum
            )
            return out.view(bags, bag_size)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass  # a private op: fall back if a PyTorch version lacks or changes it
    g = grad_out.to(acc)
    gs = torch.empty(bags, bag_size, dtype=acc, device=values.device)
    for sl, rows in _gathered_chunks(indices, values, acc):  # rows [c, k, dim]
        gs[sl] = torch.bmm(rows, g[sl].unsqueeze(2)).squeeze(2)
    return gs


def _value_grad_rows(
    grad_out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows [U], their gradient [U, dim] in the table's dtype) via reverse indices.

    Sorting the flat indices groups every occurrence of a row (duplicates within a
    bag and across bags) into one segment; the row's gradient is the score-weighted
    sum of `grad_out` over the bags of its occurrences. That is itself an embedding
    bag, with `grad_out` as the table and one bag per unique row, so PyTorch's fused
    `embedding_bag` computes it without materializing `[N, dim]` contributions, in
    fp32 -- run in the table's dtype when grad_out and scores already have it (it
    accumulates in fp32 and rounds once, see `bag_forward`), else in the accumulation
    dtype and cast, which costs a `[U, dim]` fp32 temporary.
    """
    bag_size = indices.shape[1]
    same = values.dtype == scores.dtype == grad_out.dtype
    dtype = values.dtype if same else accumulate_dtype(values, scores)
    flat = indices.reshape(-1)
    sorted_rows, perm = torch.sort(flat, stable=True)  # stable: fixed summation order
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    offsets = torch.zeros(uniq.numel(), dtype=torch.int64, device=flat.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    rows = F.embedding_bag(
        perm // bag_size,  # the bag of each occurrence, grouped by row
        grad_out.to(dtype).contiguous(),
        offsets,
        mode="sum",
        per_sample_weights=scores.reshape(-1)[perm].to(dtype),
    )
    return uniq, rows.to(values.dtype)


def bag_backward(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    need_values: bool = True,
    need_scores: bool = True,
    sparse_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients on 2-D inputs. Returns (grad_values, grad_scores); None where not needed.

    Args:
        grad_out: [bags, dim] gradient of the output.
        indices, values, scores: the forward's inputs.
    """
    acc = accumulate_dtype(values, scores)
    grad_scores = grad_values = None
    if need_scores:
        if indices.numel() == 0:
            grad_scores = torch.zeros_like(scores)
        else:
            grad_scores = _score_grad(grad_out, indices, values, acc).to(scores.dtype)
    if need_values:
        if indices.numel() == 0:
            uniq = indices.new_zeros(0)
            rows = values.new_zeros(0, values.shape[1])
        else:
            uniq, rows = _value_grad_rows(grad_out, indices, values, scores)
        grad_values = row_sparse_grad(uniq, rows, values, sparse_grad)
    return grad_values, grad_scores


def bag_function(name: str, forward, backward, doc: str) -> type[torch.autograd.Function]:
    """A torch.autograd.Function over 2-D bags, shared by the backends.

    `forward(indices, values, scores)` and `backward(grad_out, indices, values, scores,
    need_values=, need_scores=, sparse_grad=)` are a backend's host functions; the
    Function's `apply(indices, values, scores, sparse_grad=True)` gives `values` a
    row-sparse gradient by default.
    """

    def fwd(ctx, indices, values, scores, sparse_grad: bool = True):
        ctx.save_for_backward(indices, values, scores)
        ctx.sparse_grad = bool(sparse_grad)
        return forward(indices, values, scores)

    @once_differentiable
    def bwd(ctx, grad_out):
        indices, values, scores = ctx.saved_tensors
        grad_values, grad_scores = backward(
            grad_out,
            indices,
            values,
            scores,
            need_values=ctx.needs_input_grad[1],
            need_scores=ctx.needs_input_grad[2],
            sparse_grad=ctx.sparse_grad,
        )
        return None, grad_values, grad_scores, None

    namespace = {"__doc__": doc, "__module__": forward.__module__, "__qualname__": name,
                 "forward": staticmethod(fwd), "backward": staticmethod(bwd)}
    return type(name, (torch.autograd.Function,), namespace)


def apply_bag(function, indices, values, scores, sparse_grad: bool, contiguous: bool = False) -> torch.Tensor:
    """`function.apply` on inputs of any leading shape [..., bag_size]: [..., dim]."""
    lead = indices.shape[:-1]
    shape2d = (math.prod(lead), indices.shape[-1])  # explicit: -1 is ambiguous for bag_size 0
    indices, scores = indices.reshape(shape2d), scores.reshape(shape2d)
    if contiguous:
        indices, scores = indices.contiguous(), scores.contiguous()
    out = function.apply(indices, values, scores, sparse_grad)
    return out.view(*lead, values.shape[1])


EmbeddingBagSparse = bag_function(
    "EmbeddingBagSparse", bag_forward, bag_backward,
    "autograd wrapper: forward `bag_forward`, backward `bag_backward` (row-sparse by default).",
)


def embedding_bag_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    sparse_grad: bool = True,
) -> torch.Tensor:
    """Weighted embedding bag with PyTorch ops (the "torch" backend).

    Args:
        indices: [..., bag_size] int32/int64 rows of `values`.
        values:  [slots, dim] value table (fp32/bf16/fp16/fp64).
        scores:  [..., bag_size] per-row weights.
        sparse_grad: gradient of `values` as a coalesced sparse COO tensor (default)
            or dense.
    Returns:
        [..., dim] in `scores.dtype`.
    """
    check_inputs(indices, values, scores)
    return apply_bag(EmbeddingBagSparse, indices, values, scores, sparse_grad)
