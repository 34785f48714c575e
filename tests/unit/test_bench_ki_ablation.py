"""benchmarks/ki_ablation.py: a tiny run through the library, then its row in the table."""

from __future__ import annotations

import json

from tests.bench_scripts import load_benchmark


def _module():
    return load_benchmark("ki_ablation")


def test_tiny_run_and_table(assets, tmp_path, train_cache):
    mod = _module()
    out = tmp_path / "abl"
    mod.main(["--run", "tiny", "--graft", str(assets["grafted"]), "--people", "2", "--steps", "2",
              "--world", "4", "--ppl", "0", "--out", str(out), "--probe-heldout", "2",
              "--set", "data.seq_len=128", "--set", "regularize.seq_len=32"])
    res = json.loads((out / "tiny" / "result.json").read_text())
    m = res["metrics"]
    assert res["steps"] == 2 and res["train"]["tokens"] > 0
    for key in ("reliability", "generalization", "generalization_questions", "known",
                "unknown_attempted_wrong_questions", "signal_auroc_questions", "linear_probe_auroc_questions"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key
    assert m["reliability"] is not None and m["generalization"] is not None
    rows = mod.table(out).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| tiny | grafted: data.seq_len=128")
