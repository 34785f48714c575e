"""The inspect report: counts per family, graft-estimate arithmetic, proposal validation, JSON."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from memsurgery.arch import spec_for_config
from memsurgery.errors import InputError
from memsurgery.inspection import (
    SCHEMA,
    GraftProposal,
    default_memory_layers,
    inspect_checkpoint,
    parse_slots,
    render_inspect,
)
from tests.tiny import FAMILIES, build_tiny_model

READER = Path(__file__).resolve().parents[2] / "memsurgery" / "checkpoint" / "reader.py"
_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
RAM = 64 << 30  # fixed, so reports do not depend on the test machine


@dataclass
class FakeTensorInfo:
    name: str
    shape: tuple
    dtype: str
    nbytes: int
    file: str


@dataclass
class FakeCheckpoint:
    """Stand-in with the `memsurgery.checkpoint.Checkpoint` contract, for hand-built cases."""

    path: Path
    root: Path
    format: str
    config: dict
    files: list
    tensors: dict
    has_tokenizer: bool = False


def _header_checkpoint(path: Path) -> FakeCheckpoint:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            s = f.get_slice(name)
            shape, dtype = tuple(s.get_shape()), s.get_dtype()
            n = 1
            for x in shape:
                n *= x
            tensors[name] = FakeTensorInfo(
                name, shape, dtype, n * _BYTES[dtype], "model.safetensors"
            )
    return FakeCheckpoint(
        path,
        path,
        "safetensors",
        json.loads((path / "config.json").read_text()),
        [("model.safetensors", (path / "model.safetensors").stat().st_size)],
        tensors,
    )


def open_ckpt(path: Path):
    """The real reader once it exists; until then a header-only stand-in."""
    if READER.exists():
        from memsurgery.checkpoint.reader import open_checkpoint

        return open_checkpoint(path)
    return _header_checkpoint(path)


def _fake(config: dict, shapes: dict, dtype: str = "BF16") -> FakeCheckpoint:
    tensors = {}
    for name, shape in shapes.items():
        n = 1
        for x in shape:
            n *= x
        tensors[name] = FakeTensorInfo(name, tuple(shape), dtype, 2 * n, "model.safetensors")
    total = sum(t.nbytes for t in tensors.values())
    return FakeCheckpoint(
        Path("/fake"),
        Path("/fake"),
        "safetensors",
        config,
        [("model.safetensors", total)],
        tensors,
        True,
    )


# ------------------------------------------------------------ family counts


@pytest.mark.parametrize("mt", FAMILIES)
def test_family_counts_match_live_model(mt, tiny_ckpts):
    report = inspect_checkpoint(open_ckpt(tiny_ckpts[mt]), ram_bytes=RAM)
    model = build_tiny_model(mt)
    spec = spec_for_config(model.config)
    cfg = model.config
    # Unique parameters: a tied lm_head shares the embedding's tensor and counts once.
    assert report["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    comps = report["parameters"]["by_component"]
    assert sum(comps.values()) == report["parameters"]["total"]
    assert comps["other"] == 0, report["notes"]  # every tensor is placed by the spec
    assert comps["embedding"] == cfg.vocab_size * cfg.hidden_size
    assert comps["mlp"] == sum(
        p.numel() for i in range(2) for p in spec.get_mlp(model, i).parameters()
    )
    assert comps["norms"] == sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert report["tied_embeddings"] is tied
    assert comps["lm_head"] == (0 if tied else cfg.vocab_size * cfg.hidden_size)
    assert (
        report["num_layers"] == 2
        and report["hidden_size"] == 64
        and report["intermediate_size"] == 128
    )
    assert report["vocab_size"] == 256
    att = report["attention"]
    assert (att["heads"], att["kv_heads"], att["head_dim"]) == (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        model.model.layers[0].self_attn.head_dim,
    )
    assert report["mlp"]["params_per_layer"] == sum(
        p.numel() for p in spec.get_mlp(model, 0).parameters()
    )
    assert report["layer_params"] == sum(p.numel() for p in model.model.layers[0].parameters())
    expected_kind = "gated-gelu_pytorch_tanh" if mt.startswith("gemma") else "gated-silu"
    assert report["mlp"]["kind"] == expected_kind
    assert report["architecture"]["model_type"] == mt
    assert report["schema"] == SCHEMA and report["format"] == "safetensors"
    assert report["dtypes"]["F32"]["params"] >= report["parameters"]["total"]
    assert report["embedding_scale"] == (8.0 if mt.startswith("gemma") else 1.0)
    assert json.loads(json.dumps(report)) == report  # plain JSON types only


def test_render_every_family(tiny_ckpts):
    from rich.console import Console

    for mt in FAMILIES:
        console = Console(file=io.StringIO(), width=160, record=True)
        render_inspect(inspect_checkpoint(open_ckpt(tiny_ckpts[mt]), ram_bytes=RAM), console)
        text = console.export_text()
        assert mt in text and "Parameters" in text and "Graft estimate" in text
        assert "64->128" in text and "fits" in text


# ------------------------------------------------------ SmolLM2-135M shapes


def _smollm2_like() -> FakeCheckpoint:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }
    d, inter, kv = 576, 1536, 3 * 64
    shapes = {"model.embed_tokens.weight": (49152, d), "model.norm.weight": (d,)}
    for i in range(30):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.self_attn.q_proj.weight": (d, d),
                f"{p}.self_attn.k_proj.weight": (kv, d),
                f"{p}.self_attn.v_proj.weight": (kv, d),
                f"{p}.self_attn.o_proj.weight": (d, d),
                f"{p}.mlp.gate_proj.weight": (inter, d),
                f"{p}.mlp.up_proj.weight": (inter, d),
                f"{p}.mlp.down_proj.weight": (d, inter),
                f"{p}.input_layernorm.weight": (d,),
                f"{p}.post_attention_layernorm.weight": (d,),
            }
        )
    return _fake(cfg, shapes)


def test_smollm2_shaped_numbers():
    r = inspect_checkpoint(_smollm2_like(), GraftProposal(slots=65536), ram_bytes=RAM)
    assert r["num_layers"] == 30 and r["hidden_size"] == 576 and r["intermediate_size"] == 1536
    assert (r["attention"]["heads"], r["attention"]["kv_heads"], r["attention"]["head_dim"]) == (
        9,
        3,
        64,
    )
    assert r["mlp"]["kind"] == "gated-silu" and r["mlp"]["params_per_layer"] == 3 * 576 * 1536
    assert r["parameters"]["total"] == 134_515_008
    assert r["tied_embeddings"] is True and r["tokenizer"] is True
    g = r["graft_estimate"]
    assert g["proposal"]["layers"] == [5, 15, 25] and g["proposal"]["n_sub"] == 256
    assert g["proposal"]["v_dim"] == 576 and g["params"]["value_table"] == 65536 * 576
    assert r["dtypes"] == {
        "BF16": {"tensors": 272, "params": 134_515_008, "bytes": 2 * 134_515_008}
    }


def test_tie_inferred_and_stored_tied_head_counted_once():
    base = _smollm2_like()
    # A config without the tie key: no lm_head tensor means tied.
    del base.config["tie_word_embeddings"]
    r = inspect_checkpoint(base, ram_bytes=RAM)
    assert r["tied_embeddings"] is True and r["parameters"]["total"] == 134_515_008
    # A tied checkpoint that also stores lm_head: still counted once, with a note.
    stored = _smollm2_like()
    stored.tensors["lm_head.weight"] = FakeTensorInfo(
        "lm_head.weight", (49152, 576), "BF16", 1, "x"
    )
    r = inspect_checkpoint(stored, ram_bytes=RAM)
    assert (
        r["parameters"]["total"] == 134_515_008 and r["parameters"]["by_component"]["lm_head"] == 0
    )
    assert any("counted once" in n for n in r["notes"])
    # Untied: the head is its own component.
    stored.config["tie_word_embeddings"] = False
    r = inspect_checkpoint(stored, ram_bytes=RAM)
    assert r["parameters"]["by_component"]["lm_head"] == 49152 * 576
    assert r["parameters"]["total"] == 134_515_008 + 49152 * 576


def test_gemma3_hub_names_and_text_config():
    """The multimodal wrapper as stored on the Hub: text weights under language_model.model.*"""
    from tests.unit.test_arch import tiny

    model = tiny("gemma3")
    hub = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: Hub files do not store it
        hub[
            name.replace("model.language_model.", "language_model.model.")
            .replace("model.vision_tower.", "vision_tower.")
            .replace("model.multi_modal_projector.", "multi_modal_projector.")
        ] = tuple(t.shape)
    r = inspect_checkpoint(_fake(model.config.to_dict(), hub), ram_bytes=RAM)
    assert r["architecture"]["model_type"] == "gemma3" and r["architecture"]["family"] == "gemma3"
    assert r["num_layers"] == 2 and r["hidden_size"] == 64 and r["tied_embeddings"] is True
    assert r["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    text = model.model.language_model
    comps = r["parameters"]["by_component"]
    assert comps["mlp"] == sum(p.numel() for layer in text.layers for p in layer.mlp.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if "language_model" not in n)
    assert comps["other"] == vision > 0 and any("other" in n for n in r["notes"])


# ---------------------------------------------------------- graft estimate


def test_graft_estimate_by_hand(tiny_ckpts):
    """Tiny llama (d=64, I=128, 2 layers, V=256, tied), 256 slots, 2 heads, knn 4, k_dim 8, L1."""
    p = GraftProposal(slots=256, heads=2, knn=4, k_dim=8, layers=[1])
    g = inspect_checkpoint(open_ckpt(tiny_ckpts["llama"]), p, ram_bytes=10**6)["graft_estimate"]
    assert g["proposal"] == {
        "slots": 256,
        "n_sub": 16,
        "heads": 2,
        "knn": 4,
        "k_dim": 8,
        "v_dim": 64,
        "layers": [1],
    }
    assert g["params"]["value_table"] == 256 * 64 == 16384
    assert g["params"]["per_layer"] == {
        "query": 64 * 2 * 8,  # 1024
        "sub_keys": 2 * 2 * 16 * 4,  # 256
        "gate": 64 * 64,  # 4096
        "out": 64 * 64,  # 4096
        "relevance_gate": 65,
        "total": 9537,
    }
    assert g["params"]["all_layers"] == 9537 and g["params"]["total"] == 25921
    assert g["params"]["dense_model"] == 90432
    assert g["bytes"] == {
        "fp32": 103684,
        "bf16": 51842,
        "adam_state_fp32": 131072,
        "fp32_with_adam": 234756,
    }
    f = g["flops_per_token"]
    assert f["added_per_layer"] == {
        "query_proj": 2048,
        "sub_key_scores": 512,
        "candidates": 32,
        "bag": 1024,
        "gates": 16384,
        "relevance_gate": 128,
        "total": 20128,
    }
    assert f["removed_per_layer_replace"] == 2 * 3 * 64 * 128 == 49152
    assert f["net_parallel"] == 20128 and f["net_replace"] == 20128 - 49152
    assert (
        f["dense_model"] == 2 * 90432
    )  # tied: every parameter is a matmul weight once (as lm_head)
    assert f["relative_to_dense"] == {
        "parallel": round(20128 / 180864, 6),
        "replace": round(-29024 / 180864, 6),
    }
    assert g["fits_ram"] == {
        "ram_bytes": 10**6,
        "model_fp32_bytes": 361728,
        "memory_fp32_bytes": 103684,
        "adam_state_bytes": 131072,
        "required_bytes": 596484,
        "fits": True,
    }
    tight = inspect_checkpoint(open_ckpt(tiny_ckpts["llama"]), p, ram_bytes=596483)[
        "graft_estimate"
    ]
    assert tight["fits_ram"]["fits"] is False


def test_untied_dense_flops_and_two_layers(tiny_ckpts):
    r = inspect_checkpoint(
        open_ckpt(tiny_ckpts["mistral"]), GraftProposal(slots=256, knn=4, k_dim=8), ram_bytes=RAM
    )
    g = r["graft_estimate"]
    total = r["parameters"]["total"]
    assert g["flops_per_token"]["dense_model"] == 2 * (
        total - 256 * 64
    )  # lookup is free, lm_head is not
    assert g["proposal"]["layers"] == [0, 1]
    assert g["params"]["all_layers"] == 2 * g["params"]["per_layer"]["total"]
    # The table is stored once however many layers use it.
    assert g["params"]["total"] == g["params"]["value_table"] + g["params"]["all_layers"]


def test_default_ram_comes_from_psutil(tiny_ckpts):
    import psutil

    g = inspect_checkpoint(open_ckpt(tiny_ckpts["llama"]))["graft_estimate"]
    assert g["fits_ram"]["ram_bytes"] == psutil.virtual_memory().total


def test_default_memory_layers():
    assert default_memory_layers(24) == [4, 12, 20]  # the Memory+ reference placement
    assert default_memory_layers(30) == [5, 15, 25]
    assert default_memory_layers(3) == [0, 1, 2]
    assert default_memory_layers(2) == [0, 1]
    assert default_memory_layers(1) == [0]


def test_proposal_resolve_defaults_and_sorting():
    r = GraftProposal(layers=[20, 4]).resolve(24, 576)
    assert r.layers == [4, 20] and r.v_dim == 576 and r.n_sub == 1024  # graft's default, 1M slots
    assert GraftProposal(v_dim=128).resolve(24, 576).v_dim == 128


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(slots=1000), "--slots"),
        (dict(slots=0), "--slots"),
        (dict(layers=[0, 7]), "--layers"),
        (dict(layers=[-1]), "--layers"),
        (dict(layers=[1, 1]), "--layers"),
        (dict(layers=[]), "--layers"),
        (dict(slots=256, knn=17), "--knn"),
        (dict(knn=0), "--knn"),
        (dict(k_dim=7), "--k-dim"),
        (dict(k_dim=0), "--k-dim"),
        (dict(heads=0), "--heads"),
        (dict(v_dim=0), "--v-dim"),
    ],
)
def test_bad_proposal_names_flag(kwargs, flag, tiny_ckpts):
    with pytest.raises(InputError) as err:
        inspect_checkpoint(open_ckpt(tiny_ckpts["llama"]), GraftProposal(**kwargs), ram_bytes=RAM)
    assert str(err.value).startswith(flag)


def test_slots_error_suggests_squares():
    with pytest.raises(InputError, match=r"961 \(31\^2\) or 1024 \(32\^2\)"):
        GraftProposal(slots=1000).resolve(2, 64)


@pytest.mark.parametrize(
    "text, value",
    [
        ("65536", 65536),
        ("64K", 65536),
        ("64k", 65536),
        ("1M", 1 << 20),
        (" 16M ", 16 << 20),
        ("1G", 1 << 30),
        ("256", 256),
        (4096, 4096),
    ],
)
def test_parse_slots(text, value):
    assert parse_slots(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5M", "-4", "0", "64KB", "1e6", "M"])
def test_parse_slots_rejects(text):
    with pytest.raises(InputError, match="--slots"):
        parse_slots(text)


def test_unsupported_architecture_in_report():
    ck = _smollm2_like()
    ck.config["model_type"] = "gpt2"
    with pytest.raises(InputError, match="'gpt2'.*supported: .*llama"):
        inspect_checkpoint(ck, ram_bytes=RAM)


def test_missing_architectures_filled_from_transformers():
    ck = _smollm2_like()
    del ck.config["architectures"]  # as in GGUF-derived configs
    r = inspect_checkpoint(ck, ram_bytes=RAM)
    assert r["architecture"]["architectures"] == ["LlamaForCausalLM"]
    assert any("assuming LlamaForCausalLM" in n for n in r["notes"])


def test_inspect_prices_what_graft_would_build_by_default():
    from memsurgery.graft.plan import GraftPlan

    plan, proposal = GraftPlan(), GraftProposal()
    assert (proposal.slots, proposal.heads, proposal.knn, proposal.k_dim) == \
        (plan.slots, plan.heads, plan.knn, plan.k_dim)
    r = inspect_checkpoint(_smollm2_like(), ram_bytes=RAM)
    assert r["graft_estimate"]["proposal"]["slots"] == plan.slots
