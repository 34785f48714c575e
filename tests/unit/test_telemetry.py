"""Usage statistics checked on hand-computable distributions."""

import math

import torch

from memsurgery.telemetry import UsageCounter, gini, slots_for_mass, usage_stats


def test_uniform_usage():
    s = usage_stats(torch.ones(100))
    assert s["pct_used"] == 100.0
    assert abs(s["kl_uniform_count"]) < 1e-12
    assert abs(s["gini_count"]) < 1e-12
    assert s["slots_for_50pct"] == 50 and s["slots_for_90pct"] == 90


def test_single_slot_usage():
    c = torch.zeros(64)
    c[7] = 10
    s = usage_stats(c)
    assert s["slots_used"] == 1 and s["pct_used"] == 100 / 64
    assert math.isclose(s["kl_uniform_count"], math.log(64), rel_tol=1e-12)
    assert math.isclose(s["gini_count"], 63 / 64, rel_tol=1e-12)
    assert s["slots_for_99pct"] == 1


def test_gini_known_value():
    # Two slots, one with everything: G = (n-1)/n = 0.5
    assert math.isclose(gini(torch.tensor([0.0, 1.0])), 0.5)
    # [1, 3]: mean abs difference / (2 mean) = 2*|1-3| / (2*2*2*2) = 0.25
    assert math.isclose(gini(torch.tensor([1.0, 3.0])), 0.25)


def test_slots_for_mass_exact_boundary():
    x = torch.tensor([5.0, 3.0, 1.0, 1.0])
    m = slots_for_mass(x, fractions=(0.5, 0.8, 0.9, 1.0))
    assert m == {"slots_for_50pct": 1, "slots_for_80pct": 2, "slots_for_90pct": 3, "slots_for_100pct": 4}


def test_counter_accumulates_counts_and_weights():
    u = UsageCounter(10)
    u.update(torch.tensor([[1, 2], [2, 3]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    u.update(torch.tensor([[2, 9]]), torch.tensor([[1.0, 0.0]]))
    assert u.counts.tolist() == [0, 1, 3, 1, 0, 0, 0, 0, 0, 1]
    assert torch.allclose(u.weights, torch.tensor([0, 0.5, 2.4, 0.1, 0, 0, 0, 0, 0, 0.0], dtype=torch.float64))
    s = u.stats()
    assert s["slots_used"] == 4 and s["tokens"] == 3
    assert s["kl_uniform_weight"] > s["kl_uniform_count"]  # weights are more concentrated than counts
