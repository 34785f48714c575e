"""Training recipes: validation (every error, by key path), --set overrides, shipped recipes, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from memsurgery.errors import InputError
from memsurgery.train.recipe import (
    Recipe,
    apply_overrides,
    build_recipe,
    load_recipe,
    parse_override,
)
from tests.cli import run_cli as _run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = ["continued-pretrain.yaml", "knowledge-injection.yaml", "sparse-memory-finetune.yaml",
           "full-finetune.yaml", "lora.yaml"]

BASE = {"model": "m", "output_dir": "o", "data": {"train": "t.txt"}}


def test_all_errors_at_once_with_key_paths():
    bad = {**BASE, "data": {"train": "t.txt", "fromat": "qa", "seq_len": 1},
           "train": {"method": "magic", "steps": 0},
           "optim": {"groups": {"values": {"lr": 1e-2, "weight_decay": 0.1}}}}
    with pytest.raises(InputError) as exc:
        build_recipe(bad, "r.yaml")
    msg = str(exc.value)
    for needle in ("data.fromat: unknown key", "data.seq_len", "train.method", "train.steps",
                   "optim.groups.values.weight_decay: must be 0"):
        assert needle in msg, msg
    assert "\n" not in msg and msg.startswith("r.yaml: ")


def test_missing_required_keys_named():
    with pytest.raises(InputError) as exc:
        build_recipe({"data": {}})
    msg = str(exc.value)
    assert "model: required key is missing" in msg and "output_dir" in msg and "data.train" in msg


def test_overrides_parse_yaml_values_and_create_keys():
    data = apply_overrides(BASE, ["train.steps=7", "optim.groups.values.lr=1e-2", "data.packing=false",
                                  "lora.target_modules=[q_proj, v_proj]", "output_dir=runs/x"])
    r = build_recipe(data)
    assert r.train.steps == 7 and r.optim.groups.values.lr == pytest.approx(0.01)
    assert r.data.packing is False and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.output_dir == "runs/x" and BASE["output_dir"] == "o"  # the input is not mutated
    assert parse_override("a.b=") == (["a", "b"], "")
    for bad in ("noequals", "=3", "a..b=1"):
        with pytest.raises(InputError, match="--set"):
            parse_override(bad)
    with pytest.raises(InputError, match="train.steps: Input should be a valid integer"):
        build_recipe(apply_overrides(BASE, ["train.steps=many"]))
    with pytest.raises(InputError, match="is not a mapping"):
        apply_overrides(BASE, ["model.x=1"])


def test_cross_field_rules():
    with pytest.raises(InputError, match="base.lr must be 0 for method memory"):
        build_recipe({**BASE, "optim": {"groups": {"base": {"lr": 1e-5}}}})
    with pytest.raises(InputError, match="answer_only_loss needs format: qa"):
        build_recipe({**BASE, "data": {"train": "t", "answer_only_loss": True}})
    with pytest.raises(InputError, match="one_fact_per_sequence"):
        build_recipe({**BASE, "data": {"train": "t", "one_fact_per_sequence": True}})
    with pytest.raises(InputError, match="data.eval and eval.heldout_fraction"):
        build_recipe({**BASE, "data": {"train": "t", "eval": "e"}, "eval": {"heldout_fraction": 0.1}})
    with pytest.raises(InputError, match="memory_parallel: must be at least 1"):
        build_recipe({**BASE, "memory_parallel": 0})
    with pytest.raises(InputError, match="fsdp: true shards the trained base, so it needs train.method full"):
        build_recipe({**BASE, "fsdp": True})
    build_recipe({**BASE, "fsdp": True, "train": {"method": "full"}})


def test_resolved_writes_method_defaults():
    r = build_recipe({**BASE, "train": {"method": "full"}, "optim": {"groups": {"norms": {"lr": 3e-6}}}})
    res = r.resolved()
    assert res.optim.groups.base.lr == 1e-5 and res.optim.groups.norms.lr == 3e-6
    assert res.optim.groups.values.lr == 0.0
    again = Recipe.model_validate(__import__("yaml").safe_load(res.to_yaml()))
    assert again == res


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_parse_and_say_how_to_launch(name):
    path = RECIPES / name
    first = path.read_text().splitlines()[:4]
    assert first[0].startswith("#")
    assert any("memsurgery train recipes/" + name in line for line in first), first
    r = load_recipe(path)
    assert r.resolved().train.steps > 0


def test_cli_bad_recipes_exit_2_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\noutput_dir: o\ndata: {train: t.txt, formt: qa}\ntrain: {steps: -1}\n")
    code, _, err = _run(["train", str(bad)], capsys)
    assert code == 2 and "data.formt: unknown key" in err and "train.steps" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    code, _, err = _run(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "no such recipe file" in err

    bad.write_text("model: [unclosed\n")
    code, _, err = _run(["train", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1

    good = tmp_path / "ok.yaml"
    good.write_text("model: m\noutput_dir: o\ndata: {train: t.txt}\n")
    code, _, err = _run(["train", str(good), "--set", "train.method=sideways"], capsys)
    assert code == 2 and "train.method" in err and len(err.strip().splitlines()) == 1
