#!/usr/bin/env python
"""Generate memsurgery/data/trace_facts.jsonl, the bundled fact set for causal tracing.

`memsurgery graft --layers auto` and `inspect --trace` run ROME-style causal
tracing (memsurgery/inspection/trace.py) on facts a model already knows, to find the
MLP layers that carry factual recall. This script builds a small, real and
deterministic set of such facts from offline packages, so the file can be
rebuilt and audited:

    capital          countryinfo (capitals), pycountry (names)    "The capital of France is" -> " Paris"
    language         countryinfo language codes -> pycountry names "The official language of Japan is" -> " Japanese"
    continent        countryinfo region/subregion                 "Kenya is located on the continent of" -> " Africa"
    element_symbol   periodictable                                "The chemical symbol of gold is" -> " Au"

Countries are the most populous ones (a 135M model knows big countries far more
often than small ones); elements are the first 30 plus well-known heavier ones.
Every record is {"id", "prompt", "subject", "answers", "relation"}; answers start
with a space because they continue the prompt, and list accepted aliases (an
ASCII spelling of accented names, older or common alternative names).

Usage:  python scripts/make_trace_facts.py [--out PATH] [--check]
  --check   exit 1 if the file on disk differs from what would be generated
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "memsurgery" / "data" / "trace_facts.jsonl"

N_CAPITALS = 90
N_LANGUAGES = 30
N_CONTINENTS = 30

# countryinfo entries that are historical, duplicated or not sovereign states, and
# whose "capital" would teach the tracer a questionable answer.
EXCLUDE = {"Serbia and Montenegro", "Burma", "Hong Kong", "Taiwan", "Macau", "Kosovo"}
# Country names that read naturally only with "the".
NEEDS_THE = {
    "United States",
    "United Kingdom",
    "Philippines",
    "Netherlands",
    "Czech Republic",
    "Democratic Republic of the Congo",
    "Republic of the Congo",
    "Dominican Republic",
    "United Arab Emirates",
    "Central African Republic",
    "Bahamas",
    "Gambia",
}
# Extra accepted answers: current/former names and the short forms models use.
CAPITAL_ALIASES = {
    "Washington D.C.": ["Washington", "Washington, D.C."],
    "Nur-Sultan": ["Astana"],
    "Kyiv": ["Kiev"],
    "Naypyidaw": ["Nay Pyi Taw", "Naypyitaw"],
    "Sucre": ["La Paz"],  # Bolivia: constitutional vs seat of government
    "City of Victoria": ["Victoria"],
    "New Delhi": ["Delhi"],
}
LANGUAGE_ALIASES = {"Persian": ["Farsi"], "Bengali": ["Bangla"], "Modern Greek": ["Greek"]}
SOUTH_AMERICA = {
    "Argentina",
    "Bolivia",
    "Brazil",
    "Chile",
    "Colombia",
    "Ecuador",
    "Guyana",
    "Paraguay",
    "Peru",
    "Suriname",
    "Uruguay",
    "Venezuela",
}
# Elements: the first 30 plus heavier ones whose symbols are common knowledge.
ELEMENT_NUMBERS = list(range(1, 31)) + [35, 36, 47, 50, 53, 54, 74, 78, 79, 80, 82, 86, 92]


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _answers(*names: str) -> list[str]:
    """Space-prefixed answers with ASCII spellings added, duplicates removed, order kept."""
    out: list[str] = []
    for name in names:
        for form in (name, _ascii(name)):
            ans = " " + form
            if form and ans not in out:
                out.append(ans)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", _ascii(text).lower()).strip("_")


def _countries() -> list[dict]:
    """Sovereign-looking countryinfo entries, most populous first (ties by name)."""
    import countryinfo
    import pycountry

    rows = []
    for c in countryinfo.all_countries():
        info = c.info()
        name, capital = info.get("name"), info.get("capital")
        if not name or not capital or name in EXCLUDE:
            continue
        try:  # pycountry knows ISO 3166 countries: drops odd countryinfo entries
            pycountry.countries.lookup(info.get("ISO", {}).get("alpha3") or name)
        except LookupError:
            continue
        rows.append(info)
    rows.sort(key=lambda i: (-(i.get("population") or 0), i["name"]))
    return rows


def _country_phrase(name: str, sentence_start: bool = False) -> str:
    if name in NEEDS_THE:
        return ("The " if sentence_start else "the ") + name
    return name


def _language_name(code: str) -> str | None:
    import pycountry

    lang = pycountry.languages.get(alpha_2=code)
    if lang is None:
        return None
    # "Dutch; Flemish" -> "Dutch"; "Swahili (macrolanguage)" -> "Swahili"
    return re.sub(r"\s*\(.*?\)", "", lang.name.split(";")[0]).strip()


def capital_facts(countries: list[dict]) -> list[dict]:
    out = []
    for info in countries[:N_CAPITALS]:
        name, capital = info["name"], info["capital"]
        out.append(
            {
                "id": f"capital/{_slug(name)}",
                "prompt": f"The capital of {_country_phrase(name)} is",
                "subject": name,
                "answers": _answers(capital, *CAPITAL_ALIASES.get(capital, [])),
                "relation": "capital",
            }
        )
    return out


def language_facts(countries: list[dict]) -> list[dict]:
    out = []
    for info in countries:
        codes = info.get("languages") or []
        # One official language only: with several, "the official language" is ill-posed.
        if len(codes) != 1:
            continue
        lang = _language_name(codes[0])
        if lang is None:
            continue
        name = info["name"]
        out.append(
            {
                "id": f"language/{_slug(name)}",
                "prompt": f"The official language of {_country_phrase(name)} is",
                "subject": name,
                "answers": _answers(lang, *LANGUAGE_ALIASES.get(lang, [])),
                "relation": "language",
            }
        )
        if len(out) == N_LANGUAGES:
            break
    return out


def _continent(info: dict) -> str | None:
    region, name = info.get("region"), info["name"]
    if region in ("Asia", "Europe", "Africa"):
        return region
    if region == "Americas":
        return "South America" if name in SOUTH_AMERICA else "North America"
    if region == "Oceania":
        return "Australia" if name in ("Australia", "New Zealand") else "Oceania"
    return None


def continent_facts(countries: list[dict]) -> list[dict]:
    out = []
    for info in countries:
        cont = _continent(info)
        # Turkey and Russia straddle two continents: no single right answer.
        if cont is None or info["name"] in ("Turkey", "Russia", "Egypt", "Kazakhstan"):
            continue
        name = info["name"]
        answers = [cont] + (["Oceania"] if cont == "Australia" else [])
        out.append(
            {
                "id": f"continent/{_slug(name)}",
                "prompt": f"{_country_phrase(name, sentence_start=True)} is located on the continent of",
                "subject": name,
                "answers": _answers(*answers),
                "relation": "continent",
            }
        )
        if len(out) == N_CONTINENTS:
            break
    return out


def element_facts() -> list[dict]:
    import periodictable

    out = []
    for number in ELEMENT_NUMBERS:
        el = periodictable.elements[number]
        out.append(
            {
                "id": f"element_symbol/{el.name}",
                "prompt": f"The chemical symbol of {el.name} is",
                "subject": el.name,
                "answers": [" " + el.symbol],
                "relation": "element_symbol",
            }
        )
    return out


def build() -> list[dict]:
    countries = _countries()
    facts = (
        capital_facts(countries)
        + language_facts(countries)
        + continent_facts(countries)
        + element_facts()
    )
    ids = [f["id"] for f in facts]
    assert len(set(ids)) == len(ids), "duplicate fact ids"
    for f in facts:
        assert f["subject"] in f["prompt"], f
    return facts


def render(facts: list[dict]) -> str:
    return "".join(json.dumps(f, ensure_ascii=False, sort_keys=True) + "\n" for f in facts)


def generator_main(build_facts, default_out: Path, description: str, argv: list[str] | None) -> int:
    """Write (or, with --check, compare) a bundled fact file from its generator."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--check", action="store_true", help="compare with the file, write nothing")
    args = ap.parse_args(argv)
    text = render(build_facts())
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from the generator output'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {text.count(chr(10))} facts to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return generator_main(build, DEFAULT_OUT, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
