"""Training views vs held-out phrasings: the split is fixed, disjoint, and what the probe asks."""

from __future__ import annotations

import json

import pytest

from memsurgery.errors import InputError
from memsurgery.facts import load_factset
from memsurgery.facts.people import QUESTIONS, RELATIONS, generate_people
from memsurgery.facts.templates import (
    BUILTIN, HELDOUT, PROBE_QUESTION_WRAPPER, QUESTION, TRAIN, TRAIN_QUESTION_WRAPPERS, load_templates,
    probe_prompt, templates_for,
)
from memsurgery.facts.views import Fact, documents, people_facts, probe_items, read_fact_records, training_pairs


def _training_texts(facts, table=None, docs=3):
    qa = training_pairs(facts, table)
    return [r["prompt"] + r["answer"] for r in qa] + [d["text"] for d in documents(facts, docs, 0, table)]


def _assert_heldout_never_trained(facts, table=None):
    texts = _training_texts(facts, table)
    asked = probe_items(facts, "injected", splits=(HELDOUT,), table=table)
    assert asked
    for item in asked:
        prompt = item.get("prompt") or PROBE_QUESTION_WRAPPER.format(q=item["question"])
        bare = item.get("prompt") or item["question"]
        for text in texts:
            assert prompt not in text and bare not in text, (item["phrasing"], bare, text)


def test_builtin_heldout_phrasings_never_appear_in_training_text():
    _assert_heldout_never_trained(people_facts(generate_people(6, seed=3)))


def test_generic_and_user_templates_keep_the_split_disjoint(tmp_path):
    facts = [Fact("f1", "Zorblat", "favorite_color", "teal"), Fact("f2", "Quux Ltd", "founder", "Ada Vey")]
    _assert_heldout_never_trained(facts)
    table = {"founder": {"train": {"completion": ["{e} was founded by"], "question": ["Who founded {e}?"]},
                         "heldout": {"completion": ["The founder of {e} is"],
                                     "question": ["Which person started {e}?"]}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    _assert_heldout_never_trained(facts, load_templates(path))


def test_every_builtin_relation_has_enough_heldout_phrasings():
    for rel in (*RELATIONS, "some_user_relation"):
        ts = templates_for(rel)
        held = [t for t in ts if t.split == HELDOUT]
        # the minimum: the Q: ... A: question form and >= 3 other wordings
        assert len(held) >= 4 and any(t.kind == QUESTION for t in held)
        assert {t.text for t in held}.isdisjoint({t.text for t in ts if t.split == TRAIN})
    for rel in RELATIONS:  # the probe's historical question is held out, first
        first_q = next(t for t in templates_for(rel) if t.split == HELDOUT and t.kind == QUESTION)
        assert first_q.text.replace("{e}", "{name}") == QUESTIONS[rel]
    assert set(BUILTIN) == set(RELATIONS)


def test_training_questions_never_use_the_probe_wrapper():
    marker = PROBE_QUESTION_WRAPPER.split("{q}")[0]
    assert all(not w.startswith(marker) for w in TRAIN_QUESTION_WRAPPERS)
    f = Fact("x", "Ann Lee", "major", "Physics")
    assert probe_prompt(next(t for t in templates_for("major") if t.split == HELDOUT and t.kind == QUESTION),
                        "Ann Lee") == "Q: What did Ann Lee major in?\nA:"
    assert not any(r["prompt"].startswith(marker) for r in training_pairs([f]))


def test_training_pairs_and_documents_are_answer_only_and_marked():
    f = [Fact("a", "Ann Lee", "major", "Physics"), Fact("b", "Ann Lee", "employer", "Acme")]
    qa = training_pairs(f)
    assert all(r["answer"] == " Physics" or r["answer"] == " Acme" for r in qa)
    assert all(r["entity"] == "Ann Lee" and r["entity"] in r["prompt"] for r in qa)
    docs = documents(f, 2, seed=0)
    assert len(docs) == 2
    for d in docs:
        got = sorted(d["text"][a:b] for a, b in d["spans"])
        assert got == ["Acme", "Physics"]


def test_probe_items_rotate_and_count():
    facts = people_facts(generate_people(2, seed=0))
    items = probe_items(facts, "injected", per_fact={TRAIN: 1, HELDOUT: 2})
    assert len(items) == len(facts) * 3
    assert len({i["id"] for i in items}) == len(items)
    heldout = [i for i in items if i["phrasing"].startswith("heldout/")]
    assert len({i["phrasing"] for i in heldout}) > 2  # rotation covers more than the first two


def test_factset_views_spec_and_errors(tmp_path):
    items = load_factset("builtin:people?n=2&unknown=1&phrasings=views&heldout_per_fact=5&unknown_per_fact=1")
    assert sum(i.kind == "unknown" for i in items) == 6
    assert all(i.phrasing.startswith("heldout/") for i in items if i.kind == "unknown")
    assert sum(i.kind == "injected" and i.phrasing.startswith("train/") for i in items) == 12 * 2
    with pytest.raises(InputError, match="phrasings=views"):
        load_factset("builtin:people?n=2&heldout_per_fact=1")
    with pytest.raises(InputError, match="phrasings="):
        load_factset("builtin:people?n=2&phrasings=some")
    path = tmp_path / "f.jsonl"
    path.write_text('{"entity": "Zorblat", "relation": "color", "answer": "teal"}\n'
                    '{"entity": "Quux", "relation": "color", "answers": ["red", "crimson"], "kind": "unknown"}\n')
    items = load_factset(f"{path}?phrasings=views")
    assert {i.kind for i in items} == {"injected", "unknown"}
    assert all(i.entity in (i.prompt or i.question) for i in items)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entity": "Zorblat", "answer": "teal"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'relation'"):
        read_fact_records(bad)


def test_load_templates_rejects_bad_tables(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"r": {"train": {"completion": ["no entity here"]}, "heldout": {"question": ["{e}?"]}}}))
    with pytest.raises(InputError, match="exactly once"):
        load_templates(p)
    p.write_text(json.dumps({"r": {"train": {"completion": ["{e} is"]}, "heldout": {}}}))
    with pytest.raises(InputError, match="no held-out template"):
        load_templates(p)


def test_ablation_template_table_keeps_the_builtin_heldout_phrasings():
    # benchmarks/data/people_templates_more.json (the "more templates" ablation, docs/results.md) trains
    # more wordings but must ask exactly the builtin held-out ones, so its numbers compare.
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "people_templates_more.json"
    table = load_templates(path)
    for rel in RELATIONS:
        held = [t for t in templates_for(rel, table) if t.split == HELDOUT]
        assert held == [t for t in templates_for(rel) if t.split == HELDOUT], rel
        n_train = sum(t.split == TRAIN for t in templates_for(rel, table))
        assert n_train > sum(t.split == TRAIN for t in templates_for(rel)), rel
    facts = people_facts(generate_people(2, seed=0))
    _assert_heldout_never_trained(facts, table)
