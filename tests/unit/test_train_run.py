"""`memsurgery train` on a tiny grafted llama: methods, frozen base, sparse rows, checkpoints, errors."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from memsurgery.errors import InputError, MissingDependency, RuntimeFailure
from tests.cli import run_cli as _run_cli
from tests.train_assets import tiny_recipe

pytestmark = pytest.mark.usefixtures("train_cache")

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
def _params(path):
    from memsurgery.export.hf import load_grafted

    return {k: v.clone() for k, v in load_grafted(path).state_dict().items()}


def test_memory_training_leaves_base_bit_identical(assets, tmp_path):
    from memsurgery.train import run

    before = _params(assets["grafted"])
    summary = run(tiny_recipe(assets, tmp_path / "run", **{"optim.groups.norms.lr": 0.0}), log=lambda m: None)
    after = _params(summary["final_dir"])
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "memory_bank.values.weight" in changed and any(".query." in k for k in changed)
    assert all(k.startswith("memory_bank.") for k in changed), sorted(changed)[:5]
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "usage_kl" in r]
    assert [r["step"] for r in logged] == [2, 4] and all(0 < r["pct_used"] <= 100 for r in logged)
    assert all(r["slots_touched"] > 0 for r in recs if "loss" in r)
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "lr: 0.001" in saved  # the resolved recipe: method defaults written out


def test_sparse_step_updates_only_top_t_rows(assets, tmp_path):
    from memsurgery.train import run

    before = _params(assets["grafted"])
    rec = tiny_recipe(assets, tmp_path / "run", **{
        "train.method": "sparse_memory", "train.steps": 1, "optim.value_optimizer": "sgd",
        "optim.groups.values.lr": 1.0, "sparse.top_t": 8, "sparse.background": str(assets["text"]),
        "sparse.background_tokens": 512, "sparse.background_seq_len": 32})
    summary = run(rec, log=lambda m: None)
    after = _params(summary["final_dir"])
    v0, v1 = before["memory_bank.values.weight"], after["memory_bank.values.weight"]
    rows = (v0 != v1).any(dim=1).nonzero().flatten()
    assert 0 < rows.numel() <= 8
    assert torch.equal(v0[(v0 == v1).all(dim=1)], v1[(v0 == v1).all(dim=1)])
    assert all(torch.equal(before[k], after[k]) for k in before if k != "memory_bank.values.weight")
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["slots_updated"] == rows.numel() and m["slots_touched"] > 8


def test_schedule_keeps_group_ratios():
    from memsurgery.train.params import schedule_multiplier
    from memsurgery.train.recipe import ScheduleSpec

    cos = ScheduleSpec(kind="cosine", warmup_steps=2)
    vals = [schedule_multiplier(cos, s, 10) for s in range(10)]
    assert vals[0] == 0.5 and vals[1] == 1.0 and vals[2] == 1.0 and vals[-1] < 0.05
    assert all(a >= b for a, b in itertools.pairwise(vals[1:]))
    lin = ScheduleSpec(kind="linear", min_lr_ratio=0.1)
    assert schedule_multiplier(lin, 0, 10) == 1.0 and schedule_multiplier(lin, 10, 10) == pytest.approx(0.1)
    assert schedule_multiplier(ScheduleSpec(kind="constant"), 7, 10) == 1.0


def test_lrs_logged_keep_ratio(assets, tmp_path):
    from memsurgery.train import run

    run(tiny_recipe(assets, tmp_path / "run", **{"optim.schedule.warmup_steps": 2}), log=lambda m: None)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        lrs = json.loads(line).get("lrs")
        if lrs:
            assert lrs["query"] / lrs["values"] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["continued-pretrain.yaml", "knowledge-injection.yaml",
                                  "sparse-memory-finetune.yaml", "full-finetune.yaml", "lora.yaml"])
def test_each_shipped_recipe_runs_a_few_steps(assets, tmp_path, capsys, name):
    dense = name in ("full-finetune.yaml", "lora.yaml")
    # continued-pretrain reads raw text; every other shipped recipe trains on structured facts
    data = assets["text"] if name == "continued-pretrain.yaml" else assets["facts"]
    argv = ["train", str(RECIPES / name), "--set", f"model={assets['dense' if dense else 'grafted']}",
            "--set", f"output_dir={tmp_path / 'run'}", "--set", f"data.train={data}",
            "--set", "data.seq_len=96", "--set", "train.steps=2", "--set", "train.batch_size=2",
            "--set", "checkpoint.every=1", "--set", "log.progress=off"]
    if name == "sparse-memory-finetune.yaml":
        argv += ["--set", f"sparse.background={assets['text']}", "--set", "sparse.background_tokens=256",
                 "--set", "sparse.background_seq_len=32", "--set", "sparse.top_t=16"]
    if name == "continued-pretrain.yaml":
        argv += ["--set", "eval.every=1"]
    code, out, err = _run_cli(argv + ["--dry-run"], capsys)
    assert code == 0, err
    assert "parameters by group" in out and not (tmp_path / "run").exists()
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == (1 if dense else 2)  # keep_last
    from transformers import AutoModelForCausalLM

    import memsurgery  # noqa: F401 -- registers the grafted model types

    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in k for k in model.state_dict())
    cfg = json.loads((final / "config.json").read_text())
    assert ("memory" in cfg) == (not dense)


def test_lora_merges_into_dense_weights(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from memsurgery.train import run

    rec = tiny_recipe(assets, tmp_path / "run", **{"model": str(assets["dense"]), "train.method": "lora",
                                                   "train.steps": 3, "optim.groups.base.lr": 0.05})
    summary = run(rec, log=lambda m: None)
    a = AutoModelForCausalLM.from_pretrained(assets["dense"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(summary["final_dir"]).state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")) for k in changed)


def test_lora_without_peft_is_a_clean_error(assets, tmp_path, monkeypatch):
    from memsurgery.train import run

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependency, match="pip install peft"):
        run(tiny_recipe(assets, tmp_path / "run", **{"model": str(assets["dense"]), "train.method": "lora"}),
            dry_run=True, log=lambda m: None)


def test_memory_method_needs_grafted_model(assets, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    import yaml

    r.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / "run", model=str(assets["dense"]))))
    code, _, err = _run_cli(["train", str(r)], capsys)
    assert code == 2 and "needs a grafted checkpoint" in err and len(err.strip().splitlines()) == 1


def test_bad_data_through_cli_exit_2(assets, tmp_path, capsys):
    import yaml

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field here"}\n')
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / "run", **{"data.train": str(bad),
                                                                         "data.format": "documents"})))
    code, _, err = _run_cli(["train", str(r)], capsys)
    assert code == 2 and "data.train" in err and "'text'" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _run_cli(["train", str(r), "--set", f"data.train={empty}", "--set", "data.format=text"], capsys)
    assert code == 2 and "is empty" in err
    code, _, err = _run_cli(["train", str(r), "--set", f"data.train={assets['text']}", "--set", "data.format=text",
                             "--set", "data.seq_len=4096"], capsys)
    assert code == 2 and "longer than the model allows" in err


def test_existing_run_needs_resume_and_same_recipe(assets, tmp_path):
    from memsurgery.train import run

    rec = tiny_recipe(assets, tmp_path / "run", **{"train.steps": 2})
    run(rec, log=lambda m: None)
    with pytest.raises(InputError, match="already holds a run; pass --resume"):
        run(rec, log=lambda m: None)
    with pytest.raises(InputError, match="differs .* in optim.groups.values.lr"):
        run(rec, overrides=["optim.groups.values.lr=0.5"], resume=True, log=lambda m: None)
    s = run(rec, overrides=["train.steps=3", "log.every=1"], resume=True, log=lambda m: None)
    assert s["steps"] == 3 and s["resumed_from"].endswith("step-00000002")


def test_resume_skips_corrupt_checkpoint_and_matches(assets, tmp_path):
    from safetensors.torch import load_file

    from memsurgery.train import run

    rec = tiny_recipe(assets, tmp_path / "a", **{"train.steps": 6, "checkpoint.keep_last": 3,
                                                 "optim.schedule.warmup_steps": 1})
    ref = run(rec, log=lambda m: None)
    rec_b = dict(rec, output_dir=str(tmp_path / "b"))
    run(rec_b, overrides=["train.steps=4"], log=lambda m: None)  # stops after step 4 ...
    import shutil

    shutil.rmtree(tmp_path / "b" / "final")
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000004"]
    # ... with a damaged newest checkpoint: resume must fall back to step 2.
    w = ck / "step-00000004" / "trainable.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    msgs = []
    # The schedule depends on train.steps, so the resumed run must have the reference's 6 steps.
    s = run(rec_b, overrides=["train.steps=6"], resume=True, log=msgs.append)
    assert any("damaged" in m and "step-00000004" in m for m in msgs)
    assert s["resumed_from"].endswith("step-00000002")
    a = load_file(str(Path(ref["last_checkpoint"]) / "trainable.safetensors"))
    b = load_file(str(Path(s["last_checkpoint"]) / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["losses"] == ref["losses"][2:]


def test_nonfinite_steps_skipped_then_stop_keeping_last_good_checkpoint(assets, tmp_path, monkeypatch):
    from memsurgery.train import loop, run

    real = loop.loss_sum
    calls = {"n": 0}
    bad_steps = {2, 4, 5}  # one isolated NaN (skipped), then two in a row (stop)

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if calls["n"] in bad_steps else (loss, n)

    monkeypatch.setattr(loop, "loss_sum", poisoned)
    msgs = []
    rec = tiny_recipe(assets, tmp_path / "run", **{"train.steps": 8, "checkpoint.every": 1,
                                                   "checkpoint.keep_last": 20, "nonfinite.max_consecutive": 2})
    with pytest.raises(RuntimeFailure, match="2 non-finite steps in a row.*step-00000003") as exc:
        run(rec, log=msgs.append)
    assert "\n" not in str(exc.value)
    assert sum("non-finite loss" in m and "skipped" in m for m in msgs) == 3
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s.get("skipped")] == [2, 4, 5]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000001", "step-00000003"]  # none for skipped steps
    assert not (tmp_path / "run" / "final").exists()


def test_probe_eval_hook(assets, tmp_path, monkeypatch):
    pytest.importorskip("memsurgery.probe.api")
    from memsurgery.train import run

    rec = tiny_recipe(assets, tmp_path / "run", **{"train.steps": 2, "eval.every": 1,
                                                   "eval.probe": {"facts": "builtin:people?n=2&seed=0", "limit": 4}})
    run(rec, log=lambda m: None)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"probe"' in x]
    assert [e["step"] for e in evals] == [1, 2] and 0.0 <= evals[0]["probe"]["exact_match"] <= 1.0
    # Without the probe module: a warning, once, and training goes on.
    monkeypatch.setitem(sys.modules, "memsurgery.probe.api", None)
    msgs = []
    run(dict(rec, output_dir=str(tmp_path / "run2")), log=msgs.append)
    assert sum("memsurgery.probe is not available" in m for m in msgs) == 1


def test_eval_file_and_heldout_split(assets, tmp_path):
    from memsurgery.train import run

    s = run(tiny_recipe(assets, tmp_path / "a", **{"data.eval": str(assets["text"]), "eval.every": 2,
                                                   "eval.max_batches": 2}), log=lambda m: None)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_loss" in x]
    assert [e["step"] for e in evals] == [2, 4] and evals[-1]["eval_loss"] == s["eval_loss"]
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    s2 = run(tiny_recipe(assets, tmp_path / "b", **{"eval.heldout_fraction": 0.25}), log=lambda m: None)
    plan2 = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan2["data"]["eval_sequences"] > 0 and s2["eval_loss"] > 0
    assert plan2["data"]["train_sequences"] + plan2["data"]["eval_sequences"] == plan["data"]["train_sequences"]


def test_memory_parallel_needs_matching_process_count(assets, tmp_path):
    from memsurgery.train import run

    with pytest.raises(InputError, match="memory_parallel: 2 needs exactly 2 processes"):
        run(tiny_recipe(assets, tmp_path / "run", memory_parallel=2), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_fsdp_needs_several_processes(assets, tmp_path):
    from memsurgery.train import run

    with pytest.raises(InputError, match="fsdp: true needs several processes"):
        run(tiny_recipe(assets, tmp_path / "run", **{"fsdp": True, "train.method": "full",
                                                     "model": str(assets["dense"])}), log=lambda m: None)
