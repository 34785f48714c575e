"""The graft plan: every choice `memsurgery graft` makes, as one validated model.

The same fields come from CLI flags or from a `--plan graft.yaml` file (flags
given explicitly override the file). Validation collects every problem and
reports them together, each naming its flag / YAML key. Pure: no model needed
except for `resolve`, which checks layer numbers against the layer count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from memsurgery import _validators as check
from memsurgery.graft.defaults import DEFAULTS as D
from memsurgery.errors import InputError, one_line


class GraftPlan(BaseModel):
    """What to graft, where, and how to initialize it (docs/graft.md)."""

    model_config = ConfigDict(extra="forbid")

    layers: Union[list[int], Literal["auto", "default"]] = D["layers"]
    slots: int = D["slots"]
    heads: int = D["heads"]
    knn: int = D["knn"]
    k_dim: int = D["k_dim"]
    mode: Literal["parallel", "replace"] = D["mode"]
    keys: Literal["faiss", "random"] = D["keys"]
    query_init: Literal["pca", "orthogonal", "random"] = D["query_init"]
    # None -> mode's default: parallel "zero" (function-preserving), replace "distill".
    values: Literal["zero", "random", "distill", None] = None
    # None -> parallel "relevance" (the memory can switch itself off), replace "none".
    gate: Literal["none", "relevance", None] = None
    qk_norm: bool = True
    swilu: bool = True
    value_dtype: Literal["float32", "bfloat16"] = D["value_dtype"]
    calib: str | None = None
    calib_field: str = "text"
    calib_tokens: int = D["calib_tokens"]
    heldout_tokens: int = D["heldout_tokens"]
    seq_len: int = D["seq_len"]
    kmeans_iters: int = D["kmeans_iters"]
    distill_steps: int = D["distill_steps"]
    trace_facts: str | None = None
    seed: int = D["seed"]

    @field_validator("slots", mode="before")
    @classmethod
    def _slots(cls, v: Any) -> Any:
        # Imported here: memory.config needs torch, and the CLI reads this model's
        # defaults while building --help.
        from memsurgery.memory.config import parse_slots

        return parse_slots(v) if isinstance(v, str) else v

    @field_validator("value_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        from memsurgery._vocab import DTYPE_ALIASES

        return DTYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("auto", "default"):
            try:
                return [int(t) for t in v.split(",") if t.strip()]
            except ValueError:
                raise ValueError("expected comma-separated layer numbers, 'auto' or 'default'") from None
        return v

    @field_validator("slots", "heads", "knn", "k_dim", "calib_tokens", "heldout_tokens", "seq_len",
                     "kmeans_iters")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be positive")
        return v

    _nonneg = field_validator("distill_steps")(check.non_negative)

    # ---- derived -------------------------------------------------------------

    @property
    def effective_values(self) -> str:
        return self.values or ("zero" if self.mode == "parallel" else "distill")

    @property
    def effective_gate(self) -> str:
        return self.gate or ("relevance" if self.mode == "parallel" else "none")

    def cross_check(self) -> list[str]:
        """Problems that involve several fields (each names its flag)."""
        problems = []
        n_sub = math.isqrt(self.slots)
        if n_sub * n_sub != self.slots:
            problems.append(f"--slots {self.slots}: must be a perfect square (e.g. 65536 = 64K, 1048576 = 1M)")
        elif self.knn > n_sub:
            problems.append(f"--knn {self.knn}: larger than sqrt(slots) = {n_sub}")
        if self.k_dim % 2:
            problems.append(f"--k-dim {self.k_dim}: must be even (queries are split in two halves)")
        if self.mode == "parallel" and self.values == "distill":
            problems.append("--values distill: only for --mode replace (parallel grafts start function-preserving)")
        if self.mode == "replace" and self.gate == "relevance":
            problems.append("--gate relevance: replace mode removes the FFN, so the memory must always be on; "
                            "use --gate none")
        return problems


_FLAG = {"k_dim": "--k-dim", "query_init": "--query-init", "value_dtype": "--value-dtype",
         "calib_tokens": "--calib-tokens", "heldout_tokens": "--heldout-tokens", "seq_len": "--seq-len",
         "kmeans_iters": "--kmeans-iters", "distill_steps": "--distill-steps", "trace_facts": "--trace",
         "calib_field": "--calib-field", "qk_norm": "--qk-norm", "swilu": "--swilu"}


def _flag(name: str) -> str:
    return _FLAG.get(name, "--" + name.replace("_", "-"))


def build_plan(values: dict[str, Any], source: str = "flags") -> GraftPlan:
    """Validate plan fields; one InputError listing every problem (flag / YAML key named)."""
    try:
        plan = GraftPlan(**values)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "plan"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key; known keys: {', '.join(GraftPlan.model_fields)}"
            parts.append(f"{_flag(key) if source == 'flags' else key}: {msg}")
        raise InputError(f"{source}: " + "; ".join(one_line(p) for p in parts)) from None
    problems = plan.cross_check()
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))
    return plan


def load_plan_file(path: str | Path) -> dict[str, Any]:
    """Read a graft.yaml into a dict of plan fields (validated later with the flags)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such plan file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({one_line(str(err))[:200]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of plan keys, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
