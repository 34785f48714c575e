"""Export: grafted checkpoints as Hugging Face models, and the merged, verified export.

- `modeling_memsurgery.py`, `configuration_memsurgery.py`: the grafted model classes.
  Self-contained (torch + transformers only): a copy of each is written next to every
  grafted checkpoint's weights and named by its config.json `auto_map`, so
  `from_pretrained(dir, trust_remote_code=True)` works without memsurgery.
- `hf`: memsurgery's side of those classes: register them with transformers' Auto
  classes, load a grafted directory, save one (weights, config, the two code files).
- `api`: `memsurgery export`, a standalone directory with reports, model card (`card`) and
  SHA256SUMS (`manifest`), verified by reloading it in a process without memsurgery;
  `--push-to-hub` uploads it (`publish`).
- `adapter`: the memory alone as an adapter over an unchanged base (`save_memory_adapter`,
  `load_memory_adapter`); `adapter_export` is `export --format memory-adapter`.
"""

from memsurgery.export.adapter import load_memory_adapter, save_memory_adapter
from memsurgery.export.api import MANIFEST, check_manifest, export, verify_export

__all__ = ["MANIFEST", "check_manifest", "export", "load_memory_adapter", "save_memory_adapter", "verify_export"]
