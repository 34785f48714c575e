"""Memory-parallel training: the shared value table sharded column-wise over a process group.

See `memsurgery.parallel.memory_parallel` and docs/memory-layer.md, "Memory-parallel sharding".
"""

from memsurgery.parallel.memory_parallel import (
    ShardedValueTable,
    column_range,
    column_seed,
    column_seeded_normal_,
    column_sizes,
    full_state_dict,
    gather_columns,
    gather_full_table,
    new_memory_parallel_group,
    shard_bank,
    shard_value_table,
)

__all__ = [
    "ShardedValueTable",
    "column_range",
    "column_seed",
    "column_seeded_normal_",
    "column_sizes",
    "full_state_dict",
    "gather_columns",
    "gather_full_table",
    "new_memory_parallel_group",
    "shard_bank",
    "shard_value_table",
]
