"""Memory+ product-key memory: config, shared value table, top-k search, the layer, the bank owning them."""

from memsurgery.memory.bank import MemoryBank
from memsurgery.memory.config import MemoryConfig, parse_slots
from memsurgery.memory.layer import ProductKeyMemory
from memsurgery.memory.topk import brute_force_topk, product_key_topk
from memsurgery.memory.values import SharedValueTable, table_bytes

__all__ = [
    "MemoryBank",
    "MemoryConfig",
    "ProductKeyMemory",
    "SharedValueTable",
    "brute_force_topk",
    "parse_slots",
    "product_key_topk",
    "table_bytes",
]
