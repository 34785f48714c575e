"""Open a checkpoint lazily: HF safetensors (single or sharded), GGUF, or gated pickle.

`open_checkpoint` reads only headers and config: the tensor table (names,
shapes, dtypes, byte sizes) comes from safetensors headers or the GGUF tensor
table, so opening a multi-GB checkpoint costs a few MB. Weights are read only by
`load_state_dict` / `load_model`. Pickle weights (`pytorch_model.bin`) are
refused unless the caller opts in, because unpickling can run arbitrary code.
Input files are only ever opened read-only.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memsurgery.checkpoint.gguf_reader import (
    GGUFHeader,
    gguf_config,
    gguf_to_hf_names,
    read_gguf_header,
)
from memsurgery.checkpoint.safetensors_header import read_safetensors_header, tensor_table
from memsurgery.errors import InputError, RuntimeFailure, one_line

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# torch dtype -> safetensors dtype string, for describing pickle tensors.
_TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, described from headers only."""

    name: str  # Hugging Face name (GGUF names are mapped)
    shape: tuple[int, ...]  # HF/PyTorch orientation
    dtype: str  # safetensors dtype string or GGUF type name
    nbytes: int  # bytes on disk
    file: str  # weight file, relative to the checkpoint root


@contextlib.contextmanager
def _transformers_loading(label: str, action: str, fix: str):
    """transformers building a model inside, quietly; its failures become one-line errors:
    out of memory -> RuntimeFailure, anything else -> InputError naming `action` and `fix`."""
    try:
        with _quiet_transformers():
            yield
    except MemoryError:
        raise RuntimeFailure(
            f"{label}: out of memory while loading the weights; use a machine with more RAM"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            one_line(f"{label}: transformers could not {action} ({type(exc).__name__}: {exc}); {fix}")
        ) from None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and load reports: the CLI owns the terminal.

    The GGUF dequantizer calls tqdm directly rather than through transformers'
    logging switches, so its module-level `tqdm` is swapped for a disabled one
    for the duration (and restored afterwards).
    """
    import functools

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_mod = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_mod is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_mod
    orig_tqdm = getattr(gguf_mod, "tqdm", None)
    if orig_tqdm is not None:
        gguf_mod.tqdm = functools.partial(orig_tqdm, disable=True)
    try:
        yield
    finally:
        if orig_tqdm is not None:
            gguf_mod.tqdm = orig_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _safe_name(name: object, where: str) -> str:
    """A weight file name from an index must be a plain file name in the checkpoint dir."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise InputError(
            one_line(
                f"{where}: weight_map names file {name!r}, which is not a plain file name in the checkpoint "
                "directory; the index is corrupt or hostile — re-download the checkpoint"
            )
        )
    return name


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 JSON; re-download the checkpoint") from None
    except OSError as exc:
        raise InputError(
            one_line(f"{path}: cannot read ({exc.strerror or exc}); check permissions")
        ) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(
            one_line(f"{path}: not valid JSON ({exc}); re-download the checkpoint or fix the file")
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a JSON object, got a {type(data).__name__}; re-download the checkpoint"
        )
    return data


# --------------------------------------------------------------------------- model skeletons


def _config_object(config: dict, label: str):
    """A transformers config for a `*ForCausalLM` class, or None if transformers has none for it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        return CONFIG_MAPPING[model_type].from_dict(cfg_dict)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad config.json
        raise InputError(
            one_line(
                f"{label}: config.json is not a valid {model_type} config ({type(exc).__name__}: {exc}); "
                "fix config.json or re-download the checkpoint"
            )
        ) from None


# Config keys that multiply modules. Each unit needs at least one stored tensor,
# so a count above the number of tensors is corruption — and building it, even
# on the meta device, would allocate millions of Python module objects.
_COUNT_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
)


def _meta_model(config: dict, label: str, n_tensors: int):
    """The `*ForCausalLM` for `config` on the meta device (no memory), or None if unknown.

    Raises InputError when the config is invalid or implies more layers/experts
    than the `n_tensors` stored tensors could possibly hold.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None  # unknown architecture: the arch registry reports it, not us
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    # Check the raw dict before building anything: config classes themselves
    # expand some counts (e.g. a per-layer `layer_types` list).
    raw = [config] + [v for k, v in config.items() if k == "text_config" and isinstance(v, dict)]
    for part in raw:
        for key in _COUNT_KEYS:
            value = part.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > max(n_tensors, 1):
                raise InputError(
                    one_line(
                        f"{label}: config.json asks for {key}={value} but the weights hold only "
                        f"{n_tensors} tensors; the checkpoint is incomplete or config.json belongs "
                        "to another model"
                    )
                )
    cfg = _config_object(config, label)
    if cfg is None:
        return None
    try:
        with torch.device("meta"), _quiet_transformers():
            return AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            one_line(
                f"{label}: cannot build a {config.get('model_type')} model from config.json "
                f"({type(exc).__name__}: {exc}); fix config.json or re-download the checkpoint"
            )
        ) from None


def tied_alias_groups(model) -> list[list[str]]:
    """State-dict keys grouped by the tensor they alias; singletons for untied tensors.

    A group is tensors that share one Parameter (tied on this instance) or that
    the model declares tied (`all_tied_weights_keys`, transformers >= 5). Within
    a group the first name is the one HF keeps when saving (the tie source).
    """
    state = model.state_dict(keep_vars=True)
    by_obj: dict[int, list[str]] = {}
    for name, value in state.items():
        by_obj.setdefault(id(value), []).append(name)
    groups = list(by_obj.values())
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    index = {name: g for g in groups for name in g}
    for target, source in declared.items():
        gt, gs = index.get(target), index.get(source)
        if gt is not None and gs is not None and gt is not gs:
            gs.extend(gt)
            for name in gt:
                index[name] = gs
            gt.clear()
    position = {name: i for i, name in enumerate(state)}
    ordered = []
    for g in groups:
        if not g:
            continue
        # The declared source (e.g. embed_tokens) first: it is the name kept on disk.
        g.sort(key=lambda n: (n in declared, position[n]))
        ordered.append(g)
    return ordered


# --------------------------------------------------------------------------- checkpoint


class Checkpoint:
    """A checkpoint on disk, described from headers; weights load on demand."""

    def __init__(
        self,
        path: Path,
        root: Path,
        format: str,
        config: dict,
        files: list[tuple[str, int]],
        tensors: dict[str, TensorInfo],
        has_tokenizer: bool,
        *,
        gguf_file: str | None = None,
        gguf_header: GGUFHeader | None = None,
        allow_pickle: bool = False,
    ):
        self.path = path
        self.root = root
        self.format = format
        self.config = config
        self.files = files
        self.tensors = tensors
        self.has_tokenizer = has_tokenizer
        self.gguf_file = gguf_file  # file name inside root, GGUF only
        self._gguf_header = gguf_header
        self._allow_pickle = allow_pickle

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self.tensors)})"
        )

    @property
    def label(self) -> str:
        """How messages name this checkpoint: the path the user gave."""
        return str(self.path)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check the stored tensors against what config.json implies; InputError on the first problem.

        Skipped (returns quietly) when transformers has no causal-LM class for
        the model_type — the architecture registry reports that — and for
        pre-quantized HF checkpoints, whose stored tensors differ by design.
        """
        if self.format != "gguf" and "quantization_config" in self.config:
            return
        model = _meta_model(self.config, self.label, len(self.tensors))
        if model is None:
            return
        shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        layers = self.config.get("num_hidden_layers")
        layers_note = f" (num_hidden_layers={layers})" if layers is not None else ""
        for group in tied_alias_groups(model):
            present = [n for n in group if n in self.tensors]
            if not present:
                raise InputError(
                    one_line(
                        f"{self.label}: weights lack {group[0]!r} that config.json requires{layers_note}; "
                        "the checkpoint is incomplete or config.json belongs to another model"
                    )
                )
            for name in present:
                want, got = shapes[name], self.tensors[name].shape
                if tuple(want) != tuple(got):
                    raise InputError(
                        one_line(
                            f"{self.label}: tensor {name!r} has shape {tuple(got)} "
                            f"in {self.tensors[name].file} "
                            f"but config.json implies {tuple(want)}{_dims_note(self.config)}; "
                            "config.json belongs to another model or the weights are corrupt"
                        )
                    )

    # ------------------------------------------------------------------ loading

    def load_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All stored tensors by HF name (GGUF: dequantized to fp32, tied aliases omitted)."""
        if self.format == "gguf":
            model = self.load_model(dtype or torch.float32)
            aliases = _alias_names(model, keep=self.tensors)
            return {k: v.detach() for k, v in model.state_dict().items() if k not in aliases}
        state: dict[str, torch.Tensor] = {}
        for fname, _ in self.files:
            state.update(self._load_file(fname))
        if dtype is not None:
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        return state

    def _load_file(self, fname: str) -> dict[str, torch.Tensor]:
        path = self.root / fname
        if self.format == "safetensors":
            from safetensors.torch import load_file

            try:
                return load_file(str(path), device="cpu")
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise InputError(
                    one_line(
                        f"{path}: cannot read tensors ({exc}); the file is corrupt or changed since it was "
                        "opened — re-download it"
                    )
                ) from None
        if not self._allow_pickle:  # defence in depth: open_checkpoint already refused
            raise InputError(_pickle_refusal(self.label))
        return _torch_load(path)

    def load_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The `*ForCausalLM` with these weights, on CPU, in eval mode."""
        # A missing tensor must fail here, not be silently re-initialised by transformers.
        self.validate()
        if self.format == "gguf":
            return self._load_gguf_model(dtype)
        cfg = _config_object(self.config, self.label)
        if cfg is None:
            raise InputError(
                one_line(
                    f"{self.label}: transformers has no causal-LM class for model_type "
                    f"{self.config.get('model_type')!r}; this architecture is not supported"
                )
            )
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
        state = self.load_state_dict()
        with _transformers_loading(self.label, "build the model", "the checkpoint does not match its config.json"):
            # The class method (not the Auto one) accepts a state dict with
            # no path, so weights go through our own checked readers.
            model = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype)
        return model.to(dtype).eval()

    def _load_gguf_model(self, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        with _transformers_loading(self.label, "dequantize this GGUF",
                                   "re-download it or convert it with llama.cpp's tools"):
            model = AutoModelForCausalLM.from_pretrained(
                str(self.root),
                gguf_file=self.gguf_file,
                dtype=torch.float32,
                local_files_only=True,
            )
        strip_quantization(model)
        return model.to(dtype).eval()

    def load_tokenizer(self):
        """The tokenizer shipped with the checkpoint, or None if there is none."""
        if not self.has_tokenizer:
            return None
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": self.gguf_file} if self.format == "gguf" else {}
        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(
                    str(self.root), local_files_only=True, **kwargs
                )
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                one_line(
                    f"{self.label}: tokenizer files are present but cannot be loaded "
                    f"({type(exc).__name__}: {exc}); "
                    "re-download the tokenizer files"
                )
            ) from None

    def weights_sha256(self) -> str:
        """sha256 over the weight files' bytes, files in sorted-name order, streamed 1 MiB at a time."""
        from memsurgery._hashing import sha256_files

        return sha256_files(self.root / fname for fname in sorted(name for name, _ in self.files))


def _dims_note(config: dict) -> str:
    keys = (
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
    )
    parts = [f"{k}={config[k]}" for k in keys if k in config]
    return f" ({', '.join(parts)})" if parts else ""


def _alias_names(model, keep) -> set[str]:
    """State-dict keys that merely alias another key (tied weights) and are not stored on disk."""
    out = set()
    for group in tied_alias_groups(model):
        for name in group[1:]:
            if name not in keep:
                out.add(name)
    return out


def strip_quantization(model) -> None:
    """Forget that `model` came from a quantized file: after dequantization it is plain float.

    transformers marks GGUF-loaded models as quantized (config.quantization_config,
    model.hf_quantizer, ...), which makes save_pretrained and our writer treat
    them as GGUF again. The weights are ordinary float tensors by now.
    """
    configs = [model.config]
    get_text = getattr(model.config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for cfg in configs:
        for attr in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
            if attr in vars(cfg):
                delattr(cfg, attr)
    for attr, value in (
        ("hf_quantizer", None),
        ("is_quantized", False),
        ("quantization_method", None),
    ):
        if attr in vars(model):
            setattr(model, attr, value)


def _pickle_refusal(label: str) -> str:
    return (
        f"{label}: checkpoint holds only pickle weights (pytorch_model.bin); pickle can run code — "
        "convert it or pass --allow-pickle if you trust it"
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no arbitrary code) and mmap where the format allows it."""

    def fail(exc: BaseException) -> InputError:
        return InputError(
            one_line(
                f"{path}: cannot load pickle weights safely ({type(exc).__name__}: {exc}); "
                "the file is corrupt or holds more than tensors — convert it with a trusted tool"
            )
        )

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (pre-zip) files cannot be memory-mapped; weights_only still applies.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise fail(exc) from None
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, EOFError, ...
        raise fail(exc) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InputError(
            one_line(
                f"{path}: holds a {type(obj).__name__}, not a flat state dict of tensors; "
                "convert it to safetensors with a trusted tool"
            )
        )
    return obj


# --------------------------------------------------------------------------- opening


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint directory or file, reading headers and config only.

    Accepts an HF directory (config.json + model.safetensors, sharded
    safetensors with an index, or — with `allow_pickle` — pytorch_model.bin
    single/sharded), a single .safetensors file next to a config.json, a .gguf
    file, or a directory holding exactly one .gguf and no config.json; or a Hugging Face Hub
    id of any of those (checkpoint/hub.py), when no local path of that name exists.
    """
    from memsurgery.checkpoint.hub import resolve_checkpoint

    given = resolve_checkpoint(path, allow_pickle=allow_pickle)  # a Hub id becomes its cached snapshot
    if given.is_file():
        root = given.parent
        suffix = given.suffix.lower()
        if suffix == ".gguf":
            return _open_gguf(given, given)
        if suffix == ".safetensors":
            config = _require_config(root, given)
            return _open_safetensors(given, root, config, [given.name])
        if given.name in ("config.json", SAFE_INDEX, PICKLE_INDEX):
            return _open_dir(
                given, root, allow_pickle
            )  # a file inside a model directory: open the directory
        if suffix in (".bin", ".pt", ".pth"):
            config = _require_config(root, given)
            if not allow_pickle:
                raise InputError(_pickle_refusal(str(given)))
            return _open_pickle(given, root, config, [given.name])
        raise InputError(
            one_line(
                f"{given}: not a checkpoint file (expected .safetensors, .gguf or a model directory)"
            )
        )
    return _open_dir(given, given, allow_pickle)


def _require_config(root: Path, given: Path) -> dict:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise InputError(
            one_line(
                f"{given}: no config.json next to this weight file; pass the Hugging Face model directory "
                "that holds config.json"
            )
        )
    return _read_json(cfg)


def _open_dir(given: Path, root: Path, allow_pickle: bool) -> Checkpoint:
    has_config = (root / "config.json").is_file()
    ggufs = sorted(p for p in root.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if not has_config:
        if len(ggufs) == 1:
            return _open_gguf(given, ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs[:4])
            raise InputError(
                one_line(f"{given}: several .gguf files here ({names}); pass the one you want")
            )
        raise InputError(
            f"{given}: no config.json here; pass a Hugging Face model directory or a .gguf file"
        )
    config = _read_json(root / "config.json")

    # Same precedence as transformers: a single model.safetensors beats an index.
    if (root / SAFE_SINGLE).is_file():
        return _open_safetensors(given, root, config, [SAFE_SINGLE])
    if (root / SAFE_INDEX).is_file():
        return _open_safetensors(given, root, config, None)
    others = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if others:
        return _open_safetensors(given, root, config, others)
    if (root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise InputError(_pickle_refusal(str(given)))
        if (root / PICKLE_INDEX).is_file():
            files = _index_files(root / PICKLE_INDEX, root)
        else:
            files = [PICKLE_SINGLE]
        return _open_pickle(given, root, config, files)
    if len(ggufs) == 1:
        return _open_gguf(given, ggufs[0])
    raise InputError(
        one_line(
            f"{given}: config.json but no weights (expected {SAFE_SINGLE}, {SAFE_INDEX} or a .gguf file); "
            "the download is incomplete"
        )
    )


def _index_files(index_path: Path, root: Path) -> list[str]:
    """Weight file names listed in an HF index json, checked to exist in `root`."""
    index = _read_json(index_path)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InputError(
            one_line(f"{index_path}: no weight_map object; re-download the checkpoint")
        )
    files = sorted({_safe_name(v, str(index_path)) for v in wm.values()})
    for f in files:
        if not (root / f).is_file():
            raise InputError(
                one_line(
                    f"{index_path}: lists shard {f} which is missing; "
                    "the download is incomplete — re-download it"
                )
            )
    return files


def _has_tokenizer_files(root: Path) -> bool:
    return any((root / n).is_file() for n in TOKENIZER_FILES)


def _open_safetensors(given: Path, root: Path, config: dict, files: list[str] | None) -> Checkpoint:
    weight_map = None
    if files is None:
        files = _index_files(root / SAFE_INDEX, root)
        weight_map = _read_json(root / SAFE_INDEX)["weight_map"]
    tensors: dict[str, TensorInfo] = {}
    sizes = []
    for fname in files:
        path = root / fname
        header, _ = read_safetensors_header(path)
        sizes.append((fname, path.stat().st_size))
        for name, (dtype, shape, nbytes) in tensor_table(header).items():
            if name in tensors:
                raise InputError(
                    one_line(
                        f"{path}: tensor {name!r} is also in {tensors[name].file}; the checkpoint mixes two "
                        "exports — remove the stray file"
                    )
                )
            tensors[name] = TensorInfo(name, shape, dtype, nbytes, fname)
    if weight_map is not None:
        # The index is what transformers trusts; make sure it agrees with the shards.
        for name, fname in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file != fname:
                raise InputError(
                    one_line(
                        f"{root / SAFE_INDEX}: says tensor {name!r} is in {fname} "
                        "but that shard does not hold it; "
                        "the index and shards are from different exports — re-download the checkpoint"
                    )
                )
    return Checkpoint(
        given, root, "safetensors", config, sizes, tensors, _has_tokenizer_files(root)
    )


def _open_pickle(given: Path, root: Path, config: dict, files: list[str]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    sizes = []
    for fname in files:
        path = root / fname
        sizes.append((fname, path.stat().st_size))
        # mmap=True: shapes and dtypes come from the pickle's records; the
        # storages are mapped, not read.
        for name, t in _torch_load(path).items():
            dtype = _TORCH_TO_ST.get(t.dtype, str(t.dtype).removeprefix("torch."))
            tensors[name] = TensorInfo(
                name, tuple(t.shape), dtype, t.numel() * t.element_size(), fname
            )
    return Checkpoint(
        given, root, "pickle", config, sizes, tensors, _has_tokenizer_files(root), allow_pickle=True
    )


def _open_gguf(given: Path, file: Path) -> Checkpoint:
    header = read_gguf_header(file)
    config = gguf_config(header)
    model = None
    with contextlib.suppress(InputError):  # a bad config is reported by validate(), not here
        model = _meta_model(config, str(given), len(header.tensors))
    hf_names = list(model.state_dict(keep_vars=True)) if model is not None else None
    names = gguf_to_hf_names(header, hf_names)
    tensors = {}
    for t in header.tensors:
        hf = names[t.name]
        tensors[hf] = TensorInfo(hf, t.torch_shape, t.type_name, t.nbytes, file.name)
    return Checkpoint(
        given,
        file.parent,
        "gguf",
        config,
        [(file.name, header.file_size)],
        tensors,
        header.has_tokenizer,
        gguf_file=file.name,
        gguf_header=header,
    )
