"""The memory adapter: a memory-only run exported as the memory alone, loaded back onto its base
with the same logits; refused when training changed the base or the base is another model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from memsurgery.errors import InputError
from tests.cli import run_cli

IDS = (torch.arange(40) * 37 % 256)[None]


def _trained_run(assets, root, *, touch_base=False):
    """A run directory whose final/ is the tiny graft with written value rows (a memory-only run),
    or, with touch_base, one whose base weights changed too (a full-finetuning run)."""
    from memsurgery.export import hf

    model = hf.load_grafted(assets["grafted"]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = torch.randperm(256, generator=g)[:40]
        model.memory_bank.values.weight[rows] = torch.randn(40, 64, generator=g)
        if touch_base:
            model.model.norm.weight.add_(0.01)
    run = root / "run"
    hf.save_grafted(model, run / "final", extra_files={"graft.json": (assets["grafted"] / "graft.json").read_text()})
    shutil.copy(assets["grafted"] / "tokenizer.json", run / "final" / "tokenizer.json")
    (run / "summary.json").write_text(json.dumps({"steps": 5}))
    return run, model


def test_round_trip_same_logits_and_a_fraction_of_the_size(assets, tmp_path):
    from memsurgery.export import export, load_memory_adapter

    run, trained = _trained_run(assets, tmp_path)
    out = tmp_path / "adapter"
    prov = export(run, out, format="memory-adapter")  # base found through graft.json's source
    assert prov["format"] == "memory-adapter" and prov["verification"]["max_abs_logit_diff"] == 0.0
    names = {p.name for p in out.iterdir()}
    assert {"memory_adapter.safetensors", "memory_adapter.json", "README.md", "SHA256SUMS"} <= names
    assert not any(n.endswith(".safetensors") and n != "memory_adapter.safetensors" for n in names)
    meta = json.loads((out / "memory_adapter.json").read_text())
    assert meta["base_weights_sha256"] == json.loads((assets["grafted"] / "graft.json").read_text())["source_sha256"]
    assert meta["memory"]["layers"] == [1] and meta["parameters"] == sum(
        v.numel() for k, v in trained.state_dict().items() if k.startswith("memory_bank."))
    # a delta: the adapter holds the memory, not the base
    dense_bytes = sum(p.stat().st_size for p in assets["dense"].glob("*.safetensors"))
    assert (out / "memory_adapter.safetensors").stat().st_size < 0.5 * dense_bytes
    again = load_memory_adapter(assets["dense"], out)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, trained(IDS).logits)
    card = (out / "README.md").read_text()
    # a local base has no Hub id: no base_model in the front matter (with one, it is an "adapter" relation)
    assert "library_name: memsurgery" in card and "base_model" not in card.split("---")[1]
    assert str(tmp_path) not in card


def test_cli_adapter_then_merged_checkpoint_from_it(assets, tmp_path, capsys):
    from memsurgery.export import hf

    run, trained = _trained_run(assets, tmp_path)
    code, out, err = run_cli(["export", str(run), str(tmp_path / "a"), "--format", "memory-adapter",
                              "--base", str(assets["dense"]), "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", str(tmp_path / "a"), str(tmp_path / "merged"), "--base",
                              str(assets["dense"]), "--json"], capsys)
    assert code == 0, err
    prov = json.loads(out)
    assert prov["grafted"] and prov["verification"]["max_abs_logit_diff"] <= prov["verification"]["tolerance"]
    merged = hf.load_grafted(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(merged(IDS).logits, trained(IDS).logits)


def test_refused_when_training_changed_the_base(assets, tmp_path, capsys):
    run, _ = _trained_run(assets, tmp_path, touch_base=True)
    code, _, err = run_cli(["export", str(run), str(tmp_path / "a"), "--format", "memory-adapter"], capsys)
    assert code == 2 and "model.norm.weight" in err and "--format merged" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_another_base_is_refused_unless_asked(assets, tmp_path):
    from memsurgery.export import export, load_memory_adapter
    from tests.tiny import make_tiny_checkpoint_with_tokenizer

    run, trained = _trained_run(assets, tmp_path)
    export(run, tmp_path / "a", format="memory-adapter", verify=False)
    other = make_tiny_checkpoint_with_tokenizer("llama", tmp_path / "other", seed=5)  # same shapes, other weights
    with pytest.raises(InputError, match="SHA-256"):
        load_memory_adapter(other, tmp_path / "a")
    model = load_memory_adapter(other, tmp_path / "a", check_base=False)
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, trained(IDS).logits)
    with pytest.raises(InputError, match="SHA-256"):
        export(run, tmp_path / "b", format="memory-adapter", base=other)
    with pytest.raises(InputError, match="not a memory adapter"):
        load_memory_adapter(assets["dense"], assets["grafted"])
