"""The shared value table and the container that owns it with its memory layers.

One value table is shared by every memory layer of a model (Memory+). The reference
shares it through a class-global variable, so two models in one process share one
table. Here the table is an ordinary module owned by one `MemoryBank` per model:

    bank = MemoryBank.from_config(cfg)            # owns bank.values (SharedValueTable)
    bank.add_layer("4"); bank.add_layer("12")     # layers read bank.values, do not own it
    model.memory_bank = bank                      # the graft code attaches it

Each `ProductKeyMemory` holds a plain (unregistered) reference to the table module,
so the table's parameter appears once in `bank.parameters()` and once in
`bank.state_dict()` ("values.weight"), while `.to()`, `load_state_dict` (in place or
with assign=True) and `copy.deepcopy(bank)` keep every layer reading the bank's
table. See docs/memory-layer.md, "How sharing works".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from memsurgery.errors import InputError
from memsurgery.ops import embedding_bag

if TYPE_CHECKING:  # layer.py imports this module; import it lazily at run time
    from memsurgery.memory.config import MemoryConfig
    from memsurgery.memory.layer import ProductKeyMemory


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


class MemoryBank(nn.Module):
    """Owns one SharedValueTable (`values`) and the memory layers that read it (`layers`).

    State-dict keys: "values.weight" once, then "layers.<name>.<param>" per layer.
    Layer names are ModuleDict keys, so they cannot contain "." (use the block index,
    e.g. "4", "12", "20").
    """

    def __init__(self, values: SharedValueTable, config: MemoryConfig | None = None):
        super().__init__()
        self.values = values
        self.layers = nn.ModuleDict()
        # The default config for add_layer; a pydantic model, not a module or tensor.
        self.config = config

    @classmethod
    def from_config(
        cls, config: MemoryConfig, device: torch.device | str | None = None
    ) -> MemoryBank:
        """A bank with a fresh table sized from `config` (input_dim must be set)."""
        config.require_dims()
        return cls(SharedValueTable.from_config(config, device=device), config)

    def add_layer(self, name: str, config: MemoryConfig | None = None) -> ProductKeyMemory:
        """Create a ProductKeyMemory on this bank's table, register it as layers[name], return it.

        `config` defaults to the bank's; its slots, value_dim and value_dtype must match the table.
        The new layer is placed on the table's device.
        """
        from memsurgery.memory.layer import ProductKeyMemory

        config = config or self.config
        if config is None:
            raise InputError(
                "MemoryBank.add_layer needs a MemoryConfig (the bank was built without one)"
            )
        layer = ProductKeyMemory(config, self.values)
        layer.to(self.values.weight.device)
        return self.attach(name, layer)

    def attach(self, name: str, layer: ProductKeyMemory) -> ProductKeyMemory:
        """Register an existing layer as layers[name] and point it at this bank's table."""
        name = str(name)
        if not name or "." in name:
            raise InputError(
                f"memory layer name {name!r} must be non-empty without '.' (use e.g. '4')"
            )
        if name in self.layers:
            raise InputError(
                f"memory layer {name!r} is already attached; names: {list(self.layers)}"
            )
        layer.bind_values(self.values)
        self.layers[name] = layer
        return layer

    def __getitem__(self, name: str) -> ProductKeyMemory:
        return self.layers[str(name)]

    def __iter__(self) -> Iterator[tuple[str, ProductKeyMemory]]:
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def table_parameters(self) -> list[nn.Parameter]:
        """The sparse-gradient parameter(s): give these to SparseRowAdam / SparseRowSGD."""
        return [self.values.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (queries, keys, projections, gates) of all layers."""
        table = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in table]

    def set_record(self, on: bool = True) -> None:
        """Switch telemetry recording on/off for every layer (see ProductKeyMemory.record)."""
        for _, layer in self:
            layer.record = on

    def memory_bytes(self) -> int:
        """Bytes held by the bank's parameters (table + layers), not counting optimizer state."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def table_bytes(slots: int, v_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a [slots, v_dim] table of `dtype`."""
    return slots * v_dim * torch.empty((), dtype=dtype).element_size()
