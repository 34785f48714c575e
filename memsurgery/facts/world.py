"""`builtin:world`: real facts bundled as memsurgery/data/world_facts.jsonl (kind "known").

Built by scripts/make_world_facts.py from countryinfo / pycountry / periodictable
(capital, currency, continent, element_symbol, atomic_number); a unit test checks
the bundled file equals the generator's output.
"""

from __future__ import annotations

from pathlib import Path

from memsurgery.facts.schema import FactItem, read_jsonl


def bundled_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "world_facts.jsonl"


def world_facts() -> list[FactItem]:
    return read_jsonl(bundled_path())
