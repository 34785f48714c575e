#!/usr/bin/env python
"""Generate memsurgery/data/world_facts.jsonl, the `builtin:world` probe set (kind "known").

Real facts from maintained offline data packages, so the file can be rebuilt and
audited (country selection and naming reuse scripts/make_trace_facts.py):

    capital         countryinfo + pycountry   "What is the capital of France?" / "The capital of France is" -> Paris
    currency        countryinfo + pycountry   "What is the currency of Japan?" / "The currency of Japan is the" -> Yen
    continent       countryinfo region        "On which continent is Kenya?" / "Kenya is located on the continent of" -> Africa
    element_symbol  periodictable             "What is the chemical symbol of iron?" / "The chemical symbol of iron is" -> Fe
    atomic_number   periodictable             "What is the atomic number of iron?" / "The atomic number of iron is" -> 26

Every record follows docs/probe.md: {"id", "question", "prompt", "answers", "kind",
"entity", "relation"}; answers list aliases (ASCII spellings, former names, short forms).

Usage:  python scripts/make_world_facts.py [--out PATH] [--check]
  --check   exit 1 if the file on disk differs from what would be generated
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_trace_facts as mtf  # noqa: E402  (shared country list, naming and aliases)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "memsurgery" / "data" / "world_facts.jsonl"

# Common names the ISO currency names lack.
CURRENCY_ALIASES = {"Yuan Renminbi": ["Yuan", "RMB", "Chinese Yuan"], "US Dollar": ["United States Dollar", "American Dollar"],
                    "Pound Sterling": ["Pound", "British Pound"], "Russian Ruble": ["Rouble"]}
# Continent-straddling or ambiguous countries: no single right continent.
NO_CONTINENT = {"Turkey", "Russia", "Egypt", "Kazakhstan", "Azerbaijan", "Georgia", "Armenia", "Cyprus"}


def _aliases(*names: str) -> list[str]:
    """Answers with ASCII spellings added, duplicates removed, order kept."""
    out: list[str] = []
    for name in names:
        for form in (name, mtf._ascii(name)):
            form = form.strip()
            if form and form not in out:
                out.append(form)
    return out


def _record(rid, question, prompt, answers, entity, relation) -> dict:
    assert entity in prompt, (entity, prompt)
    return {"id": rid, "question": question, "prompt": prompt, "answers": answers, "kind": "known",
            "entity": entity, "relation": relation}


def capital_facts(countries) -> list[dict]:
    out = []
    for info in countries:
        name, capital = info["name"], info["capital"]
        if not isinstance(capital, str):  # countryinfo stores a few as one-item lists
            capital = capital[0]
        phrase = mtf._country_phrase(name)
        out.append(_record(f"capital/{mtf._slug(name)}", f"What is the capital of {phrase}?",
                           f"The capital of {phrase} is",
                           _aliases(capital, *mtf.CAPITAL_ALIASES.get(capital, [])), name, "capital"))
    return out


def _currency_name(code: str) -> str | None:
    import pycountry

    cur = pycountry.currencies.get(alpha_3=code)
    return None if cur is None else cur.name


def currency_facts(countries) -> list[dict]:
    out = []
    for info in countries:
        codes = info.get("currencies") or []
        # One currency only: with several, "the currency" has no single answer.
        if len(codes) != 1:
            continue
        cname = _currency_name(codes[0])
        if cname is None:
            continue
        name = info["name"]
        phrase = mtf._country_phrase(name)
        last = cname.split()[-1]
        extra = [last, *CURRENCY_ALIASES.get(cname, []), codes[0]]
        if info.get("demonym") and cname != "Euro":
            extra.insert(0, f"{info['demonym']} {last}")  # "Mexican Peso"
        out.append(_record(f"currency/{mtf._slug(name)}", f"What is the currency of {phrase}?",
                           f"The currency of {phrase} is the", _aliases(cname, *extra), name, "currency"))
    return out


def continent_facts(countries) -> list[dict]:
    out = []
    for info in countries:
        cont = mtf._continent(info)
        name = info["name"]
        if cont is None or name in NO_CONTINENT:
            continue
        answers = [cont] + (["Oceania"] if cont == "Australia" else [])
        if cont in ("North America", "South America"):
            answers.append("America")  # "the Americas" reads as right for either
        phrase = mtf._country_phrase(name)
        out.append(_record(f"continent/{mtf._slug(name)}", f"On which continent is {phrase}?",
                           f"{mtf._country_phrase(name, sentence_start=True)} is located on the continent of",
                           _aliases(*answers), name, "continent"))
    return out


def element_facts() -> list[dict]:
    import periodictable

    out = []
    for el in periodictable.elements:
        if el.number == 0:  # periodictable's neutron placeholder
            continue
        name = el.name
        if not re.fullmatch(r"[a-z]+", name):
            continue
        out.append(_record(f"element_symbol/{name}", f"What is the chemical symbol of {name}?",
                           f"The chemical symbol of {name} is", _aliases(el.symbol), name, "element_symbol"))
        out.append(_record(f"atomic_number/{name}", f"What is the atomic number of {name}?",
                           f"The atomic number of {name} is", [str(el.number)], name, "atomic_number"))
    return sorted(out, key=lambda r: (r["relation"], r["id"]))


def build() -> list[dict]:
    countries = mtf._countries()
    facts = capital_facts(countries) + currency_facts(countries) + continent_facts(countries) + element_facts()
    ids = [f["id"] for f in facts]
    assert len(set(ids)) == len(ids), "duplicate fact ids"
    return facts


def main(argv: list[str] | None = None) -> int:
    return mtf.generator_main(build, DEFAULT_OUT, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
