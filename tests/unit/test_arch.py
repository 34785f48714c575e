"""Architecture specs: every JSON spec validates and resolves the right modules on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from importlib import resources

import pytest
import torch

from memsurgery.arch import (
    ArchSpec,
    SpecError,
    load_spec,
    parse_spec,
    spec_for_config,
    supported_model_types,
)
from memsurgery.errors import InputError
from tests.tiny import FAMILIES, TINY_CONFIGS, build_tiny_model

EXPECTED_TYPES = [
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "llama",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
    "smollm3",
]
SPEC_DIR = resources.files("memsurgery.arch").joinpath("specs")


def _build_extra(kind: str):
    """Models beyond tests.tiny: SmolLM3 (llama.json) and the multimodal Gemma 3 wrapper."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "smollm3":
        cfg = AutoConfig.for_model(
            "smollm3",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        text = dict(TINY_CONFIGS["gemma3_text"])
        text.pop("model_type")
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = AutoConfig.for_model(
            "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4
        )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


ALL_MODELS = FAMILIES + ["smollm3", "gemma3"]
_MODELS: dict = {}


def tiny(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = build_tiny_model(kind) if kind in FAMILIES else _build_extra(kind)
    return _MODELS[kind]


# ------------------------------------------------------------------- registry


def test_supported_model_types():
    assert supported_model_types() == EXPECTED_TYPES
    # Every family in the tiny test set is covered.
    assert set(FAMILIES) <= set(supported_model_types())


def test_unknown_and_missing_model_type():
    with pytest.raises(InputError) as err:
        spec_for_config({"model_type": "gpt2"})
    msg = str(err.value)
    assert "'gpt2'" in msg and "model_type" in msg and "gemma, gemma2" in msg and "llama" in msg
    with pytest.raises(InputError, match="no model_type"):
        spec_for_config({"hidden_size": 8})


def test_spec_is_frozen_and_hashable():
    spec = spec_for_config({"model_type": "llama"})
    assert isinstance(spec, ArchSpec) and spec.model_type == "llama" and spec.family == "llama"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.family = "x"  # type: ignore[misc]
    hash(spec)
    assert spec_for_config({"model_type": "mistral"}).family == "llama"


def _llama_raw() -> dict:
    return json.loads(SPEC_DIR.joinpath("llama.json").read_text())


@pytest.mark.parametrize(
    "key",
    [
        "family",
        "model_types",
        "layers_path",
        "layer_template",
        "attention",
        "mlp",
        "norms",
        "embedding",
        "final_norm",
        "lm_head",
        "embedding_scale",
        "config_keys",
        "config_defaults",
    ],
)
def test_missing_top_level_key_names_file_and_key(key):
    raw = _llama_raw()
    del raw[key]
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "llama.json")
    assert "llama.json" in str(err.value) and key in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r["mlp"].pop("down"), "mlp.down"),
        (lambda r: r["attention"].pop("module"), "attention.module"),
        (lambda r: r["norms"].pop("pre_mlp"), "norms.pre_mlp"),
        (lambda r: r["config_keys"].pop("hidden_size"), "config_keys.hidden_size"),
        (lambda r: r.__setitem__("layer_templat", "x"), "layer_templat"),  # typo: unknown key
        (lambda r: r["mlp"].__setitem__("kind", "moe"), "mlp.kind"),
        (lambda r: r["mlp"].__setitem__("gate", None), "mlp"),  # gated without gate
        (lambda r: r.__setitem__("layer_template", "model.layers"), "layer_template"),  # no {i}
        (lambda r: r["config_defaults"].__setitem__("nonsense", 1), "config_defaults.nonsense"),
        (lambda r: r["variants"].__setitem__("gpt2", {}), "variants.gpt2"),
        (lambda r: r["variants"]["mistral"].__setitem__("family", "x"), "variants.mistral.family"),
        (
            lambda r: r["variants"]["mistral"].__setitem__("mlp", {"module": "mlp"}),
            "variants.mistral.mlp",
        ),
    ],
)
def test_bad_spec_content_names_key(mutate, needle):
    raw = _llama_raw()
    mutate(raw)
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "llama.json")
    assert "llama.json" in str(err.value) and needle in str(err.value)


def test_load_spec_file_errors(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{ not json")
    with pytest.raises(SpecError, match="broken.json.*invalid JSON"):
        load_spec(bad)
    good = tmp_path / "mine.json"
    raw = _llama_raw()
    raw["model_types"] = ["my_llama"]
    raw.pop("variants")
    good.write_text(json.dumps(raw))
    specs = load_spec(good)
    assert list(specs) == ["my_llama"] and specs["my_llama"].source == "mine.json"


def test_every_builtin_spec_file_validates():
    files = sorted(e.name for e in SPEC_DIR.iterdir() if e.name.endswith(".json"))
    assert files == [
        "gemma.json",
        "gemma2.json",
        "gemma3.json",
        "llama.json",
        "phi3.json",
        "qwen2.json",
        "qwen3.json",
    ]
    for name in files:
        assert load_spec(SPEC_DIR.joinpath(name))


# ---------------------------------------------------------------- config reads


def test_config_reads_and_fallbacks():
    spec = spec_for_config({"model_type": "llama"})
    cfg = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_attention_heads": 9,
        "head_dim": None,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
    }
    assert spec.head_dim(cfg) == 64  # null head_dim: hidden / heads
    assert spec.num_kv_heads(cfg) == 9  # absent: plain multi-head
    assert spec.activation(cfg) == "silu"  # family default
    assert spec.tie_embeddings(cfg) is False and spec.tie_explicit(cfg) is None
    assert (
        spec.get(cfg, "num_layers") == 30 and spec.get(cfg, "num_hidden_layers") == 30
    )  # logical or raw
    assert spec.get(cfg, "nope", 7) == 7
    assert spec.num_layers(cfg) == 30 and spec.intermediate_size(cfg) == 1536
    with pytest.raises(InputError, match="vocab_size"):
        spec.vocab_size(cfg)
    # Per-model_type defaults from the variant.
    assert (
        spec_for_config({"model_type": "mistral"}).num_kv_heads(
            {"model_type": "mistral", "num_attention_heads": 32}
        )
        == 8
    )
    # Gemma: legacy "gelu" means the tanh approximation; head_dim default is 256, not hidden/heads.
    gemma = spec_for_config({"model_type": "gemma"})
    assert gemma.activation({"hidden_act": "gelu"}) == "gelu_pytorch_tanh"
    assert gemma.head_dim({"hidden_size": 64, "num_attention_heads": 4}) == 256
    assert gemma.embedding_multiplier({"hidden_size": 64}) == 8.0
    assert spec.embedding_multiplier({"hidden_size": 64}) == 1.0


def test_gemma3_text_config_nesting_and_hub_names():
    cfg = {
        "model_type": "gemma3",
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "vocab_size": 256,
        },
        "vision_config": {"hidden_size": 32},
    }
    spec = spec_for_config(cfg)
    assert (
        spec.family == "gemma3"
        and spec.model_type == "gemma3"
        and spec.config_subkey == "text_config"
    )
    assert spec.hidden_size(cfg) == 64 and spec.num_layers(cfg) == 2 and spec.head_dim(cfg) == 16
    assert spec.tie_embeddings(cfg) is True
    assert spec.layer_prefix(1) == "model.language_model.layers.1"
    # Hub checkpoints name the text model language_model.model.*
    hub = [
        "language_model.model.layers.0.mlp.up_proj.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.x.weight",
    ]
    assert spec.canonical_name(hub[0]) == "model.language_model.layers.0.mlp.up_proj.weight"
    assert spec.canonical_name(hub[2]) == "lm_head.weight"
    assert spec.layer_index_of(hub[0]) == (0, "mlp.up_proj.weight")
    adapted = spec.adapt_to_names(hub)
    assert adapted.mlp_param_names(0)[1] == hub[0]
    assert adapted.layer_index_of(hub[0]) == (0, "mlp.up_proj.weight")
    assert (
        adapted.embedding == "language_model.model.embed_tokens"
        and adapted.lm_head == "language_model.lm_head"
    )
    assert spec.adapt_to_names(["model.language_model.layers.0.mlp.up_proj.weight"]) is spec
    # The text-only model_type keeps the plain layout.
    assert spec_for_config({"model_type": "gemma3_text"}).layer_prefix(0) == "model.layers.0"


def test_mlp_param_names_with_bias():
    spec = spec_for_config({"model_type": "llama"})
    assert spec.mlp_param_names(3) == [
        "model.layers.3.mlp.gate_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
    ]
    with_bias = spec.mlp_param_names(0, {"model_type": "llama", "mlp_bias": True})
    assert "model.layers.0.mlp.down_proj.bias" in with_bias and len(with_bias) == 6
    phi = spec_for_config({"model_type": "phi3"})
    assert phi.mlp_param_names(1) == [
        "model.layers.1.mlp.gate_up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]


# ----------------------------------------------------------------- live models


def _act_class(mlp):
    return type(getattr(mlp, "act_fn", None) or mlp.activation_fn)


@pytest.mark.parametrize("kind", ALL_MODELS)
def test_spec_matches_live_model(kind):
    from transformers.activations import ACT2FN

    model = tiny(kind)
    cfg = model.config.to_dict()
    spec = spec_for_config(cfg)
    sd = model.state_dict()
    n = spec.num_layers(cfg)
    d, inter = spec.hidden_size(cfg), spec.intermediate_size(cfg)
    layers = spec.get_layers(model)
    assert len(layers) == n == 2
    for i in range(n):
        for name in spec.mlp_param_names(i, cfg):
            assert name in sd, name
        prefix = spec.layer_prefix(i)
        for norm in spec.layer_norm_modules():
            assert f"{prefix}.{norm}.weight" in sd
        for proj in spec.attention_projections():
            assert f"{prefix}.{spec.attn_module}.{proj}.weight" in sd
        for qn in spec.qk_norms:
            assert f"{prefix}.{spec.attn_module}.{qn}.weight" in sd
        assert spec.get_mlp(model, i) is getattr(layers[i], spec.mlp_module)
        assert spec.get_pre_mlp_norm(model, i) is getattr(layers[i], spec.pre_mlp_norm)
        assert spec.get_attention(model, i) is getattr(layers[i], spec.attn_module)
        post = spec.get_post_mlp_norm(model, i)
        assert (post is None) == (spec.post_mlp_norm is None)
    for top in (spec.embedding, spec.final_norm, spec.lm_head):
        assert f"{top}.weight" in sd, top
    # Shapes agree with what the spec reads from the config.
    mlp = spec.get_mlp(model, 0)
    down = getattr(mlp, spec.down_proj).weight
    assert tuple(down.shape) == (d, inter)
    if spec.mlp_kind == "fused_gated":
        assert tuple(getattr(mlp, spec.gate_up_proj).weight.shape) == (2 * inter, d)
    else:
        assert tuple(getattr(mlp, spec.gate_proj).weight.shape) == (inter, d)
        assert tuple(getattr(mlp, spec.up_proj).weight.shape) == (inter, d)
    assert _act_class(mlp) is type(ACT2FN[spec.activation(cfg)])
    attn = spec.get_attention(model, 0)
    assert attn.head_dim == spec.head_dim(cfg)
    assert tuple(getattr(attn, spec.o_proj).weight.shape) == (
        d,
        spec.num_heads(cfg) * spec.head_dim(cfg),
    )
    kv = spec.num_kv_heads(cfg) * spec.head_dim(cfg)
    if spec.qkv_proj:
        assert (
            getattr(attn, spec.qkv_proj).weight.shape[0]
            == spec.num_heads(cfg) * spec.head_dim(cfg) + 2 * kv
        )
    else:
        assert getattr(attn, spec.k_proj).weight.shape[0] == kv
    assert spec.vocab_size(cfg) == sd[f"{spec.embedding}.weight"].shape[0]
    # Tied or not, as the live model really is.
    tied = sd[f"{spec.lm_head}.weight"].data_ptr() == sd[f"{spec.embedding}.weight"].data_ptr()
    assert spec.tie_embeddings(cfg) == tied


@pytest.mark.parametrize("kind", ALL_MODELS)
def test_pre_mlp_norm_output_is_mlp_input(kind):
    """A forward hook on the pre-MLP norm sees exactly what the MLP receives, in every layer."""
    model = tiny(kind)
    spec = spec_for_config(model.config)
    seen_norm, seen_mlp, handles = {}, {}, []
    for i in range(len(spec.get_layers(model))):
        handles.append(
            spec.get_pre_mlp_norm(model, i).register_forward_hook(
                lambda m, a, out, i=i: seen_norm.__setitem__(i, out.detach().clone())
            )
        )
        handles.append(
            spec.get_mlp(model, i).register_forward_pre_hook(
                lambda m, a, i=i: seen_mlp.__setitem__(i, a[0].detach().clone())
            )
        )
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen_norm) == sorted(seen_mlp) == [0, 1]
    for i, out in seen_norm.items():
        assert torch.equal(out, seen_mlp[i]), (kind, i)


@pytest.mark.parametrize("kind", ["llama", "gemma", "gemma2", "phi3", "gemma3"])
def test_set_mlp_swaps_the_module_used_in_forward(kind):
    model = copy.deepcopy(tiny(kind))
    spec = spec_for_config(model.config)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    class Spy(torch.nn.Module):
        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale, self.calls = inner, scale, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x) * self.scale

    spy = Spy(spec.get_mlp(model, 1), 1.0)
    spec.set_mlp(model, 1, spy)
    assert spec.get_mlp(model, 1) is spy
    with torch.no_grad():
        same = model(input_ids=ids).logits
    assert spy.calls == 1 and torch.allclose(same, ref)
    spy.scale = 0.0  # the swapped-in module really drives the output
    with torch.no_grad():
        changed = model(input_ids=ids).logits
    assert not torch.allclose(changed, ref)


@pytest.mark.parametrize("kind", ["llama", "gemma", "gemma2", "gemma3_text"])
def test_embedding_multiplier_matches_model(kind):
    model = tiny(kind)
    spec = spec_for_config(model.config)
    embed = model.get_input_embeddings()
    ids = torch.tensor([[3, 17, 200]])
    with torch.no_grad():
        out = embed(ids)
    expected = embed.weight[ids] * spec.embedding_multiplier(model.config)
    torch.testing.assert_close(out, expected)
    assert (spec.embedding_multiplier(model.config) == math.sqrt(64)) == kind.startswith("gemma")


def test_get_layers_on_base_model_and_bad_model():
    model = tiny("llama")
    spec = spec_for_config(model.config)
    assert spec.get_layers(model.model) is model.model.layers  # bare LlamaModel
    with pytest.raises(InputError, match="no decoder layers"):
        spec.get_layers(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="out of range"):
        spec.get_mlp(model, 2)
