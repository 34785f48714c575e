"""The knowledge-editing triple from scored probe samples: reliability, generalization, locality.

    reliability     exact match on injected facts asked in phrasings used in training
                    (items whose `phrasing` starts with "train/")
    generalization  exact match on injected facts asked in held-out phrasings, never in any
                    training text ("heldout/..."): overall, questions (asked as
                    `Q: {question}\\nA:`), completions, per phrasing and per relation
    locality        exact match on known facts (and, from the probe's retention section,
                    general-text perplexity)
    hallucination   never-trained (unknown) entities: the share answered and wrong, overall
                    and on question phrasings

Injected items without a phrasing (the canonical `builtin:people` items) are counted apart
as "unsplit": whether they were trained depends on the recipe, so they are neither.
Definitions: docs/probe.md.
"""

from __future__ import annotations

from collections import defaultdict

from memsurgery.probe import metrics as M

TRAIN_PREFIX, HELDOUT_PREFIX = "train/", "heldout/"


def split_of(row: dict) -> str | None:
    """"train", "heldout" or None (no phrasing) for a scored sample."""
    ph = row.get("phrasing") or ""
    if ph.startswith(TRAIN_PREFIX):
        return "train"
    if ph.startswith(HELDOUT_PREFIX):
        return "heldout"
    return None


def is_question(row: dict) -> bool:
    return "question" in (row.get("phrasing") or "")


def _em(rows: list[dict]) -> dict:
    em, se = M.mean_stderr([r["exact_match"] for r in rows])
    return {"exact_match": em, "stderr": se, "n": len(rows)}


def _by(rows: list[dict], key) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {k: _em(v) for k, v in sorted(groups.items())}


def _wrong(rows: list[dict]) -> float | None:
    """Share of rows answered (not abstained) and wrong: SimpleQA's INCORRECT."""
    return sum(r["grade"] == M.INCORRECT for r in rows) / len(rows) if rows else None


def knowledge(samples: list[dict], retention: dict | None = None) -> dict:
    """Reliability / generalization / locality / unknown-entity hallucination of one model."""
    inj = [s for s in samples if s["kind"] == "injected"]
    trained = [s for s in inj if split_of(s) == "train"]
    held = [s for s in inj if split_of(s) == "heldout"]
    unsplit = [s for s in inj if split_of(s) is None]
    known = [s for s in samples if s["kind"] == "known"]
    unknown = [s for s in samples if s["kind"] == "unknown"]
    unk_q = [s for s in unknown if is_question(s)]
    out = {
        "reliability": {**_em(trained), "by_phrasing": _by(trained, lambda r: r["phrasing"])} if trained else None,
        "generalization": None,
        "unsplit_injected": _em(unsplit) if unsplit else None,
        "locality": {"known": _em(known) if known else None,
                     "perplexity": (retention or {}).get("perplexity")},
        "hallucination": {"n": len(unknown), "attempted_wrong": _wrong(unknown),
                          "n_questions": len(unk_q), "attempted_wrong_questions": _wrong(unk_q)},
    }
    if held:
        out["generalization"] = {
            **_em(held),
            "questions": _em([s for s in held if is_question(s)]),
            "completions": _em([s for s in held if not is_question(s)]),
            "by_phrasing": _by(held, lambda r: r["phrasing"]),
            "by_relation": _by(held, lambda r: r.get("relation") or "none"),
        }
    return out


def knowledge_numbers(report: dict) -> dict:
    """The headline numbers of a probe report's (or its `baseline`'s) knowledge section, flat:
    exact-match rates, perplexity and the unknown-entity hallucination rate on questions;
    None where the report did not measure them. What the demo, the benchmark and the
    ablations print, read in one place."""
    k = report.get("knowledge") or {}
    gen = k.get("generalization") or {}
    loc = k.get("locality") or {}

    def rate(d: dict | None) -> float | None:
        return None if not d else d.get("exact_match")

    return {"reliability": rate(k.get("reliability")), "generalization": rate(gen),
            "generalization_questions": rate(gen.get("questions")),
            "generalization_completions": rate(gen.get("completions")),
            "known": rate(loc.get("known")), "perplexity": loc.get("perplexity"),
            "unknown_attempted_wrong_questions": (k.get("hallucination") or {}).get("attempted_wrong_questions")}
