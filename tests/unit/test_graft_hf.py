"""The grafted model as a transformers model: graft, function preservation, save/load, remote code.

Tiny random models of every family (tests/tiny.py). The remote-code test runs a fresh
interpreter in which memsurgery cannot be imported and compares its logits with this
process's; the fallback test loads the written modeling file with memsurgery disabled
and compares it, layer by layer and end to end, with memsurgery's own memory layer.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memsurgery.export.hf import (
    is_grafted_config,
    memory_layers,
    register_all,
    save_grafted,
)
from memsurgery.graft.surgery import graft_model
from memsurgery.memory import MemoryBank, MemoryConfig
from tests.numerics import assert_close_normwise, forward_chain, memory_chain, reorder_rtol
from tests.tiny import FAMILIES, TINY_CONFIGS, build_tiny_model

MEM = {"slots": 64, "heads": 2, "k_dim": 16, "knn": 4}
IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a loaded 2-core machine two intra-op
    # threads spin against each other: a 64x128 linear took 8 ms with 2 threads, 7 us with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _graft(family: str, mode: str = "parallel", layers=(1,), seed: int = 0, **mem):
    base = build_tiny_model(family, seed)
    torch.manual_seed(seed + 1)
    model = graft_model(base, MemoryConfig.build(**{**MEM, **mem}), list(layers), mode)
    return base, model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def _mlp(model, i: int):
    return model.model.layers[i].mlp


def _disk_keys(directory: Path) -> list[str]:
    """Every tensor name stored in the directory's safetensors files (read from the headers)."""
    names = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names += list(fh.keys())
    return names


# ---- graft -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_values_graft_preserves_function(family):
    base, model = _graft(family, layers=(0, 1))
    ref = _logits(base)
    assert _maxdiff(_logits(model), ref) > 1e-3  # random memory: the memory path is live
    model.memory_bank.values.zero_()
    assert _maxdiff(_logits(model), ref) <= TOL
    # names, sharing and the config block
    assert type(model).__name__ == "MemsurgeryForCausalLM"
    assert isinstance(model, type(base))
    assert model.config.model_type == f"memsurgery_{base.config.model_type}"
    assert is_grafted_config(model.config.to_dict()) and not is_grafted_config(
        base.config.to_dict()
    )
    block = model.config.memory
    assert (
        block["layers"] == [0, 1] and block["mode"] == "parallel" and block["format_version"] == 1
    )
    assert block["config"]["input_dim"] == base.config.hidden_size
    base_state, state = base.state_dict(), model.state_dict()
    for name, t in base_state.items():  # same names, same storage: nothing copied
        assert state[name].data_ptr() == t.data_ptr(), name
    assert sorted(k for k in state if k not in base_state) == sorted(
        f"memory_bank.{k}" for k in model.memory_bank.state_dict()
    )
    assert set(memory_layers(model)) == {0, 1}
    assert not hasattr(_mlp(base, 0), "_memsurgery_memory")  # the base keeps working as before
    if base.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_output_graft_preserves_function(family):
    base, model = _graft(family, layers=(0,), gate="relevance")
    for layer in memory_layers(model).values():
        layer.zero_output_()
    assert _maxdiff(_logits(model), _logits(base)) <= TOL


def test_replace_mode_drops_mlp_weights_and_changes_function():
    base, model = _graft("llama", mode="replace", layers=(1,))
    state = model.state_dict()
    assert not any(k.startswith("model.layers.1.mlp.") for k in state)
    assert any(k.startswith("model.layers.0.mlp.") for k in state)
    assert _maxdiff(_logits(model), _logits(base)) > 1e-3
    mlp = _mlp(model, 1)
    assert type(mlp).__name__ == "MemoryMLP" and not list(mlp.parameters())


def test_gradients_reach_zero_initialized_memory():
    _, model = _graft("llama", layers=(0, 1))
    model.memory_bank.values.zero_()
    for layer in memory_layers(model).values():
        layer.sparse_grad = False
    model(IDS, labels=IDS).loss.backward()
    assert model.memory_bank.values.weight.grad.abs().sum() > 0

    _, model = _graft("llama", layers=(0,))
    layer = memory_layers(model)[0]
    layer.zero_output_()
    model(IDS, labels=IDS).loss.backward()
    assert layer.out_proj.weight.grad.abs().sum() > 0
    grad = model.memory_bank.values.weight.grad  # sparse by default: W_o = 0 gives zero rows
    assert grad is not None and grad.is_sparse


def test_deepcopy_keeps_sharing_and_models_do_not_share_tables():
    _, model = _graft("llama", layers=(0, 1))
    clone = copy.deepcopy(model)
    for i, layer in memory_layers(clone).items():
        assert _mlp(clone, i).__dict__["_memsurgery_memory"] is layer
        assert layer.value_table is clone.memory_bank.values
    assert clone.memory_bank.values.weight.data_ptr() != model.memory_bank.values.weight.data_ptr()
    before = _logits(model)
    clone.memory_bank.values.zero_()
    assert _maxdiff(_logits(model), before) == 0  # the original's memory is untouched
    assert list(clone.state_dict()) == list(model.state_dict())

    _, other = _graft("llama", layers=(0, 1), seed=1)
    assert other.memory_bank.values.weight.data_ptr() != model.memory_bank.values.weight.data_ptr()
    assert memory_layers(other)[0].value_table is other.memory_bank.values


def test_to_and_load_state_dict_keep_memory_bound():
    _, model = _graft("qwen3", layers=(0, 1))
    ref = _logits(model)
    model.to(torch.float64)
    assert model.memory_bank.values.weight.dtype == torch.float64
    # fp64 is exact at this scale; the fp32 logits are off by their own rounding error
    chain = forward_chain(TINY_CONFIGS["qwen3"], IDS.shape[1], MEM)
    assert_close_normwise(_logits(model).float(), ref, reorder_rtol(chain), "fp64 vs fp32 logits")
    model.to(torch.float32)
    _, fresh = _graft("qwen3", layers=(0, 1), seed=5)
    fresh.load_state_dict(model.state_dict())
    assert _maxdiff(_logits(fresh), ref) <= TOL
    fresh.load_state_dict(model.state_dict(), assign=True)
    assert memory_layers(fresh)[1].value_table is fresh.memory_bank.values
    assert _maxdiff(_logits(fresh), ref) <= TOL


def test_fp32_memory_in_a_bf16_model():
    base = build_tiny_model("llama").to(torch.bfloat16)
    model = graft_model(base, MemoryConfig.build(**MEM), [1], "parallel")
    assert memory_layers(model)[1].query.weight.dtype == torch.float32
    assert _logits(model).dtype == torch.bfloat16


def test_generate_with_and_without_cache_agree():
    _, model = _graft("llama", layers=(0, 1))
    ids = IDS[:1, :5]
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, plain)


def test_graft_input_errors():
    from memsurgery.errors import InputError

    base = build_tiny_model("llama")
    cfg = MemoryConfig.build(**MEM)
    with pytest.raises(InputError, match="out of range"):
        graft_model(base, cfg, [2], "parallel")
    with pytest.raises(InputError, match="mode"):
        graft_model(base, cfg, [0], "beside")
    with pytest.raises(InputError, match="input_dim"):
        graft_model(base, MemoryConfig.build(**MEM, input_dim=48), [0], "parallel")
    model = graft_model(base, cfg, [0], "parallel")
    with pytest.raises(InputError, match="already grafted"):
        graft_model(model, cfg, [1], "parallel")


# ---- save / load in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def registered():
    return register_all()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_in_process(family, tmp_path, registered):
    from transformers import AutoModelForCausalLM

    _, model = _graft(family, layers=(0, 1), gate="relevance", gate_bias_init=1.0)
    ref = _logits(model)
    files = save_grafted(
        model, tmp_path, extra_files={"graft.json": "{}\n", "notes/x.bin": b"\x00"}
    )
    assert {
        "config.json",
        "configuration_memsurgery.py",
        "modeling_memsurgery.py",
        "model.safetensors",
        "generation_config.json",
        "graft.json",
        "notes/x.bin",
    } <= set(files)
    assert (tmp_path / "notes" / "x.bin").read_bytes() == b"\x00"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == f"memsurgery_{model.config.base_model_type}"
    assert cfg["architectures"] == ["MemsurgeryForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_memsurgery.MemsurgeryForCausalLM"
    assert "quantization_config" not in cfg and cfg["memory"] == model.config.memory
    assert (
        f'BASE_MODEL_TYPE = "{model.config.base_model_type}"'
        in (tmp_path / "modeling_memsurgery.py").read_text()
    )
    disk = _disk_keys(tmp_path)
    assert disk.count("memory_bank.values.weight") == 1
    assert list(model.state_dict()).count("memory_bank.values.weight") == 1

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _maxdiff(_logits(loaded), ref) <= TOL
    assert memory_layers(loaded)[0].value_table is loaded.memory_bank.values


def test_sharded_save_and_save_pretrained(tmp_path, registered):
    from transformers import AutoModelForCausalLM

    _, model = _graft("gemma2", mode="replace", layers=(1,))
    ref = _logits(model)
    files = save_grafted(model, tmp_path / "sharded", max_shard_size="20KB")
    assert "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]).count("memory_bank.values.weight") == 1
    assert not any(k.startswith("model.layers.1.mlp.") for k in index["weight_map"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", trust_remote_code=True)
    assert type(loaded) is type(model)  # registered classes win over the checkpoint's copy
    assert _maxdiff(_logits(loaded), ref) <= TOL

    # transformers' own save_pretrained also writes a complete checkpoint
    loaded.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "modeling_memsurgery.py").exists()
    assert _disk_keys(tmp_path / "hf").count("memory_bank.values.weight") == 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert _maxdiff(_logits(again), ref) <= TOL


def test_missing_memory_weights_get_reference_init(tmp_path, registered):
    from transformers import AutoModelForCausalLM

    _, model = _graft("llama", gate="relevance")
    save_grafted(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    drop = (
        "memory_bank.values.weight",
        "memory_bank.layers.1.keys",
        "memory_bank.layers.1.gate_bias",
    )
    save_file(
        {k: v for k, v in state.items() if k not in drop},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(drop)
    layer, orig = memory_layers(loaded)[1], memory_layers(model)[1]
    assert torch.equal(layer.query.weight, orig.query.weight)  # loaded ones are left alone
    assert 0 < layer.keys.abs().max() <= MEM["k_dim"] ** -0.5  # U(+-1/sqrt(k_dim))
    assert layer.gate_bias.item() == -4.0
    assert abs(loaded.memory_bank.values.weight.std().item() - 64**-0.5) < 0.02


def test_load_grafted(tmp_path):
    from memsurgery.errors import InputError
    from memsurgery.export.hf import load_grafted

    base, model = _graft("qwen2")
    save_grafted(model, tmp_path / "g")
    assert _maxdiff(_logits(load_grafted(tmp_path / "g")), _logits(model)) <= TOL
    base.save_pretrained(tmp_path / "plain")
    with pytest.raises(InputError, match="not a grafted checkpoint"):
        load_grafted(tmp_path / "plain")


def test_gemma3_multimodal_graft(tmp_path, registered):
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 300,
        "max_position_embeddings": 128,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    torch.manual_seed(0)
    base = Gemma3ForConditionalGeneration(cfg).eval()
    model = graft_model(base, MemoryConfig.build(**MEM), [1], "parallel")
    assert model.config.memory["layers_path"] == "model.language_model.layers"
    model.memory_bank.values.zero_()
    assert _maxdiff(_logits(model), _logits(base)) <= TOL
    model.memory_bank.values.reset_parameters()
    ref = _logits(model)
    save_grafted(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, Gemma3ForConditionalGeneration)
    assert _maxdiff(_logits(loaded), ref) <= TOL


def test_save_grafted_rejects_bad_extra_files(tmp_path):
    from memsurgery.errors import InputError

    _, model = _graft("llama")
    for name in ("../x", "/abs", "config.json"):
        with pytest.raises(InputError):
            save_grafted(model, tmp_path / "o", extra_files={name: "x"})


# ---- the self-contained file: fallback and remote code ---------------------------------


def _import_written_files(directory: Path):
    """Import a checkpoint's two code files as a fresh package, with memsurgery disabled."""
    pkg = f"_ms_remote_{uuid.uuid4().hex[:8]}"
    root = directory.parent / (pkg + "_root")
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    for name in ("configuration_memsurgery.py", "modeling_memsurgery.py"):
        (root / pkg / name).write_text((directory / name).read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMSURGERY_REMOTE_FALLBACK", "1")  # read once, at import
        mp.syspath_prepend(str(root))
        return importlib.import_module(f"{pkg}.modeling_memsurgery")


@pytest.fixture(scope="module")
def fallback_module(tmp_path_factory):
    from memsurgery.export.modeling_memsurgery import write_code_files

    directory = tmp_path_factory.mktemp("code") / "ckpt"
    directory.mkdir()
    write_code_files(directory, "llama")
    mod = _import_written_files(directory)
    assert not mod.USING_MEMSURGERY
    return mod


@pytest.mark.parametrize(
    "mem",
    [
        {},
        {"qk_norm": False},
        {"swilu": False, "gate": "relevance"},
        {"score_scale": 0.7, "gate": "relevance", "gate_bias_init": 0.5},
        {"value_dtype": "bfloat16"},
        {"v_dim": 24},
    ],
)
def test_fallback_layer_equals_memsurgery(mem, fallback_module):
    mod = fallback_module
    torch.manual_seed(0)
    cfg = MemoryConfig.build(**{**MEM, **mem}).for_model(32)
    bank = MemoryBank.from_config(cfg)
    bank.add_layer("3")
    with torch.no_grad():  # exercise the gate's weight, not only its bias
        for p in bank.parameters():
            if p.dim() == 1:
                p.normal_()
    plain = mod.PlainMemoryBank(mod.PlainMemorySettings(cfg.model_dump()))
    plain.add_layer("3")
    assert [(k, v.shape, v.dtype) for k, v in plain.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in bank.state_dict().items()
    ]
    plain.load_state_dict(bank.state_dict())
    x = torch.randn(3, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    bank["3"].sparse_grad = False
    ref, out = bank["3"](x), plain["3"](x2)
    # Two implementations of one layer: they differ in the order of their fp32 sums only.
    # Forward: the layer's chain of sums; backward: that chain again, plus the sum over the
    # batch's 21 tokens for a parameter's gradient (tests/numerics.py). A bf16 table is
    # rounded to bf16 before it is read: that rounding is shared, so bf16 adds nothing here.
    chain = memory_chain(32, {**MEM, **mem})
    assert_close_normwise(out, ref, reorder_rtol(chain), "output")
    ref.square().sum().backward()
    out.square().sum().backward()
    assert_close_normwise(x2.grad, x.grad, reorder_rtol(2 * chain), "input grad")
    for (name, p), q in zip(bank.named_parameters(), plain.parameters()):
        if p.dtype == torch.float32:
            assert_close_normwise(q.grad, p.grad, reorder_rtol(2 * chain, 21), name)
        else:  # a bf16 table's gradient is rounded to bf16: memsurgery once per row, autograd per pick
            assert _maxdiff(q.grad.float(), p.grad.float()) <= 2**-7 * p.grad.float().abs().max().item(), name
    plain["3"].sparse_grad = True  # the fallback can give a row-sparse table gradient too
    plain.zero_grad()
    plain["3"](x2).sum().backward()
    assert plain.values.weight.grad.is_sparse


@pytest.mark.parametrize(
    "mem",
    [{}, {"qk_norm": False}, {"swilu": False, "gate": "relevance"}, {"score_scale": 0.7, "gate_bias_init": 0.5},
     {"value_dtype": "bfloat16", "v_dim": 24, "gate": "relevance"}],
)
def test_fallback_copies_stay_equal(mem, fallback_module):
    """The remote-code file repeats memsurgery's settings rules and reference init (it must run
    without memsurgery): the copies give the same score scale, table dtype and initial weights."""
    mod = fallback_module
    cfg = MemoryConfig.build(**{**MEM, **mem}).for_model(32)
    settings = mod.PlainMemorySettings(cfg.model_dump())
    assert settings.effective_score_scale == cfg.effective_score_scale
    assert settings.torch_value_dtype == cfg.torch_value_dtype
    bank = MemoryBank.from_config(cfg)
    plain = mod.PlainMemoryBank(settings)
    for b in (bank, plain):
        b.add_layer("3")
        torch.manual_seed(1)
        b["3"].reset_parameters()
    ours, theirs = bank["3"].state_dict(), plain["3"].state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fallback_model_equals_in_process_model(tmp_path):
    _, model = _graft("gemma3_text", layers=(0, 1), gate="relevance", gate_bias_init=2.0)
    save_grafted(model, tmp_path / "ckpt")
    mod = _import_written_files(tmp_path / "ckpt")
    assert not mod.USING_MEMSURGERY
    loaded = mod.MemsurgeryForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert type(loaded.memory_bank).__name__ == "PlainMemoryBank"
    # Two implementations of the memory layers in one model: the order of their sums differs.
    chain = forward_chain(TINY_CONFIGS["gemma3_text"], IDS.shape[1], MEM)
    assert_close_normwise(_logits(loaded), _logits(model), reorder_rtol(chain), "logits")


_CHILD = r"""
import json, socket, sys
attempts = []
def _refuse(*a, **k):
    attempts.append(repr(a)[:200])
    raise OSError("network disabled in this test")
socket.socket.connect = _refuse
socket.create_connection = _refuse

class _NoMemsurgery:
    # The venv has memsurgery installed (editable): make it unimportable, as on a user's machine.
    def find_spec(self, name, path=None, target=None):
        if name == "memsurgery" or name.startswith("memsurgery."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoMemsurgery())
try:
    import memsurgery  # noqa: F401
    sys.exit("memsurgery is importable in the child")
except ModuleNotFoundError:
    pass

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

dirs, ids_file, out_file = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
from safetensors.torch import load_file
ids = load_file(ids_file)["ids"]
out, kinds = {}, {}
for d in dirs:
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    with torch.no_grad():
        out[d.rsplit("/", 1)[-1]] = m(ids).logits.contiguous()
    kinds[d] = [type(m).__name__, type(m).__module__, type(m.memory_bank).__name__]
save_file(out, out_file)
print(json.dumps({"kinds": kinds, "attempts": attempts, "memsurgery_loaded": "memsurgery" in sys.modules}))
"""


def test_remote_code_without_memsurgery(tmp_path):
    refs, dirs = {}, []
    for family in FAMILIES:  # one child process loads them all
        mode = "replace" if family in ("phi3", "gemma2") else "parallel"
        _, model = _graft(family, mode=mode, layers=(0, 1), gate="relevance", gate_bias_init=1.0)
        save_grafted(model, tmp_path / family)
        refs[family] = _logits(model)
        dirs.append(str(tmp_path / family))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            textwrap.dedent(_CHILD),
            ",".join(dirs),
            str(tmp_path / "ids.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and not report["memsurgery_loaded"]
    for d, (name, module, bank) in report["kinds"].items():
        assert name == "MemsurgeryForCausalLM" and bank == "PlainMemoryBank", d
        assert module.startswith("transformers_modules."), module
    assert (tmp_path / "modules" / "transformers_modules").is_dir()
    out = load_file(str(tmp_path / "out.safetensors"))
    for family, ref in refs.items():
        assert _maxdiff(out[family], ref) <= TOL, family
