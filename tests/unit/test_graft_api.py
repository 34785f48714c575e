"""`memsurgery graft` end to end on tiny checkpoints: function preservation, output format, bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from memsurgery.errors import InputError
from tests.cli import run_cli as _run
from tests.tiny import make_tiny_checkpoint_with_tokenizer

SMALL = dict(slots=256, heads=2, knn=4, k_dim=16, calib_tokens=2048, heldout_tokens=1024, seq_len=64,
             kmeans_iters=5)


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = "the memory layer stores facts about people places and things in many slots".split()
    paras = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(60)]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return {mt: make_tiny_checkpoint_with_tokenizer(mt, tmp_path_factory.mktemp(mt) / "src")
            for mt in ("llama", "gemma2", "qwen3")}


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3"])
def test_parallel_graft_preserves_function(tiny_src, calib_txt, tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from memsurgery.graft import graft
    from memsurgery.export.hf import load_grafted

    out = tmp_path / "g"
    model, report = graft(tiny_src[model_type], out, calib=str(calib_txt), **SMALL)
    assert report["check"]["max_abs_logit_diff_vs_base"] <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(tiny_src[model_type]).eval()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    reloaded = load_grafted(out).eval()
    with torch.no_grad():
        b = base(ids).logits
        assert (reloaded(ids).logits - b).abs().max() <= 1e-5
    # The memory is live: a loss on the grafted model sends gradient into the value table.
    reloaded.train()
    for _, layer in reloaded.memory_bank:
        layer.sparse_grad = False
    loss = reloaded(ids, labels=ids).loss
    loss.backward()
    g = reloaded.memory_bank.values.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_graft_output_format(tiny_src, calib_txt, tmp_path):
    from memsurgery.graft import graft

    out = tmp_path / "g"
    _, report = graft(tiny_src["llama"], out, calib=str(calib_txt), layers=[1], **SMALL)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "configuration_memsurgery.py", "modeling_memsurgery.py", "graft.json",
            "README.md", "tokenizer.json", "generation_config.json", "model.safetensors"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["memory"]["layers"] == [1] and cfg["memory"]["mode"] == "parallel"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_memsurgery.")
    meta = json.loads((out / "graft.json").read_text())
    assert len(meta["source_sha256"]) == 64 and meta["plan"]["slots"] == 256
    assert set(meta["usage"]["1"]) == {"random", "faiss"}
    assert {"torch", "transformers", "faiss", "memsurgery"} <= set(meta["versions"])
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert [k for k in header if k.endswith("values.weight")] == ["memory_bank.values.weight"]
    assert (out / "README.md").read_text().startswith("---\n")


def test_replace_mode_removes_ffn(tiny_src, calib_txt, tmp_path):
    from memsurgery.graft import graft

    model, report = graft(tiny_src["llama"], tmp_path / "r", calib=str(calib_txt), mode="replace",
                          values="zero", layers=[0], **SMALL)
    assert not any(k.startswith("model.layers.0.mlp.") for k in model.state_dict())
    assert any(k.startswith("model.layers.1.mlp.") for k in model.state_dict())
    assert report["check"]["ppl_ratio"] > 0 and report["check"]["max_abs_logit_diff_vs_base"] > 0


def test_refuses_already_grafted(tiny_src, calib_txt, tmp_path, capsys):
    from memsurgery.graft import graft

    graft(tiny_src["llama"], tmp_path / "g", calib=str(calib_txt), layers=[0], **SMALL)
    code, _, err = _run(["graft", str(tmp_path / "g"), str(tmp_path / "g2")], capsys)
    assert code == 2 and "already grafted" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g2").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--layers", "0,9"], "--layers"),
    (["--slots", "1000"], "--slots"),
    (["--knn", "99", "--slots", "256"], "--knn"),
    (["--mode", "sideways"], "--mode"),
    (["--values", "distill"], "--values distill"),
])
def test_bad_flags(tiny_src, tmp_path, capsys, argv, needle):
    code, _, err = _run(["graft", str(tiny_src["llama"]), str(tmp_path / "o"), *argv], capsys)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_ram_check_refuses_with_numbers(tiny_src, tmp_path, monkeypatch, capsys):
    import psutil

    class Tiny:
        available = 1 << 20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    code, _, err = _run(["graft", str(tiny_src["llama"]), str(tmp_path / "o"), "--slots", "1M"], capsys)
    assert code == 2 and "GiB" in err and "--force" in err
    assert not (tmp_path / "o").exists()


def test_plan_file_and_flag_override(tiny_src, calib_txt, tmp_path, capsys):
    plan = tmp_path / "graft.yaml"
    plan.write_text("slots: 256\nheads: 2\nknn: 4\nk-dim: 16\ncalib_tokens: 2048\nheldout_tokens: 1024\n"
                    f"seq_len: 64\nkmeans_iters: 3\nlayers: [0]\ncalib: {calib_txt}\n")
    code, out, err = _run(["graft", str(tiny_src["llama"]), str(tmp_path / "o"), "--plan", str(plan),
                           "--layers", "1", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == [1] and report["plan"]["heads"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("slotz: 5\n")
    code, _, err = _run(["graft", str(tiny_src["llama"]), str(tmp_path / "o2"), "--plan", str(bad)], capsys)
    assert code == 2 and "slotz" in err


def test_source_never_modified(tiny_src, calib_txt, tmp_path):
    from memsurgery.graft import graft

    before = {p.name: p.read_bytes() for p in tiny_src["qwen3"].iterdir()}
    graft(tiny_src["qwen3"], tmp_path / "g", calib=str(calib_txt), layers=[0], **SMALL)
    assert {p.name: p.read_bytes() for p in tiny_src["qwen3"].iterdir()} == before


def test_api_without_output_returns_model(tiny_src, calib_txt):
    from memsurgery.graft import graft

    model, report = graft(tiny_src["llama"], None, calib=str(calib_txt), layers=[0], keys="random",
                          **SMALL)
    assert report["usage"]["0"]["faiss"] is None and "memory_bank.values.weight" in model.state_dict()
    with pytest.raises(InputError):
        graft(tiny_src["llama"], None, calib=str(calib_txt), layers=[5], **SMALL)


@pytest.mark.parametrize("order", ["memsurgery-first", "transformers-first"])
def test_import_memsurgery_registers_for_plain_from_pretrained(tiny_src, calib_txt, tmp_path, order):
    """After `import memsurgery`, plain from_pretrained loads a grafted dir without remote code."""
    import subprocess
    import sys

    from memsurgery.graft import graft

    graft(tiny_src["llama"], tmp_path / "g", calib=str(calib_txt), layers=[0], **SMALL)
    imports = ["import memsurgery", "from transformers import AutoModelForCausalLM"]
    if order == "transformers-first":
        imports.reverse()
    code = "\n".join(imports + [
        "import warnings; warnings.simplefilter('error', UserWarning)",
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'g')!r}, trust_remote_code=False)",
        "print(type(m).__module__)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("memsurgery.")


def test_replace_distill_fits_all_layers_jointly(tiny_src, calib_txt, tmp_path):
    from memsurgery.graft import graft

    common = dict(calib=str(calib_txt), mode="replace", layers=[0, 1], **SMALL)
    _, zero = graft(tiny_src["llama"], None, values="zero", **common)
    model, rep = graft(tiny_src["llama"], None, values="distill", distill_steps=40, **common)
    info = rep["distill"]
    # One joint fit over both layers (they share the value table), not one per layer.
    assert info["steps"] == 40 and set(info["layers"]) == {"0", "1"}
    for layer in info["layers"].values():
        assert layer["heldout_fve_final"] > 0.0
    assert rep["check"]["ppl_ratio"] < zero["check"]["ppl_ratio"]
