"""2 processes on gloo take the same 10 steps as 1 process at the same global batch.

Data parallel (2 x batch 1 x accumulation 2 vs 1 x batch 2 x 2), also for sparse memory
finetuning; and memory-parallel (the value table column-sharded over both ranks).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.numerics import assert_close_normwise, forward_chain, reorder_rtol
from tests.tiny import TINY_CONFIGS
from tests.train_assets import GRAFT, tiny_recipe, train_assets

ROOT = Path(__file__).resolve().parents[2]
# 1 and 2 processes differ only in the order of their fp32 sums (gradients all-reduced over
# ranks, other padding, other matmul shapes). A gradient entry sums, over the global batch's
# 4 sequences of <= 32 tokens (128 terms), products that went through the forward and the
# backward pass of the (grafted) tiny llama: n = 2 x forward_chain + 128 ~ 2,500 roundings.
# So losses and weights may differ by reorder_rtol(n) = 4.8e-5 of their scale, normwise
# (tests/numerics.py); not elementwise: an entry near 0 carries its tensor's rounding error.
# Adam-trained weights in the 2-norm: Adam amplifies the error of entries with small
# gradients (under AVX2 kernels a value entry differed by 3.7e-5 of max|w|, the tensor by 9e-7).
TOL = reorder_rtol(2 * forward_chain(TINY_CONFIGS["llama"], 32, GRAFT), 128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["memory", "sparse_memory", "memory_parallel", "fsdp"])
def test_two_process_gloo_matches_single_process(tmp_path_factory, tmp_path, monkeypatch, method):
    from safetensors.torch import load_file

    from memsurgery.train import run

    assets = train_assets(tmp_path_factory)
    monkeypatch.setenv("MEMSURGERY_CACHE", str(assets["cache"]))
    mp, fsdp = method == "memory_parallel", method == "fsdp"
    over = {"train.steps": 10, "checkpoint.every": 10,
            "train.method": {"memory_parallel": "memory", "fsdp": "full"}.get(method, method),
            "optim.schedule.warmup_steps": 2,
            # QA pairs without packing: sequences of different lengths, so the two ranks
            # pad differently from the single process; answer-only loss, grad accumulation.
            "data.train": str(assets["qa"]), "data.format": "qa", "data.packing": False,
            "data.answer_only_loss": True, "train.grad_accum": 2, "train.batch_size": 2}
    if fsdp:  # FSDP2 full finetuning of the dense model; AdamW state sharded too
        over.update({"model": str(assets["dense"]), "optim.groups.base.lr": 1e-3, "optim.groups.norms.lr": 1e-3})
    if method == "sparse_memory":
        over.update({"sparse.top_t": 12, "sparse.background": str(assets["text"]),
                     "sparse.background_tokens": 512, "sparse.background_seq_len": 32,
                     "optim.value_optimizer": "sgd", "optim.groups.values.lr": 0.5})
    single = run(tiny_recipe(assets, tmp_path / "one", **over), log=lambda m: None)

    if mp:  # both ranks read the same batch; each holds half of the value table's columns
        over["memory_parallel"] = 2
    else:
        over["fsdp"] = fsdp
        over["train.batch_size"] = 1  # 2 ranks x 1 x grad_accum 2 = the same global batch of 4
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / "two", **over)))
    env = dict(os.environ, MEMSURGERY_CACHE=str(assets["cache"]), OMP_NUM_THREADS="1", MEMSURGERY_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "memsurgery", "train", str(recipe)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]

    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == 10
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan["fsdp"] == fsdp and plan["memory_parallel"] == (2 if mp else 1)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 10
    assert_close_normwise(b, a, TOL, "losses")
    wa = load_file(str(Path(single["last_checkpoint"]) / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000010" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close_normwise(wb[k], wa[k], TOL, k, norm="fro")
    if method == "sparse_memory":  # the same rows were chosen on both sides
        v0 = load_file(str(assets["grafted"] / "model.safetensors"))["memory_bank.values.weight"]
        k = "memory_bank.values.weight"
        assert torch.equal((wa[k] != v0).any(1), (wb[k] != v0).any(1))
    fa = load_file(str(Path(single["final_dir"]) / "model.safetensors"))
    fb = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert_close_normwise(fb[k], fa[k], TOL, k, norm="fro")

    if mp or fsdp:  # resume from the full-size checkpoint (shards regathered), 2 more steps
        first = over | {"memory_parallel": 1, "fsdp": False, "train.batch_size": 2}
        run(tiny_recipe(assets, tmp_path / "one", **first), overrides=["train.steps=12"],
            resume=True, log=lambda m: None)
        res = subprocess.run(cmd + ["--resume", "--set", "train.steps=12"], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=False, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed from" in res.stdout
        wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000012" / "trainable.safetensors"))
        wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000012" / "trainable.safetensors"))
        for k in wa:
            assert_close_normwise(wb[k], wa[k], TOL, k, norm="fro")
