"""Scoring: answer normalization, exact match, token F1, SimpleQA grades, AUROC, ECE.

Pure Python over lists, no model: every function here has hand-checked unit tests
(tests/unit/test_probe_metrics.py) and a definition with a worked example in
docs/probe.md.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

# Phrases that make a generation an abstention (SimpleQA's NOT_ATTEMPTED), matched
# on the normalized text as whole-word substrings.
ABSTAIN_PHRASES = (
    "i don't know", "i do not know", "i dont know", "don't know", "not sure", "unknown", "i'm not sure",
    "i am not sure", "no idea", "cannot answer", "can't answer", "no answer", "not known", "unsure",
    "i cannot", "i can't", "no information", "not available",
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2019\u2018\u201c\u201d")

CORRECT, INCORRECT, NOT_ATTEMPTED = "CORRECT", "INCORRECT", "NOT_ATTEMPTED"


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.

    "The  U.S. Dollar!" -> "us dollar"  (SQuAD / lm-eval convention).
    """
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalized prediction and any alias."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)


def answer_candidates(prediction: str) -> list[str]:
    """The prediction, and its part before the first comma when it has one.

    Decoding does not stop at commas (answers such as "January 27, 1994" contain one),
    so "Yen, which is..." is also tried as "Yen" -- lm-eval's "," stop, without
    truncating comma-containing answers.
    """
    out = [prediction]
    head = prediction.split(",", 1)[0]
    if head != prediction and head.strip():
        out.append(head)
    return out


def score_answer(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, token F1), each the best over `answer_candidates(prediction)`."""
    cands = answer_candidates(prediction)
    return max(exact_match(c, answers) for c in cands), max(token_f1(c, answers) for c in cands)


def is_abstention(text: str, phrases: Sequence[str] = ABSTAIN_PHRASES) -> bool:
    """True for an empty answer or one containing an abstention phrase (whole words)."""
    norm = " " + " ".join(text.lower().replace("\u2019", "'").split()) + " "
    stripped = normalize_answer(text)
    if not stripped:
        return True
    for p in phrases:
        if re.search(r"(?<![a-z0-9])" + re.escape(p) + r"(?![a-z0-9])", norm):
            return True
    return False


def grade(prediction: str, answers: Sequence[str], abstained: bool) -> str:
    """SimpleQA-style grade: NOT_ATTEMPTED if abstained, else CORRECT by exact match (score_answer), else INCORRECT."""
    if abstained:
        return NOT_ATTEMPTED
    return CORRECT if score_answer(prediction, answers)[0] else INCORRECT


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, standard error of the mean); (None, None) when empty, stderr None for n=1."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n == 1:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    Computed from average ranks (Mann-Whitney U). None when either class is empty or
    a score is NaN.
    """
    pairs = [(float(s), bool(y)) for s, y in zip(scores, labels, strict=True)]
    if any(math.isnan(s) for s, _ in pairs):
        return None
    n_pos = sum(y for _, y in pairs)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and pairs[order[j + 1]][0] == pairs[order[i]][0]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based average rank of the tie group
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_sum = sum(r for r, (_, y) in zip(ranks, pairs) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def calibration_bins(confidence: Sequence[float], correct: Sequence[int | bool], n_bins: int = 10) -> list[dict]:
    """Equal-width bins over [0, 1]: count, mean confidence, accuracy (empty bins kept, count 0).

    A confidence of exactly 1.0 falls in the last bin.
    """
    bins = [{"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": 0, "conf_sum": 0.0, "correct": 0}
            for b in range(n_bins)]
    for c, y in zip(confidence, correct, strict=True):
        c = min(max(float(c), 0.0), 1.0)
        b = min(int(c * n_bins), n_bins - 1)
        bins[b]["count"] += 1
        bins[b]["conf_sum"] += c
        bins[b]["correct"] += int(bool(y))
    out = []
    for b in bins:
        n = b["count"]
        out.append({"lo": b["lo"], "hi": b["hi"], "count": n,
                    "confidence": b["conf_sum"] / n if n else None,
                    "accuracy": b["correct"] / n if n else None})
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[int | bool], n_bins: int = 10) -> float | None:
    """ECE = sum over bins of (bin count / N) * |accuracy - mean confidence|; None when empty."""
    n = len(confidence)
    if n == 0:
        return None
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in calibration_bins(confidence, correct, n_bins) if b["count"])


def keep_threshold(scores: Sequence[float], keep: float = 0.95) -> float | None:
    """Largest t such that at least `keep` of `scores` are >= t (the (1-keep) lower order statistic)."""
    vals = sorted(float(s) for s in scores if not math.isnan(float(s)))
    if not vals:
        return None
    # Drop at most floor((1 - keep) * n) of the lowest scores.
    drop = int(math.floor((1.0 - keep) * len(vals) + 1e-9))
    return vals[drop]
