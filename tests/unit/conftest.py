"""Unit-test fixtures for checkpoint I/O: a tiny llama GGUF and a small safetensors file.

The GGUF is written the way llama.cpp's converter writes one (F32 tensors, q/k
rows permuted for rotary, no output.weight when embeddings are tied), so
reading it back through transformers exercises the real dequantize path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import TINY_CONFIGS, build_tiny_model


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for q/k projections (transformers undoes this on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_llama_gguf(path: Path, seed: int = 0, *, with_tokenizer: bool = True) -> Path:
    """Write the tiny llama of tests/tiny.py as an F32 GGUF file at `path`."""
    import gguf

    cfg = TINY_CONFIGS["llama"]
    model = build_tiny_model("llama", seed)
    n_layers, n_head, n_kv = (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    head_dim = cfg["hidden_size"] // n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp stores the embedding once
            continue
        arr = t.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            arr = _permute_qk(arr, n_head)
        elif name.endswith("k_proj.weight"):
            arr = _permute_qk(arr, n_kv)
        stem, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{name_map.get_name(stem)}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """Path to a tiny llama GGUF (F32, tied embeddings, with tokenizer metadata)."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(scope="session")
def small_safetensors(tmp_path_factory) -> Path:
    """A valid three-tensor safetensors file (F32, BF16, I64), for corruption and fuzz tests."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "small.safetensors"
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
            "c": torch.tensor([7], dtype=torch.int64),
        },
        str(path),
        metadata={"format": "pt"},
    )
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The train tests' tiny dense llama, its graft and data files (tests/train_assets.py)."""
    from tests.train_assets import train_assets

    return train_assets(tmp_path_factory)


@pytest.fixture
def train_cache(assets, monkeypatch):
    """Tokenization caches of the train tests go beside their assets, not to ~/.cache."""
    monkeypatch.setenv("MEMSURGERY_CACHE", str(assets["cache"]))
