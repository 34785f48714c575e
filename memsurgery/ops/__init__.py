"""Kernels behind the memory layer, each with a plain-PyTorch reference beside it.

`embedding_bag(indices, values, scores, backend="auto", sparse_grad=True)` is the
public entry point (see `memsurgery.ops.dispatch` for backends and the
`MEMSURGERY_EMBEDDING_BAG_BACKEND` override).

Name note: `memsurgery.ops.embedding_bag` is the *function*. The implementation
subpackage of the same name is imported by the line below before the function is
bound, so the function wins the attribute. Import submodules with `from`:
`from memsurgery.ops.embedding_bag import fused` or
`from memsurgery.ops.embedding_bag.naive import embedding_bag_naive` work;
`import memsurgery.ops.embedding_bag.fused as f` does not (its attribute walk meets
the function), nor do dotted strings for `mock.patch` through that name.
"""

from memsurgery.errors import BackendUnavailable
from memsurgery.ops.dispatch import (
    BACKENDS,
    ENV_VAR,
    embedding_bag,
    resolve_backend,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailable",
    "embedding_bag",
    "resolve_backend",
    "triton_available",
]
