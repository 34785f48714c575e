"""Probe bookkeeping without a model: limits, templates, summaries, the memory-signal abstention policy."""

from __future__ import annotations

import pytest

from memsurgery.facts.schema import FactItem
from memsurgery.probe import api


def _item(i, kind="known", rel="r", q=True, p=True):
    return FactItem(id=f"{kind}{rel}{i}", kind=kind, relation=rel, answers=("a",),
                    question=f"q{i}?" if q else None, prompt=f"p{i}" if p else None)


def test_limit_is_round_robin_over_kind_and_relation():
    items = [_item(i, rel="x") for i in range(5)] + [_item(i, rel="y") for i in range(2)] + \
            [_item(i, kind="unknown") for i in range(3)]
    got = api.limit_items(items, 5)
    assert [it.id for it in got] == ["knownx0", "knownx1", "knowny0", "knowny1", "unknownr0"]
    assert api.limit_items(items, None) == items and api.limit_items(items, 100) == items


def test_templates():
    both = api.render_prompts(_item(1), "both")
    assert both == [("qa", "Q: q1?\nA:"), ("completion", "p1")]
    assert api.render_prompts(_item(1), "auto") == [("completion", "p1")]
    assert api.render_prompts(_item(1, p=False), "auto") == [("qa", "Q: q1?\nA:")]
    assert api.render_prompts(_item(1, q=False), "qa") == []


def _s(kind, em, sig, abstained=False, template="completion", rel="r"):
    return {"kind": kind, "relation": rel, "template": template, "exact_match": float(em), "f1": float(em),
            "abstained": abstained, "grade": "NOT_ATTEMPTED" if abstained else ("CORRECT" if em else "INCORRECT"),
            "confidence": 0.5, "logprob_sum": -0.7, "logprob_mean": -0.7, "signals": {"w": sig, "w@1": sig}}


def test_memory_abstention_hand_computed():
    # 20 correct injected with signal 1..20 -> t = 2 (drop the lowest one), 1 wrong injected (signal 9).
    samples = [_s("injected", 1, float(v)) for v in range(1, 21)] + [_s("injected", 0, 9.0)]
    # unknown: 4 wrong answers with signals 0.5, 1, 3, 30, one abstention
    samples += [_s("unknown", 0, v) for v in (0.5, 1.0, 3.0, 30.0)] + [_s("unknown", 0, 0.1, abstained=True)]
    rep = api.signal_report(samples, primary="w")
    ab = rep["abstention"]
    assert ab["threshold"] == 2.0 and ab["injected_correct_kept"] == pytest.approx(19 / 20)
    assert ab["unknown_attempted_wrong_before"] == pytest.approx(4 / 5)
    assert ab["unknown_attempted_wrong_after"] == pytest.approx(2 / 5)  # 3.0 and 30.0 stay
    assert ab["injected_accuracy_before"] == pytest.approx(20 / 21)
    assert ab["injected_accuracy_after"] == pytest.approx(19 / 21)
    # AUROC injected vs unknown of "w": hand count of pairs
    inj = list(range(1, 21)) + [9]
    unk = [0.5, 1.0, 3.0, 30.0, 0.1]
    wins = sum((a > b) + 0.5 * (a == b) for a in inj for b in unk)
    assert rep["signals"]["w"]["auroc_injected_vs_unknown"] == pytest.approx(wins / (len(inj) * len(unk)))
    assert rep["signals"]["w"]["mean"]["known"] is None


def test_abstention_needs_injected_and_unknown():
    rep = api.signal_report([_s("known", 1, 1.0), _s("unknown", 0, 0.0)], primary="w")
    assert rep["abstention"]["threshold"] is None and "needs" in rep["abstention"]["note"]
    assert api.signal_report([{**_s("known", 1, 1.0), "signals": None}][:0]) is None


def test_summary_and_hallucination():
    samples = [_s("known", 1, 0, rel="a"), _s("known", 0, 0, rel="b"), _s("unknown", 0, 0),
               _s("unknown", 0, 0, abstained=True), _s("unknown", 1, 0)]
    summ = api.summarize(samples)["completion"]
    assert summ["kinds"]["known"]["exact_match"] == 0.5 and summ["relations"]["known/a"]["exact_match"] == 1.0
    h = api.hallucination(samples)
    assert h["n"] == 3 and h["incorrect"] == pytest.approx(1 / 3) and h["attempted"] == pytest.approx(2 / 3)
    assert h["not_attempted"] == pytest.approx(1 / 3)
    assert api.hallucination(samples[:2])["n"] == 0
