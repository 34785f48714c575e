"""`memsurgery demo` end to end on the real checkpoint at a tiny budget, then a cached rerun."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli import run_cli as _run

pytestmark = pytest.mark.slow




def test_demo_end_to_end_then_reuse(smollm2_hf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long paths mid-phrase
    out = tmp_path / "demo"
    out.mkdir()
    # The session fixture already converted the same GGUF: the demo must recognise it.
    shutil.copytree(smollm2_hf, out / "smollm2-135m")
    argv = ["demo", "--out", str(out), "--people", "5", "--steps", "5", "--world-limit", "20"]
    code, text, err = _run(argv, capsys)
    assert code == 0, err
    assert "reusing" in text and "converted from the same GGUF" in text

    probe = out / "probe"
    for name in ("report.json", "report.md", "report.html", "samples.jsonl"):
        assert (probe / name).is_file(), name
    export = out / "smollm2-135m-people"
    for name in ("config.json", "modeling_memsurgery.py", "graft.json", "README.md", "SHA256SUMS",
                 "reports/probe/report.html"):
        assert (export / name).is_file(), name
    assert (out / "train-run" / "final" / "config.json").is_file()

    summary = json.loads((out / "demo-summary.json").read_text())["summary"]
    assert summary["people"] == 5 and summary["steps"] == 5
    # 5 people x 6 facts, each asked in 1 trained + 5 held-out phrasings, and 5 look-alikes x 6
    # facts in 2 held-out phrasings; the base model cannot know fictional people.
    report = json.loads((probe / "report.json").read_text())
    assert report["fact_sets"][next(k for k in report["fact_sets"] if "people" in k)] == 30 * 6 + 30 * 2
    for key in ("reliability", "generalization", "generalization_questions"):
        assert summary[key]["base"] == 0.0 and 0.0 <= summary[key]["trained"] <= 1.0, key
    assert summary["known"]["base"] > 0.0  # SmolLM2 knows some capitals and symbols
    assert summary["perplexity"]["trained"] > 0 and summary["linear_probe_auroc_questions"] is not None
    for label in ("knowledge injection", "reliability", "generalization: held-out phrasings", "report:"):
        assert label in text, label

    # Second run: every stage after inspect is reused and says so.
    code, text, err = _run(argv, capsys)
    assert code == 0, err
    for what in ("grafted earlier", "trained earlier", "probed earlier", "exported earlier"):
        assert what in text, what


def test_demo_rejects_bad_sizes(tmp_path, capsys):
    code, _, err = _run(["demo", "--out", str(tmp_path / "d"), "--people", "0"], capsys)
    assert code == 2 and "--people 0" in err and len(err.strip().splitlines()) == 1
