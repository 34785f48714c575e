"""Inspection: what a checkpoint is, and where it knows its facts.

- `report`: the `memsurgery inspect` report, from headers only, and the graft estimate;
- `trace`: causal tracing over known facts (loads the weights), the per-layer profile
  behind `inspect --trace` and `graft --layers auto`. Not imported here: it needs torch.
"""

from memsurgery.inspection.report import (
    SCHEMA,
    GraftProposal,
    default_memory_layers,
    graft_estimate,
    inspect_checkpoint,
    parse_slots,
    render_inspect,
)

__all__ = [
    "SCHEMA",
    "GraftProposal",
    "default_memory_layers",
    "graft_estimate",
    "inspect_checkpoint",
    "parse_slots",
    "render_inspect",
]
