"""MemoryConfig: the validated shape of one Memory+ product-key memory layer.

A pydantic v2 model (unknown keys rejected). Build it through
`MemoryConfig.build(**kwargs)`, which turns every validation problem into one
`memsurgery.errors.InputError` whose one-line message lists all of them, each
naming its field ("slots=1000 is not a perfect square ...; knn=64 > n_sub=32 ...").

`input_dim` (the model's hidden size d) and `v_dim` are usually unknown when a
recipe is written; the graft code fills them with `config.for_model(hidden_size)`.
The field meanings and the math are in docs/memory-layer.md.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from memsurgery.errors import InputError, one_line

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SLOTS_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)I?B?\s*$", re.IGNORECASE)


def parse_slots(value: int | str) -> int:
    """Slot count from an int or a string with a binary suffix: "64K" -> 65536, "1M" -> 1048576.

    Accepts "1024", "64K", "1M", "4M", "1Mi"; K/M/G are powers of 1024 because slot
    counts are n_sub**2 with n_sub a power of two in practice (1M = 1024**2).
    Raises ValueError with a message naming the accepted forms.
    """
    if isinstance(value, bool):
        # bool is an int subclass: True is a typo, not 1. ValueError, not TypeError, so that
        # pydantic reports it as a validation problem of the field.
        raise ValueError(  # noqa: TRY004
            f"slots={value!r} is not a count; give an int or a string like '64K' or '1M'"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SLOTS_RE.match(value)
        if m:
            return int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    raise ValueError(
        f"slots={value!r} is not a count; give an int or a string like '65536', '64K' or '1M' "
        "(K/M/G are binary: 1M = 1024**2)"
    )


def _square_hint(slots: int) -> str:
    """Nearest perfect squares below and above `slots`, for the error message."""
    lo = math.isqrt(slots)
    hi = lo + 1
    return f"try {lo * lo} ({lo}**2) or {hi * hi} ({hi}**2); 64K, 1M and 4M are squares"


class MemoryConfig(BaseModel):
    """Shape and options of one memory layer (and of the value table it reads).

    Fields (see docs/memory-layer.md for the math):
      slots          number of value rows, n_sub**2 (int, or "64K" / "1M")
      heads          query heads H; each picks knn slots, all H*knn rows are summed
      knn            slots picked per head (<= n_sub)
      k_dim          query/key dim per head; split in two halves of k_dim/2 (even)
      v_dim          value row width; None -> the model's hidden size (for_model)
      input_dim      the model's hidden size d (None until for_model)
      qk_norm        RMS-normalize query halves and sub-keys before scoring
      swilu          Memory+ gate: out = W_o(bag * silu(W_g x)); off -> W_o(bag)
      gate           "relevance": multiply the output by sigmoid(w.x + b) per token
      gate_bias_init b at init (w = 0), so the gate starts at sigmoid(b)
      score_scale    softmax temperature on the knn scores; None -> see effective_score_scale
      value_dtype    storage dtype of the value table
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Field order matters: a field validator sees the fields declared above it in
    # info.data, which is how knn is checked against slots while every other
    # field is still validated (so all problems are reported together).
    slots: int
    heads: int = 4
    k_dim: int = 512
    knn: int = 32
    v_dim: int | None = None
    input_dim: int | None = None
    qk_norm: bool = True
    swilu: bool = True
    gate: Literal["none", "relevance"] = "none"
    gate_bias_init: float = -4.0
    score_scale: float | None = None
    value_dtype: Literal["float32", "bfloat16"] = "float32"

    # ---- single-field checks -------------------------------------------------

    @field_validator("slots", mode="before")
    @classmethod
    def _parse_slots(cls, v: Any) -> Any:
        return parse_slots(v) if isinstance(v, (str, bool)) else v

    @field_validator("slots")
    @classmethod
    def _check_slots(cls, v: int) -> int:
        if v < 4:
            raise ValueError(
                f"slots={v} must be at least 4 (n_sub**2 with n_sub >= 2); try 64K or 1M"
            )
        if math.isqrt(v) ** 2 != v:
            raise ValueError(
                f"slots={v} is not a perfect square (n_sub**2 slots; {_square_hint(v)})"
            )
        return v

    @field_validator("heads")
    @classmethod
    def _check_heads(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"heads={v} must be >= 1 (the reference uses 4)")
        return v

    @field_validator("k_dim")
    @classmethod
    def _check_k_dim(cls, v: int) -> int:
        if v < 2 or v % 2:
            raise ValueError(
                f"k_dim={v} must be even and >= 2 (the query is split into two halves of k_dim/2)"
            )
        return v

    @field_validator("knn")
    @classmethod
    def _check_knn(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"knn={v} must be >= 1 (the reference uses 32)")
        slots = info.data.get("slots")  # absent when slots itself failed
        if slots is not None:
            n_sub = math.isqrt(slots)
            if v > n_sub:
                raise ValueError(
                    f"knn={v} > n_sub={n_sub} (each half picks knn of its n_sub sub-keys; "
                    f"use knn <= {n_sub} or more slots)"
                )
        return v

    @field_validator("v_dim", "input_dim")
    @classmethod
    def _check_dims(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name}={v} must be a positive width")
        return v

    @field_validator("score_scale")
    @classmethod
    def _check_scale(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(
                f"score_scale={v} must be a positive finite number (or null for the default)"
            )
        return v

    @field_validator("gate_bias_init")
    @classmethod
    def _check_bias(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"gate_bias_init={v} must be finite (e.g. -4.0, gate ~0.018 at init)")
        return v

    # ---- construction ----------------------------------------------------------

    @classmethod
    def build(cls, **kwargs: Any) -> MemoryConfig:
        """Validate `kwargs`; on failure raise one InputError listing every problem."""
        try:
            return cls(**kwargs)
        except ValidationError as err:
            raise InputError(
                one_line("invalid memory config: " + "; ".join(_describe(e) for e in err.errors()))
            ) from None

    def for_model(self, hidden_size: int) -> MemoryConfig:
        """A copy with input_dim = hidden_size and, when unset, v_dim = hidden_size (validated)."""
        data = self.model_dump()
        data["input_dim"] = hidden_size
        if data["v_dim"] is None:
            data["v_dim"] = hidden_size
        return type(self).build(**data)

    # ---- derived values -------------------------------------------------------

    @property
    def n_sub(self) -> int:
        """Sub-keys per half: slots = n_sub**2."""
        return math.isqrt(self.slots)

    @property
    def value_dim(self) -> int:
        """Width of a value row: v_dim, else input_dim. Raises InputError if neither is set."""
        if self.v_dim is not None:
            return self.v_dim
        if self.input_dim is not None:
            return self.input_dim
        raise InputError(
            "memory config has neither v_dim nor input_dim; call config.for_model(hidden_size)"
        )

    @property
    def effective_score_scale(self) -> float:
        """Multiplier on the knn scores before the softmax.

        Explicit score_scale wins. Otherwise:
          qk_norm=True  -> 1/sqrt(k_dim). Query halves and sub-keys are RMS-normalized
                           (unit RMS per element), so a score is a dot product of two
                           k_dim-long unit-RMS vectors: it ranges over [-k_dim, k_dim] and
                           is ~sqrt(k_dim) for random vectors. 1/sqrt(k_dim) gives O(1)
                           logits, as in attention, with room up to sqrt(k_dim) (22.6 at 512)
                           for a sharp pick.
          qk_norm=False -> 1.0, as in the reference: its key init U(+-1/sqrt(k_dim)) already
                           makes raw scores O(1) (std ~ 0.4 with a unit-RMS input), and a
                           further 1/sqrt(k_dim) would flatten the softmax to near uniform.
        """
        if self.score_scale is not None:
            return float(self.score_scale)
        return 1.0 / math.sqrt(self.k_dim) if self.qk_norm else 1.0

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.value_dtype == "bfloat16" else torch.float32

    def require_dims(self) -> tuple[int, int]:
        """(input_dim, value_dim); InputError when input_dim was never filled in."""
        if self.input_dim is None:
            raise InputError(
                "memory config has no input_dim (the model's hidden size); "
                "call config.for_model(hidden_size) before building a layer"
            )
        return self.input_dim, self.value_dim


def _describe(err: dict) -> str:
    """One pydantic error -> 'field=...: message', keeping our own messages as written."""
    field = ".".join(str(p) for p in err.get("loc", ())) or "config"
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        known = ", ".join(MemoryConfig.model_fields)
        return f"unknown field {field!r} (known: {known})"
    if kind == "missing":
        return f"{field} is required"
    if kind == "value_error":
        # Our validators already name the field and value; drop pydantic's prefix.
        return msg.removeprefix("Value error, ")
    return f"{field}={err.get('input')!r}: {msg}"
