"""A training process killed with SIGKILL mid-run, then resumed, ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_assets import tiny_recipe, train_assets

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path_factory, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from memsurgery.train import run

    assets = train_assets(tmp_path_factory)
    env = dict(os.environ, MEMSURGERY_CACHE=str(assets["cache"]), OMP_NUM_THREADS="1", MEMSURGERY_THREADS="1")
    monkeypatch.setenv("MEMSURGERY_CACHE", str(assets["cache"]))
    # Adam on values and AdamW on the dense memory groups, a cosine schedule with warmup
    # and grad clipping: every piece of optimizer and schedule state must survive.
    over = {"train.steps": 150, "checkpoint.every": 10, "checkpoint.keep_last": 3, "log.every": 50,
            "optim.schedule.warmup_steps": 5, "train.max_grad_norm": 0.003}
    ref = run(tiny_recipe(assets, tmp_path / "ref", **over), log=lambda m: None)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / "run", **over)))
    cmd = [sys.executable, "-m", "memsurgery", "train", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (ck / "step-00000020").is_dir():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "final").exists()
    done = sorted(p.name for p in ck.iterdir() if not p.name.startswith("."))
    assert done and done[-1] < "step-00000150"

    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a = load_file(str(Path(ref["last_checkpoint"]) / "trainable.safetensors"))
    b = load_file(str(ck / "step-00000150" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The final model too (the value table and every other weight), bit for bit.
    fa = load_file(str(Path(ref["final_dir"]) / "model.safetensors"))
    fb = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # metrics.jsonl holds each step once: what the killed run logged past its checkpoint was dropped.
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 151))
