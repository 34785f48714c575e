"""builtin:people generator: deterministic, disjoint unknowns, consistent data and probes."""

from __future__ import annotations

import pytest

from memsurgery.errors import InputError
from memsurgery.facts.people import PROMPTS, RELATIONS, people_set


def test_same_seed_same_set_other_seed_differs():
    a, b = people_set(4, 3, seed=7), people_set(4, 3, seed=7)
    assert a == b
    c = people_set(4, 3, seed=8)
    assert [p["name"] for p in c["people"]] != [p["name"] for p in a["people"]]


def test_unknown_people_are_disjoint_and_never_in_training_data():
    s = people_set(12, 12, seed=0, paraphrases=2)
    trained = {p["name"] for p in s["people"]}
    unknown = {p["name"] for p in s["unknown"]}
    assert len(trained) == 12 and len(unknown) == 12 and not trained & unknown
    text = " ".join(d["text"] for d in s["documents"]) + " ".join(q["prompt"] for q in s["qa"])
    for name in unknown:
        assert name not in text


def test_every_attribute_appears_in_every_biography_and_qa_matches_facts():
    s = people_set(3, 1, seed=1, paraphrases=3)
    assert len(s["documents"]) == 9 and len(s["qa"]) == 18
    by_name = {p["name"]: p for p in s["people"]}
    for doc in s["documents"]:
        person = by_name[doc["entity"]]
        for rel in RELATIONS:
            assert person[rel] in doc["text"]
    injected = [f for f in s["facts"] if f["kind"] == "injected"]
    assert len(injected) == 18 and sum(f["kind"] == "unknown" for f in s["facts"]) == 6
    for qa, fact in zip(s["qa"], injected):
        assert qa["prompt"] == fact["prompt"] == PROMPTS[fact["relation"]].format(name=fact["entity"])
        assert qa["answer"] == " " + fact["answers"][0]
        assert "," not in by_name[fact["entity"]]["employer"]
    # The canonical biography contains each QA prompt followed by its answer.
    first = {d["entity"]: d["text"] for d in s["documents"] if d["id"].endswith("bio0")}
    for qa in s["qa"]:
        assert qa["prompt"] + qa["answer"] in first[qa["entity"]]


@pytest.mark.parametrize("kwargs", [{"n_people": 0}, {"n_people": 2, "paraphrases": 0}])
def test_bad_sizes_are_input_errors(kwargs):
    with pytest.raises(InputError):
        people_set(**kwargs)
