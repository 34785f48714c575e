"""MemoryConfig: validation collects every problem, names each field, and derives n_sub/scale."""

import math

import pytest
from pydantic import ValidationError

from memsurgery.errors import InputError
from memsurgery.memory import MemoryConfig, parse_slots


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1M", 1 << 20),
        ("64K", 65536),
        ("4m", 1 << 22),
        ("1024", 1024),
        (4096, 4096),
        ("1Mi", 1 << 20),
    ],
)
def test_parse_slots(text, expected):
    assert parse_slots(text) == expected


@pytest.mark.parametrize("bad", ["abc", "1.5M", "", "-4", True, 2.5])
def test_parse_slots_rejects(bad):
    with pytest.raises(ValueError, match="slots="):
        parse_slots(bad)


def test_defaults_and_derived():
    c = MemoryConfig.build(slots="1M")
    assert c.slots == 1 << 20 and c.n_sub == 1024
    assert (c.heads, c.knn, c.k_dim) == (4, 32, 512)
    assert c.qk_norm and c.swilu and c.gate == "none" and c.gate_bias_init == -4.0
    assert c.v_dim is None and c.input_dim is None


def test_all_problems_reported_together_in_one_line():
    with pytest.raises(InputError) as exc:
        MemoryConfig.build(slots=1024, knn=64, k_dim=7, heads=0, v_dim=-3, foo=1)
    msg = str(exc.value)
    assert "\n" not in msg
    for part in ("knn=64 > n_sub=32", "k_dim=7", "heads=0", "v_dim=-3", "'foo'"):
        assert part in msg, (part, msg)


def test_slots_not_square_names_field_and_suggests():
    with pytest.raises(InputError, match=r"slots=1000 is not a perfect square.*1024") as exc:
        MemoryConfig.build(slots=1000, heads=0)
    assert "heads=0" in str(exc.value)  # still collected alongside


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"slots": 1024, "value_dtype": "float16"}, "value_dtype"),
        ({"slots": 1024, "gate": "always"}, "gate"),
        ({"slots": 1024, "score_scale": 0.0}, "score_scale=0.0"),
        ({"slots": 1024, "input_dim": 0}, "input_dim=0"),
        ({"slots": "lots"}, "slots='lots'"),
        ({"slots": 1024, "heads": "four"}, "heads"),
        ({"slots": 2}, "slots=2"),
        ({}, "slots is required"),
    ],
)
def test_single_problems_name_their_field(kwargs, needle):
    with pytest.raises(InputError, match="invalid memory config") as exc:
        MemoryConfig.build(**kwargs)
    assert needle in str(exc.value)


def test_knn_equal_n_sub_is_allowed():
    assert MemoryConfig.build(slots=64, knn=8).knn == 8


def test_score_scale_default_depends_on_qk_norm():
    assert math.isclose(MemoryConfig.build(slots=64, k_dim=16, knn=4).effective_score_scale, 0.25)
    assert MemoryConfig.build(slots=64, k_dim=16, knn=4, qk_norm=False).effective_score_scale == 1.0
    assert MemoryConfig.build(slots=64, knn=4, score_scale=3.0).effective_score_scale == 3.0


def test_for_model_fills_dims_and_keeps_explicit_v_dim():
    c = MemoryConfig.build(slots=64, knn=4).for_model(576)
    assert (c.input_dim, c.v_dim, c.value_dim) == (576, 576, 576)
    c2 = MemoryConfig.build(slots=64, knn=4, v_dim=256).for_model(576)
    assert (c2.input_dim, c2.value_dim) == (576, 256)
    assert c2.require_dims() == (576, 256)


def test_require_dims_without_model_size():
    with pytest.raises(InputError, match="for_model"):
        MemoryConfig.build(slots=64, knn=4).require_dims()


def test_config_is_immutable():
    c = MemoryConfig.build(slots=64, knn=4)
    with pytest.raises(ValidationError, match="frozen"):
        c.knn = 2
