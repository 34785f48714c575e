"""Fact sets for probing: schema, builtin sets, and the loader.

    load_factset("builtin:world")                                   # real facts, kind known
    load_factset("builtin:people?n=20&seed=0&unknown=20&paraphrases=3")  # injected + unknown people
    load_factset("my_facts.jsonl")                                  # any file in the schema
    load_factset("builtin:world?limit=200")     # any set cut to K items, round-robin over relations
    load_factset("builtin:people?n=30&phrasings=views")   # trained + held-out phrasings of each fact
    load_factset("facts.jsonl?phrasings=views&templates=my_templates.json")  # structured facts, same

`phrasings=views` asks each fact in the wordings of memsurgery.facts.templates: up to
`train_per_fact` (default 2) of the phrasings training uses (reliability) and
`heldout_per_fact` (default all) of the held-out ones (generalization); never-trained
(unknown) people are asked `unknown_per_fact` (default 2) held-out phrasings. A file read
this way holds structured facts ({"entity", "relation", "answer"}).

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
# phrasings=views options (any structured fact set), with defaults; None = all.
_VIEW_KEYS = {"phrasings": "canonical", "train_per_fact": 2, "heldout_per_fact": None, "unknown_per_fact": 2,
              "templates": None}


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


def _view_options(params: dict, text: str) -> dict | None:
    """The phrasings=views options taken out of `params` (None when phrasings is canonical)."""
    opts = {k: params.pop(k, v) for k, v in _VIEW_KEYS.items()}
    if opts["phrasings"] not in ("canonical", "views"):
        raise InputError(f"--facts {text}: phrasings={opts['phrasings']!r}; choose canonical or views")
    for key in ("train_per_fact", "heldout_per_fact", "unknown_per_fact"):
        if isinstance(opts[key], str):
            try:
                opts[key] = int(opts[key])
            except ValueError:
                raise InputError(f"--facts {text}: {key}={opts[key]!r} must be an integer") from None
            if opts[key] < 0:
                raise InputError(f"--facts {text}: {key}={opts[key]} must be >= 0")
    if opts["phrasings"] == "canonical":
        extra = [k for k, v in opts.items() if k != "phrasings" and v != _VIEW_KEYS[k]]
        if extra:
            raise InputError(f"--facts {text}: {', '.join(extra)} needs phrasings=views")
        return None
    return opts


def _view_items(taught, unknown, opts: dict, label: str, taught_kind: str = "injected") -> list[FactItem]:
    from memsurgery.facts.templates import HELDOUT, TRAIN, load_templates
    from memsurgery.facts.views import probe_items

    table = load_templates(opts["templates"]) if opts["templates"] else None
    per = {TRAIN: opts["train_per_fact"], HELDOUT: opts["heldout_per_fact"]}
    records = probe_items(taught, taught_kind, table=table, per_fact=per)
    records += probe_items(unknown, "unknown", splits=(HELDOUT,), table=table,
                           per_fact={HELDOUT: opts["unknown_per_fact"]})
    return from_records(records, label=label)


def _load(name: str, params: dict, text: str) -> list[FactItem]:
    """The set `name` with its options `params` (limit taken out); `text` is the whole spec, for messages."""
    if name == "builtin:world":
        if params:
            raise InputError(f"--facts {text}: builtin:world takes only limit=K")
        from memsurgery.facts.world import world_facts

        return world_facts()
    if name == "builtin:people":
        views = _view_options(params, text)
        data = people_factset(name + ("?" + urlencode(params) if params else ""))
        if views is None:
            return from_records(data["facts"], label="builtin:people")
        from memsurgery.facts.people import Person
        from memsurgery.facts.views import people_facts

        return _view_items(people_facts([Person(**p) for p in data["people"]]),
                           people_facts([Person(**p) for p in data["unknown"]]), views, "builtin:people")
    if name.startswith("builtin:"):
        raise InputError(f"--facts {text}: unknown builtin set; choose builtin:world or builtin:people")
    views = _view_options(params, text)
    if params:
        raise InputError(f"--facts {text}: a fact file takes only limit=K and the phrasings=views options")
    if name != text and not Path(name).is_file():
        raise InputError(f"--facts {text}: fact file not found; give a JSONL path (options: ?limit=K)")
    if views is not None:
        from memsurgery.facts.views import read_fact_records

        taught, unknown = read_fact_records(Path(name))
        return _view_items(taught, unknown, views, name)
    return read_jsonl(Path(name))
