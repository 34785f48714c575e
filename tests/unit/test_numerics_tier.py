"""The float-tolerance helpers (tests/numerics.py) and the `numerics` tier's list (tests/conftest.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import NUMERICS
from tests.numerics import EPS32, assert_close_normwise, forward_chain, reorder_rtol
from tests.tiny import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


def test_every_numerics_entry_names_an_existing_test():
    """A renamed or moved test must not drop out of the tier silently."""
    for entry in NUMERICS:
        path, _, name = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}", (ROOT / path).read_text(), re.M), entry


def test_reorder_rtol_follows_the_error_model():
    assert reorder_rtol(1) == pytest.approx(8 * EPS32)
    assert reorder_rtol(100) == pytest.approx(10 * reorder_rtol(1))  # sqrt(n)
    assert reorder_rtol(60, 40) == reorder_rtol(100)  # a chain's lengths add up
    # recursive fp32 sums of the same 2,048 numbers in two orders: within it, relative to sum|x|
    x = torch.randn(32, 2048, generator=torch.Generator().manual_seed(0)).numpy()
    perm = torch.randperm(2048, generator=torch.Generator().manual_seed(1)).numpy()

    def fp32_sum(row):
        acc = np.float32(0)
        for v in row:
            acc = np.float32(acc + v)
        return acc

    a = torch.tensor([fp32_sum(r) for r in x])
    b = torch.tensor([fp32_sum(r[perm]) for r in x])
    assert not torch.equal(a, b)  # the order does change the rounding
    scale = float(abs(x).sum(1).max())
    assert (a - b).abs().max() <= reorder_rtol(2048) * scale
    assert (a - b).abs().max() > 5e-4 * reorder_rtol(2048) * scale  # not vacuous: measured 1.5e-3 of it
    assert forward_chain(TINY_CONFIGS["llama"], 32) > TINY_CONFIGS["llama"]["vocab_size"]


def test_normwise_comparison_fails_on_a_real_difference():
    b = torch.tensor([1.0, -2.0, 1e-9])
    assert_close_normwise(b + 1e-7, b, 1e-7)  # within 1e-7 x max|b| = 2e-7
    with pytest.raises(AssertionError, match=re.escape("max |diff| 1.000e-06 > 2.000e-07")):
        assert_close_normwise(b + 1e-6, b, 1e-7)
    # the 2-norm: one entry off by 1e-6 in a tensor of norm 1e3 passes at 1e-8, not at 1e-10
    w = torch.full((1000, 1000), 1.0, dtype=torch.float64)
    w2 = w.clone()
    w2[0, 0] += 1e-6
    assert_close_normwise(w2, w, 1e-8, norm="fro")
    with pytest.raises(AssertionError, match="ratio"):
        assert_close_normwise(w2, w, 1e-10, norm="fro")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_normwise(torch.tensor([float("nan")]), torch.tensor([0.0]), 1.0)
    assert_close_normwise(torch.zeros(3), torch.zeros(3), 0.0)  # exactly zero on both sides
