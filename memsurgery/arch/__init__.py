"""Architecture specs as data: which modules and config keys a supported family uses.

`spec_for_config(config)` picks the spec for an HF config's `model_type`; the
returned `ArchSpec` names the decoder layers, MLP, norms and config keys and
resolves them on config dicts, weight names and live models. The specs
themselves are the JSON files in `memsurgery/arch/specs/`.
"""

from memsurgery.arch.registry import (
    ArchSpec,
    SpecError,
    all_specs,
    load_spec,
    parse_spec,
    spec_for_config,
    spec_for_model_type,
    supported_model_types,
)

__all__ = [
    "ArchSpec",
    "SpecError",
    "all_specs",
    "load_spec",
    "parse_spec",
    "spec_for_config",
    "spec_for_model_type",
    "supported_model_types",
]
