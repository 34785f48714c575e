"""Write checkpoints: sharded safetensors + index, and complete HF model directories.

Everything here writes into a directory the caller owns — normally the temp
dir from `memsurgery._atomic.atomic_output_dir`, which renames it into place
only when the whole write succeeded.

Shared storage: the safetensors format cannot express two names reading the
same bytes. `save_state_dict_sharded` writes every name it is given; names
whose tensors share storage are written as independent copies. `save_hf_model`
avoids the duplicate for tied weights by omitting the tied alias (e.g.
`lm_head.weight` when `tie_word_embeddings`), which transformers re-ties on load.
"""

from __future__ import annotations

import os

import json
import re
from pathlib import Path

import torch

from memsurgery.errors import InputError, one_line

INDEX_NAME = "model.safetensors.index.json"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "2GB", "500MB", "1.5GiB", "1000" or 1000.

    Decimal units (KB/MB/GB/TB) are powers of 1000, as on the Hugging Face Hub;
    binary units (KiB/MiB/GiB/TiB) are powers of 1024.
    """
    hint = "use e.g. 2GB, 500MB, 1.5GiB or a byte count"
    if isinstance(text, bool):
        raise InputError(f"size {text!r}: not a size; {hint}")
    if isinstance(text, int):
        if text <= 0:
            raise InputError(f"size {text}: must be positive; {hint}")
        return text
    if not isinstance(text, str):
        raise InputError(one_line(f"size {text!r}: not a size; {hint}"))
    m = _SIZE_RE.match(text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise InputError(one_line(f"size {text[:40]!r}: not a size; {hint}"))
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(one_line(f"size {text!r}: must be at least 1 byte; {hint}"))
    return value


def _prepare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; names sharing storage get their own copy."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise ValueError(
                f"state dict entry {name!r} is on the meta device and has no data to write"
            )
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if t.numel() and key in seen:
            t = t.clone(memory_format=torch.contiguous_format)  # an alias: give it its own bytes
        else:
            t = t.contiguous()
            if t.numel():
                seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        # A view of a larger storage (e.g. one row of a table) would make
        # safetensors write or reject the whole storage; store just the view.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = t
    return out


def save_state_dict_sharded(
    state_dict: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    max_shard_size: int | str = "2GB",
    metadata: dict | None = None,
) -> list[str]:
    """Write `state_dict` as safetensors in `out_dir`, sharded if above `max_shard_size`.

    Writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). Every
    file's metadata holds `{"format": "pt"}` plus `metadata` (non-string values
    are JSON-encoded). Names that share storage are written as separate copies
    (see the module docstring). Returns the names of all files written, shards
    first and the index (if any) last.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    file_meta = {
        str(k): (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in (metadata or {}).items()
    }
    file_meta["format"] = "pt"  # what transformers checks for; always wins over the caller's

    tensors = _prepare(state_dict)
    plan = split_torch_state_dict_into_shards(tensors, max_shard_size=limit)
    written: list[str] = []
    for fname, names in plan.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out_dir / fname), metadata=file_meta)
        # safetensors creates its files 0600; a published checkpoint should be readable
        # like any file the user writes (0666 minus the umask).
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(out_dir / fname, 0o666 & ~mask)
        written.append(fname)
    if plan.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": dict(sorted(plan.tensor_to_filename.items())),
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(INDEX_NAME)
    return written


def tied_aliases(model) -> set[str]:
    """State-dict keys of `model` that transformers re-ties on load and so need not be saved.

    A key counts only if the model declares it tied (`all_tied_weights_keys`,
    or lm_head.weight under `tie_word_embeddings` on older transformers) *and*
    it really shares storage with its source here — if someone untied the
    weights, both must be saved.
    """
    state = model.state_dict()
    declared = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not declared:  # transformers < 5: only the word embeddings tie, via the config flag
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text_cfg, "tie_word_embeddings", False):
            out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
            if out_emb is not None and in_emb is not None:
                where = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
                if id(out_emb) in where and id(in_emb) in where:
                    declared[f"{where[id(out_emb)]}.weight"] = f"{where[id(in_emb)]}.weight"
    out = set()
    for target, source in declared.items():
        t, s = state.get(target), state.get(source)
        if t is not None and s is not None and t.data_ptr() == s.data_ptr() and t.shape == s.shape:
            out.add(target)
    return out


def _config_json(model) -> str:
    """config.json text for `model`, without quantization settings (the weights we write are float)."""
    cfg = model.config
    data = json.loads(cfg.to_json_string(use_diff=True))
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    data.pop("_model_name_or_path", None)  # GGUF's general.name, as transformers' GGUF loader files it
    data["architectures"] = [type(model).__name__]
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save_hf_model(
    model,
    out_dir: Path,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer=None,
    generation_config=None,
) -> None:
    """Write `model` as a Hugging Face directory loadable by plain `from_pretrained`.

    Writes config.json (quantization_config removed), the state dict minus tied
    aliases as sharded safetensors, generation_config.json, and the tokenizer
    files if `tokenizer` is given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(_config_json(model), encoding="utf-8")

    skip = tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    save_state_dict_sharded(state, out_dir, max_shard_size=max_shard_size)

    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_model_config(model.config)
    generation_config.save_pretrained(str(out_dir))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)


# Written by transformers from the loading call, not properties of the tokenizer; an auto_map
# would make AutoTokenizer ask to run remote code for a tokenizer that needs none.
_TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "auto_map",
                          "trust_remote_code")


def save_tokenizer(tokenizer, out_dir: Path) -> list[str]:
    """tokenizer.save_pretrained(out_dir) with a standard, portable tokenizer_config.json
    (no load-time keys, no auto_map); returns the file names written."""
    out_dir = Path(out_dir)
    before = {p for p in out_dir.rglob("*") if p.is_file()}
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg = {k: v for k, v in cfg.items() if k not in _TOKENIZER_CONFIG_DROP}
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p not in before)
