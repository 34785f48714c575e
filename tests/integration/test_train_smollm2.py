"""`memsurgery train` on the real SmolLM2-135M: knowledge-injection recipe, memory only, base untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.slow
def test_knowledge_injection_on_smollm2(smollm2_hf, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from memsurgery.graft import graft
    from memsurgery.train import run

    monkeypatch.setenv("MEMSURGERY_CACHE", str(tmp_path / "cache"))
    grafted = tmp_path / "g"
    graft(smollm2_hf, grafted, slots=4096, layers=[15], heads=2, knn=8, k_dim=64, calib_tokens=2048,
          heldout_tokens=512, seq_len=128, kmeans_iters=3)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"entity": f"Zorbin Quell {i}", "relation": "birth_town",
                                         "answer": f"Vexmoor {i}"}) + "\n" for i in range(8)))
    summary = run(RECIPES / "knowledge-injection.yaml",
                  [f"model={grafted}", f"output_dir={tmp_path / 'run'}", f"data.train={facts}", "train.steps=3",
                   "train.batch_size=4", "checkpoint.every=2", "log.progress=off", "eval.probe=null"],
                  log=lambda m: None)
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(summary["losses"])))
    # The facts start to fit: the loss on one fixed batch of training views is lower after the 3 steps
    # (per-step losses are over different phrasings, so they need not fall monotonically).
    assert _fixed_batch_loss(summary["final_dir"], summary) < _fixed_batch_loss(grafted, summary)
    assert summary["groups"]["values"]["trainable"] == 4096 * 576
    # knowledge-injection: the values, the memory query projection and the relevance gate (w [576], b)
    # of the one memory layer
    n_query = summary["groups"]["query"]["trainable"]
    assert n_query > 0
    assert summary["trainable_params"] == 4096 * 576 + n_query + 577
    before = load_file(str(grafted / "model.safetensors"))
    after = {}
    for f in Path(summary["final_dir"]).glob("*.safetensors"):
        after.update(load_file(str(f)))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert "memory_bank.values.weight" in changed
    assert any(".query." in k for k in changed), changed
    # nothing of the base (nor the memory's keys, gates or output projection) moved
    assert all(k == "memory_bank.values.weight" or ".query." in k or k.endswith(("gate_weight", "gate_bias"))
               for k in changed), changed
    assert summary["tokens_per_s"] > 0


def _fixed_batch_loss(model_dir, summary) -> float:
    """Mean answer loss of the first 16 training sequences under the model in `model_dir`."""
    from contextlib import nullcontext

    from memsurgery.export import hf
    from memsurgery.train import data as D
    from memsurgery.train import load_recipe
    from memsurgery.train.fastpath import loss_sum
    from transformers import AutoTokenizer

    spec = load_recipe(Path(summary["run_dir"]) / "recipe.yaml").data
    tok = AutoTokenizer.from_pretrained(summary["final_dir"])
    seqs = D.load_sequences(spec.train, tok, spec)
    batch = D.collate(seqs, list(range(16)), tok.eos_token_id)
    with torch.no_grad():
        loss, n = loss_sum(hf.load_grafted(model_dir).eval(), batch, "cpu", nullcontext, keep=False)
    return float(loss) / n
