"""Tests for memsurgery.checkpoint reading.

Formats, laziness, header validation, validate(), pickle gating, GGUF.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memsurgery.checkpoint import (
    TensorInfo,
    open_checkpoint,
    read_safetensors_header,
    save_state_dict_sharded,
)
from memsurgery.errors import InputError
from tests.tiny import TINY_CONFIGS, build_tiny_model

# --------------------------------------------------------------------------- helpers


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expected_tensors(model_type: str) -> dict[str, torch.Tensor]:
    """The state dict a saved tiny model stores (tied lm_head omitted)."""
    sd = build_tiny_model(model_type).state_dict()
    if TINY_CONFIGS[model_type].get("tie_word_embeddings", True) and model_type != "mistral":
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return sd


def _write_raw(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    """A safetensors-like file from a header (dict -> JSON, or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _assert_clean_error(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- safetensors directories


def test_open_single_safetensors_dir_reads_headers_only(tiny_ckpts):
    ck = open_checkpoint(tiny_ckpts["llama"])
    assert ck.format == "safetensors"
    assert ck.root == tiny_ckpts["llama"]
    assert ck.config["model_type"] == "llama" and ck.config["num_hidden_layers"] == 2
    assert [f for f, _ in ck.files] == ["model.safetensors"]
    assert ck.files[0][1] == (tiny_ckpts["llama"] / "model.safetensors").stat().st_size
    expected = _expected_tensors("llama")
    assert set(ck.tensors) == set(expected)
    for name, t in expected.items():
        info = ck.tensors[name]
        assert info == TensorInfo(name, tuple(t.shape), "F32", t.numel() * 4, "model.safetensors")
    assert ck.has_tokenizer is False
    ck.validate()


def test_open_untied_has_lm_head(tiny_ckpts):
    ck = open_checkpoint(tiny_ckpts["mistral"])
    assert "lm_head.weight" in ck.tensors
    ck.validate()


def test_open_single_file_path(tiny_ckpts):
    ck = open_checkpoint(tiny_ckpts["llama"] / "model.safetensors")
    assert ck.root == tiny_ckpts["llama"]
    assert ck.path == tiny_ckpts["llama"] / "model.safetensors"
    assert set(ck.tensors) == set(open_checkpoint(tiny_ckpts["llama"]).tensors)


def test_tensor_info_is_frozen(tiny_ckpts):
    info = next(iter(open_checkpoint(tiny_ckpts["llama"]).tensors.values()))
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]


def test_open_sharded_matches_single(tiny_ckpts, tmp_path):
    src = tiny_ckpts["qwen2"]
    state = open_checkpoint(src).load_state_dict()
    out = tmp_path / "sharded"
    written = save_state_dict_sharded(state, out, max_shard_size="30KB")
    shutil.copy(src / "config.json", out / "config.json")
    assert "model.safetensors.index.json" in written and len(written) > 3

    ck = open_checkpoint(out)
    single = open_checkpoint(src)
    assert len(ck.files) == len(written) - 1
    assert {n: (i.shape, i.dtype, i.nbytes) for n, i in ck.tensors.items()} == {
        n: (i.shape, i.dtype, i.nbytes) for n, i in single.tensors.items()
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(ck.tensors[n].file == f for n, f in index["weight_map"].items())
    ck.validate()
    loaded = ck.load_state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_sharded_index_errors(tiny_ckpts, tmp_path):
    state = open_checkpoint(tiny_ckpts["llama"]).load_state_dict()
    out = tmp_path / "s"
    save_state_dict_sharded(state, out, max_shard_size="30KB")
    shutil.copy(tiny_ckpts["llama"] / "config.json", out / "config.json")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    shard = min(index["weight_map"].values())
    (out / shard).rename(out / "moved.bin")
    with pytest.raises(InputError) as exc:
        open_checkpoint(out)
    _assert_clean_error(exc, shard, "missing")
    (out / "moved.bin").rename(out / shard)

    evil = dict(index, weight_map={**index["weight_map"], "x": "../../etc/passwd"})
    index_path.write_text(json.dumps(evil))
    with pytest.raises(InputError) as exc:
        open_checkpoint(out)
    _assert_clean_error(exc, "model.safetensors.index.json", "not a plain file name")

    name = next(iter(index["weight_map"]))
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    wrong = dict(index, weight_map={**index["weight_map"], name: other})
    index_path.write_text(json.dumps(wrong))
    with pytest.raises(InputError) as exc:
        open_checkpoint(out)
    _assert_clean_error(exc, name, other)


def test_has_tokenizer_detects_tokenizer_files(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "t")
    assert open_checkpoint(ck_dir).has_tokenizer is False
    assert open_checkpoint(ck_dir).load_tokenizer() is None
    (ck_dir / "tokenizer_config.json").write_text("{}")
    assert open_checkpoint(ck_dir).has_tokenizer is True


def test_load_model_gives_identical_logits(tiny_ckpts):
    ck = open_checkpoint(tiny_ckpts["llama"])
    model = ck.load_model()
    ref = build_tiny_model("llama")
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_load_state_dict_dtype(tiny_ckpts):
    sd = open_checkpoint(tiny_ckpts["mistral"]).load_state_dict(dtype=torch.bfloat16)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}


def test_weights_sha256_streams_file_bytes_in_name_order(tiny_ckpts, tmp_path):
    ck = open_checkpoint(tiny_ckpts["llama"])
    assert (
        ck.weights_sha256()
        == hashlib.sha256((tiny_ckpts["llama"] / "model.safetensors").read_bytes()).hexdigest()
    )

    out = tmp_path / "s"
    save_state_dict_sharded(ck.load_state_dict(), out, max_shard_size="30KB")
    shutil.copy(tiny_ckpts["llama"] / "config.json", out / "config.json")
    sharded = open_checkpoint(out)
    h = hashlib.sha256()
    for name in sorted(f for f, _ in sharded.files):
        h.update((out / name).read_bytes())
    assert sharded.weights_sha256() == h.hexdigest()
    # Changing one weight byte changes the digest.
    first = min(f for f, _ in sharded.files)
    data = bytearray((out / first).read_bytes())
    data[-1] ^= 0xFF
    (out / first).write_bytes(bytes(data))
    assert open_checkpoint(out).weights_sha256() != h.hexdigest()


# --------------------------------------------------------------------------- path errors


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as exc:
        open_checkpoint(tmp_path / "nope")
    assert str(exc.value) == f"{tmp_path / 'nope'}: no such file or directory"


def test_dir_without_config_or_gguf(tmp_path):
    with pytest.raises(InputError) as exc:
        open_checkpoint(tmp_path)
    assert (
        str(exc.value)
        == f"{tmp_path}: no config.json here; pass a Hugging Face model directory or a .gguf file"
    )


def test_config_json_not_json(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "c")
    (ck_dir / "config.json").write_text("{not json")
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir)
    _assert_clean_error(exc, "config.json", "not valid JSON")


def test_safetensors_file_without_config(tiny_ckpts, tmp_path):
    shutil.copy(tiny_ckpts["llama"] / "model.safetensors", tmp_path / "w.safetensors")
    with pytest.raises(InputError) as exc:
        open_checkpoint(tmp_path / "w.safetensors")
    _assert_clean_error(exc, "w.safetensors", "no config.json")


def test_config_without_weights(tiny_ckpts, tmp_path):
    shutil.copy(tiny_ckpts["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(InputError) as exc:
        open_checkpoint(tmp_path)
    _assert_clean_error(exc, str(tmp_path), "no weights")


# --------------------------------------------------------------------------- header corruption

VALID = {
    "__metadata__": {"format": "pt"},
    "x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
}
DATA16 = bytes(16)


def _entry(**kw):
    e = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    e.update(kw)
    return e


CORRUPT_CASES = {
    "short": (lambda p: p.write_bytes(b"\x01\x02\x03"), "too short"),
    "length_past_eof": (lambda p: _write_raw(p, VALID, DATA16, length=10_000), "more than the"),
    "not_utf8": (lambda p: _write_raw(p, b'{"x\xff": 1}'), "not valid UTF-8"),
    "not_json": (lambda p: _write_raw(p, b"{this is not json"), "not valid JSON"),
    "not_object": (lambda p: _write_raw(p, b"[1, 2, 3]"), "expected an object"),
    "entry_not_object": (lambda p: _write_raw(p, {"x": [1, 2]}), "entry is a list"),
    "no_dtype": (
        lambda p: _write_raw(p, {"x": {"shape": [2, 2], "data_offsets": [0, 16]}}, DATA16),
        "no 'dtype'",
    ),
    "no_shape": (
        lambda p: _write_raw(p, {"x": {"dtype": "F32", "data_offsets": [0, 16]}}, DATA16),
        "no 'shape'",
    ),
    "no_offsets": (
        lambda p: _write_raw(p, {"x": {"dtype": "F32", "shape": [2, 2]}}, DATA16),
        "no 'data_offsets'",
    ),
    "dtype_not_str": (
        lambda p: _write_raw(p, {"x": _entry(dtype=4)}, DATA16),
        "dtype is not a string",
    ),
    "unknown_dtype": (lambda p: _write_raw(p, {"x": _entry(dtype="F33")}, DATA16), "unknown dtype"),
    "shape_str": (lambda p: _write_raw(p, {"x": _entry(shape="2x2")}, DATA16), "shape must be"),
    "shape_bool": (
        lambda p: _write_raw(p, {"x": _entry(shape=[True, 4])}, DATA16),
        "shape must be",
    ),
    "shape_negative": (
        lambda p: _write_raw(p, {"x": _entry(shape=[-2, -2])}, DATA16),
        "shape must be",
    ),
    "offsets_three": (
        lambda p: _write_raw(p, {"x": _entry(data_offsets=[0, 8, 16])}, DATA16),
        "two integers",
    ),
    "offsets_float": (
        lambda p: _write_raw(p, {"x": _entry(data_offsets=[0, 16.0])}, DATA16),
        "two integers",
    ),
    "offsets_reversed": (
        lambda p: _write_raw(p, {"x": _entry(data_offsets=[16, 0])}, DATA16),
        "reversed",
    ),
    "offsets_negative": (
        lambda p: _write_raw(p, {"x": _entry(data_offsets=[-16, 0])}, DATA16),
        "negative",
    ),
    "past_end": (
        lambda p: _write_raw(p, {"x": _entry(data_offsets=[0, 16])}, bytes(10)),
        "data runs past the end of the file (offset 16 > 10 bytes)",
    ),
    "size_mismatch": (
        lambda p: _write_raw(p, {"x": _entry(shape=[3, 2])}, DATA16),
        "needs 24 bytes",
    ),
    "overlap": (
        lambda p: _write_raw(
            p, {"x": _entry(), "y": _entry(shape=[2], data_offsets=[8, 16])}, DATA16
        ),
        "overlaps",
    ),
    "gap": (
        lambda p: _write_raw(p, {"x": _entry(shape=[2], data_offsets=[8, 16])}, DATA16),
        "unused bytes",
    ),
    "trailing": (lambda p: _write_raw(p, VALID, DATA16 + bytes(4)), "after the last tensor"),
    "metadata_not_dict": (
        lambda p: _write_raw(p, {"__metadata__": ["a"], "x": _entry()}, DATA16),
        "__metadata__",
    ),
    "metadata_value_int": (
        lambda p: _write_raw(p, {"__metadata__": {"a": 1}, "x": _entry()}, DATA16),
        "__metadata__",
    ),
    "duplicate_name": (
        lambda p: _write_raw(
            p,
            b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
            b'"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
            DATA16,
        ),
        "twice",
    ),
    "deep_nesting": (lambda p: _write_raw(p, b"[" * 100_000 + b"]" * 100_000), "header"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_header_gives_clean_input_error(case, tmp_path):
    make, needle = CORRUPT_CASES[case]
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(InputError) as exc:
        read_safetensors_header(path)
    _assert_clean_error(exc, str(path), needle)


def test_absurd_header_length_is_refused_without_reading(tmp_path):
    # A sparse 200 MB file claiming a 150 MB header: refused by the 100 MB limit.
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 150_000_000))
        fh.truncate(200_000_000)
    with pytest.raises(InputError) as exc:
        read_safetensors_header(path)
    _assert_clean_error(exc, "big.safetensors", "absurd")


def test_valid_header_parses(small_safetensors):
    header, start = read_safetensors_header(small_safetensors)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [2, 3]
    a0, a1 = header["a"]["data_offsets"]
    assert a1 - a0 == 24
    assert header["b"]["dtype"] == "BF16" and header["c"]["dtype"] == "I64"
    raw = small_safetensors.read_bytes()
    assert start == 8 + struct.unpack("<Q", raw[:8])[0]
    assert torch.equal(
        torch.frombuffer(bytearray(raw[start + a0 : start + a1]), dtype=torch.float32),
        torch.arange(6, dtype=torch.float32),
    )


def test_truncated_checkpoint_named_in_error(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "t")
    f = ck_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir)
    _assert_clean_error(exc, "model.safetensors", "past the end of the file", "re-download")


# --------------------------------------------------------------------------- validate()


def _rewrite_without(ck_dir: Path, drop: str | None = None, replace: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    f = ck_dir / "model.safetensors"
    sd = load_file(str(f))
    if drop:
        del sd[drop]
    sd.update(replace or {})
    save_file(sd, str(f), metadata={"format": "pt"})


def test_validate_reports_missing_tensor(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "m")
    _rewrite_without(ck_dir, drop="model.layers.1.mlp.down_proj.weight")
    ck = open_checkpoint(ck_dir)
    with pytest.raises(InputError) as exc:
        ck.validate()
    assert str(exc.value) == (
        f"{ck_dir}: weights lack 'model.layers.1.mlp.down_proj.weight' that config.json requires "
        "(num_hidden_layers=2); the checkpoint is incomplete or config.json belongs to another model"
    )
    # load_model must refuse too, rather than silently re-initialising the tensor.
    with pytest.raises(InputError):
        ck.load_model()


def test_validate_reports_shape_mismatch(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["mistral"], tmp_path / "s")
    _rewrite_without(ck_dir, replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)})
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir).validate()
    _assert_clean_error(
        exc, "model.layers.0.mlp.up_proj.weight", "(100, 64)", "(128, 64)", "model.safetensors"
    )


def test_validate_requires_embedding_but_not_tied_lm_head(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "e")
    assert (
        "lm_head.weight" not in open_checkpoint(ck_dir).tensors
    )  # tied alias not stored, still valid
    _rewrite_without(ck_dir, drop="model.embed_tokens.weight")
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir).validate()
    _assert_clean_error(exc, "'model.embed_tokens.weight'")


def test_validate_untied_needs_lm_head(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["mistral"], tmp_path / "u")
    _rewrite_without(ck_dir, drop="lm_head.weight")
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir).validate()
    _assert_clean_error(exc, "'lm_head.weight'")


def test_validate_skips_unknown_model_type(tiny_ckpts, tmp_path):
    ck_dir = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "x")
    cfg = json.loads((ck_dir / "config.json").read_text())
    cfg["model_type"] = "totally_new_arch"
    (ck_dir / "config.json").write_text(json.dumps(cfg))
    ck = open_checkpoint(ck_dir)
    ck.validate()  # the arch registry, not validate, reports unsupported architectures
    assert ck.config["model_type"] == "totally_new_arch"


# --------------------------------------------------------------------------- pickle gating


@pytest.fixture
def pickle_ckpt(tiny_ckpts, tmp_path) -> Path:
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(tiny_ckpts["mistral"] / "config.json", d / "config.json")
    torch.save(build_tiny_model("mistral").state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_refused_without_allow(pickle_ckpt):
    with pytest.raises(InputError) as exc:
        open_checkpoint(pickle_ckpt)
    assert str(exc.value) == (
        f"{pickle_ckpt}: checkpoint holds only pickle weights (pytorch_model.bin); pickle can run code — "
        "convert it or pass --allow-pickle if you trust it"
    )
    with pytest.raises(InputError):
        open_checkpoint(pickle_ckpt / "pytorch_model.bin")


def test_pickle_loaded_with_allow(pickle_ckpt):
    ck = open_checkpoint(pickle_ckpt, allow_pickle=True)
    ref = build_tiny_model("mistral").state_dict()
    assert ck.format == "pickle"
    assert set(ck.tensors) == set(ref)
    assert (
        ck.tensors["lm_head.weight"].shape == (256, 64)
        and ck.tensors["lm_head.weight"].dtype == "F32"
    )
    ck.validate()
    sd = ck.load_state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, tiny_ckpts):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tiny_ckpts["mistral"] / "config.json", d / "config.json")
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Boom()}, fh)
    with pytest.raises(InputError) as exc:
        open_checkpoint(d, allow_pickle=True)
    _assert_clean_error(exc, "pytorch_model.bin", "cannot load pickle weights safely")


def test_safetensors_preferred_over_pickle(tiny_ckpts, tmp_path):
    d = _copy_ckpt(tiny_ckpts["llama"], tmp_path / "both")
    torch.save({"junk": torch.zeros(1)}, d / "pytorch_model.bin")
    ck = open_checkpoint(d)  # no allow_pickle needed: the pickle is never touched
    assert ck.format == "safetensors"


# --------------------------------------------------------------------------- GGUF


def test_gguf_open_is_lazy_and_maps_names(tiny_gguf):
    ck = open_checkpoint(tiny_gguf)
    ref = build_tiny_model("llama").state_dict()
    assert ck.format == "gguf"
    assert ck.root == tiny_gguf.parent and ck.files == [(tiny_gguf.name, tiny_gguf.stat().st_size)]
    assert set(ck.tensors) == set(ref) - {"lm_head.weight"}
    for name, info in ck.tensors.items():
        assert info.shape == tuple(ref[name].shape), name  # HF orientation, not ggml's
        assert info.dtype == "F32" and info.nbytes == ref[name].numel() * 4
    assert ck.config["model_type"] == "llama"
    assert ck.config["num_hidden_layers"] == 2 and ck.config["hidden_size"] == 64
    assert ck.config["tie_word_embeddings"] is True
    assert "quantization_config" not in ck.config
    assert ck.has_tokenizer is True
    ck.validate()


def test_gguf_dir_with_single_gguf(tiny_gguf):
    ck = open_checkpoint(tiny_gguf.parent)
    assert ck.format == "gguf" and ck.gguf_file == tiny_gguf.name


def test_gguf_config_matches_transformers(tiny_gguf):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from memsurgery.checkpoint.gguf_reader import gguf_raw_config, read_gguf_header

    header = read_gguf_header(tiny_gguf)
    assert (
        gguf_raw_config(header)
        == load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)["config"]
    )
    full = AutoConfig.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).to_dict()
    full.pop("_name_or_path", None)
    full.pop("quantization_config", None)
    # GGUF's general.name, filed by transformers as _model_name_or_path: not a property of the
    # model, so the reader (and every config.json memsurgery writes) leaves it out
    assert full.pop("_model_name_or_path") == "tiny-llama"
    config = open_checkpoint(tiny_gguf).config
    assert config == full and "_model_name_or_path" not in config


def test_gguf_load_state_dict_dequantizes_to_original(tiny_gguf):
    ck = open_checkpoint(tiny_gguf)
    sd = ck.load_state_dict()
    ref = build_tiny_model("llama").state_dict()
    assert set(sd) == set(ck.tensors)
    for name, t in sd.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, ref[name]), name  # q/k un-permuted, nothing transposed
    model = ck.load_model()
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None


@pytest.mark.parametrize("damage", ["magic", "truncate_table", "truncate_data", "garbage"])
def test_corrupt_gguf_gives_input_error(tiny_gguf, tmp_path, damage):
    raw = bytearray(tiny_gguf.read_bytes())
    if damage == "magic":
        raw[:4] = b"GGUX"
    elif damage == "truncate_table":
        raw = raw[:200]
    elif damage == "truncate_data":
        raw = raw[:-1000]
    else:
        raw = b"GGUF" + bytes(range(256)) * 3
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as exc:
        open_checkpoint(path)
    _assert_clean_error(exc, "bad.gguf")


_GGUF_FUZZ_DIR = Path(__import__("tempfile").mkdtemp(prefix="memsurgery-gguf-fuzz-"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mutated_gguf_never_crashes(tiny_gguf, edits, cut):
    """Byte edits in the metadata/tensor table, or a cut anywhere: a checkpoint or a clean InputError."""
    from memsurgery.checkpoint.gguf_reader import read_gguf_header

    raw = bytearray(tiny_gguf.read_bytes())
    table_end = read_gguf_header(tiny_gguf).data_start  # metadata + tensor table, no tensor data
    for pos, value in edits:
        raw[pos % table_end] = value
    if cut is not None:
        raw = raw[: cut % len(raw)]
    path = _GGUF_FUZZ_DIR / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        ck = open_checkpoint(path)
    except InputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert ck.format == "gguf"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_tiny_family_opens_and_validates(tiny_ckpts, model_type):
    from safetensors.torch import load_file

    ck = open_checkpoint(tiny_ckpts[model_type])
    stored = load_file(str(tiny_ckpts[model_type] / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in stored.items()} == {
        n: i.shape for n, i in ck.tensors.items()
    }
    ck.validate()


def test_absurd_layer_count_fails_fast(tiny_ckpts, tmp_path):
    """A corrupt num_hidden_layers must not make validate() build billions of meta modules."""
    import time

    ck_dir = _copy_ckpt(tiny_ckpts["gemma2"], tmp_path / "big")
    cfg = json.loads((ck_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3_000_000_000
    (ck_dir / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(InputError) as exc:
        open_checkpoint(ck_dir).validate()
    assert time.perf_counter() - t0 < 5
    _assert_clean_error(exc, "num_hidden_layers=3000000000", "incomplete")


def test_absurd_gguf_block_count_fails_fast(tiny_gguf, tmp_path):
    import struct as _struct
    import time

    raw = bytearray(tiny_gguf.read_bytes())
    key = b"llama.block_count"
    at = raw.index(key) + len(key)
    assert _struct.unpack_from("<I", raw, at)[0] == 4  # value type u32
    _struct.pack_into("<I", raw, at + 4, 4_000_000_000)
    path = tmp_path / "blocks.gguf"
    path.write_bytes(bytes(raw))
    t0 = time.perf_counter()
    with pytest.raises(InputError) as exc:
        open_checkpoint(path)
    assert time.perf_counter() - t0 < 5
    _assert_clean_error(exc, "blocks.gguf", "4000000000 blocks")


def test_gguf_missing_tensor_is_reported_not_reinitialised(tmp_path):
    """A well-formed GGUF lacking a layer tensor: validate/load_model refuse it."""
    import gguf

    from tests.unit.conftest import write_tiny_llama_gguf

    full = write_tiny_llama_gguf(tmp_path / "full.gguf")
    reader = gguf.GGUFReader(str(full))
    w = gguf.GGUFWriter(str(tmp_path / "holey.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = open_checkpoint(tmp_path / "holey.gguf")
    with pytest.raises(InputError) as exc:
        ck.load_model()
    _assert_clean_error(exc, "holey.gguf", "'model.layers.1.mlp.down_proj.weight'")
