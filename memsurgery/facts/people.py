"""Fictional people for knowledge injection (Allen-Zhu & Li's bioS design).

Each person has six attributes: birth date, birth city, university, major,
employer, employer city. Everything comes from a seeded `faker` instance, so no
pretrained model can know these facts: what the model answers after training
was injected, and what it answers about a never-trained look-alike is made up.

`people_set(n_people, n_unknown, seed, paraphrases)` returns
  people     the people to inject (dicts with the six attributes)
  unknown    look-alikes from the same generator, never trained (hallucination probes)
  documents  `paraphrases` biographies per injected person: one sentence per
             attribute, templates drawn at random, sentence order shuffled, full
             name in every sentence (bioS "fullname" + "permute": it measurably
             helps later extraction, and lets every sentence stand alone)
  qa         {"prompt", "answer"} pairs (completion style, answer with leading
             space) for answer-only training on the injected people
  facts      probe items in the fact-set schema (docs/probe.md): kind "injected"
             for trained people, "unknown" for look-alikes
The same seed gives the same set for a given faker version (recorded in `meta`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from memsurgery.errors import InputError, MissingDependency

RELATIONS = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Completion prompts (the probe's "completion" template and the QA training pairs)
# and questions (the probe's "Q: ... A:" template), one per relation.
PROMPTS = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} was born in the city of",
    "university": "{name} studied at",
    "major": "{name} majored in",
    "employer": "{name} works for",
    "employer_city": "{name} works in the city of",
}
QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_city": "In which city was {name} born?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} major in?",
    "employer": "Which company does {name} work for?",
    "employer_city": "In which city does {name} work?",
}
# Biography sentences: the first template of each relation is the probe prompt
# followed by the answer, so QA-style probing is in distribution; the others are
# paraphrases so that the fact is not tied to one wording.
SENTENCES = {
    "birth_date": [
        "{name} was born on {v}.",
        "{name} came into this world on {v}.",
        "{name} celebrates a birthday on {v}.",
    ],
    "birth_city": [
        "{name} was born in the city of {v}.",
        "{name} spent the early years of life in {v}.",
        "{name} grew up in {v}.",
    ],
    "university": [
        "{name} studied at {v}.",
        "{name} graduated from {v}.",
        "{name} received an education at {v}.",
    ],
    "major": [
        "{name} majored in {v}.",
        "{name} completed a degree with a focus on {v}.",
        "{name} chose {v} as the field of study.",
    ],
    "employer": [
        "{name} works for {v}.",
        "{name} has a job at {v}.",
        "{name} is employed by {v}.",
    ],
    "employer_city": [
        "{name} works in the city of {v}.",
        "{name} commutes to an office in {v}.",
        "{name} has a workplace in {v}.",
    ],
}
MAJORS = (
    "Economics", "Mechanical Engineering", "Biology", "Computer Science", "History",
    "Philosophy", "Chemistry", "Architecture", "Linguistics", "Mathematics", "Physics",
    "Psychology", "Sociology", "Music Theory", "Civil Engineering", "Marine Biology",
    "Political Science", "Graphic Design", "Anthropology", "Astronomy", "Nursing",
    "Geology", "Statistics", "Journalism", "Accounting", "Art History",
    "Environmental Science", "Materials Science", "Neuroscience", "Urban Planning",
)
_UNIVERSITY_FORMS = (
    "University of {city}", "{city} Institute of Technology", "{last} University",
    "{city} State University", "{last} College",
)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def attribute(self, relation: str) -> str:
        return getattr(self, relation)


def _faker(seed: int):
    try:
        from faker import Faker
    except ImportError as err:  # pragma: no cover - faker is a core dependency
        raise MissingDependency("builtin:people needs faker: pip install faker") from err
    fake = Faker("en_US")
    fake.seed_instance(seed)
    return fake


def _faker_version() -> str:
    try:
        from importlib.metadata import version

        return version("faker")
    except Exception:  # pragma: no cover
        return "unknown"


def generate_people(n: int, seed: int = 0, *, prefix: str = "p", exclude: set[str] | None = None) -> list[Person]:
    """`n` people with unique full names (none in `exclude`) and six attributes each."""
    if n < 0:
        raise InputError(f"number of people must be >= 0, got {n}")
    fake = _faker(seed)
    rng = random.Random(seed)
    taken = set(exclude or ())
    people: list[Person] = []
    while len(people) < n:
        first, last = fake.first_name(), fake.last_name()
        name = f"{first} {last}"
        if name in taken:
            continue
        taken.add(name)
        company = fake.company()
        while "," in company:  # "Smith, Jones and Brown": commas break stop sequences
            company = fake.company()
        birth_city = fake.city()
        work_city = fake.city()
        while work_city == birth_city:
            work_city = fake.city()
        uni_city = fake.city()
        university = rng.choice(_UNIVERSITY_FORMS).format(city=uni_city, last=fake.last_name())
        born = fake.date_of_birth(minimum_age=22, maximum_age=75)
        people.append(Person(
            id=f"{prefix}{len(people):05d}",
            name=name,
            birth_date=f"{_MONTHS[born.month - 1]} {born.day}, {born.year}",
            birth_city=birth_city,
            university=university,
            major=rng.choice(MAJORS),
            employer=company,
            employer_city=work_city,
        ))
    return people


def biographies(person: Person, paraphrases: int, rng: random.Random) -> list[str]:
    """`paraphrases` biographies; the first uses every relation's canonical sentence."""
    docs = []
    for k in range(paraphrases):
        sentences = []
        for rel in RELATIONS:
            options = SENTENCES[rel]
            template = options[0] if k == 0 else rng.choice(options)
            sentences.append(template.format(name=person.name, v=person.attribute(rel)))
        if k > 0:
            rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    return docs


def fact_items(person: Person, kind: str) -> list[dict]:
    """Probe items for one person in the fact-set schema."""
    return [
        {
            "id": f"people/{person.id}/{rel}",
            "question": QUESTIONS[rel].format(name=person.name),
            "prompt": PROMPTS[rel].format(name=person.name),
            "answers": [person.attribute(rel)],
            "kind": kind,
            "entity": person.name,
            "relation": rel,
        }
        for rel in RELATIONS
    ]


def people_set(n_people: int, n_unknown: int | None = None, seed: int = 0, paraphrases: int = 3) -> dict:
    """Injected people, never-trained look-alikes, their training data and probes."""
    if n_people < 1:
        raise InputError(f"builtin:people: n must be >= 1, got {n_people}")
    if paraphrases < 1:
        raise InputError(f"builtin:people: paraphrases must be >= 1, got {paraphrases}")
    n_unknown = n_people if n_unknown is None else n_unknown
    people = generate_people(n_people, seed=seed, prefix="p")
    # A second stream from the same generator: same distribution of names and
    # attributes, disjoint names, so the two kinds differ only in being trained.
    unknown = generate_people(n_unknown, seed=seed + 1_000_003, prefix="u",
                              exclude={p.name for p in people})
    rng = random.Random(seed)
    documents, qa = [], []
    for p in people:
        for k, text in enumerate(biographies(p, paraphrases, rng)):
            documents.append({"id": f"people/{p.id}/bio{k}", "text": text, "entity": p.name})
        for rel in RELATIONS:
            qa.append({"prompt": PROMPTS[rel].format(name=p.name), "answer": " " + p.attribute(rel),
                       "entity": p.name, "relation": rel})
    facts = [it for p in people for it in fact_items(p, "injected")]
    facts += [it for p in unknown for it in fact_items(p, "unknown")]
    return {
        "people": [asdict(p) for p in people],
        "unknown": [asdict(p) for p in unknown],
        "documents": documents,
        "qa": qa,
        "facts": facts,
        "meta": {"generator": "memsurgery.facts.people/1", "seed": seed, "n_people": n_people,
                 "n_unknown": n_unknown, "paraphrases": paraphrases, "faker": _faker_version()},
    }
