"""The knowledge-editing triple (reliability / generalization / locality) and the residual linear probe."""

from __future__ import annotations

import json

import pytest
import torch

from memsurgery.probe import metrics as M
from memsurgery.probe.knowledge import knowledge
from memsurgery.probe.linear import grouped_cv_auroc


def _row(kind, phrasing, em, grade=None, relation="r"):
    return {"kind": kind, "phrasing": phrasing, "exact_match": em, "relation": relation,
            "grade": grade or (M.CORRECT if em else M.INCORRECT)}


def test_knowledge_splits_trained_from_heldout_phrasings():
    rows = ([_row("injected", "train/completion0", 1)] * 3 + [_row("injected", "train/question0/w0", 0)]
            + [_row("injected", "heldout/question0", 1)] * 2 + [_row("injected", "heldout/question1", 0)] * 2
            + [_row("injected", "heldout/completion0", 1)]
            + [_row("injected", None, 1)]  # unsplit: neither
            + [_row("known", None, 1), _row("known", None, 0)]
            + [_row("unknown", "heldout/question0", 0), _row("unknown", "heldout/completion1", 0, M.NOT_ATTEMPTED)])
    k = knowledge(rows, {"perplexity": 12.5})
    assert k["reliability"]["exact_match"] == 0.75 and k["reliability"]["n"] == 4
    g = k["generalization"]
    assert g["exact_match"] == pytest.approx(3 / 5) and g["n"] == 5
    assert g["questions"]["exact_match"] == 0.5 and g["completions"]["exact_match"] == 1.0
    assert g["by_phrasing"]["heldout/question1"]["exact_match"] == 0.0
    assert k["unsplit_injected"]["n"] == 1
    assert k["locality"] == {"known": {"exact_match": 0.5, "stderr": pytest.approx(0.5), "n": 2},
                             "perplexity": 12.5}
    h = k["hallucination"]
    assert h["attempted_wrong"] == 0.5 and h["attempted_wrong_questions"] == 1.0


def test_grouped_cv_auroc_separates_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n, d = 200, 16
    y = [i % 2 for i in range(n)]
    groups = [f"e{i // 4}" for i in range(n)]  # 4 rows per entity, never split across folds
    x = torch.randn(n, d, generator=g)
    signal = x.clone()
    signal[:, 0] += 3.0 * torch.tensor(y, dtype=torch.float32)
    assert grouped_cv_auroc(signal, y, groups)["auroc"] > 0.95
    # labels unrelated to the features: out-of-fold AUROC stays near chance
    assert abs(grouped_cv_auroc(x, y, groups)["auroc"] - 0.5) < 0.15


def test_probe_reports_the_triple_and_the_residual_probe(tmp_path):
    """run_probe on a tiny grafted model with structured facts asked in trained and held-out phrasings."""
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig
    from memsurgery.probe.api import run_probe
    from tests.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=16,
                                                                        gate="relevance"), [0, 1], "parallel")
    with torch.no_grad():
        torch.nn.init.normal_(model.memory_bank.values.weight, std=0.5)
    facts = tmp_path / "facts.jsonl"
    names = ["Ann Lee", "Bo Chan", "Cy Dale", "Di Eng", "Ed Fox", "Flo Gu"]
    with open(facts, "w") as fh:
        for i, name in enumerate(names):
            fh.write(json.dumps({"entity": name, "relation": "city", "answer": "Oslo",
                                 "kind": "unknown" if i % 2 else "injected"}) + "\n")
    report = run_probe(model.eval(), facts=[f"{facts}?phrasings=views&heldout_per_fact=3&unknown_per_fact=3"],
                       tokenizer=build_tiny_tokenizer(), ppl_tokens=0, max_new_tokens=3, out=tmp_path / "p")
    k = report["knowledge"]
    assert k["reliability"]["n"] == 3 * 2 and k["generalization"]["n"] == 3 * 3
    assert k["hallucination"]["n"] == 3 * 3
    assert 0.0 <= k["generalization"]["exact_match"] <= 1.0
    rp = report["residual_probe"]
    assert rp["layer"] == 0 and rp["all"]["n"] == 6 + 9 + 9
    assert 0.0 <= rp["all"]["auroc"] <= 1.0 and rp["questions"]["n"] < rp["all"]["n"]
    rows = [json.loads(line) for line in open(tmp_path / "p" / "samples.jsonl")]
    assert rows and not any("residual" in r for r in rows)  # the vectors are never written
    assert {r["phrasing"].split("/")[0] for r in rows if r["kind"] == "injected"} == {"train", "heldout"}


def test_entity_token_reductions():
    from memsurgery.probe.signals import CaptureContext, _entity_last, _entity_max, _entity_min

    v = torch.tensor([[1.0, 5.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    ctx = CaptureContext(written=None, entity_mask=torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool))
    for fn, want in ((_entity_max, 5.0), (_entity_min, 3.0), (_entity_last, 3.0)):
        got = fn(v, ctx)
        assert got[0] == want and torch.isnan(got[1])
