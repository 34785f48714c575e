"""Grafted models as real transformers models: register, load, save.

    save_grafted(model, tmp_dir, tokenizer=tok, extra_files={"graft.json": ...})
    register_all()                         # in-process: AutoModelForCausalLM.from_pretrained(dir)

The model classes live in `modeling_memsurgery.py` (self-contained, copied into every
checkpoint as remote code); this module is the memsurgery-side API around them. See
that file's docstring for how memories are attached, and memsurgery/graft/surgery.py
for how a grafted model is built from a dense one.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from memsurgery.errors import InputError
from memsurgery.export.configuration_memsurgery import (
    AUTO_MAP,
    MODEL_TYPE_PREFIX,
    grafted_model_type,
)
from memsurgery.export.modeling_memsurgery import (
    CODE_FILES,
    MemsurgeryModelMixin,
    build_classes,
    code_files,
)
from memsurgery.memory import ProductKeyMemory

__all__ = [
    "is_grafted_config",
    "is_grafted_model",
    "load_grafted",
    "memory_block",
    "memory_layers",
    "register",
    "register_all",
    "save_grafted",
]

_REGISTERED: set[str] = set()


# ------------------------------------------------------------------ registration


def register(base_model_type: str) -> tuple[type, type]:
    """Register memsurgery_<base_model_type> with AutoConfig / AutoModelForCausalLM (idempotent).

    Returns (config class, model class). Imports that family's transformers modules.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config_cls, model_cls = build_classes(base_model_type)
    except ValueError as err:  # transformers lacks the family
        raise InputError(str(err)) from None
    if base_model_type not in _REGISTERED:
        AutoConfig.register(grafted_model_type(base_model_type), config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        _REGISTERED.add(base_model_type)
    return config_cls, model_cls


def register_all() -> list[str]:
    """Register every supported base family that this transformers knows; return the model_types.

    After this, `AutoModelForCausalLM.from_pretrained(grafted_dir)` works in-process without
    `trust_remote_code` (memsurgery's own classes take precedence over the checkpoint's copy).
    Costs the import of each family's modeling module (see the lead's notes for timings).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from memsurgery.arch import supported_model_types

    done = []
    for mt in supported_model_types():
        if mt in CONFIG_MAPPING and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            register(mt)
            done.append(grafted_model_type(mt))
    return done


def load_grafted(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` for a grafted checkpoint.

    Registers only the checkpoint's base family (cheaper than register_all) and checks
    that the directory really holds a grafted model. InputError otherwise.
    """
    from transformers import AutoModelForCausalLM

    cfg_path = Path(path) / "config.json"
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{cfg_path}: cannot read a config.json ({err})") from None
    if not is_grafted_config(data):
        raise InputError(
            f"{path}: not a grafted checkpoint (model_type {data.get('model_type')!r}, no memory block)"
        )
    register(data["model_type"][len(MODEL_TYPE_PREFIX) :])
    from memsurgery.checkpoint.reader import _quiet_transformers

    with _quiet_transformers():  # no progress bar or load report: stderr is for the one-line error
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# ------------------------------------------------------------------ inspection


def is_grafted_config(config) -> bool:
    """True for a grafted model's config (a config.json dict or a PretrainedConfig)."""
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else {}
    model_type = config.get("model_type")
    return (
        isinstance(model_type, str)
        and model_type.startswith(MODEL_TYPE_PREFIX)
        and isinstance(config.get("memory"), Mapping)
    )


def is_grafted_model(model) -> bool:
    return isinstance(model, MemsurgeryModelMixin)


def memory_layers(model) -> dict[int, ProductKeyMemory]:
    """{decoder layer index: memory layer} of a grafted model."""
    if not is_grafted_model(model):
        raise InputError(f"{type(model).__name__} is not a grafted model (no memory bank)")
    return model.memory_layers()


def memory_block(model) -> dict:
    """A copy of the model config's `memory` block."""
    return copy.deepcopy(model.config.memory)


# ------------------------------------------------------------------ save


def _config_json(model) -> str:
    data = json.loads(model.config.to_json_string(use_diff=True))
    # _model_name_or_path: GGUF's general.name, carried along by transformers' GGUF loader
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    data["architectures"] = [type(model).__name__]
    data["auto_map"] = {**(data.get("auto_map") or {}), **AUTO_MAP}
    data["model_type"] = model.config.model_type
    data["memory"] = model.config.memory
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise InputError(
            f"extra file name {name!r} must be a relative path inside the output directory"
        )
    return rel


def save_grafted(
    model,
    out_dir: Path,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer=None,
    extra_files: dict[str, str | bytes] | None = None,
) -> list[str]:
    """Write a grafted model as a Hugging Face directory; return the file names written.

    config.json (model_type memsurgery_<base>, memory block, auto_map; no
    quantization_config), configuration_memsurgery.py + modeling_memsurgery.py (remote
    code for machines without memsurgery), sharded safetensors (tied aliases omitted,
    the value table once), generation_config.json, the tokenizer if given, and
    `extra_files` written verbatim. `out_dir` is normally the temp dir of
    memsurgery._atomic.atomic_output_dir; the caller handles atomicity.
    """
    from memsurgery.checkpoint.writer import save_state_dict_sharded, tied_aliases

    if not is_grafted_model(model):
        raise InputError(
            f"{type(model).__name__} is not a grafted model; graft it first (graft_model)"
        )
    extra = {str(_safe_relpath(k)): v for k, v in (extra_files or {}).items()}
    clash = sorted(set(extra) & {"config.json", *CODE_FILES})
    if clash:
        raise InputError(f"extra_files may not replace {clash}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = ["config.json"]
    (out_dir / "config.json").write_text(_config_json(model), encoding="utf-8")
    for name, text in code_files(model.config.base_model_type).items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(name)

    skip = tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    written += save_state_dict_sharded(state, out_dir, max_shard_size=max_shard_size)

    gen = getattr(model, "generation_config", None)
    if gen is None:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(str(out_dir))
    written.append("generation_config.json")

    if tokenizer is not None:
        from memsurgery.checkpoint.writer import save_tokenizer

        written += save_tokenizer(tokenizer, out_dir)

    for name, content in extra.items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(str(content), encoding="utf-8")
        written.append(name)
    return written
