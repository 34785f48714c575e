"""Training recipes: one validated pydantic model per YAML file (docs/recipes.md).

    recipe = load_recipe("recipes/knowledge-injection.yaml", overrides=["train.steps=50"])

Validation reports every problem at once, each naming its YAML key path
("optim.groups.values.weight_decay: ..."); unknown keys are refused. `--set`
overrides are `dotted.key=value` with the value parsed as YAML, applied to the
raw mapping before validation, so an override is checked exactly like the file.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memsurgery import _validators as check
from memsurgery.errors import InputError, one_line

METHODS = ("memory", "sparse_memory", "full", "lora")
GROUPS = ("values", "keys", "query", "gates", "projections", "norms", "base")
MEMORY_GROUPS = ("values", "keys", "query", "gates", "projections")
# Optional group split off "gates" only when the recipe gives it a learning rate:
# the relevance gate's gate_weight/gate_bias without the SiLU gate_proj.
RELEVANCE_GATE = "relevance_gate"
PARAM_GROUPS = (*GROUPS, RELEVANCE_GATE)

# Learning rates a group gets when the recipe leaves `lr` unset (null), per method.
# 0 freezes the group (requires_grad False). The base is frozen for memory methods.
DEFAULT_LR: dict[str, dict[str, float]] = {
    "memory": {"values": 1e-3, "keys": 1e-4, "query": 1e-4, "gates": 1e-4, "projections": 1e-4,
               "norms": 0.0, "base": 0.0},
    "sparse_memory": {"values": 1e-2, "keys": 0.0, "query": 0.0, "gates": 0.0, "projections": 0.0,
                      "norms": 0.0, "base": 0.0},
    "full": {"values": 0.0, "keys": 0.0, "query": 0.0, "gates": 0.0, "projections": 0.0,
             "norms": 1e-5, "base": 1e-5},
    "lora": {"values": 0.0, "keys": 0.0, "query": 0.0, "gates": 0.0, "projections": 0.0,
             "norms": 0.0, "base": 1e-4},
}

# Keys that may differ between a run and its --resume (they do not change the math
# of the steps already taken): extend a run, change logging, checkpointing, eval.
# Checkpoints hold the full value table, so memory_parallel may change too.
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "log.", "eval.", "output_dir", "memory_parallel")



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ViewsSpec(_Strict):
    """What `format: facts` renders from each structured fact (memsurgery.facts.views)."""

    qa: bool = True  # every training phrasing as an answer-only pair (completions + questions)
    documents: int = 0  # short documents per entity (loss on the answers' spans)
    templates: str | None = None  # a JSON table of your relations' phrasings (docs/recipes.md)
    seed: int = 0

    @field_validator("documents")
    @classmethod
    def _docs(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


class DataSpec(_Strict):
    train: str
    eval: str | None = None
    format: Literal["text", "documents", "qa", "facts"] = "text"
    views: ViewsSpec = Field(default_factory=ViewsSpec)
    text_field: str = "text"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    entity_field: str = "entity"
    # Where the memory layers act during training: every token, only the tokens of each
    # record's entity (its `entity_field`), or only the entity's last token (where the whole
    # name has been read), so that a fact is written where any later question about the
    # entity can read it. At inference the memory acts everywhere.
    memory_positions: Literal["all", "entity", "entity_last"] = "all"
    qa_separator: str = "auto"
    seq_len: int = 256
    packing: bool = True
    answer_only_loss: bool = False
    one_fact_per_sequence: bool = False
    too_long: Literal["truncate", "refuse"] = "truncate"
    add_eos: bool = True
    cache_dir: str | None = None

    _seq = field_validator("seq_len")(check.seq_len)

    @model_validator(mode="after")
    def _cross(self):
        if self.answer_only_loss and self.format not in ("qa", "facts"):
            raise ValueError("answer_only_loss needs format: qa (prompt/answer pairs) or facts")
        if self.format == "facts" and not (self.views.qa or self.views.documents):
            raise ValueError("format: facts renders nothing with views.qa false and views.documents 0")
        if self.one_fact_per_sequence and self.packing:
            raise ValueError("one_fact_per_sequence: true needs packing: false (packing joins facts)")
        return self

    @property
    def at_entity(self) -> bool:
        """Whether training masks the memory to the entity's tokens (memory_positions entity / entity_last)."""
        return self.memory_positions != "all"


class TrainSpec(_Strict):
    method: Literal["memory", "sparse_memory", "full", "lora"] = "memory"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    # dtype names as everywhere in memsurgery (memsurgery/_vocab.py); fp32 / bf16 accepted
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # memory / sparse_memory: run the frozen layers below the first memory layer once per
    # training sequence, not once per step (docs/recipes.md); off, or over the budget, = plain forwards
    prefix_cache: bool = True
    prefix_cache_max_mb: int = 2048

    _pos = field_validator("steps", "batch_size", "grad_accum", "prefix_cache_max_mb")(check.at_least_1)

    @field_validator("precision", mode="before")
    @classmethod
    def _dtype_alias(cls, v):
        from memsurgery._vocab import DTYPE_ALIASES

        return DTYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive, or null for no clipping")
        return v


class GroupSpec(_Strict):
    lr: float | None = None  # None -> DEFAULT_LR[method][group]; 0 -> frozen
    weight_decay: float = 0.0

    _nonneg = field_validator("lr", "weight_decay")(check.non_negative)


class ValuesGroupSpec(GroupSpec):
    @field_validator("weight_decay")
    @classmethod
    def _no_wd(cls, v: float) -> float:
        if v != 0:
            raise ValueError("must be 0: weight decay on the value table would touch every row "
                             "each step and erase rarely-read slots")
        return v


class Groups(_Strict):
    values: ValuesGroupSpec = Field(default_factory=ValuesGroupSpec)
    keys: GroupSpec = Field(default_factory=GroupSpec)
    query: GroupSpec = Field(default_factory=GroupSpec)
    gates: GroupSpec = Field(default_factory=GroupSpec)
    projections: GroupSpec = Field(default_factory=GroupSpec)
    norms: GroupSpec = Field(default_factory=GroupSpec)
    base: GroupSpec = Field(default_factory=GroupSpec)
    # null (or lr null): gate_weight/gate_bias stay in "gates", as before this key existed.
    relevance_gate: GroupSpec | None = None


class ScheduleSpec(_Strict):
    kind: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    _w = field_validator("warmup_steps")(check.non_negative)

    @field_validator("min_lr_ratio")
    @classmethod
    def _m(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


class OptimSpec(_Strict):
    groups: Groups = Field(default_factory=Groups)
    value_optimizer: Literal["adam", "sgd"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class SparseSpec(_Strict):
    top_t: int = 500
    background: str = "builtin"
    background_field: str = "text"
    background_tokens: int = 16384
    background_seq_len: int = 256

    _pos = field_validator("top_t", "background_tokens", "background_seq_len")(check.at_least_1)


class LoraSpec(_Strict):
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | Literal["auto"] = "auto"

    _r = field_validator("r")(check.at_least_1)

    _d = field_validator("dropout")(check.unit_interval)


class CheckpointSpec(_Strict):
    every: int = 100
    keep_last: int = 2

    _pos = field_validator("every", "keep_last")(check.at_least_1)


class LogSpec(_Strict):
    every: int = 10
    # Experiment tracker beside metrics.jsonl (train/tracking.py); tensorboard: true is the
    # older spelling of backend: tensorboard.
    backend: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    project: str | None = None  # W&B project / MLflow experiment (default "memsurgery")
    run_name: str | None = None  # default: the output directory's name
    tracking_uri: str | None = None  # MLflow only (default: MLFLOW_TRACKING_URI, else ./mlruns)
    tensorboard: bool = False
    progress: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _tensorboard_alias(self):
        if self.tensorboard and self.backend not in ("none", "tensorboard"):
            raise ValueError(f"tensorboard: true and backend: {self.backend} name two trackers; keep backend")
        if self.tensorboard:
            self.backend = "tensorboard"
        return self

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        # YAML reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    _pos = field_validator("every")(check.at_least_1)


class ProbeSpec(_Strict):
    facts: str
    limit: int | None = 100


class EvalSpec(_Strict):
    every: int = 0  # 0: only at the end
    heldout_fraction: float = 0.0
    max_batches: int | None = 50
    probe: ProbeSpec | None = None

    @field_validator("every")
    @classmethod
    def _e(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0 = only at the end)")
        return v

    _f = field_validator("heldout_fraction")(check.unit_interval)


class NonfiniteSpec(_Strict):
    max_consecutive: int = 5

    _pos = field_validator("max_consecutive")(check.at_least_1)


class RegularizeSpec(_Strict):
    """Penalties on general text (and never-trained prompts) that keep a memory graft quiet off-topic."""

    text: str = "builtin:corpus"
    batch_size: int = 4
    seq_len: int = 64
    gate_penalty: float = 0.0
    output_l2: float = 0.0
    kl_to_base: float = 0.0
    negatives: str | None = None
    negative_weight: float = 1.0

    _pos = field_validator("batch_size")(check.at_least_1)

    _seq = field_validator("seq_len")(check.seq_len)

    @field_validator("gate_penalty", "output_l2", "kl_to_base", "negative_weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("must be a finite number >= 0 (0 turns the penalty off)")
        return v

    @property
    def text_active(self) -> bool:
        return self.gate_penalty > 0 or self.output_l2 > 0 or self.kl_to_base > 0

    @property
    def negatives_active(self) -> bool:
        return bool(self.negatives) and self.negative_weight > 0

    @property
    def active(self) -> bool:
        return self.text_active or self.negatives_active


class Recipe(_Strict):
    model: str
    output_dir: str
    seed: int = 0
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    sparse: SparseSpec = Field(default_factory=SparseSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    nonfinite: NonfiniteSpec = Field(default_factory=NonfiniteSpec)
    regularize: RegularizeSpec | None = None
    memory_parallel: int = 1
    fsdp: bool = False

    _mp = field_validator("memory_parallel")(check.at_least_1)

    @model_validator(mode="after")
    def _cross(self):
        g = self.optim.groups
        m = self.train.method
        if m in ("memory", "sparse_memory") and (g.base.lr or 0) > 0:
            raise ValueError(f"optim.groups.base.lr must be 0 for method {m} (the base stays frozen); "
                             "use method full or lora to train it")
        if self.fsdp and m != "full":
            raise ValueError(f"fsdp: true shards the trained base, so it needs train.method full (got {m}); "
                             "FSDP2 for lora and for a frozen base is not supported yet")
        if self.fsdp and self.memory_parallel > 1:
            raise ValueError("fsdp and memory_parallel > 1 together are not supported yet; choose one")
        if self.data.eval and self.eval.heldout_fraction > 0:
            raise ValueError("data.eval and eval.heldout_fraction are both set; choose one held-out source")
        if self.regularize is not None and m not in ("memory", "sparse_memory"):
            raise ValueError(f"regularize: penalizes a grafted model's memory layers, so it needs train.method "
                             f"memory or sparse_memory (got {m}); remove the regularize section")
        if m == "sparse_memory" and self.lr("values") <= 0:
            raise ValueError("optim.groups.values.lr must be > 0 for method sparse_memory")
        return self

    # ---- derived -------------------------------------------------------------------

    def lr(self, group: str) -> float:
        """The learning rate of `group`: the recipe's, else the method's default."""
        if group == RELEVANCE_GATE:
            spec = self.optim.groups.relevance_gate
            return self.lr("gates") if spec is None or spec.lr is None else float(spec.lr)
        spec = getattr(self.optim.groups, group)
        return DEFAULT_LR[self.train.method][group] if spec.lr is None else float(spec.lr)

    @property
    def split_relevance_gate(self) -> bool:
        """True when gate_weight/gate_bias form their own group (optim.groups.relevance_gate.lr set)."""
        spec = self.optim.groups.relevance_gate
        return spec is not None and spec.lr is not None

    def weight_decay(self, group: str) -> float:
        if group == RELEVANCE_GATE:
            spec = self.optim.groups.relevance_gate
            return 0.0 if spec is None else spec.weight_decay
        return getattr(self.optim.groups, group).weight_decay

    def resolved(self) -> Recipe:
        """A copy with every method default written out (what run_dir/recipe.yaml holds)."""
        data = self.model_dump(mode="json")
        for g in GROUPS:
            data["optim"]["groups"][g]["lr"] = self.lr(g)
        return Recipe.model_validate(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        key = ".".join(loc) or "recipe"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = ", ".join(parent.model_fields) if parent else ""
            msg = "unknown key" + (f"; known keys here: {known}" if known else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(one_line(p) for p in parts)


def _model_at(path: list[str]):
    """The pydantic model class at a key path of Recipe (for 'known keys' hints)."""
    cls: Any = Recipe
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        # X | None: the model class inside the Optional
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return None
    return cls


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], YAML-parsed value)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise InputError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise InputError(f"--set {text!r}: value is not valid YAML ({one_line(str(err))[:120]})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of `data` with each `a.b=value` set (creating nested mappings as needed)."""
    out = copy.deepcopy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise InputError(f"--set {text!r}: {'.'.join(path[:i + 1])} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return out


def read_recipe_file(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({one_line(str(err))[:200]})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; a recipe is YAML") from None
    if data is None:
        raise InputError(f"{path}: the recipe is empty; it needs at least model, output_dir and data.train")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of recipe keys, got {type(data).__name__}")
    return data


def build_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise InputError(_format_errors(err, source)) from None


def load_recipe(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """A validated Recipe from a YAML path, a dict or a Recipe, with `overrides` applied."""
    if isinstance(recipe, Recipe):
        data, source = recipe.model_dump(mode="json"), "recipe"
    elif isinstance(recipe, dict):
        data, source = recipe, "recipe"
    else:
        data, source = read_recipe_file(recipe), str(recipe)
    data = apply_overrides(data, list(overrides or []))
    return build_recipe(data, source)


def recipe_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dumps."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_diff(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out
