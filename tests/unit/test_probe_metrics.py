"""Probe metrics against hand-computed cases (docs/probe.md gives the same worked examples)."""

from __future__ import annotations

import math

import pytest

from memsurgery.probe import metrics as M


@pytest.mark.parametrize("text, expected", [
    ("The  U.S. Dollar!", "us dollar"),
    ("  Paris.\n", "paris"),
    ("an Apple a day", "apple day"),
    ("Theater", "theater"),  # "the" inside a word stays
    ("Washington, D.C.", "washington dc"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_match_any_alias_and_f1():
    assert M.exact_match("the Yen", ["Japanese yen", "Yen"]) == 1.0
    assert M.exact_match("Japanese", ["Japanese yen", "Yen"]) == 0.0
    # pred "new delhi india" vs gold "new delhi": common 2, P = 2/3, R = 1, F1 = 0.8
    assert M.token_f1("New Delhi, India", ["New Delhi"]) == pytest.approx(0.8)
    # best alias wins: "delhi" vs "Delhi" = 1.0
    assert M.token_f1("Delhi", ["New Delhi", "Delhi"]) == 1.0
    assert M.token_f1("Lima", ["Paris"]) == 0.0


def test_comma_candidates():
    assert M.score_answer("yen, which is the", ["Yen"]) == (1.0, 1.0)
    assert M.score_answer("January 27, 1994", ["January 27, 1994"])[0] == 1.0
    em, f1 = M.score_answer("Paris France", ["Paris"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, abstained", [
    ("I don't know", True), ("I\u2019m not sure.", True), ("", True), ("  .", True), ("Unknown", True),
    ("Paris", False), ("Known for Paris", False), ("the unknowns", False),
])
def test_abstention(text, abstained):
    assert M.is_abstention(text) is abstained


def test_grade():
    assert M.grade("Paris", ["Paris"], False) == M.CORRECT
    assert M.grade("Lyon", ["Paris"], False) == M.INCORRECT
    assert M.grade("Paris", ["Paris"], True) == M.NOT_ATTEMPTED


def test_auroc_hand_computed():
    # positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1 -> 3/4
    assert M.auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    # one tie counts half: pos {0.5, 0.8}, neg {0.5}: (0.5 + 1) / 2
    assert M.auroc([0.5, 0.8, 0.5], [1, 1, 0]) == pytest.approx(0.75)
    assert M.auroc([1, 2, 3], [0, 0, 1]) == 1.0
    assert M.auroc([1, 2, 3], [1, 1, 0]) == 0.0
    assert M.auroc([1, 2], [1, 1]) is None
    assert M.auroc([float("nan"), 1.0], [1, 0]) is None


def test_ece_hand_computed():
    # bin [0.9,1.0): conf 0.9, 0.9 -> acc 1/2 ; bin [0.2,0.3): conf 0.2 -> acc 0
    # ECE = 2/3*|0.5-0.9| + 1/3*|0-0.2| = 0.2667 + 0.0667 = 1/3
    conf, ok = [0.9, 0.9, 0.2], [1, 0, 0]
    assert M.expected_calibration_error(conf, ok) == pytest.approx(1 / 3)
    bins = M.calibration_bins(conf, ok)
    assert len(bins) == 10 and bins[9]["count"] == 2 and bins[9]["accuracy"] == 0.5
    assert bins[2]["count"] == 1 and bins[0]["count"] == 0 and bins[0]["accuracy"] is None
    assert M.calibration_bins([1.0], [1])[9]["count"] == 1  # 1.0 lands in the last bin
    assert M.expected_calibration_error([], []) is None
    assert M.expected_calibration_error([0.7, 0.7], [1, 1]) == pytest.approx(0.3)


def test_keep_threshold_and_stderr():
    vals = list(range(1, 21))  # 20 values, keep 95% -> drop 1 -> t = 2
    t = M.keep_threshold(vals, 0.95)
    assert t == 2 and sum(v >= t for v in vals) / 20 >= 0.95
    assert M.keep_threshold([5.0], 0.95) == 5.0
    assert M.keep_threshold([], 0.95) is None
    m, se = M.mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert M.mean_stderr([]) == (None, None)
