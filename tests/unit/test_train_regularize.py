"""Recipe `regularize` (gate / output-L2 / KL-to-base / negative-prompt penalties) and the relevance_gate group."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memsurgery.errors import InputError
from memsurgery.train.recipe import build_recipe
from tests.numerics import assert_close_normwise, forward_chain, reorder_rtol
from tests.tiny import TINY_CONFIGS
from tests.train_assets import GRAFT, tiny_recipe, train_assets

BASE = {"model": "m", "output_dir": "o", "data": {"train": "t.txt"}}
QUIET = {"log": lambda m: None}


pytestmark = pytest.mark.usefixtures("train_cache")


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _final(summary) -> dict:
    from safetensors.torch import load_file

    return load_file(str(summary["final_dir"] + "/model.safetensors"))


def _gate_on_text(model_dir, text_path) -> float:
    """Mean relevance gate over the tokens of the first 8 paragraphs of `text_path`."""
    from transformers import AutoTokenizer

    from memsurgery.export import hf

    model = hf.load_grafted(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    layers = hf.memory_layers(model)
    gates = []
    for para in text_path.read_text().split("\n\n")[:8]:
        ids = torch.tensor([tok(para, add_special_tokens=False)["input_ids"][:64]])
        for layer in layers.values():
            layer.record = True
        with torch.no_grad():
            model(input_ids=ids)
        gates += [float(layer.last_gate.mean()) for layer in layers.values()]
    return sum(gates) / len(gates)


# ---------------------------------------------------------------- validation


def test_recipe_validation_names_keys():
    bad = {**BASE, "regularize": {"gate_penalty": -1, "output_l2": float("nan"), "kl_to_base": -0.5,
                                  "negative_weight": -2, "batch_size": 0, "seq_len": 1, "gate": 1.0}}
    with pytest.raises(InputError) as exc:
        build_recipe(bad, "r.yaml")
    msg = str(exc.value)
    for key in ("regularize.gate_penalty", "regularize.output_l2", "regularize.kl_to_base",
                "regularize.negative_weight", "regularize.batch_size", "regularize.seq_len",
                "regularize.gate: unknown key; known keys here: text"):
        assert key in msg, msg
    for method in ("full", "lora"):
        with pytest.raises(InputError, match="regularize: .*memory or sparse_memory"):
            build_recipe({**BASE, "train": {"method": method}, "regularize": {"gate_penalty": 1.0}})
    ok = build_recipe({**BASE, "regularize": {"gate_penalty": 0.5, "negatives": "builtin:people?n=3"}})
    assert ok.regularize.active and ok.regularize.text == "builtin:corpus" and ok.regularize.negative_weight == 1.0
    assert build_recipe(BASE).regularize is None
    assert not build_recipe({**BASE, "regularize": {}}).regularize.active


def test_relevance_gate_group_defaults_to_gates():
    r = build_recipe({**BASE, "optim": {"groups": {"gates": {"lr": 0.003}}}})
    assert not r.split_relevance_gate and r.lr("relevance_gate") == 0.003
    r = build_recipe({**BASE, "optim": {"groups": {"gates": {"lr": 0}, "relevance_gate": {"lr": 0.01}}}})
    assert r.split_relevance_gate and r.lr("relevance_gate") == 0.01 and r.lr("gates") == 0.0
    from memsurgery.train.params import group_of

    name = "memory_bank.layers.1.gate_weight"
    assert group_of(name) == "gates" and group_of(name, True) == "relevance_gate"
    assert group_of("memory_bank.layers.1.gate_proj.weight", True) == "gates"


# ---------------------------------------------------------------- runs


def test_zero_weights_bit_identical_to_no_section(assets, tmp_path):
    """All-zero weights (plus an explicit relevance_gate group with the gates' lr) change nothing."""
    from memsurgery.train import run

    over = {"optim.groups.values.lr": 0.05, "optim.groups.gates.lr": 0.01}
    a = run(tiny_recipe(assets, tmp_path / "a", **over), **QUIET)
    b = run(tiny_recipe(assets, tmp_path / "b", **over, **{
        "regularize": {"text": str(assets["text"]), "gate_penalty": 0.0, "output_l2": 0.0, "kl_to_base": 0.0,
                       "negatives": "builtin:people?n=3&seed=5", "negative_weight": 0.0},
        "optim.groups.relevance_gate.lr": 0.01}), **QUIET)
    assert a["losses"] == b["losses"]
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not any(k.startswith("reg/") for r in _metrics(tmp_path / "b") for k in r)
    assert "relevance_gate" in b["groups"] and "relevance_gate" not in a["groups"]


def test_gate_penalty_shuts_the_gate(assets, tmp_path):
    """Only gate_weight/gate_bias train (group relevance_gate); with the penalty the gate on text goes down."""
    from memsurgery.train import run

    over = {"train.steps": 5, "optim.groups.values.lr": 0.0, "optim.groups.keys.lr": 0.0,
            "optim.groups.query.lr": 0.0, "optim.groups.projections.lr": 0.0, "optim.groups.gates.lr": 0.0,
            "optim.groups.relevance_gate.lr": 0.05, "optim.schedule.kind": "constant"}
    reg = {"text": str(assets["text"]), "seq_len": 32, "batch_size": 4}
    off = run(tiny_recipe(assets, tmp_path / "off", **over), **QUIET)
    on = run(tiny_recipe(assets, tmp_path / "on", **over, regularize={**reg, "gate_penalty": 1.0}), **QUIET)
    g0 = _gate_on_text(assets["grafted"], assets["text"])
    g_off = _gate_on_text(off["final_dir"], assets["text"])
    g_on = _gate_on_text(on["final_dir"], assets["text"])
    assert g_on < g_off and g_on < g0, (g0, g_off, g_on)
    logged = [r["reg/gate"] for r in _metrics(tmp_path / "on")]
    assert len(logged) == 5 and logged[-1] < logged[0]
    # gate_proj (group gates, lr 0) did not move; gate_weight/gate_bias did.
    before, after = _final({"final_dir": str(assets["grafted"])}), _final(on)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith((".gate_weight", ".gate_bias")) for k in moved), moved


def test_kl_l2_negatives_logged_and_resume_bit_identical(assets, tmp_path):
    """KL to the base is 0 at step 0 of a zero-value graft and > 0 once the values moved;
    every penalty is logged; a run resumed from a checkpoint matches the uninterrupted one."""
    from memsurgery.train import run

    over = {"optim.groups.values.lr": 0.1, "optim.groups.gates.lr": 0.01, "optim.schedule.kind": "constant",
            "regularize": {"text": str(assets["text"]), "seq_len": 32, "batch_size": 3, "gate_penalty": 0.5,
                           "output_l2": 0.1, "kl_to_base": 1.0, "negatives": "builtin:people?n=3&seed=5",
                           "negative_weight": 0.5}}
    full = run(tiny_recipe(assets, tmp_path / "full", **over), **QUIET)
    recs = _metrics(tmp_path / "full")
    for r in recs:
        assert {"reg/gate", "reg/l2", "reg/kl", "reg/neg", "reg/neg_gate"} <= set(r), r
        assert all(r[k] >= 0 and r[k] == r[k] for k in r if k.startswith("reg/"))
    assert recs[0]["reg/kl"] == 0.0 and recs[0]["reg/l2"] == 0.0  # values start at zero
    assert recs[-1]["reg/kl"] > 0 and recs[-1]["reg/l2"] > 0
    plan = json.loads((tmp_path / "full" / "plan.json").read_text())
    assert plan["regularize"]["text_windows"] > 0 and plan["regularize"]["negative_prompts"] > 0

    part = tiny_recipe(assets, tmp_path / "part", **over, **{"train.steps": 2})
    run(part, **QUIET)
    res = run(tiny_recipe(assets, tmp_path / "part", **over), resume=True, **QUIET)
    assert res["resumed_from"] and res["losses"] == full["losses"][2:]
    fa, fb = _final(full), _final(res)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_runtime_refusals_name_the_key(assets, tmp_path):
    from memsurgery.train import run

    rec = tiny_recipe(assets, tmp_path / "x", regularize={"text": str(assets["text"]), "seq_len": 32,
                                                          "negatives": "builtin:corpus"})
    with pytest.raises(InputError, match="regularize.negatives"):
        run(rec, dry_run=True, **QUIET)
    rec = tiny_recipe(assets, tmp_path / "y", regularize={"text": str(tmp_path / "missing.txt"), "output_l2": 1.0})
    with pytest.raises(InputError, match="regularize.text"):
        run(rec, dry_run=True, **QUIET)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path_factory, tmp_path, monkeypatch):
    """2 gloo processes x 2 windows each take the same steps as 1 process x 4 windows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    from memsurgery.train import run
    from tests.unit.test_train_ddp import _free_port

    assets = train_assets(tmp_path_factory)
    monkeypatch.setenv("MEMSURGERY_CACHE", str(assets["cache"]))
    reg = {"text": str(assets["text"]), "seq_len": 32, "batch_size": 4, "gate_penalty": 0.5,
           "output_l2": 0.1, "kl_to_base": 1.0}
    over = {"train.steps": 6, "checkpoint.every": 6, "train.batch_size": 2, "optim.groups.values.lr": 0.1,
            "optim.groups.relevance_gate.lr": 0.02, "regularize": reg}
    single = run(tiny_recipe(assets, tmp_path / "one", **over), **QUIET)
    over.update({"train.batch_size": 1, "regularize": {**reg, "batch_size": 2}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / "two", **over)))
    env = dict(os.environ, MEMSURGERY_CACHE=str(assets["cache"]), OMP_NUM_THREADS="1", MEMSURGERY_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "memsurgery", "train", str(recipe)]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    # The two runs differ only in the order of their fp32 sums (per-rank partial gradients
    # all-reduced, other batch shapes). A gradient entry is a sum over the step's 2 x 32
    # training + 4 x 32 regularizer tokens of products that went through the forward and the
    # backward pass of 32-token windows: n = 2 x forward_chain + 192 ~ 2,600 roundings, so
    # the runs may differ by reorder_rtol(n) = 4.9e-5 of each quantity's scale
    # (tests/numerics.py); the Adam-trained weights in the 2-norm, where the few entries
    # whose small gradient Adam's normalization amplifies count by their share.
    # Elementwise rtol=1e-4/atol=1e-6 failed on another CPU: 1.68e-6 on a value near 0,
    # whose rounding error is the table's, not its own.
    tol = reorder_rtol(2 * forward_chain(TINY_CONFIGS["llama"], 32, GRAFT), 192)
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 6
    for key in ("loss", "reg/gate", "reg/l2"):  # means of positive terms: error ~ tol x value
        assert_close_normwise([r[key] for r in b], [r[key] for r in a], tol, key)
    # KL(base || model) = sum p (log p - log q) sums near-cancelling differences of log-
    # probabilities of size up to ~log(vocab): its rounding error is tol x log(vocab) absolute,
    # not relative to the KL (1e-4 here, where 2.1e-8 = 2.6e-4 of it was measured).
    kl_a, kl_b = (torch.tensor([r["reg/kl"] for r in x], dtype=torch.float64) for x in (a, b))
    assert (kl_a - kl_b).abs().max() <= tol * math.log(TINY_CONFIGS["llama"]["vocab_size"]), (kl_a, kl_b)
    assert a[-1]["reg/kl"] > 0 and b[-1]["reg/kl"] > 0
    wa = load_file(str(Path(single["last_checkpoint"]) / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert wa["memory_bank.values.weight"].abs().max() > 0.1  # the values did train
    for k in wa:
        assert_close_normwise(wb[k], wa[k], tol, k, norm="fro")
