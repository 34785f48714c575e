"""Tiny random checkpoints of every supported family, built in the test run.

Each is a real Hugging Face directory (config.json + model.safetensors) with 2
layers and hidden size 32-64, deterministic for a given seed, so tests exercise
the same loading code as real checkpoints in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small but structurally faithful configs: GQA where the family uses it,
# tied embeddings where the family ties them.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=True, hidden_act="silu",
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=False, hidden_act="silu", sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=True, hidden_act="silu",
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        max_position_embeddings=128, tie_word_embeddings=True, hidden_act="silu",
    ),
    "gemma": dict(
        model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=256,
        max_position_embeddings=128, hidden_act="gelu_pytorch_tanh",
    ),
    "gemma2": dict(
        model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh",
    ),
    "phi3": dict(
        model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=False, hidden_act="silu", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}

FAMILIES = sorted(TINY_CONFIGS)


def build_tiny_model(model_type: str, seed: int = 0):
    """A tiny random `*ForCausalLM` of `model_type`, fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[model_type])
    mt = kwargs.pop("model_type")
    config = AutoConfig.for_model(mt, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of HF models leaves some tensors at exact zeros/ones; perturb
    # norms so tests notice if a norm weight is dropped or misplaced.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_tiny_checkpoint(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint (config.json + model.safetensors) to `out_dir`."""
    out_dir = Path(out_dir)
    model = build_tiny_model(model_type, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 tokens, one per byte.

    Matches the tiny models' vocab_size=256, works offline, and round-trips any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=byte_chars[2], bos_token=byte_chars[1])


def make_tiny_checkpoint_with_tokenizer(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    out_dir = make_tiny_checkpoint(model_type, out_dir, seed)
    build_tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
