"""A memsurgery-grafted causal LM: a base family's `*ForCausalLM` with Memory+ memory layers.

This file is copied verbatim (with the `BASE_MODEL_TYPE` line set to the base family)
next to the weights of every grafted checkpoint, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

works on a machine without memsurgery. It imports torch, transformers and its sibling
`configuration_memsurgery.py`, and nothing else unconditionally: when `memsurgery.memory`
imports (and the environment variable MEMSURGERY_REMOTE_FALLBACK is unset), the memory
layers are memsurgery's own (fast kernels, row-sparse value gradients); otherwise the
plain-PyTorch `Plain*` classes below, with the same parameter names, shapes and math.

The model (`build_classes(model_type)` makes one class per family):
- is a subclass of the base family's causal-LM class, so generate(), the KV cache,
  tied embeddings and save_pretrained keep working, and every base weight keeps its
  name (`model.layers.4.mlp.gate_proj.weight`);
- owns `memory_bank`: one value table (`memory_bank.values.weight`, stored once) and
  one memory layer per grafted decoder layer (`memory_bank.layers.<i>.*`);
- attaches layer i's memory at the MLP of decoder layer i. "parallel" mode swaps the
  MLP instance's class for a subclass whose forward returns mlp(x) + memory(x);
  "replace" mode puts a parameter-free `MemoryMLP` returning memory(x) in the MLP's
  place. Either way the memory sees exactly the MLP's input, and any norm the layer
  applies to the MLP output (Gemma 2/3) applies to the sum. The MLP reaches its
  memory through a plain `__dict__` entry, not a registered submodule, so the memory
  is stored and moved once (through the bank), and copy.deepcopy of the model maps
  the reference to the copy's bank.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_memsurgery import (
    AUTO_MAP,
    MODES,
    build_config_class,
    check_memory_block,
    grafted_model_type,
)

# Rewritten by memsurgery when the file is copied into a checkpoint (see configuration_memsurgery.py).
BASE_MODEL_TYPE = "llama"

FALLBACK_ENV = "MEMSURGERY_REMOTE_FALLBACK"
CODE_FILES = ("configuration_memsurgery.py", "modeling_memsurgery.py")

# memsurgery's implementation when available. transformers' remote-code import check
# skips imports inside try blocks, so a checkpoint loads where memsurgery is absent.
if os.environ.get(FALLBACK_ENV, "").strip() in ("", "0"):
    try:
        import memsurgery.memory as _ms
    except ImportError:
        _ms = None
else:
    _ms = None
USING_MEMSURGERY = _ms is not None

_QK_EPS = 1e-6  # memsurgery.memory.layer._QK_EPS: the qk-norm epsilon
_MEMORY_ATTR = "_memsurgery_memory"  # instance-__dict__ slot of a wrapped MLP
_PART_FLAG = "_is_memsurgery_memory"  # set on every module of a bank (see _init_weights)


# --------------------------------------------------------------------------------------
# Plain-PyTorch memory layer: the fallback, a deliberate copy of memsurgery.memory's
# rules. Must stay equal to it: tests/unit/test_graft_hf.py compares the layers in fp32
# (forward and gradients) and holds the copied settings rules and init equal.


class PlainMemorySettings:
    """The `memory.config` dict (a memsurgery MemoryConfig dump) as attributes.

    Only what the layer needs; `effective_score_scale` follows MemoryConfig's rule:
    explicit score_scale, else 1/sqrt(k_dim) with qk-norm, else 1.
    """

    def __init__(self, data: dict):
        self.slots = int(data["slots"])
        self.heads = int(data.get("heads", 4))
        self.k_dim = int(data.get("k_dim", 512))
        self.knn = int(data.get("knn", 32))
        self.input_dim = int(data["input_dim"])
        self.v_dim = int(data.get("v_dim") or self.input_dim)
        self.qk_norm = bool(data.get("qk_norm", True))
        self.swilu = bool(data.get("swilu", True))
        self.gate = str(data.get("gate", "none"))
        self.gate_bias_init = float(data.get("gate_bias_init", -4.0))
        self.score_scale = data.get("score_scale")
        self.value_dtype = str(data.get("value_dtype", "float32"))
        self.n_sub = math.isqrt(self.slots)
        if self.n_sub**2 != self.slots or not 1 <= self.knn <= self.n_sub or self.k_dim % 2:
            raise ValueError(
                f"memory config: slots={self.slots} must be a square, knn={self.knn} in [1, n_sub], "
                f"k_dim={self.k_dim} even"
            )
        if self.gate not in ("none", "relevance"):
            raise ValueError(f"memory config: gate={self.gate!r} must be 'none' or 'relevance'")

    @property
    def effective_score_scale(self) -> float:
        if self.score_scale is not None:
            return float(self.score_scale)
        return 1.0 / math.sqrt(self.k_dim) if self.qk_norm else 1.0

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.value_dtype == "bfloat16" else torch.float32


class PlainValueTable(nn.Module):
    """The shared value rows: weight [slots, v_dim]."""

    def __init__(self, slots: int, v_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(slots, v_dim, dtype=dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.normal_(0.0, self.weight.shape[1] ** -0.5)

    @torch.no_grad()
    def zero_(self) -> PlainValueTable:
        self.weight.zero_()
        return self


def _half_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [N, H, K2] x keys [H, n_sub, K2] -> [N, H, n_sub] (one bmm over heads)."""
    return torch.bmm(q.transpose(0, 1), keys.transpose(1, 2)).transpose(0, 1)


def _product_key_topk(q1, q2, keys1, keys2, knn: int):
    """Exact top-knn of n_sub**2 product keys: top-knn per half, then of the knn**2 sums.

    Returns (scores, indices) [N, H, knn]; index = i1 * n_sub + i2.
    """
    n_sub = keys1.shape[1]
    s1, i1 = _half_scores(q1, keys1).topk(knn, dim=-1)
    s2, i2 = _half_scores(q2, keys2).topk(knn, dim=-1)
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [N, H, knn*knn]
    scores, flat = cand.topk(knn, dim=-1)
    a = torch.div(flat, knn, rounding_mode="floor")
    b = flat - a * knn
    return scores, i1.gather(-1, a) * n_sub + i2.gather(-1, b)


def _weighted_bag(indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, sparse: bool):
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]; fp32 accumulation, weights' dtype out."""
    acc = torch.promote_types(torch.promote_types(table.dtype, weights.dtype), torch.float32)
    if table.dtype == acc:
        out = F.embedding_bag(
            indices, table, per_sample_weights=weights.to(acc), mode="sum", sparse=sparse
        )
    else:  # bf16/fp16 table: F.embedding_bag would accumulate in the table's dtype
        rows = F.embedding(indices, table, sparse=sparse).to(acc)  # [B, k, V]
        out = torch.bmm(weights.to(acc).unsqueeze(1), rows).squeeze(1)
    return out.to(weights.dtype)


class PlainProductKeyMemory(nn.Module):
    """Memory+ product-key memory layer, x [..., d] -> [..., d], reading a shared table.

    Parameters as in memsurgery.memory.ProductKeyMemory: query.weight [H*K, d],
    keys [H, 2, n_sub, K/2], gate_proj.weight [V, d] (swilu), out_proj.weight [d, V],
    gate_weight [d] and gate_bias [] (relevance gate). The table is referenced, not owned.
    `sparse_grad` defaults to False here: a dense table gradient suits the standard
    optimizers a user without memsurgery has.
    """

    def __init__(self, settings: PlainMemorySettings, values: PlainValueTable):
        super().__init__()
        s = self.config = settings
        self.heads, self.knn, self.k_dim, self.n_sub = s.heads, s.knn, s.k_dim, s.n_sub
        self.input_dim, self.v_dim = s.input_dim, s.v_dim
        self.score_scale = s.effective_score_scale
        self.query = nn.Linear(s.input_dim, s.heads * s.k_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(s.heads, 2, s.n_sub, s.k_dim // 2))
        self.gate_proj = nn.Linear(s.input_dim, s.v_dim, bias=False) if s.swilu else None
        self.out_proj = nn.Linear(s.v_dim, s.input_dim, bias=False)
        if s.gate == "relevance":
            self.gate_weight = nn.Parameter(torch.zeros(s.input_dim))
            self.gate_bias = nn.Parameter(torch.tensor(s.gate_bias_init))
        else:
            self.gate_weight = None
            self.gate_bias = None
        self.sparse_grad = False
        self.record = False
        self.last_indices = self.last_scores = self.last_gate = None
        self.bind_values(values)
        self.reset_parameters()

    def bind_values(self, values: PlainValueTable) -> None:
        # Unregistered reference: the bank owns (stores, moves, copies) the table.
        object.__setattr__(self, "_value_table", values)

    @property
    def value_table(self) -> PlainValueTable:
        return self.__dict__["_value_table"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = self.k_dim**-0.5
        self.keys.uniform_(-bound, bound)
        for lin in (self.query, self.gate_proj, self.out_proj):
            if lin is not None:
                lin.weight.normal_(0.0, lin.in_features**-0.5)
        if self.gate_weight is not None:
            self.gate_weight.zero_()
            self.gate_bias.fill_(self.config.gate_bias_init)

    @torch.no_grad()
    def zero_output_(self) -> PlainProductKeyMemory:
        self.out_proj.weight.zero_()
        return self

    def select(self, x: torch.Tensor):
        """Tokens x [N, d] -> (raw scores, slot indices) [N, H, knn]."""
        n, k2 = x.shape[0], self.k_dim // 2
        q = self.query(x).view(n, self.heads, 2, k2)
        q1, q2 = q[:, :, 0], q[:, :, 1]
        k1, k2_ = self.keys[:, 0], self.keys[:, 1]
        if self.config.qk_norm:
            q1, q2 = F.rms_norm(q1, (k2,), eps=_QK_EPS), F.rms_norm(q2, (k2,), eps=_QK_EPS)
            k1, k2_ = F.rms_norm(k1, (k2,), eps=_QK_EPS), F.rms_norm(k2_, (k2,), eps=_QK_EPS)
        return _product_key_topk(q1, q2, k1, k2_, self.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.input_dim)
        n, picks = x2.shape[0], self.heads * self.knn
        scores, indices = self.select(x2)
        acc = torch.promote_types(scores.dtype, torch.float32)
        weights = torch.softmax(scores.to(acc) * self.score_scale, dim=-1)
        bag = _weighted_bag(
            indices.reshape(n, picks),
            self.value_table.weight,
            weights.reshape(n, picks),
            self.sparse_grad,
        ).to(x2.dtype)
        if self.gate_proj is not None:
            bag = bag * F.silu(self.gate_proj(x2))
        out = self.out_proj(bag)
        gate = None
        if self.gate_weight is not None:
            gate = torch.sigmoid(x2 @ self.gate_weight.to(x2.dtype) + self.gate_bias.to(x2.dtype))
            out = out * gate.unsqueeze(-1)
        if self.record:
            self.last_indices = indices.detach().reshape(*lead, self.heads, self.knn)
            self.last_scores = weights.detach().reshape(*lead, self.heads, self.knn)
            self.last_gate = None if gate is None else gate.detach().reshape(lead)
        return out.reshape(*lead, out.shape[-1])


class PlainMemoryBank(nn.Module):
    """One value table (`values`) and the memory layers reading it (`layers`, by block index)."""

    def __init__(self, settings: PlainMemorySettings, device=None):
        super().__init__()
        self.config = settings
        self.values = PlainValueTable(
            settings.slots, settings.v_dim, settings.torch_value_dtype, device
        )
        self.layers = nn.ModuleDict()

    def add_layer(self, name: str) -> PlainProductKeyMemory:
        layer = PlainProductKeyMemory(self.config, self.values).to(self.values.weight.device)
        self.layers[str(name)] = layer
        return layer

    def __getitem__(self, name) -> PlainProductKeyMemory:
        return self.layers[str(name)]

    def __iter__(self):
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def table_parameters(self) -> list:
        return [self.values.weight]

    def dense_parameters(self) -> list:
        return [p for p in self.parameters() if p is not self.values.weight]

    def set_record(self, on: bool = True) -> None:
        for _, layer in self:
            layer.record = on


def new_memory_bank(block: dict, device=None) -> nn.Module:
    """A freshly initialized bank for a `memory` block: memsurgery's MemoryBank if available."""
    if _ms is not None:
        bank = _ms.MemoryBank.from_config(_ms.MemoryConfig.build(**block["config"]), device=device)
    else:
        bank = PlainMemoryBank(PlainMemorySettings(block["config"]), device=device)
    for i in block["layers"]:
        bank.add_layer(str(i))
    mark_memory_modules(bank)
    return bank


def mark_memory_modules(bank: nn.Module) -> None:
    """Flag every module of `bank` so the model's `_init_weights` leaves them to the bank's own init."""
    for module in bank.modules():
        object.__setattr__(module, _PART_FLAG, True)


# --------------------------------------------------------------------------------------
# Attaching a memory at an MLP


def _run_memory(memory: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """memory(x) in the memory's own dtype (e.g. fp32 memory in a bf16 model), returned in x's."""
    dtype = memory.query.weight.dtype
    if x.dtype == dtype:
        return memory(x)
    return memory(x.to(dtype)).to(x.dtype)


class ParallelMemoryMLP:
    """Mixin placed in front of an MLP's own class: forward returns mlp(x) + memory(x).

    Never instantiated: `parallel_mlp_class(type(mlp))` builds the subclass once per MLP
    class and the graft assigns it to `mlp.__class__`, so the MLP keeps its parameters
    and their names.
    """

    def forward(self, x, *args, **kwargs):
        return super().forward(x, *args, **kwargs) + _run_memory(self.__dict__[_MEMORY_ATTR], x)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return (base + ", " if base else "") + "+ memory (parallel)"


_PARALLEL_CLASSES: dict = {}


def parallel_mlp_class(mlp_class: type) -> type:
    """The subclass of `mlp_class` whose forward adds the memory (cached per class)."""
    if issubclass(mlp_class, ParallelMemoryMLP):
        return mlp_class
    cls = _PARALLEL_CLASSES.get(mlp_class)
    if cls is None:
        name = f"MemoryParallel{mlp_class.__name__}"
        cls = type(
            name, (ParallelMemoryMLP, mlp_class), {"__module__": __name__, "__qualname__": name}
        )
        _PARALLEL_CLASSES[mlp_class] = cls
    return cls


class MemoryMLP(nn.Module):
    """Replace mode: stands where the MLP was and returns memory(x); owns no parameters."""

    def forward(self, x, *args, **kwargs):
        return _run_memory(self.__dict__[_MEMORY_ATTR], x)

    def extra_repr(self) -> str:
        return "memory (replace)"


def _bind(mlp: nn.Module, memory: nn.Module) -> None:
    # object.__setattr__ skips nn.Module registration: not a child, not in state_dict.
    object.__setattr__(mlp, _MEMORY_ATTR, memory)


# --------------------------------------------------------------------------------------
# The model


def _missing(p) -> bool:
    return p is not None and not getattr(p, "_is_hf_initialized", False)


@torch.no_grad()
def _init_missing_memory(module: nn.Module) -> None:
    """Reference init for memory parameters a checkpoint did not provide (others stay as loaded)."""
    if isinstance(getattr(module, "keys", None), nn.Parameter):  # a memory layer
        if _missing(module.keys):
            bound = module.k_dim**-0.5
            module.keys.uniform_(-bound, bound)
        for lin in (module.query, module.gate_proj, module.out_proj):
            if lin is not None and _missing(lin.weight):
                lin.weight.normal_(0.0, lin.in_features**-0.5)
        if module.gate_weight is not None:
            if _missing(module.gate_weight):
                module.gate_weight.zero_()
            if _missing(module.gate_bias):
                module.gate_bias.fill_(float(module.config.gate_bias_init))
    elif (  # the value table
        isinstance(getattr(module, "weight", None), nn.Parameter)
        and not isinstance(module, nn.Linear)
        and _missing(module.weight)
    ):
        module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)


class MemsurgeryModelMixin:
    """What a grafted model adds to its base `*ForCausalLM` (first in the MRO)."""

    def __init__(self, config, *args, **kwargs):
        block = check_memory_block(getattr(config, "memory", None))
        super().__init__(config, *args, **kwargs)
        # Built after the base's post_init, so the base's weight init never touches it.
        self.memory_bank = new_memory_bank(block)
        self._attach_memory()

    # ---- attaching ----------------------------------------------------------------

    def decoder_layers(self) -> nn.ModuleList:
        path = self.config.memory.get("layers_path", "model.layers")
        obj = self
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, nn.ModuleList):
            raise ValueError(  # noqa: TRY004 (a config problem, reported like the others)
                f"{type(self).__name__} has no decoder layers at {path!r} (config memory.layers_path)"
            )
        return obj

    def _attach_memory(self) -> None:
        """(Re)bind every grafted layer's MLP slot to its memory in `self.memory_bank`."""
        block = self.config.memory
        layers = self.decoder_layers()
        mlp_name = block.get("mlp_module", "mlp")
        for i in block["layers"]:
            if not 0 <= i < len(layers):
                raise ValueError(
                    f"memory.layers: {i} is out of range (the model has {len(layers)} layers)"
                )
            memory = self.memory_bank.layers[str(i)]
            mlp = getattr(layers[i], mlp_name)
            if block["mode"] == "parallel":
                if not isinstance(mlp, ParallelMemoryMLP):
                    mlp.__class__ = parallel_mlp_class(type(mlp))
            elif not isinstance(mlp, MemoryMLP):
                mlp = MemoryMLP()
                setattr(layers[i], mlp_name, mlp)
            _bind(mlp, memory)

    def set_memory_bank(self, bank: nn.Module) -> None:
        """Replace the memory bank (e.g. a materialized one after a meta-device build) and rebind."""
        block = self.config.memory
        missing = [i for i in block["layers"] if str(i) not in bank.layers]
        if missing:
            raise ValueError(f"memory bank lacks layers {missing} named in config.memory.layers")
        mark_memory_modules(bank)
        self.memory_bank = bank
        self._attach_memory()

    def memory_layers(self) -> dict:
        """{decoder layer index: memory layer}."""
        return {int(name): layer for name, layer in self.memory_bank.layers.items()}

    # ---- transformers hooks -----------------------------------------------------------

    def _init_weights(self, module):
        # Memory modules get memsurgery's reference init, and only where a checkpoint left
        # a parameter missing; the base's rule (normal(0, 0.02) for every Linear) is not it.
        if getattr(module, _PART_FLAG, False):
            _init_missing_memory(module)
            return
        super()._init_weights(module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus the remote-code files and auto_map."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_code_files(save_directory, self.config.base_model_type)
        return result


# --------------------------------------------------------------------------------------
# Class factory and the code files


_MODEL_CLASSES: dict = {}


def base_causal_lm_class(base_model_type: str) -> type:
    """transformers' causal-LM class for a model_type (LlamaForCausalLM for "llama")."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(
            f"transformers {transformers.__version__} has no causal-LM class for model_type "
            f"{base_model_type!r}; this checkpoint needs a transformers that has one"
        )
    return cls


def build_classes(base_model_type: str) -> tuple[type, type]:
    """(config class, model class) of the grafted model for a base family; cached."""
    pair = _MODEL_CLASSES.get(base_model_type)
    if pair is not None:
        return pair
    config_cls = build_config_class(base_model_type)
    base = base_causal_lm_class(base_model_type)
    model_cls = type(
        "MemsurgeryForCausalLM",
        (MemsurgeryModelMixin, base),
        {
            "__module__": __name__,
            "__qualname__": "MemsurgeryForCausalLM",
            "__doc__": f"{base.__name__} with memsurgery memory layers (model_type "
            f"{grafted_model_type(base_model_type)!r}); see modeling_memsurgery.py.",
            "config_class": config_cls,
        },
    )
    _MODEL_CLASSES[base_model_type] = (config_cls, model_cls)
    return config_cls, model_cls


_BASE_LINE = re.compile(r"^BASE_MODEL_TYPE = .*$", re.MULTILINE)


def code_files(base_model_type: str) -> dict:
    """{file name: text} of the two remote-code files for a checkpoint of `base_model_type`."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", base_model_type):
        raise ValueError(f"model_type {base_model_type!r} is not a plain identifier")
    here = Path(__file__).resolve().parent
    out = {}
    for name in CODE_FILES:
        text = (here / name).read_text(encoding="utf-8")
        text, n = _BASE_LINE.subn(f'BASE_MODEL_TYPE = "{base_model_type}"', text, count=1)
        if n != 1:
            raise RuntimeError(f"{here / name} has no BASE_MODEL_TYPE line to set")
        out[name] = text
    return out


def write_code_files(directory, base_model_type: str) -> list:
    """Write configuration_memsurgery.py and modeling_memsurgery.py into `directory`."""
    directory = Path(directory)
    written = []
    for name, text in code_files(base_model_type).items():
        (directory / name).write_text(text, encoding="utf-8")
        written.append(name)
    return written


def __getattr__(name: str):
    # Resolved on first use (transformers' auto_map does getattr(module, name)), so that
    # importing the module does not import a model family.
    if name == "MemsurgeryForCausalLM":
        return build_classes(BASE_MODEL_TYPE)[1]
    if name == "MemsurgeryConfig":
        return build_config_class(BASE_MODEL_TYPE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTO_MAP",
    "MODES",
    "USING_MEMSURGERY",
    "MemoryMLP",
    "MemsurgeryModelMixin",
    "PlainMemoryBank",
    "PlainMemorySettings",
    "PlainProductKeyMemory",
    "PlainValueTable",
    "build_classes",
    "code_files",
    "new_memory_bank",
    "parallel_mlp_class",
    "write_code_files",
]
