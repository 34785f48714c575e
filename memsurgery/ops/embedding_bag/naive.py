"""Plain-PyTorch reference for the weighted embedding bag, and the op's dtype contract.

The embedding bag is the read side of a memory layer: every token picked
`bag_size` value rows with softmax scores, and its output is the score-weighted
sum of those rows::

    out[b, :] = sum_j scores[b, j] * values[indices[b, j], :]

This file is the reference every faster implementation (`sparse.py`, `fused.py`)
is compared against in the tests, forward and every gradient. It is written for
clarity, not speed: it materializes the full `[bags, bag_size, dim]` gather.

Dtype contract (shared by every backend; the helpers below are the single source):

- the output has `scores.dtype`; the memory layer's scores live on the activation
  path, so the bag's output follows the activations' precision, whatever the table's;
- the sum is accumulated in `promote(values.dtype, scores.dtype, float32)`: fp32 for
  bf16/fp16/fp32 inputs, fp64 when either input is fp64 (so gradcheck works);
- the value gradient has `values.dtype`, the score gradient `scores.dtype`.
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def output_dtype(values: torch.Tensor, scores: torch.Tensor) -> torch.dtype:
    """The dtype of the bag's output: always `scores.dtype`."""
    return scores.dtype


def accumulate_dtype(values: torch.Tensor, scores: torch.Tensor) -> torch.dtype:
    """The dtype sums are accumulated in: fp32 unless an input is fp64."""
    return torch.promote_types(torch.promote_types(values.dtype, scores.dtype), torch.float32)


def check_inputs(indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
    """Raise ValueError ("expected X, got Y") when the three tensors do not fit together.

    Cheap metadata checks only; index bounds are not checked here because that
    would need a device sync on CUDA (the torch and naive paths check them anyway).
    """
    if indices.dtype not in _INTS:
        raise ValueError(f"embedding_bag: expected int32/int64 indices, got {indices.dtype}")
    if values.dim() != 2:
        raise ValueError(
            f"embedding_bag: expected values [slots, dim], got shape {tuple(values.shape)}"
        )
    if values.dtype not in _FLOATS or scores.dtype not in _FLOATS:
        raise ValueError(
            f"embedding_bag: expected floating values and scores, got {values.dtype} and {scores.dtype}"
        )
    if indices.shape != scores.shape or indices.dim() < 1:
        raise ValueError(
            "embedding_bag: expected indices and scores of the same shape [..., bag_size], got "
            f"{tuple(indices.shape)} and {tuple(scores.shape)}"
        )
    if not (indices.device == values.device == scores.device):
        raise ValueError(
            "embedding_bag: expected indices, values and scores on one device, got "
            f"{indices.device}, {values.device} and {scores.device}"
        )


def embedding_bag_naive(
    indices: torch.Tensor, values: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """Reference weighted embedding bag (sum mode); autograd goes through standard ops.

    Args:
        indices: [..., bag_size] int32/int64, rows of `values` to read.
        values:  [slots, dim] floating value table.
        scores:  [..., bag_size] floating per-row weights.
    Returns:
        [..., dim] in `scores.dtype`, accumulated in fp32 (fp64 for fp64 inputs).
        `values.grad` is dense, as for any indexing op.
    """
    check_inputs(indices, values, scores)
    acc = accumulate_dtype(values, scores)
    rows = values[indices.long()].to(acc)  # [..., bag_size, dim]
    out = (rows * scores.to(acc).unsqueeze(-1)).sum(-2)
    return out.to(output_dtype(values, scores))
