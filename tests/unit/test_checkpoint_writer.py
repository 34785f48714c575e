"""Tests for memsurgery.checkpoint writing: sizes, sharding + index, shared storage, HF round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memsurgery._atomic import atomic_output_dir
from memsurgery.checkpoint import (
    open_checkpoint,
    parse_size,
    save_hf_model,
    save_state_dict_sharded,
)
from memsurgery.errors import InputError
from tests.tiny import build_tiny_model

# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("10 KiB", 10240),
        ("1000", 1000),
        (1000, 1000),
        ("3kb", 3000),
        ("7B", 7),
        (" 1TB ", 10**12),
        (".5MB", 500_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GB", "2XB", "two GB", "-1MB", "0", 0, -5, "1e9", True, None, 1.5, "2 G B"]
)
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(InputError) as exc:
        parse_size(bad)
    assert "\n" not in str(exc.value) and "2GB" in str(exc.value)


# --------------------------------------------------------------------------- save_state_dict_sharded


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(64, 32, generator=g),
        "w2": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "b": torch.randn(64, generator=g),
        "idx": torch.arange(10),
    }


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_single_file_when_small(tmp_path):
    state = _state()
    written = save_state_dict_sharded(state, tmp_path, metadata={"origin": "test", "n": 3})
    assert written == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert _metadata(tmp_path / "model.safetensors") == {"format": "pt", "origin": "test", "n": "3"}
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(
        torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state
    )


def test_format_pt_cannot_be_overridden(tmp_path):
    save_state_dict_sharded(_state(), tmp_path, metadata={"format": "np"})
    assert _metadata(tmp_path / "model.safetensors")["format"] == "pt"


def test_sharded_with_index(tmp_path):
    state = _state()
    written = save_state_dict_sharded(state, tmp_path, max_shard_size="5KB", metadata={"k": "v"})
    shards = [w for w in written if w.endswith(".safetensors")]
    assert written[-1] == "model.safetensors.index.json"
    assert len(shards) >= 2 and all(
        s.startswith("model-0000") and f"-of-0000{len(shards)}" in s for s in shards
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    merged = {}
    for shard in shards:
        assert _metadata(tmp_path / shard) == {"format": "pt", "k": "v"}
        part = load_file(str(tmp_path / shard))
        assert all(index["weight_map"][n] == shard for n in part)
        merged.update(part)
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_shared_storage_and_views_are_written_as_copies(tmp_path):
    base = torch.randn(100, 8)
    tied = torch.randn(16, 8)
    state = {
        "table": base,
        "row": base[3],  # a view into a bigger storage
        "a": tied,
        "b": tied,  # the same tensor under two names
        "t": torch.randn(8, 4).t(),  # non-contiguous
    }
    save_state_dict_sharded(state, tmp_path)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert loaded["row"].shape == (8,)
    expected = sum(t.numel() * 4 for t in state.values())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(state)
    # Only the view's own bytes are stored, not the 100-row table again.
    assert (tmp_path / "model.safetensors").stat().st_size < expected + 1024


def test_meta_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="meta"):
        save_state_dict_sharded({"x": torch.empty(2, device="meta")}, tmp_path)


def test_writer_inside_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        save_state_dict_sharded(_state(), tmp, max_shard_size="5KB")
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out2") as tmp:
        save_state_dict_sharded(_state(), tmp)
        raise RuntimeError("boom")
    assert not (tmp_path / "out2").exists()


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temp files/dirs are created 0600/0700; published outputs must not stay private."""
    import os

    mask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "o") as tmp:
            save_state_dict_sharded(_state(), tmp)
    finally:
        os.umask(mask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "o" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- save_hf_model round trips


def _logits(model, seed: int = 3) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("mistral", False)])
def test_save_hf_model_round_trip(tmp_path, model_type, tied):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(model_type)
    save_hf_model(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) is (not tied)
    assert _metadata(tmp_path / "model.safetensors")["format"] == "pt"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type and "quantization_config" not in config

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    if tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    open_checkpoint(tmp_path).validate()


def test_save_hf_model_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("llama")
    save_hf_model(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" not in index["weight_map"]
    assert all(_metadata(tmp_path / s)["format"] == "pt" for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(model))


def test_save_hf_model_untied_copy_keeps_both(tmp_path):
    """A model whose config says tied but whose weights were untied must keep both tensors."""
    model = build_tiny_model("llama")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    from memsurgery.checkpoint.writer import tied_aliases

    assert tied_aliases(model) == set()
    assert tied_aliases(build_tiny_model("llama")) == {"lm_head.weight"}
    assert tied_aliases(build_tiny_model("mistral")) == set()


def test_save_hf_model_with_tokenizer_and_generation_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    vocab["[UNK]"] = 0
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    model = build_tiny_model("mistral")
    save_hf_model(
        model, tmp_path, tokenizer=tokenizer, generation_config=GenerationConfig(max_new_tokens=7)
    )
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 7
    ck = open_checkpoint(tmp_path)
    assert ck.has_tokenizer
    loaded = ck.load_tokenizer()
    assert loaded("w5 w9")["input_ids"] == tokenizer("w5 w9")["input_ids"] == [5, 9]


def test_gguf_model_saved_as_plain_hf(tiny_gguf, tmp_path):
    """Dequantized GGUF -> save_hf_model -> plain from_pretrained, same logits, no quantization_config."""
    from transformers import AutoModelForCausalLM

    model = open_checkpoint(tiny_gguf).load_model()
    save_hf_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert torch.equal(_logits(reloaded), _logits(build_tiny_model("llama")))
