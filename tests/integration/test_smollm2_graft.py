"""graft on the real SmolLM2-135M: function preserved, output loads anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.test_graft_hf import _CHILD

TEXT = "The capital of France is Paris. The chemical symbol of gold is Au."


@pytest.fixture(scope="module")
def grafted(smollm2_hf, tmp_path_factory):
    from memsurgery.graft import graft

    out = tmp_path_factory.mktemp("graft") / "smol-mem"
    _, report = graft(smollm2_hf, out, slots="64K", layers=[5, 15, 25], calib_tokens=8192,
                      heldout_tokens=4096, kmeans_iters=10)
    return out, report


def test_parallel_graft_reproduces_base_logits(grafted, smollm2_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = grafted
    assert report["check"]["max_abs_logit_diff_vs_base"] <= 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # registered in-process: no remote code
    assert type(model).__name__ == "MemsurgeryForCausalLM"
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max().item() <= 1e-5
    x = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, x["input_ids"].shape[1]:])
    # faiss keys spread the load across more slots than the reference init on held-out text.
    for layer, usage in report["usage"].items():
        assert usage["faiss"]["slots_used"] > usage["random"]["slots_used"], layer


def test_grafted_output_loads_without_memsurgery(grafted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = grafted
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = model(ids).logits
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(_CHILD), str(out),
                           str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["memsurgery_loaded"] and report["attempts"] == []
    got = load_file(str(tmp_path / "out.safetensors"))[out.name]
    assert (got - ref).abs().max().item() <= 1e-5
