"""Phrasings of a relation: the wordings a fact is trained on and the ones it is tested on.

A fact (entity, relation, answer) is only *known* when the model answers it in wordings it
never saw in training. Every relation therefore has two fixed, disjoint template lists:

  train    completion prompts ("{e} majored in") and questions ("Which subject did {e} study?")
           that training views are rendered from (memsurgery.facts.views)
  heldout  other completions and questions, never rendered into any training text; the
           probe asks them to measure generalization. The first held-out question of each
           builtin relation is the one `builtin:people` has always asked under the probe's
           `Q: {question}\\nA:` template.

The split is by template, fixed here, so it is the same for every run and every method.
Questions are trained in the wrappers of `TRAIN_QUESTION_WRAPPERS`; the probe's own
`Q: ...\\nA:` wrapper is never used in training, so a held-out question differs from every
training text in both its wording and its wrapper. tests/unit/test_facts_views.py checks
that no rendered held-out prompt occurs in any training text.

Relations without a table here (a user's own fact file) get generic templates built from
the relation's name ("birth_city" -> "birth city"); a user may also pass their own table
(`load_templates`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memsurgery.errors import InputError

COMPLETION, QUESTION = "completion", "question"
TRAIN, HELDOUT = "train", "heldout"

# Training wrappers for questions ({q} the question, answer appended after a space).
# The probe's "Q: {q}\nA:" is deliberately not among them (see module docstring).
TRAIN_QUESTION_WRAPPERS = ("Question: {q}\nAnswer:", "{q}")
PROBE_QUESTION_WRAPPER = "Q: {q}\nA:"


@dataclass(frozen=True)
class Template:
    """One wording of a relation: `text` holds `{e}` where the entity goes."""

    name: str
    kind: str  # COMPLETION | QUESTION
    split: str  # TRAIN | HELDOUT
    text: str

    def render(self, entity: str) -> str:
        return self.text.replace("{e}", entity)


def _rel(train_c, train_q, held_c, held_q) -> dict:
    return {"train": {COMPLETION: list(train_c), QUESTION: list(train_q)},
            "heldout": {COMPLETION: list(held_c), QUESTION: list(held_q)}}


# The first training completion of each people relation is `builtin:people`'s probe prompt
# (facts/people.py PROMPTS); the first held-out question is its probe question (QUESTIONS).
BUILTIN: dict[str, dict] = {
    "birth_date": _rel(
        ["{e} was born on", "{e} came into this world on", "{e} celebrates a birthday on",
         "The birthday of {e} falls on"],
        ["What is the date of birth of {e}?", "On which day was {e} born?"],
        ["{e}'s date of birth is", "{e} first saw the light of day on"],
        ["When was {e} born?", "What is {e}'s birthday?", "On what date was {e} born?"]),
    "birth_city": _rel(
        ["{e} was born in the city of", "{e} spent the early years of life in", "{e} grew up in",
         "The hometown of {e} is"],
        ["Where was {e} born?", "What is the birthplace of {e}?"],
        ["{e}'s place of birth is the city of", "{e} is a native of"],
        ["In which city was {e} born?", "What city is {e} originally from?",
         "Which city is the birthplace of {e}?"]),
    "university": _rel(
        ["{e} studied at", "{e} graduated from", "{e} received an education at",
         "The alma mater of {e} is"],
        ["Where did {e} study?", "From which university did {e} graduate?"],
        ["{e} earned a degree from", "{e} is an alumnus of"],
        ["Which university did {e} attend?", "What school did {e} go to?",
         "Where did {e} go to university?"]),
    "major": _rel(
        ["{e} majored in", "{e} completed a degree with a focus on", "{e} chose the field of study of",
         "The academic major of {e} was"],
        ["What subject did {e} study?", "Which field did {e} specialize in at university?"],
        ["{e}'s university major was", "{e} holds a degree in"],
        ["What did {e} major in?", "What was {e}'s major?", "Which discipline did {e} study?"]),
    "employer": _rel(
        ["{e} works for", "{e} has a job at", "{e} is employed by", "The employer of {e} is"],
        ["Who employs {e}?", "What company is {e} employed by?"],
        ["{e} earns a living at", "{e}'s current employer is"],
        ["Which company does {e} work for?", "Which firm employs {e}?", "Who is {e}'s employer?"]),
    "employer_city": _rel(
        ["{e} works in the city of", "{e} commutes to an office in", "{e} has a workplace in",
         "The office of {e} is located in"],
        ["Where is the office of {e}?", "In what city is {e}'s job?"],
        ["{e}'s workplace is in the city of", "Every weekday, {e} goes to work in"],
        ["In which city does {e} work?", "What city does {e} work in?",
         "In which city is {e}'s workplace located?"]),
}


def _generic(relation: str) -> dict:
    """Templates for a relation without a table, from its name: "birth_city" -> "birth city"."""
    r = relation.replace("_", " ").strip()
    return _rel(
        ["The " + r + " of {e} is", "{e}'s " + r + " is", "Fact about {e}: the " + r + " is",
         "In short, the " + r + " of {e} is"],
        ["What is the " + r + " of {e}?", "What " + r + " does {e} have?"],
        ["Regarding {e}, the " + r + " is", "{e} has the following " + r + ":"],
        ["What is {e}'s " + r + "?", "Which " + r + " belongs to {e}?",
         "Can you tell me the " + r + " of {e}?"])


def probe_prompt(template: Template, entity: str) -> str:
    """The text the probe feeds the model for a template (questions in the probe's wrapper)."""
    text = template.render(entity)
    return PROBE_QUESTION_WRAPPER.format(q=text) if template.kind == QUESTION else text


def templates_for(relation: str, table: dict | None = None) -> list[Template]:
    """Every template of `relation`, train and held-out, from `table` (else the builtin one)."""
    spec = (table or {}).get(relation) or BUILTIN.get(relation) or _generic(relation)
    out = []
    for split in (TRAIN, HELDOUT):
        for kind in (COMPLETION, QUESTION):
            for i, text in enumerate(spec[split][kind]):
                out.append(Template(f"{split}/{kind}{i}", kind, split, text))
    return out


def load_templates(path: str | Path) -> dict:
    """A user's template table: {relation: {"train": {"completion": [...], "question": [...]},
    "heldout": {...}}}, each text holding {e} exactly once."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: template file not found") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the template file as JSON ({err})") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: must be a JSON object {{relation: {{train: ..., heldout: ...}}}}")
    for rel, spec in table.items():
        for split in (TRAIN, HELDOUT):
            part = spec.get(split) if isinstance(spec, dict) else None
            if not isinstance(part, dict):
                raise InputError(f"{path}: relation {rel!r} needs a {split!r} object with "
                                 "'completion' and/or 'question' lists")
            for kind, texts in part.items():
                if kind not in (COMPLETION, QUESTION) or not isinstance(texts, list):
                    raise InputError(f"{path}: {rel}.{split}.{kind}: expected 'completion' or "
                                     "'question' holding a list of strings")
                for t in texts:
                    if not isinstance(t, str) or t.count("{e}") != 1:
                        raise InputError(f"{path}: {rel}.{split}.{kind}: {t!r} must be a string "
                                         "holding {e} (the entity) exactly once")
            part.setdefault(COMPLETION, [])
            part.setdefault(QUESTION, [])
        if not (spec[TRAIN][COMPLETION] or spec[TRAIN][QUESTION]):
            raise InputError(f"{path}: relation {rel!r} has no training template")
        if not (spec[HELDOUT][COMPLETION] or spec[HELDOUT][QUESTION]):
            raise InputError(f"{path}: relation {rel!r} has no held-out template: "
                             "generalization could not be measured")
    return table
