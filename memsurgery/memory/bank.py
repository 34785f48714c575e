"""The container that owns a model's shared value table together with its memory layers.

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

import torch
from torch import nn

from memsurgery.errors import InputError
from memsurgery.memory.config import MemoryConfig
from memsurgery.memory.layer import ProductKeyMemory
from memsurgery.memory.values import SharedValueTable


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
