"""The fact-set schema: one JSON object per line, validated with file:line errors.

    {"id": "capital/france", "question": "What is the capital of France?",
     "prompt": "The capital of France is", "answers": ["Paris"], "kind": "known",
     "entity": "France", "relation": "capital"}

id        unique string (defaults to "<file>:<line>" when absent)
question  a question, used by the `qa` template ("Q: {question}\\nA:")
prompt    a sentence prefix, used by the `completion` template ("{prompt}")
          (at least one of question / prompt)
answers   non-empty list of accepted answers (aliases); a single "answer" string is accepted
kind      "known" (real facts the base model may know), "injected" (facts written into
          the memory by training), "unknown" (never trained: answering them is hallucination)
entity    optional subject string (the person, country, element)
relation  optional relation name ("capital", "birth_city"); "" when absent
phrasing  optional name of the wording (memsurgery.facts.templates: "train/completion0",
          "heldout/question1"); the probe reports trained ("train/...") and held-out
          ("heldout/...") phrasings apart: reliability vs generalization
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from memsurgery.errors import InputError

KINDS = ("known", "injected", "unknown")
_FIELDS = {"id", "question", "prompt", "answers", "answer", "kind", "entity", "relation", "phrasing", "meta"}


@dataclass(frozen=True)
class FactItem:
    id: str
    answers: tuple[str, ...]
    kind: str
    question: str | None = None
    prompt: str | None = None
    entity: str | None = None
    relation: str = ""
    phrasing: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return {k: v for k, v in d.items() if v is not None}


def _str_field(rec: dict, name: str, where: str, required: bool = False) -> str | None:
    v = rec.get(name)
    if v is None:
        if required:
            raise InputError(f"{where}: field {name!r} is missing; add it")
        return None
    if not isinstance(v, str) or not v.strip():
        raise InputError(f"{where}: field {name!r} must be a non-empty string, got {v!r}")
    return v


def validate_record(rec: object, where: str, default_id: str, default_kind: str | None = None) -> FactItem:
    """One parsed JSON value -> FactItem; InputError naming `where` (file:line) and the field."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS - {'meta'})}")
    fid = _str_field(rec, "id", where) or default_id
    question = _str_field(rec, "question", where)
    prompt = _str_field(rec, "prompt", where)
    if question is None and prompt is None:
        raise InputError(f"{where}: field 'question' or 'prompt' is required (at least one)")
    if "answers" in rec and "answer" in rec:
        raise InputError(f"{where}: give 'answers' (a list) or 'answer' (a string), not both")
    if "answer" in rec:
        answers = [rec["answer"]]
        fname = "answer"
    else:
        answers = rec.get("answers")
        fname = "answers"
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: field {fname!r} must be a non-empty list of strings, got {answers!r}")
    for a in answers:
        if not isinstance(a, str) or not a.strip():
            raise InputError(f"{where}: field {fname!r} has an empty or non-string answer {a!r}")
    kind = rec.get("kind", default_kind)
    if kind is None:
        raise InputError(f"{where}: field 'kind' is missing; one of {list(KINDS)}")
    if kind not in KINDS:
        raise InputError(f"{where}: field 'kind' is {kind!r}; must be one of {list(KINDS)}")
    entity = _str_field(rec, "entity", where)
    relation = rec.get("relation", "")
    if relation is None:
        relation = ""
    if not isinstance(relation, str):
        raise InputError(f"{where}: field 'relation' must be a string, got {relation!r}")
    phrasing = _str_field(rec, "phrasing", where)
    return FactItem(id=fid, answers=tuple(answers), kind=kind, question=question, prompt=prompt,
                    entity=entity, relation=relation, phrasing=phrasing)


def check_unique(items: Iterable[FactItem], label: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise InputError(f"{label}: duplicate fact id {it.id!r}; ids must be unique")
        seen.add(it.id)


def jsonl_records(lines: list[str], label: str):
    """(line number, "label:n", parsed record) for every non-blank line of a JSONL file."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{label}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        yield n, where, rec


def read_jsonl(path: str | Path, default_kind: str | None = None) -> list[FactItem]:
    """Read and validate a fact-set JSONL file (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: fact file not found; give a JSONL path or builtin:world / builtin:people") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the fact file ({err})") from None
    items = []
    for n, where, rec in jsonl_records(text.splitlines(), str(path)):
        items.append(validate_record(rec, where, default_id=f"{path.name}:{n}", default_kind=default_kind))
    if not items:
        raise InputError(f"{path}: the fact file has no facts")
    check_unique(items, str(path))
    return items


def from_records(records: Iterable[dict], label: str, default_kind: str | None = None) -> list[FactItem]:
    """Validate in-memory records (e.g. from the people generator); `label` names their source."""
    items = [validate_record(r, f"{label}[{i}]", default_id=f"{label}:{i}", default_kind=default_kind)
             for i, r in enumerate(records)]
    check_unique(items, label)
    return items
