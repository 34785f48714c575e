"""Inspection: what a checkpoint is, what a graft would cost, and where it knows its facts.

    report = inspect_checkpoint(open_checkpoint(path), GraftProposal(slots=65536))
    render_inspect(report, console)

- `report`: the `memsurgery inspect` report, from headers only (no weights loaded);
- `estimate`: the proposed memory (`GraftProposal`) and its cost (`graft_estimate`);
- `render`: the report as rich tables;
- `trace`: causal tracing over known facts (loads the weights), the per-layer profile
  behind `inspect --trace` and `graft --layers auto`. Not imported here: it needs torch,
  and `inspect` without `--trace` stays light.
"""

from memsurgery.inspection.estimate import (
    GraftProposal,
    default_memory_layers,
    graft_estimate,
    parse_slots,
)
from memsurgery.inspection.render import render_inspect
from memsurgery.inspection.report import SCHEMA, inspect_checkpoint

__all__ = [
    "SCHEMA",
    "GraftProposal",
    "default_memory_layers",
    "graft_estimate",
    "inspect_checkpoint",
    "parse_slots",
    "render_inspect",
]
