"""probe and export on the real SmolLM2-135M: known-fact accuracy, complete reports, faithful export."""

from __future__ import annotations

import json

import pytest
import torch

SMALL = dict(layers=[5], slots=4096, heads=2, knn=8, k_dim=64, calib_tokens=4096, heldout_tokens=1024,
             seq_len=128, kmeans_iters=5)


@pytest.fixture(scope="module")
def smol_grafted(smollm2_hf, tmp_path_factory):
    from memsurgery.graft import graft

    out = tmp_path_factory.mktemp("smolg") / "g"
    graft(smollm2_hf, out, **SMALL)
    return out


@pytest.mark.slow
def test_probe_world_on_grafted_smollm2(smol_grafted, tmp_path):
    from memsurgery.facts import load_factset
    from memsurgery.probe.api import evaluate, load_model, run_probe

    model, tok, _ = load_model(smol_grafted)
    france = [f for f in load_factset("builtin:world") if f.id == "capital/france"]
    samples, _ = evaluate(model, tok, france, signals=False)
    assert samples[0]["generation"].startswith("Paris") and samples[0]["exact_match"] == 1.0

    out = tmp_path / "probe"
    report = run_probe(model, facts=["builtin:world"], tokenizer=tok, out=out, limit=40, ppl_tokens=1024)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "samples.jsonl"]
    known = report["summary"]["completion"]["kinds"]["known"]
    assert known["n"] == 40 and known["exact_match"] > 0
    rels = report["summary"]["completion"]["relations"]
    assert len(rels) == 5 and all(r["n"] == 8 for r in rels.values())
    assert report["retention"]["perplexity"] < 100
    tel = report["telemetry"]["builtin:world"]["5"]
    assert 0 < tel["pct_used"] <= 100 and tel["slots_per_fact"] > 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 40 and "signals" in json.loads(lines[0])


@pytest.mark.slow
def test_export_grafted_smollm2_reloads_with_equal_logits(smol_grafted, tmp_path):
    from memsurgery.export import export
    from memsurgery.export import hf

    out = tmp_path / "exported"
    prov = export(smol_grafted, out)
    assert prov["verification"]["max_abs_logit_diff"] <= prov["verification"]["tolerance"]
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        a = hf.load_grafted(smol_grafted).eval()(ids).logits
        b = hf.load_grafted(out).eval()(ids).logits
    assert torch.equal(a, b)
