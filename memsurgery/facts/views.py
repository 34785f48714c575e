"""Training views and probe phrasings generated from structured facts.

A fact is (entity, relation, answer). Training on one wording teaches that wording
(reliability); a fact is known only when held-out wordings and questions are answered
too (generalization). `make_views` renders, from the fixed template split of
memsurgery.facts.templates:

  qa          {"prompt", "answer", "entity", "relation", "phrasing"} training pairs: every
              training completion, and every training question in every training wrapper
  documents   {"text", "entity", "spans"} short biographies per entity (one training
              completion per relation, shuffled), `spans` the answers' character spans
  probe       fact-set items (memsurgery.facts.schema) for the trained phrasings
              (split "train": reliability) and the held-out ones (split "heldout":
              generalization); held-out questions are asked as `Q: {question}\\nA:`

Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from memsurgery.facts.templates import (
    COMPLETION, HELDOUT, QUESTION, TRAIN, TRAIN_QUESTION_WRAPPERS, templates_for,
)


@dataclass(frozen=True)
class Fact:
    id: str
    entity: str
    relation: str
    answer: str  # the trained answer (the first alias)
    aliases: tuple[str, ...] = ()  # other accepted answers when probing


def _train_prompts(template, entity: str) -> list[tuple[str, str]]:
    """[(phrasing name, prompt)] a training template renders to (questions: one per wrapper)."""
    text = template.render(entity)
    if template.kind == COMPLETION:
        return [(template.name, text)]
    return [(f"{template.name}/w{k}", w.format(q=text)) for k, w in enumerate(TRAIN_QUESTION_WRAPPERS)]


def training_pairs(facts: list[Fact], table: dict | None = None) -> list[dict]:
    """Every training phrasing of every fact as an answer-only QA pair."""
    out = []
    for f in facts:
        for t in templates_for(f.relation, table):
            if t.split != TRAIN:
                continue
            for name, prompt in _train_prompts(t, f.entity):
                out.append({"prompt": prompt, "answer": " " + f.answer, "entity": f.entity,
                            "relation": f.relation, "phrasing": name})
    return out


def documents(facts: list[Fact], per_entity: int, seed: int, table: dict | None = None) -> list[dict]:
    """`per_entity` short documents per entity: one sentence per fact from a random training
    completion, sentences shuffled; `spans` are the answers' [start, end) character spans."""
    rng = random.Random(seed)
    by_entity: dict[str, list[Fact]] = {}
    for f in facts:
        by_entity.setdefault(f.entity, []).append(f)
    out = []
    for entity, fs in by_entity.items():
        for k in range(per_entity):
            sentences = []
            for f in fs:
                comps = [t for t in templates_for(f.relation, table) if t.split == TRAIN and t.kind == COMPLETION]
                t = comps[k % len(comps)] if k < len(comps) else rng.choice(comps)
                sentences.append((t.render(entity), f.answer))
            rng.shuffle(sentences)
            text, spans = "", []
            for prompt, answer in sentences:
                if text:
                    text += " "
                text += prompt + " "
                spans.append([len(text), len(text) + len(answer)])
                text += answer + "."
            out.append({"text": text, "entity": entity, "spans": spans})
    return out


def probe_items(facts: list[Fact], kind: str, *, splits=(TRAIN, HELDOUT), table: dict | None = None,
                per_fact: dict | None = None, seed: int = 0) -> list[dict]:
    """Fact-set records for `facts` in the phrasings of `splits`.

    per_fact {split: k} keeps k phrasings per fact (rotating through the templates so that
    each is asked equally often); absent = all.
    """
    per_fact = per_fact or {}
    out = []
    for i, f in enumerate(facts):
        answers = [f.answer, *[a for a in f.aliases if a != f.answer]]
        for split in splits:
            phrasings = []
            for t in templates_for(f.relation, table):
                if t.split != split:
                    continue
                if split == TRAIN:
                    phrasings += [(name, {"prompt": p}) for name, p in _train_prompts(t, f.entity)]
                elif t.kind == QUESTION:
                    phrasings.append((t.name, {"question": t.render(f.entity)}))
                else:
                    phrasings.append((t.name, {"prompt": t.render(f.entity)}))
            k = per_fact.get(split)
            if k is not None and k < len(phrasings):
                start = (i + seed) % len(phrasings)
                phrasings = [phrasings[(start + j) % len(phrasings)] for j in range(k)]
            for name, text in phrasings:
                out.append({"id": f"{f.id}@{name}", **text, "answers": answers, "kind": kind,
                            "entity": f.entity, "relation": f.relation, "phrasing": name})
    return out


# ---------------------------------------------------------------- loading facts


def people_facts(people) -> list[Fact]:
    """The six facts of each person (facts.people.Person) as Facts."""
    from memsurgery.facts.people import RELATIONS

    return [Fact(f"people/{p.id}/{r}", p.name, r, p.attribute(r)) for p in people for r in RELATIONS]


def read_fact_records(path, label: str | None = None) -> tuple[list[Fact], list[Fact]]:
    """(injected-or-known facts, unknown facts) of a JSONL file of structured facts:
    {"entity", "relation", "answer" | "answers", "id"?, "kind"?} per line."""
    from pathlib import Path

    from memsurgery.errors import InputError
    from memsurgery.facts.schema import jsonl_records

    path = Path(path)
    label = label or str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{label}: fact file not found; give a JSONL path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{label}: cannot read the fact file ({err})") from None
    taught, unknown, seen = [], [], set()
    for n, where, rec in jsonl_records(lines, label):
        if not isinstance(rec, dict):
            raise InputError(f"{where}: each line must be a JSON object")
        for key in ("entity", "relation"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise InputError(f"{where}: field {key!r} must be a non-empty string (structured facts "
                                 "are {\"entity\", \"relation\", \"answer\"})")
        answers = rec.get("answers", [rec["answer"]] if "answer" in rec else None)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                   for a in answers):
            raise InputError(f"{where}: give 'answer' (a string) or 'answers' (a non-empty list of strings)")
        fid = str(rec.get("id") or f"{path.name}:{n}")
        if fid in seen:
            raise InputError(f"{where}: duplicate fact id {fid!r}; ids must be unique")
        seen.add(fid)
        fact = Fact(fid, rec["entity"], rec["relation"], answers[0], tuple(answers[1:]))
        (unknown if rec.get("kind") == "unknown" else taught).append(fact)
    if not taught and not unknown:
        raise InputError(f"{label}: the fact file has no facts")
    return taught, unknown
