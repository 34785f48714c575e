"""Field checks shared by the validated models (training recipes, graft plans): one message per rule.

Each is a pydantic field validator body: `_x = field_validator("a", "b")(at_least_1)`.
"""

from __future__ import annotations


def at_least_1(cls, v: int) -> int:
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def non_negative(cls, v):
    """>= 0; None (where the field allows it) passes."""
    if v is not None and v < 0:
        raise ValueError("must be >= 0")
    return v


def unit_interval(cls, v: float) -> float:
    if not 0.0 <= v < 1.0:
        raise ValueError("must be in [0, 1)")
    return v


def seq_len(cls, v: int) -> int:
    if v < 2:
        raise ValueError("must be at least 2 (one input and one predicted token)")
    return v
