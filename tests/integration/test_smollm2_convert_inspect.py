"""Convert and inspect on the real SmolLM2-135M-Instruct checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

PROMPT = "The capital of France is"


def _inspect_json(path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "memsurgery", "inspect", str(path), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_converted_logits_equal_gguf(smollm2_hf, smollm2_gguf, smollm2_gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_gguf = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok_hf = AutoTokenizer.from_pretrained(smollm2_hf)
    text = "The capital of France is Paris. Memory layers store facts; 1234 + 5678 = ?"
    assert tok_hf(text)["input_ids"] == tok_gguf(text)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    ids = tok_hf(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(ids).logits
        b = smollm2_gguf_model(ids).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= 1e-6
    # The model still knows what it knew: a real fact through greedy decoding.
    x = tok_hf(PROMPT, return_tensors="pt")
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok_hf.decode(out[0, x["input_ids"].shape[1]:])


def test_converted_directory_layout(smollm2_hf):
    names = {p.name for p in smollm2_hf.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert "tokenizer.json" in names or "tokenizer.model" in names
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert "quantization_config" not in cfg
    from safetensors import safe_open

    with safe_open(str(smollm2_hf / "model.safetensors"), framework="pt") as f:
        assert f.metadata().get("format") == "pt"


def test_inspect_smollm2_numbers_and_agreement(smollm2_hf, smollm2_gguf):
    a = _inspect_json(smollm2_gguf)
    b = _inspect_json(smollm2_hf)
    for rep in (a, b):
        assert rep["architecture"]["model_type"] == "llama"
        assert rep["num_layers"] == 30
        assert rep["hidden_size"] == 576
        assert rep["attention"]["heads"] == 9 and rep["attention"]["kv_heads"] == 3
        assert rep["attention"]["head_dim"] == 64
        assert rep["mlp"]["kind"] == "gated-silu" and rep["intermediate_size"] == 1536
        assert rep["parameters"]["total"] == 134_515_008
        assert rep["tied_embeddings"] is True
        assert rep["tokenizer"] is True
    # Everything that describes the model (not the files) must agree.
    for key in ("architecture", "num_layers", "hidden_size", "intermediate_size", "attention", "mlp",
                "vocab_size", "tied_embeddings", "parameters", "graft_estimate"):
        assert a[key] == b[key], key


def test_convert_sharded_output(smollm2_gguf, tmp_path):
    from memsurgery.checkpoint.convert import convert_checkpoint
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    convert_checkpoint(smollm2_gguf, out, shard_size="200MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
