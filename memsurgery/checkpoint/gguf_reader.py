"""Lazy GGUF support: header parsing, config reconstruction, GGUF -> HF tensor names.

`read_gguf_header` walks the GGUF metadata and tensor table with explicit bounds
checks and never touches tensor data. We do not use `gguf.GGUFReader` for this:
it builds numpy views for every vocabulary string and merge rule, which on
SmolLM2-135M costs ~160 MB of RSS and ~2.5 s just to list 272 tensors, and it
fails on damaged files with arbitrary exceptions. The `gguf` package is still
the authority for quantization type names/sizes and the tensor name map, and
transformers (`from_pretrained(..., gguf_file=...)`) does the dequantization.

Config: for the plain decoder families memsurgery supports we apply
transformers' own GGUF key table (`GGUF_CONFIG_MAPPING`) to the lean metadata,
which reproduces `load_gguf_checkpoint(path, return_tensors=False)["config"]`
(a unit test checks they agree) at ~1% of the cost; every other architecture
goes through `AutoConfig.from_pretrained(root, gguf_file=name)`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from memsurgery.errors import InputError, one_line

_FIX = "the file is truncated or corrupt — re-download it"

# GGUF metadata value type ids -> struct format (fixed-size scalars only).
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# Numeric arrays up to this length are kept (per-layer head counts and the like);
# longer ones (token scores, token types) and all string arrays beyond
# _KEEP_STRINGS entries are recorded by length only, which is all we need.
_KEEP_NUMBERS = 4096
_KEEP_STRINGS = 64
_MAX_DIMS = 8  # ggml uses 4; leave room, but refuse nonsense
_BLOCK_RE = re.compile(r"blk\.(\d{1,5})\.", re.ASCII)

# Architectures whose config we rebuild ourselves; load_gguf_checkpoint applies
# no special cases to these beyond the ones replicated in `gguf_config`.
FAST_CONFIG_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"})


@dataclass
class GGUFTensor:
    """One entry of the tensor table, as stored (ggml dims are fastest-moving first)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int  # relative to the data section
    nbytes: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape in PyTorch/HF orientation: ggml lists dimensions in reverse."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    """Everything about a GGUF file except its tensor data."""

    path: Path
    version: int
    metadata: dict  # scalars, strings and short arrays
    array_lengths: dict[str, int]  # every array-valued key -> its length
    tensors: list[GGUFTensor]
    data_start: int
    file_size: int
    tensor_names: set[str] = field(default_factory=set)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def has_tokenizer(self) -> bool:
        return (
            "tokenizer.ggml.model" in self.metadata
            and self.array_lengths.get("tokenizer.ggml.tokens", 0) > 0
        )


class _Cursor:
    """Bounds-checked little/big-endian reads from a memory map."""

    def __init__(self, buf, label: str, endian: str = "<"):
        self.buf, self.label, self.endian, self.pos = buf, label, endian, 0
        self.size = len(buf)

    def fail(self, what: str, fix: str = _FIX) -> InputError:
        return InputError(one_line(f"{self.label}: {what}; {fix}"))

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)"
            )

    def unpack(self, fmt: str, what: str):
        fmt = self.endian + fmt
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse the metadata and tensor table of the GGUF file at `path` (InputError if malformed)."""
    import gguf  # the authority on quant type ids, names and block sizes

    path = Path(path)
    label = str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise InputError(
                    one_line(f"{label}: file is {size} bytes, too short to be a GGUF file; {_FIX}")
                )
            # A read-only map: only the header pages are ever faulted in.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, label, size, gguf)
    except OSError as exc:
        raise InputError(
            one_line(
                f"{label}: cannot read file ({exc.strerror or exc}); check the path and permissions"
            )
        ) from None


def _parse(buf, path: Path, label: str, size: int, gguf) -> GGUFHeader:
    cur = _Cursor(buf, label)
    version, n_tensors, n_kv = _parse_preamble(cur, buf, size)
    metadata: dict = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        (vtype,) = cur.unpack("I", f"type of metadata {key!r}")
        metadata[key] = _read_value(cur, vtype, key, array_lengths)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise cur.fail("metadata has no general.architecture")
    alignment = metadata.get("general.alignment", 32)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    raw_tensors = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        (n_dims,) = cur.unpack("I", f"tensor {name!r} dimension count")
        if n_dims > _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} claims {n_dims} dimensions")
        dims = cur.unpack(f"{n_dims}Q", f"tensor {name!r} dimensions")
        type_id, offset = cur.unpack("IQ", f"tensor {name!r} type and offset")
        raw_tensors.append((name, tuple(dims), type_id, offset))

    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for name, dims, type_id, offset in raw_tensors:
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append(_tensor(cur, gguf, name, dims, type_id, offset, data_start, size))
    return GGUFHeader(path, version, metadata, array_lengths, tensors, data_start, size, names)


def _parse_preamble(cur: _Cursor, buf, size: int) -> tuple[int, int, int]:
    """Magic, version (byte order) and counts: (version, tensor count, metadata count)."""
    if buf[:4] != b"GGUF":
        raise cur.fail(
            "does not start with the GGUF magic bytes",
            "pass a .gguf file produced by llama.cpp tools",
        )
    cur.pos = 4
    (version,) = cur.unpack("I", "version")
    if version & 0xFFFF == 0 and version != 0:  # written on a big-endian host
        cur.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise cur.fail(
            f"GGUF version {version} is not supported (only 2 and 3)",
            "re-convert it with a current llama.cpp",
        )
    n_tensors, n_kv = cur.unpack("QQ", "tensor and metadata counts")
    # Every metadata entry takes at least 12 bytes and every tensor entry at
    # least 24, so counts beyond that are corruption (and would loop forever).
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise cur.fail(
            f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than fit in {size} bytes"
        )
    return version, n_tensors, n_kv


def _tensor(cur: _Cursor, gguf, name: str, dims: tuple, type_id: int, offset: int, data_start: int,
            size: int) -> GGUFTensor:
    """One tensor's entry, checked: a known ggml type, whole blocks, data inside the file."""
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(
            f"tensor {name!r} has unknown ggml type id {type_id}",
            "the file is corrupt or needs a newer gguf package",
        ) from None
    numel = 1
    for d in dims:
        numel *= d
    if numel % block or (dims and dims[0] % block):
        raise cur.fail(
            f"tensor {name!r} has {numel} elements, not a whole number of {qtype.name} blocks of {block}"
        )
    nbytes = numel // block * type_size
    if offset + nbytes > size - data_start:
        raise cur.fail(
            f"tensor {name!r} data runs past the end of the file "
            f"(offset {data_start + offset + nbytes} > {size} bytes)"
        )
    return GGUFTensor(name, dims, type_id, qtype.name, offset, nbytes)


def _read_value(cur: _Cursor, vtype: int, key: str, array_lengths: dict[str, int]):
    what = f"metadata {key!r}"
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype], what)[0]
    if vtype == _STRING:
        return cur.string(what)
    if vtype != _ARRAY:
        raise cur.fail(f"{what} has unknown value type {vtype}")
    etype, count = cur.unpack("IQ", what)
    array_lengths[key] = count
    if etype in _SCALAR:
        width = struct.calcsize(_SCALAR[etype])
        if count > _KEEP_NUMBERS:
            cur.skip(count * width, what)
            return None
        return list(cur.unpack(f"{count}{_SCALAR[etype]}", what))
    if etype == _STRING:
        cur.need(count * 8, what)  # each string is at least its 8-byte length
        if count > _KEEP_STRINGS:
            for _ in range(count):  # walk without decoding: lengths only
                (n,) = cur.unpack("Q", what)
                cur.skip(n, what)
            return None
        return [cur.string(what) for _ in range(count)]
    # Arrays of arrays exist in the spec but no model file uses them.
    raise cur.fail(f"{what} is an array of type {etype}, which memsurgery cannot read")


def gguf_raw_config(header: GGUFHeader) -> dict | None:
    """The config dict `load_gguf_checkpoint` would build, or None if the arch needs transformers' slow path."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = header.architecture
    md = header.metadata
    if arch not in FAST_CONFIG_ARCHS or arch not in GGUF_CONFIG_MAPPING:
        return None
    if arch == "llama" and md.get("general.name") == "mistral":
        return None  # transformers renames this one to mistral; let it
    cfg: dict = {"tie_word_embeddings": "output.weight" not in header.tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}).items():
        cfg.setdefault(key, value)
    for key, value in md.items():
        prefix, _, rest = key.partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None or target == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # transformers unwraps one-element arrays
        if value is None:
            continue  # a long array we did not keep; never a config field for these archs
        cfg[target] = value
    if cfg.get("model_type") == "gemma3":
        cfg["model_type"] = "gemma3_text"  # the GGUF holds only the text backbone
    if "vocab_size" not in cfg and header.array_lengths.get("tokenizer.ggml.tokens"):
        cfg["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
    return cfg


def gguf_config(header: GGUFHeader) -> dict:
    """A full HF config dict for the GGUF file, without loading any weights.

    `quantization_config` is dropped: after dequantization the model is plain
    fp32 and must be saved as such.
    """
    from transformers import AutoConfig

    # A corrupt block count must fail here: config classes expand per-layer
    # lists from it, and every block needs at least one stored tensor.
    blocks = header.metadata.get(f"{header.architecture}.block_count")
    if isinstance(blocks, int) and blocks > max(len(header.tensors), 1):
        raise InputError(
            one_line(
                f"{header.path}: metadata claims {blocks} blocks but the file holds only "
                f"{len(header.tensors)} tensors; {_FIX}"
            )
        )
    raw = gguf_raw_config(header)
    if raw is None:
        try:
            config = AutoConfig.from_pretrained(
                str(header.path.parent), gguf_file=header.path.name, local_files_only=True
            ).to_dict()
        except Exception:  # noqa: BLE001 - transformers cannot read this arch; report what we know
            config = _minimal_config(header)
    else:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = raw.get("model_type")
        if model_type in CONFIG_MAPPING:
            try:
                config = CONFIG_MAPPING[model_type].from_dict(raw).to_dict()
            except Exception as exc:  # noqa: BLE001 - metadata values of the wrong type or range
                raise InputError(
                    one_line(
                        f"{header.path}: GGUF metadata does not form a valid {model_type} config "
                        f"({type(exc).__name__}: {exc}); {_FIX}"
                    )
                ) from None
        else:
            config = dict(raw)
    config.pop("quantization_config", None)
    # A path on someone's machine, and GGUF's general.name (which transformers files under
    # _model_name_or_path): neither is a property of the model, and neither belongs in config.json.
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    return config


def _minimal_config(header: GGUFHeader) -> dict:
    """Generic fields for an architecture transformers cannot load, so reports can still show it."""
    arch, md = header.architecture, header.metadata
    keys = {
        "block_count": "num_hidden_layers",
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "context_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
    }
    cfg: dict = {"model_type": arch}
    for src, dst in keys.items():
        if f"{arch}.{src}" in md:
            cfg[dst] = md[f"{arch}.{src}"]
    if "vocab_size" not in cfg and header.array_lengths.get("tokenizer.ggml.tokens"):
        cfg["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
    cfg["tie_word_embeddings"] = "output.weight" not in header.tensor_names
    return cfg


def gguf_to_hf_names(header: GGUFHeader, hf_names: list[str] | None) -> dict[str, str]:
    """Map each GGUF tensor name to its Hugging Face name.

    With `hf_names` (the state-dict keys of the HF model for this config) we
    translate each HF name with gguf's `TensorNameMap` and invert, which is
    exact. Without it (transformers has no class for the arch) we invert the
    whole name map and prefer HF-style `model.*` / `lm_head` candidates. Names
    with no mapping (e.g. llama3's `rope_freqs.weight`) keep their GGUF name.
    """
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == header.architecture), None)
    if arch_id is None:
        return {t.name: t.name for t in header.tensors}
    # Blocks actually stored, not the metadata's claim: the name map's size grows
    # with the block count, and a corrupt count must not make it explode.
    found = (_BLOCK_RE.match(t.name) for t in header.tensors)
    n_blocks = 1 + max((int(m.group(1)) for m in found if m), default=0)
    n_blocks = min(n_blocks, max(len(header.tensors), 1))  # a stray "blk.99999." is corruption
    name_map = gguf.get_tensor_name_map(arch_id, n_blocks)

    forward: dict[str, str] = {}  # gguf name -> hf name
    if hf_names is not None:
        for hf in hf_names:
            stem, dot, suffix = hf.rpartition(".")
            if suffix not in ("weight", "bias") or not dot:
                stem, suffix = hf, ""
            g = name_map.get_name(stem)
            if g is not None:
                forward.setdefault(g + ("." + suffix if suffix else ""), hf)
    else:
        candidates: dict[str, list[str]] = {}
        for hf_stem, (_, g) in name_map.mapping.items():
            candidates.setdefault(g, []).append(hf_stem)
        for g, stems in candidates.items():
            best = next((s for s in stems if s.startswith(("model.", "lm_head"))), None)
            if best is not None:
                for suffix in (".weight", ".bias"):
                    forward[g + suffix] = best + suffix
    return {t.name: forward.get(t.name, t.name) for t in header.tensors}
