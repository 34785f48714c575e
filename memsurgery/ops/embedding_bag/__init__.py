"""The weighted embedding bag: the read side of a memory layer.

`out[b] = sum_j scores[b, j] * values[indices[b, j]]`, three implementations with
one contract (see `naive.py`): `naive` (reference), `sparse` (PyTorch ops,
row-sparse gradient; the "torch" backend), `fused` (Triton; imported lazily, not
here, so this package imports without triton). Call it through
`memsurgery.ops.embedding_bag`, which picks the backend.
"""

from memsurgery.ops.embedding_bag.naive import (
    accumulate_dtype,
    check_inputs,
    embedding_bag_naive,
    output_dtype,
)
from memsurgery.ops.embedding_bag.sparse import EmbeddingBagSparse, embedding_bag_sparse

__all__ = [
    "EmbeddingBagSparse",
    "accumulate_dtype",
    "check_inputs",
    "embedding_bag_naive",
    "embedding_bag_sparse",
    "output_dtype",
]
