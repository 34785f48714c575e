"""Fact sets for probing: schema, builtin sets, and the loader.

    load_factset("builtin:world")                                   # real facts, kind known
    load_factset("builtin:people?n=20&seed=0&unknown=20&paraphrases=3")  # injected + unknown people
    load_factset("my_facts.jsonl")                                  # any file in the schema

Schema and sets: docs/probe.md.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from memsurgery.errors import InputError
from memsurgery.facts.schema import KINDS, FactItem, from_records, read_jsonl

__all__ = ["KINDS", "FactItem", "load_factset", "parse_spec", "people_factset"]

# builtin:people query keys -> people_set keyword, with defaults.
_PEOPLE_KEYS = {"n": ("n_people", 20), "seed": ("seed", 0), "unknown": ("n_unknown", 20),
                "paraphrases": ("paraphrases", 3)}


def parse_spec(spec: str) -> tuple[str, dict]:
    """'builtin:people?n=5&seed=1' -> ('builtin:people', {'n': '5', 'seed': '1'})."""
    name, _, query = str(spec).partition("?")
    if not query:
        return name, {}
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise InputError(f"--facts {spec}: cannot parse the options after '?'; write key=value&key=value") from None
    return name, params


def people_factset(spec: str = "builtin:people", **overrides) -> dict:
    """The `people_set` dict for a builtin:people spec ("facts", "documents", "qa", ...)."""
    name, params = parse_spec(spec)
    if name != "builtin:people":
        raise InputError(f"--facts {spec}: not a builtin:people spec")
    kwargs = {}
    for key, value in params.items():
        if key not in _PEOPLE_KEYS:
            raise InputError(f"--facts {spec}: unknown option {key!r}; known: {sorted(_PEOPLE_KEYS)}")
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"--facts {spec}: option {key}={value!r} must be an integer") from None
        if n < 0 or (key in ("n", "paraphrases") and n < 1):
            raise InputError(f"--facts {spec}: option {key}={n} is out of range")
        kwargs[_PEOPLE_KEYS[key][0]] = n
    kwargs.update(overrides)
    try:
        from memsurgery.facts.people import people_set
    except ImportError as err:
        raise InputError(f"--facts {spec}: the people generator is not available ({err})") from None
    n_people = kwargs.pop("n_people", _PEOPLE_KEYS["n"][1])
    for key, (kw, default) in _PEOPLE_KEYS.items():
        if key != "n":
            kwargs.setdefault(kw, default)
    return people_set(n_people, **kwargs)


def load_factset(spec: str | Path) -> list[FactItem]:
    """Facts of `spec`: builtin:world, builtin:people[?options], or a JSONL path."""
    text = str(spec)
    name, params = parse_spec(text)
    if name == "builtin:world":
        if params:
            raise InputError(f"--facts {text}: builtin:world takes no options")
        from memsurgery.facts.world import world_facts

        return world_facts()
    if name == "builtin:people":
        data = people_factset(text)
        return from_records(data["facts"], label="builtin:people")
    if name.startswith("builtin:"):
        raise InputError(f"--facts {text}: unknown builtin set; choose builtin:world or builtin:people")
    return read_jsonl(Path(text))
