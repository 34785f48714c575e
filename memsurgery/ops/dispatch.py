"""Backend selection for the ops: one switch (`auto|torch|triton|naive`) that tests can force.

Precedence, strongest first:

1. an explicit `backend=` argument other than "auto";
2. the environment variable `MEMSURGERY_EMBEDDING_BAG_BACKEND` (torch|triton|naive|auto),
   which only replaces "auto" -- so a test or a user can force a backend under
   library code that calls with the default, while code that asks for a specific
   backend gets it;
3. auto-detection: "triton" when the table is on CUDA and triton imports, else "torch".

Triton is imported lazily, only when the "triton" backend runs, so this package
imports on machines without it.
"""

from __future__ import annotations

import functools
import os

import torch

from memsurgery.errors import BackendUnavailable
from memsurgery.ops.embedding_bag.naive import embedding_bag_naive
from memsurgery.ops.embedding_bag.sparse import embedding_bag_sparse

BACKENDS = ("auto", "torch", "triton", "naive")
ENV_VAR = "MEMSURGERY_EMBEDDING_BAG_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when `import triton` works (cached; a failed import is not retried)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or a broken install raising anything
        return False
    return True


def resolve_backend(backend: str, values: torch.Tensor) -> str:
    """Concrete backend ("torch" | "triton" | "naive") for a call; see module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"embedding_bag: expected backend in {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of torch|triton|naive|auto, got {env!r}")
        return env
    return "triton" if values.is_cuda and triton_available() else "torch"


def _fused():
    if not triton_available():
        raise BackendUnavailable(
            "embedding_bag backend 'triton' needs the triton package, which does not import here; "
            "install triton or use backend='torch'"
        )
    from memsurgery.ops.embedding_bag import fused

    return fused


def embedding_bag(
    indices: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    backend: str = "auto",
    sparse_grad: bool = True,
) -> torch.Tensor:
    """Score-weighted sum of value rows per bag: `out[b] = sum_j scores[b,j] * values[indices[b,j]]`.

    Equal to `F.embedding_bag(indices, values, per_sample_weights=scores, mode="sum")`
    up to float rounding, with fp32 accumulation even for bf16 tables.

    Args:
        indices: [bags, bag_size] (or [..., bag_size]) int32/int64 rows of `values`.
        values:  [slots, dim] value table, fp32 or bf16 (fp16/fp64 also work).
        scores:  same shape as `indices`, per-row weights (e.g. softmaxed top-k scores).
        backend: "auto" | "torch" | "triton" | "naive"; see the module docstring.
        sparse_grad: `values` gets a coalesced sparse COO gradient holding only the
            rows touched (True, default; for sparse optimizers) or a dense one. The
            "naive" reference ignores it and always gives a dense gradient.
    Returns:
        [bags, dim] (or [..., dim]) with dtype `scores.dtype`; accumulation is fp32,
        fp64 when an input is fp64. Gradients: `values.dtype` and `scores.dtype`.
    Raises:
        ValueError: shapes, dtypes or devices that do not fit; unknown backend.
        BackendUnavailable: "triton" requested where it cannot run.
    """
    name = resolve_backend(backend, values)
    if name == "naive":
        return embedding_bag_naive(indices, values, scores)
    if name == "torch":
        return embedding_bag_sparse(indices, values, scores, sparse_grad=sparse_grad)
    return _fused().embedding_bag_triton(indices, values, scores, sparse_grad=sparse_grad)
