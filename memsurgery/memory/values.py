"""The shared value table: the value rows every memory layer of one model reads.

One value table is shared by every memory layer of a model (Memory+). The reference
shares it through a class-global variable, so two models in one process share one
table. Here the table is an ordinary module owned by one `MemoryBank` per model
(bank.py), and each `ProductKeyMemory` holds a plain (unregistered) reference to it.
See docs/memory-layer.md, "How sharing works".
"""

from __future__ import annotations

import torch
from torch import nn

from memsurgery.errors import InputError
from memsurgery.memory.config import MemoryConfig
from memsurgery.ops import embedding_bag


class SharedValueTable(nn.Module):
    """The value rows all memory layers of one model read.

    weight: [slots, v_dim] parameter; its gradient is row-sparse (COO) when the layers
    use the sparse embedding-bag backward, so train it with memsurgery.optim.SparseRowAdam
    or SparseRowSGD (never a weight-decaying or dense optimizer: that is O(slots) per step).
    """

    def __init__(
        self,
        slots: int,
        v_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if slots < 1 or v_dim < 1:
            raise InputError(f"value table needs positive sizes, got slots={slots}, v_dim={v_dim}")
        self.weight = nn.Parameter(torch.empty(slots, v_dim, dtype=dtype, device=device))
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, config: MemoryConfig, device: torch.device | str | None = None
    ) -> SharedValueTable:
        return cls(config.slots, config.value_dim, dtype=config.torch_value_dtype, device=device)

    @property
    def slots(self) -> int:
        return self.weight.shape[0]

    @property
    def v_dim(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: N(0, v_dim**-0.5)."""
        self.weight.normal_(0.0, self.v_dim**-0.5)

    def bag(
        self,
        indices: torch.Tensor,
        scores: torch.Tensor,
        backend: str = "auto",
        sparse_grad: bool = True,
    ) -> torch.Tensor:
        """Score-weighted sum of this table's rows: indices, scores [N, B] -> [N, v_dim].

        The one place the memory layers read the table (ProductKeyMemory.forward calls it),
        so a subclass can change how rows are read without the layer knowing:
        memsurgery.parallel.ShardedValueTable bags its column slice and gathers the
        columns of every rank. Here: `memsurgery.ops.embedding_bag` on `weight`.
        """
        return embedding_bag(indices, self.weight, scores, backend=backend, sparse_grad=sparse_grad)

    @torch.no_grad()
    def zero_(self) -> SharedValueTable:
        """Zero every row: a function-preserving start (the bag is then exactly zero)."""
        self.weight.zero_()
        return self

    def extra_repr(self) -> str:
        return f"slots={self.slots}, v_dim={self.v_dim}, dtype={self.weight.dtype}"


def table_bytes(slots: int, v_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a [slots, v_dim] table of `dtype`."""
    return slots * v_dim * torch.empty((), dtype=dtype).element_size()
