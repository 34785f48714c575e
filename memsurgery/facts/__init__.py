"""Fact sets for probing: schema, builtin sets, and the loader.

    load_factset("builtin:world")                                   # real facts, kind known
    load_factset("builtin:people?n=20&seed=0&unknown=20&paraphrases=3")  # injected + unknown people
    load_factset("my_facts.jsonl")                                  # any file in the schema
    load_factset("builtin:world?limit=200")     # any set cut to K items, round-robin over relations

Schema and sets: docs/probe.md.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from memsurgery.errors import InputError
from memsurgery.facts.schema import KINDS, FactItem, from_records, read_jsonl

__all__ = ["KINDS", "FactItem", "limit_items", "load_factset", "parse_spec", "people_factset"]

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


def limit_items(items: list[FactItem], limit: int | None) -> list[FactItem]:
    """The first `limit` items taken round-robin over (kind, relation) groups, file order kept.

    Round-robin so that a small cut still covers every relation (builtin:world lists
    its 929 facts relation by relation)."""
    if limit is None or limit >= len(items):
        return list(items)
    groups: dict[tuple, list[FactItem]] = defaultdict(list)
    for it in items:
        groups[(it.kind, it.relation)].append(it)
    picked: set[str] = set()
    queues = [list(g) for g in groups.values()]
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.add(q.pop(0).id)
    return [it for it in items if it.id in picked]


def load_factset(spec: str | Path) -> list[FactItem]:
    """Facts of `spec`: builtin:world, builtin:people[?options], or a JSONL path; any of them
    with `?limit=K` (or `&limit=K`) is cut to K items by `limit_items`."""
    text = str(spec)
    if Path(text).is_file():  # a file, even one with '?' in its name
        return read_jsonl(Path(text))
    name, params = parse_spec(text)
    limit = params.pop("limit", None)
    if limit is not None:
        try:
            limit = int(limit)
        except ValueError:
            raise InputError(f"--facts {text}: limit={limit!r} must be an integer") from None
        if limit < 1:
            raise InputError(f"--facts {text}: limit={limit} must be at least 1")
    return limit_items(_load(name, params, text), limit)


def _load(name: str, params: dict, text: str) -> list[FactItem]:
    """The set `name` with its options `params` (limit taken out); `text` is the whole spec, for messages."""
    if name == "builtin:world":
        if params:
            raise InputError(f"--facts {text}: builtin:world takes only limit=K")
        from memsurgery.facts.world import world_facts

        return world_facts()
    if name == "builtin:people":
        data = people_factset(name + ("?" + urlencode(params) if params else ""))
        return from_records(data["facts"], label="builtin:people")
    if name.startswith("builtin:"):
        raise InputError(f"--facts {text}: unknown builtin set; choose builtin:world or builtin:people")
    if params:
        raise InputError(f"--facts {text}: a fact file takes only limit=K")
    if name != text and not Path(name).is_file():
        raise InputError(f"--facts {text}: fact file not found; give a JSONL path (options: ?limit=K)")
    return read_jsonl(Path(name))
