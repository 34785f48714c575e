"""Configuration of a memsurgery-grafted causal LM (shipped next to the weights as remote code).

A grafted checkpoint's config is its base family's config (LlamaConfig, Qwen3Config,
...) plus one `memory` block, under `model_type = "memsurgery_<base model_type>"`:

    "memory": {
      "format_version": 1,
      "config": {...},            # memsurgery MemoryConfig.model_dump() (input_dim filled in)
      "layers": [4, 12, 20],      # decoder layers that got a memory
      "mode": "parallel",         # "parallel": mlp(x) + memory(x); "replace": memory(x) only
      "layers_path": "model.layers",   # where the decoder layers sit in the *ForCausalLM
      "mlp_module": "mlp"              # the MLP attribute of a decoder layer
    }

`layers_path` / `mlp_module` come from memsurgery's architecture specs at graft time,
so the modeling file needs no per-family code (and works without memsurgery).

This file is self-contained: it imports only transformers. memsurgery writes a copy
of it into every grafted checkpoint with the `BASE_MODEL_TYPE` line set to the base
family; `MemsurgeryConfig` (the name `auto_map` points at) is the config class for
that family. In-process, memsurgery calls `build_config_class(model_type)` for each
family it registers instead.

Remote-code note (transformers 5.24): `auto_map` names this file for AutoConfig and
modeling_memsurgery.py for AutoModelForCausalLM. transformers copies a local checkpoint's
code into HF_MODULES_CACHE under a hash of each entry file plus its relative imports,
so this file is imported twice (alone, and beside the modeling file): the loaded
model's `type(model.config)` is then not `type(model).config_class`, though both are
the same code. Nothing relies on that identity; it only matters to isinstance checks.
"""

from __future__ import annotations

# Rewritten by memsurgery when the file is copied into a checkpoint; the copy inside the
# memsurgery package keeps a placeholder (its module-level names are built lazily).
BASE_MODEL_TYPE = "llama"

MODEL_TYPE_PREFIX = "memsurgery_"
FORMAT_VERSION = 1
MODES = ("parallel", "replace")
AUTO_MAP = {
    "AutoConfig": "configuration_memsurgery.MemsurgeryConfig",
    "AutoModelForCausalLM": "modeling_memsurgery.MemsurgeryForCausalLM",
}

_CONFIG_CLASSES: dict = {}


def grafted_model_type(base_model_type: str) -> str:
    """ "llama" -> "memsurgery_llama"."""
    return MODEL_TYPE_PREFIX + base_model_type


def check_memory_block(block, where: str = "config.json: memory") -> dict:
    """Validate the shape of a `memory` block (not the memory config's values); return it.

    Raises ValueError naming the key; a newer format_version asks for a newer reader.
    """
    if not isinstance(block, dict):
        # One exception type for every bad block: callers report config errors, not types.
        raise ValueError(f"{where}: expected an object, got {type(block).__name__}")  # noqa: TRY004
    version = block.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}.format_version: expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}.format_version={version} is newer than this reader ({FORMAT_VERSION}); "
            "upgrade memsurgery or re-export the checkpoint"
        )
    if not isinstance(block.get("config"), dict):
        raise ValueError(f"{where}.config: expected an object (a memsurgery MemoryConfig)")  # noqa: TRY004
    layers = block.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ValueError(
            f"{where}.layers: expected a non-empty list of distinct layer indices, got {layers!r}"
        )
    if block.get("mode") not in MODES:
        raise ValueError(f"{where}.mode: expected one of {MODES}, got {block.get('mode')!r}")
    for key in ("layers_path", "mlp_module"):
        if key in block and not (isinstance(block[key], str) and block[key]):
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {block[key]!r}")
    return block


def base_config_class(base_model_type: str) -> type:
    """transformers' config class for a model_type (e.g. LlamaConfig for "llama")."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if base_model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"transformers has no model_type {base_model_type!r}; "
            "this checkpoint needs a newer transformers"
        )
    return CONFIG_MAPPING[base_model_type]


def build_config_class(base_model_type: str) -> type:
    """The grafted config class for `base_model_type` (one class per family, cached).

    A subclass of the base config with one extra field, `memory` (None for a plain
    config). transformers turns every config subclass into a keyword-only dataclass,
    so the field needs a real annotation, not a string.
    """
    cls = _CONFIG_CLASSES.get(base_model_type)
    if cls is not None:
        return cls
    base = base_config_class(base_model_type)
    namespace = {
        "__module__": __name__,
        "__qualname__": "MemsurgeryConfig",
        "__doc__": (
            f"{base.__name__} plus a memsurgery `memory` block (model_type "
            f"{grafted_model_type(base_model_type)!r}); see configuration_memsurgery.py."
        ),
        "__annotations__": {"memory": dict | None},
        "memory": None,
        "model_type": grafted_model_type(base_model_type),
        "base_model_type": base_model_type,
    }
    cls = type("MemsurgeryConfig", (base,), namespace)
    _CONFIG_CLASSES[base_model_type] = cls
    return cls


def __getattr__(name: str):
    # Built on first use, so importing this module does not import the base family.
    if name == "MemsurgeryConfig":
        return build_config_class(BASE_MODEL_TYPE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
