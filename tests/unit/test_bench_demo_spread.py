"""benchmarks/demo_spread.py --report-only on hand-made demo outputs: metrics side by side, and
"=" exactly where a stage's output is bit-identical to the first variant's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def _fake_demo(out: Path, values: torch.Tensor, known: float) -> None:
    (out / "smollm2-135m").mkdir(parents=True)
    save_file({"model.w": torch.ones(3)}, str(out / "smollm2-135m" / "model.safetensors"))
    (out / "smollm2-135m-memory").mkdir()
    save_file({"memory_bank.layers.1.keys": torch.zeros(2, 2), "memory_bank.layers.1.gate_bias": torch.tensor(4.0)},
              str(out / "smollm2-135m-memory" / "model.safetensors"))
    (out / "train-run" / "final").mkdir(parents=True)
    save_file({"memory_bank.values.weight": values}, str(out / "train-run" / "final" / "model.safetensors"))
    (out / "train-run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 7.0}) + "\n")
    (out / "probe").mkdir()
    (out / "probe" / "samples.jsonl").write_text(
        json.dumps({"id": "a", "template": "t", "raw": "x", "model": "baseline"}) + "\n"
        + json.dumps({"id": "a", "template": "t", "raw": "x", "signals": {"s": 1.0}}) + "\n")
    summary = {"people": 5, "reliability": {"base": 0.0, "trained": 1.0}, "known": {"base": 0.4, "trained": known},
               "perplexity": {"base": 26.7, "trained": 26.6},
               "unknown_wrong_questions": {"base": 1.0, "trained": 0.99, "trained_abstaining": 0.36},
               "signal": "s", "signal_auroc_questions": 0.93, "injected_correct_kept": 0.97}
    (out / "demo-summary.json").write_text(json.dumps({"summary": summary}))


def test_report_only_marks_identical_stages(tmp_path):
    _fake_demo(tmp_path / "native", torch.zeros(4, 2), 0.40)
    _fake_demo(tmp_path / "avx2", torch.full((4, 2), 1e-7), 0.42)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_spread.py"), "--out", str(tmp_path),
                           "--variants", "native,avx2", "--report-only"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {ln.split("  ")[0].strip(): ln.split() for ln in proc.stdout.splitlines() if "  " in ln}
    assert lines["known (trained)"][-2:] == ["40.0%", "42.0%"]
    assert lines["perplexity (base)"][-2:] == ["26.700", "26.700"]
    assert lines["unknown_wrong_questions (trained_abstaining)"][-1] == "36.0%"
    assert lines["signal_auroc_questions"][-1] == "0.930"
    assert lines["convert: weights"][-1] == "="
    assert lines["graft: memory keys"][-1] == "="
    assert lines["train: memory values"][-1] != "="  # 1e-7 apart: not bit-identical
    assert lines["probe: trained generations"][-1] == "="
