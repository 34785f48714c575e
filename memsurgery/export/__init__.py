"""Export: grafted checkpoints as Hugging Face models, and the merged, verified export.

- `modeling_memsurgery.py`, `configuration_memsurgery.py`: the grafted model classes.
  Self-contained (torch + transformers only): a copy of each is written next to every
  grafted checkpoint's weights and named by its config.json `auto_map`, so
  `from_pretrained(dir, trust_remote_code=True)` works without memsurgery.
- `hf`: memsurgery's side of those classes: register them with transformers' Auto
  classes, load a grafted directory, save one (weights, config, the two code files).
- `api`: `memsurgery export`, a standalone directory with reports, model card and
  SHA256SUMS, verified by reloading it in a process without memsurgery.
"""

from memsurgery.export.api import MANIFEST, check_manifest, export, verify_export

__all__ = ["MANIFEST", "check_manifest", "export", "verify_export"]
