"""Fact sets: schema validation errors (file:line + field), builtin sets, the world-facts generator check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from memsurgery.errors import InputError
from memsurgery.facts import load_factset, parse_spec
from memsurgery.facts.schema import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, lines) -> Path:
    p = tmp_path / "f.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


GOOD = {"id": "a", "question": "Capital of Peru?", "answers": ["Lima"], "kind": "known", "relation": "capital"}


def test_user_file_loads_with_defaults(tmp_path):
    p = _write(tmp_path, [GOOD, "", {"prompt": "Gold's symbol is", "answer": "Au", "kind": "injected"}])
    a, b = read_jsonl(p)
    assert a.answers == ("Lima",) and a.relation == "capital" and a.prompt is None
    assert b.id == "f.jsonl:3" and b.answers == ("Au",) and b.relation == "" and b.kind == "injected"


@pytest.mark.parametrize("bad, needle", [
    ({**GOOD, "kind": "maybe"}, "field 'kind'"),
    ({**GOOD, "answers": []}, "field 'answers'"),
    ({**GOOD, "answers": ["ok", 3]}, "field 'answers'"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "'question' or 'prompt'"),
    ({**GOOD, "colour": "red"}, "unknown field"),
    ({**GOOD, "question": ""}, "field 'question'"),
    ({k: v for k, v in GOOD.items() if k != "kind"}, "field 'kind'"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_validation_errors_name_file_line_and_field(tmp_path, bad, needle):
    p = _write(tmp_path, [GOOD | {"id": "first"}, bad])
    with pytest.raises(InputError) as err:
        read_jsonl(p)
    msg = str(err.value)
    assert f"{p}:2:" in msg and needle in msg and "\n" not in msg


def test_duplicate_ids_and_empty_and_missing(tmp_path):
    with pytest.raises(InputError, match="duplicate fact id 'a'"):
        read_jsonl(_write(tmp_path, [GOOD, GOOD]))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="no facts"):
        read_jsonl(empty)
    with pytest.raises(InputError, match="not found"):
        load_factset(tmp_path / "missing.jsonl")


def test_spec_errors():
    assert parse_spec("builtin:people?n=5&seed=1") == ("builtin:people", {"n": "5", "seed": "1"})
    with pytest.raises(InputError, match="unknown builtin"):
        load_factset("builtin:nope")
    with pytest.raises(InputError, match="takes only limit=K"):
        load_factset("builtin:world?n=3")
    with pytest.raises(InputError, match="unknown option 'size'"):
        load_factset("builtin:people?size=3")
    with pytest.raises(InputError, match="integer"):
        load_factset("builtin:people?n=x")


def test_builtin_world_is_large_real_and_known():
    facts = load_factset("builtin:world")
    rel = Counter(f.relation for f in facts)
    assert len(facts) >= 500 and len(rel) >= 4 and all(n >= 50 for n in rel.values())
    assert {f.kind for f in facts} == {"known"}
    by_id = {f.id: f for f in facts}
    assert "Paris" in by_id["capital/france"].answers
    assert by_id["capital/france"].prompt == "The capital of France is"
    assert by_id["element_symbol/iron"].answers == ("Fe",)
    assert by_id["atomic_number/gold"].answers == ("79",)
    assert any("Kiev" in f.answers for f in facts)  # aliases are kept
    assert all(f.question and f.prompt and f.entity in f.prompt for f in facts)


def test_bundled_world_facts_match_generator():
    for mod in ("countryinfo", "pycountry", "periodictable"):
        pytest.importorskip(mod)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_world_facts.py"), "--check"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_builtin_people_kinds_and_determinism():
    pytest.importorskip("faker")
    pytest.importorskip("memsurgery.facts.people")
    a = load_factset("builtin:people?n=3&seed=7&unknown=2&paraphrases=2")
    b = load_factset("builtin:people?n=3&seed=7&unknown=2&paraphrases=2")
    assert a == b
    kinds = Counter(f.kind for f in a)
    assert kinds["injected"] == 3 * 6 and kinds["unknown"] == 2 * 6
    from memsurgery.facts import people_factset

    data = people_factset("builtin:people?n=3&seed=7&unknown=2&paraphrases=2")
    docs = " ".join(d["text"] for d in data["documents"])
    for f in a:
        assert (f.entity in docs) == (f.kind == "injected")


def test_limit_option_cuts_any_set_round_robin(tmp_path):
    from memsurgery.facts import limit_items, load_factset

    world = load_factset("builtin:world")
    cut = load_factset("builtin:world?limit=10")
    assert cut == limit_items(world, 10) and len(cut) == 10
    assert len({it.relation for it in cut}) == len({it.relation for it in world})  # every relation kept
    people = load_factset("builtin:people?n=3&seed=7&unknown=2&limit=4")
    assert people == limit_items(load_factset("builtin:people?n=3&seed=7&unknown=2"), 4)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in world[:6]))
    assert load_factset(f"{f}?limit=2") == limit_items(load_factset(f), 2)
    assert load_factset("builtin:world?limit=5000") == world


@pytest.mark.parametrize(("spec", "msg"), [
    ("builtin:world?limit=0", "limit=0 must be at least 1"),
    ("builtin:world?limit=x", "limit='x' must be an integer"),
    ("builtin:world?n=3", "builtin:world takes only limit=K"),
    ("nope.jsonl?limit=3", "fact file not found"),
])
def test_limit_option_errors_name_the_spec(spec, msg):
    from memsurgery.errors import InputError
    from memsurgery.facts import load_factset

    with pytest.raises(InputError, match=re.escape(msg)) as exc:
        load_factset(spec)
    assert spec in str(exc.value)
