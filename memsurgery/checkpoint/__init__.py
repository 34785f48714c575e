"""Checkpoint I/O: lazy reading of safetensors / GGUF / gated pickle, sharded safetensors writing.

`convert` (`memsurgery convert`: any readable checkpoint -> a Hugging Face directory) and
`fetch` (the demo checkpoint, downloaded once) build on these; import them by name.
"""

from memsurgery.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint
from memsurgery.checkpoint.safetensors_header import read_safetensors_header
from memsurgery.checkpoint.writer import parse_size, save_hf_model, save_state_dict_sharded

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "open_checkpoint",
    "parse_size",
    "read_safetensors_header",
    "save_hf_model",
    "save_state_dict_sharded",
]
