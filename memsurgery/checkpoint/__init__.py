"""Checkpoint I/O: lazy reading of safetensors / GGUF / gated pickle, sharded safetensors writing.

`convert` (`memsurgery convert`: any readable checkpoint -> a Hugging Face directory),
`fetch` (the demo checkpoint, downloaded once) and `hub` (Hub ids as inputs) build on
these; import them by name. The names below are loaded on first use, so that importing
a light submodule (fetch, hub) does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Checkpoint": "reader",
    "TensorInfo": "reader",
    "open_checkpoint": "reader",
    "read_safetensors_header": "safetensors_header",
    "parse_size": "writer",
    "save_hf_model": "writer",
    "save_state_dict_sharded": "writer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"memsurgery.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
