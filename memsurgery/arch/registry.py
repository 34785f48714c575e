"""Architecture specs as data: load and validate `specs/*.json`, resolve a config to an ArchSpec.

Each JSON file describes one model family (module paths, weight-name templates,
config key names and defaults); `ArchSpec` turns that description into helpers
that work on config dicts, checkpoint tensor names and live `nn.Module`s, so no
other code needs per-model branches. Supporting a new family that follows the
same "decoder layers with an attention block and a gated MLP" shape is a new
JSON file, not new code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from memsurgery.errors import InputError

MLP_KINDS = ("gated", "fused_gated")
EMBEDDING_SCALES = (None, "sqrt_hidden")

# Logical config keys every spec must map to one or more HF config names.
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "activation",
    "tie_embeddings",
)

# JSON schema, by hand: key -> (required?, checker name). Kept as data so the
# validator and the error messages stay in one place.
_TOP_REQUIRED = {
    "family",
    "model_types",
    "layers_path",
    "layer_template",
    "attention",
    "mlp",
    "norms",
    "embedding",
    "final_norm",
    "lm_head",
    "embedding_scale",
    "config_keys",
    "config_defaults",
}
_TOP_OPTIONAL = {
    "description",
    "activation_aliases",
    "config_subkey",
    "weight_renames",
    "alt_layers_paths",
    "variants",
}
# A variant (one model_type of the family) may override these.
_VARIANT_KEYS = (_TOP_REQUIRED | _TOP_OPTIONAL) - {
    "family",
    "model_types",
    "variants",
    "description",
}
_ATTN_KEYS = {"module", "q", "k", "v", "qkv", "o", "qk_norms"}
_MLP_KEYS = {"module", "kind", "gate", "up", "gate_up", "down"}
_NORM_KEYS = {"input", "post_attention", "pre_mlp", "post_mlp"}


class SpecError(InputError):
    """An architecture spec file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class ArchSpec:
    """One family's layout, optionally narrowed to one `model_type` (see `spec_for_config`).

    Names ending in `_path` / `embedding` / `final_norm` / `lm_head` are dotted module paths
    from the top-level `*ForCausalLM` model, which are also the checkpoint weight-name
    prefixes. Per-layer names (`attn_module`, `mlp_module`, norms) are relative to one
    decoder layer.
    """

    family: str
    model_types: tuple[str, ...]
    source: str  # spec file name, for messages
    layers_path: str  # "model.layers"
    layer_template: str  # "model.layers.{i}"
    attn_module: str
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    qkv_proj: str | None  # fused q/k/v (Phi-3)
    o_proj: str
    qk_norms: tuple[str, ...]  # per-head q/k norms inside attention (Qwen3, Gemma 3)
    mlp_module: str
    mlp_kind: str  # "gated" | "fused_gated"
    gate_proj: str | None
    up_proj: str | None
    gate_up_proj: str | None  # fused gate+up (Phi-3): first half gate, second half up
    down_proj: str
    input_norm: str
    post_attn_norm: str | None  # Gemma 2/3 normalize the attention output
    pre_mlp_norm: str  # its output is the MLP's input
    post_mlp_norm: str | None  # Gemma 2/3 normalize the MLP output before the residual add
    embedding: str
    final_norm: str
    lm_head: str
    embedding_scale: str | None  # "sqrt_hidden": embeddings are multiplied by sqrt(hidden)
    model_type: str | None = None  # set once resolved for a config
    description: str = ""
    config_subkey: str | None = None  # "text_config" for multimodal wrappers
    alt_layers_paths: tuple[str, ...] = ()
    weight_renames: tuple[tuple[str, str], ...] = ()  # (alternative prefix, canonical prefix)
    # Mappings are excluded from hashing/comparison-by-hash; they are read-only views.
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    config_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    activation_aliases: Mapping[str, str] = field(default_factory=dict, hash=False)

    # ------------------------------------------------------------- weight names

    def layer_prefix(self, i: int) -> str:
        """Weight-name prefix of decoder layer `i`, e.g. "model.layers.3"."""
        return self.layer_template.format(i=int(i))

    def mlp_prefix(self, i: int) -> str:
        return f"{self.layer_prefix(i)}.{self.mlp_module}"

    def mlp_projections(self) -> list[str]:
        """The MLP's linear layers, in forward order (gate/up or gate_up, then down)."""
        if self.mlp_kind == "fused_gated":
            return [self.gate_up_proj, self.down_proj]
        return [self.gate_proj, self.up_proj, self.down_proj]

    def attention_projections(self) -> list[str]:
        if self.qkv_proj:
            return [self.qkv_proj, self.o_proj]
        return [self.q_proj, self.k_proj, self.v_proj, self.o_proj]

    def mlp_param_names(self, i: int, config: Mapping | None = None) -> list[str]:
        """Full weight names of layer `i`'s MLP; with `config`, biases too when it says mlp_bias."""
        prefix = self.mlp_prefix(i)
        names = [f"{prefix}.{p}.weight" for p in self.mlp_projections()]
        if config is not None and self.get(config, "mlp_bias", False):
            names += [f"{prefix}.{p}.bias" for p in self.mlp_projections()]
        return names

    def layer_norm_modules(self) -> list[str]:
        """Per-layer norm module names (relative to the layer), in forward order."""
        return [
            n
            for n in (self.input_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm)
            if n
        ]

    def canonical_name(self, name: str) -> str:
        """Rewrite a weight name saved under an alternative prefix to the spec's naming.

        Gemma 3 checkpoints on the Hub say `language_model.model.layers.0...`, while
        transformers 5 (and this spec) say `model.language_model.layers.0...`.
        """
        for alt, canon in self.weight_renames:
            if name.startswith(alt):
                return canon + name[len(alt) :]
        return name

    def adapt_to_names(self, names) -> ArchSpec:
        """This spec with weight templates rewritten to the prefix a checkpoint actually uses.

        Only matters for specs with `weight_renames`; returns `self` when the
        checkpoint already uses the canonical names.
        """
        names = list(names)
        if not self.weight_renames or any(n.startswith(self.layer_prefix(0) + ".") for n in names):
            return self
        changes = {}
        for alt, canon in self.weight_renames:
            if not any(n.startswith(alt) for n in names):
                continue
            for fld in ("layer_template", "embedding", "final_norm", "lm_head"):
                # Stored names lack the trailing dot that the rename prefixes carry.
                probe = changes.get(fld, getattr(self, fld)) + "."
                if probe.startswith(canon):
                    changes[fld] = (alt + probe[len(canon) :])[:-1]
        return replace(self, **changes) if changes else self

    def layer_index_of(self, name: str) -> tuple[int, str] | None:
        """(layer index, rest of the name) when `name` is inside a decoder layer, else None."""
        regex = self._layer_regex()
        # Raw first: a spec from adapt_to_names uses the checkpoint's own prefix.
        m = regex.match(name) or regex.match(self.canonical_name(name))
        if m is None:
            return None
        return int(m.group(1)), m.group(2)

    def _layer_regex(self) -> re.Pattern:
        head, _, tail = self.layer_template.partition("{i}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.(.+)$")

    # ------------------------------------------------------------------ config

    def config_scope(self, config) -> dict:
        """The dict holding the text model's settings (`text_config` for multimodal wrappers)."""
        cfg = _as_dict(config)
        if self.config_subkey:
            sub = cfg.get(self.config_subkey)
            if isinstance(sub, Mapping):
                return dict(sub)
        return cfg

    def get(self, config, key: str, default=None):
        """Read logical `key` (e.g. "num_layers") or a raw HF key from `config`.

        Order: the text sub-config (if the spec has one), then the top level, then
        the family's transformers default from the spec, then `default`. A key
        present with value null counts as absent (HF writes `head_dim: null`).
        """
        cfg = _as_dict(config)
        names = self.config_keys.get(key, (key,))
        scopes = []
        if self.config_subkey and isinstance(cfg.get(self.config_subkey), Mapping):
            scopes.append(cfg[self.config_subkey])
        scopes.append(cfg)
        for scope in scopes:
            for name in names:
                value = scope.get(name)
                if value is not None:
                    return value
        if key in self.config_defaults:
            return self.config_defaults[key]
        return default

    def _require_int(self, config, key: str) -> int:
        value = self.get(config, key)
        if value is None:
            names = " or ".join(repr(n) for n in self.config_keys.get(key, (key,)))
            where = f" (in {self.config_subkey})" if self.config_subkey else ""
            raise InputError(f"config.json has no {names}{where}; a {self.family} config needs it")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InputError(f"config.json: {key} = {value!r} is not an integer") from None

    def num_layers(self, config) -> int:
        return self._require_int(config, "num_layers")

    def hidden_size(self, config) -> int:
        return self._require_int(config, "hidden_size")

    def intermediate_size(self, config) -> int:
        return self._require_int(config, "intermediate_size")

    def vocab_size(self, config) -> int:
        return self._require_int(config, "vocab_size")

    def num_heads(self, config) -> int:
        return self._require_int(config, "num_heads")

    def num_kv_heads(self, config) -> int:
        # Absent everywhere (no family default either) means plain multi-head attention.
        value = self.get(config, "num_kv_heads")
        return int(value) if value is not None else self.num_heads(config)

    def head_dim(self, config) -> int:
        value = self.get(config, "head_dim")
        if value is not None:
            return int(value)
        return self.hidden_size(config) // self.num_heads(config)

    def activation(self, config) -> str:
        value = self.get(config, "activation")
        if value is None:
            raise InputError(
                f"config.json names no activation ({self.config_keys.get('activation')})"
            )
        value = str(value)
        return self.activation_aliases.get(value, value)

    def tie_embeddings(self, config) -> bool:
        return bool(self.get(config, "tie_embeddings", False))

    def tie_explicit(self, config) -> bool | None:
        """The config's own tie setting, or None when it does not say (defaults not applied)."""
        cfg = _as_dict(config)
        scopes = [cfg]
        if self.config_subkey and isinstance(cfg.get(self.config_subkey), Mapping):
            scopes.insert(0, cfg[self.config_subkey])
        for scope in scopes:
            for name in self.config_keys.get("tie_embeddings", ()):
                if scope.get(name) is not None:
                    return bool(scope[name])
        return None

    def embedding_multiplier(self, config) -> float:
        """Factor the model applies to embedding rows (Gemma: sqrt(hidden), in the model dtype)."""
        if self.embedding_scale == "sqrt_hidden":
            return math.sqrt(self.hidden_size(config))
        return 1.0

    # -------------------------------------------------------------- live model

    def get_layers(self, model):
        """The decoder-layer ModuleList of a live model (CausalLM or bare base model)."""
        from torch import nn

        tried = []
        for path in (self.layers_path, *self.alt_layers_paths):
            parts = path.split(".")
            # Also accept the base model (e.g. LlamaModel, whose layers sit at "layers").
            for start in range(len(parts)):
                sub = ".".join(parts[start:])
                if sub in tried:
                    continue
                tried.append(sub)
                obj = _resolve(model, sub)
                if isinstance(obj, nn.ModuleList):
                    return obj
        raise InputError(
            f"{type(model).__name__} has no decoder layers at {' / '.join(tried)} "
            f"(expected a {self.family} model)"
        )

    def get_layer(self, model, i: int):
        layers = self.get_layers(model)
        if not 0 <= int(i) < len(layers):
            raise InputError(
                f"layer {i} is out of range; "
                f"the model has {len(layers)} layers (0..{len(layers) - 1})"
            )
        return layers[int(i)]

    def _child(self, model, i: int, name: str):
        layer = self.get_layer(model, i)
        module = getattr(layer, name, None)
        if module is None:
            raise InputError(
                f"layer {i} of {type(model).__name__} has no {name!r} (spec {self.source})"
            )
        return module

    def get_mlp(self, model, i: int):
        return self._child(model, i, self.mlp_module)

    def set_mlp(self, model, i: int, module) -> None:
        """Replace layer `i`'s MLP module (the layer calls it exactly where the MLP was)."""
        self._child(model, i, self.mlp_module)  # must exist: we replace, never add
        setattr(self.get_layer(model, i), self.mlp_module, module)

    def get_attention(self, model, i: int):
        return self._child(model, i, self.attn_module)

    def get_pre_mlp_norm(self, model, i: int):
        """The norm whose output is the MLP input (hook its output to see what the MLP sees)."""
        return self._child(model, i, self.pre_mlp_norm)

    def get_post_mlp_norm(self, model, i: int):
        """The norm applied to the MLP output, or None for families without one."""
        return self._child(model, i, self.post_mlp_norm) if self.post_mlp_norm else None


# ------------------------------------------------------------------- loading


def _as_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(f"expected a config dict, got {type(config).__name__}")


def _resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class _Checker:
    """Small typed accessors that raise SpecError naming file and key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str):
        raise SpecError(f"arch spec {self.source}: {key}: {problem}")

    def keys(self, obj, path: str, required: set, optional: set = frozenset()):
        if not isinstance(obj, dict):
            self.fail(path or "(top level)", "expected a JSON object")
        for k in sorted(required):
            if k not in obj:
                self.fail(f"{path}.{k}" if path else k, "missing key")
        for k in sorted(obj):
            if k not in required and k not in optional:
                self.fail(f"{path}.{k}" if path else k, "unknown key")

    def mapping(self, obj, path: str, required=(), allowed=None, unknown: str = "unknown key"):
        """A JSON object holding every `required` key (in that order) and, when `allowed` is
        given, no other key."""
        if not isinstance(obj, dict):
            self.fail(path, "expected a JSON object")
        for k in required:
            if k not in obj:
                self.fail(f"{path}.{k}", "missing key")
        for k in obj if allowed is not None else ():
            if k not in allowed:
                self.fail(f"{path}.{k}", unknown)

    def string(self, value, key: str, nullable: bool = False):
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            self.fail(
                key, f"expected a non-empty string{' or null' if nullable else ''}, got {value!r}"
            )
        return value

    def str_list(self, value, key: str, allow_empty: bool = True) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"expected a list of strings, got {value!r}")
        if not value and not allow_empty:
            self.fail(key, "must not be empty")
        return tuple(value)


def _validate_layout(raw: dict, chk: _Checker, where: str = "") -> None:
    """Check the keys that describe a layout (also run on each fully merged variant)."""
    p = (where + ".") if where else ""
    chk.string(raw["layers_path"], p + "layers_path")
    tmpl = chk.string(raw["layer_template"], p + "layer_template")
    if tmpl.count("{i}") != 1 or re.search(r"\{(?!i\})", tmpl):
        chk.fail(
            p + "layer_template",
            f"must contain exactly one {{i}} and no other braces, got {tmpl!r}",
        )
    for k in ("embedding", "final_norm", "lm_head"):
        chk.string(raw[k], p + k)
    if raw["embedding_scale"] not in EMBEDDING_SCALES:
        chk.fail(
            p + "embedding_scale",
            f"expected one of {EMBEDDING_SCALES}, got {raw['embedding_scale']!r}",
        )

    attn = raw["attention"]
    chk.keys(attn, p + "attention", _ATTN_KEYS)
    chk.string(attn["module"], p + "attention.module")
    chk.string(attn["o"], p + "attention.o")
    for k in ("q", "k", "v", "qkv"):
        chk.string(attn[k], f"{p}attention.{k}", nullable=True)
    if not attn["qkv"] and not all(attn[k] for k in ("q", "k", "v")):
        chk.fail(p + "attention", "give either qkv or all of q, k, v")
    chk.str_list(attn["qk_norms"], p + "attention.qk_norms")

    mlp = raw["mlp"]
    chk.keys(mlp, p + "mlp", _MLP_KEYS)
    chk.string(mlp["module"], p + "mlp.module")
    if mlp["kind"] not in MLP_KINDS:
        chk.fail(p + "mlp.kind", f"expected one of {MLP_KINDS}, got {mlp['kind']!r}")
    chk.string(mlp["down"], p + "mlp.down")
    for k in ("gate", "up", "gate_up"):
        chk.string(mlp[k], f"{p}mlp.{k}", nullable=True)
    if mlp["kind"] == "gated" and not (mlp["gate"] and mlp["up"]):
        chk.fail(p + "mlp", "kind 'gated' needs gate and up")
    if mlp["kind"] == "fused_gated" and not mlp["gate_up"]:
        chk.fail(p + "mlp", "kind 'fused_gated' needs gate_up")

    norms = raw["norms"]
    chk.keys(norms, p + "norms", _NORM_KEYS)
    chk.string(norms["input"], p + "norms.input")
    chk.string(norms["pre_mlp"], p + "norms.pre_mlp")
    chk.string(norms["post_attention"], p + "norms.post_attention", nullable=True)
    chk.string(norms["post_mlp"], p + "norms.post_mlp", nullable=True)

    keys = raw["config_keys"]
    chk.mapping(keys, p + "config_keys", required=REQUIRED_CONFIG_KEYS)
    for k, v in keys.items():
        chk.str_list(v, f"{p}config_keys.{k}", allow_empty=False)
    chk.mapping(raw["config_defaults"], p + "config_defaults", allowed=keys,
                unknown="default for a key not in config_keys")

    aliases = raw.get("activation_aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        chk.fail(p + "activation_aliases", "expected an object of strings")
    chk.string(raw.get("config_subkey"), p + "config_subkey", nullable=True)
    chk.str_list(raw.get("alt_layers_paths", []), p + "alt_layers_paths")
    renames = raw.get("weight_renames", [])
    if not isinstance(renames, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(s, str) and s for s in r)
        for r in renames
    ):
        chk.fail(
            p + "weight_renames", "expected a list of [alternative_prefix, canonical_prefix] pairs"
        )


def _build(raw: dict, source: str, model_type: str | None) -> ArchSpec:
    attn, mlp, norms = raw["attention"], raw["mlp"], raw["norms"]
    return ArchSpec(
        family=raw["family"],
        model_types=tuple(raw["model_types"]),
        source=source,
        model_type=model_type,
        description=raw.get("description", ""),
        layers_path=raw["layers_path"],
        layer_template=raw["layer_template"],
        alt_layers_paths=tuple(raw.get("alt_layers_paths", ())),
        attn_module=attn["module"],
        q_proj=attn["q"],
        k_proj=attn["k"],
        v_proj=attn["v"],
        qkv_proj=attn["qkv"],
        o_proj=attn["o"],
        qk_norms=tuple(attn["qk_norms"]),
        mlp_module=mlp["module"],
        mlp_kind=mlp["kind"],
        gate_proj=mlp["gate"],
        up_proj=mlp["up"],
        gate_up_proj=mlp["gate_up"],
        down_proj=mlp["down"],
        input_norm=norms["input"],
        post_attn_norm=norms["post_attention"],
        pre_mlp_norm=norms["pre_mlp"],
        post_mlp_norm=norms["post_mlp"],
        embedding=raw["embedding"],
        final_norm=raw["final_norm"],
        lm_head=raw["lm_head"],
        embedding_scale=raw["embedding_scale"],
        config_subkey=raw.get("config_subkey"),
        weight_renames=tuple(tuple(r) for r in raw.get("weight_renames", ())),
        config_keys=MappingProxyType({k: tuple(v) for k, v in raw["config_keys"].items()}),
        config_defaults=MappingProxyType(dict(raw["config_defaults"])),
        activation_aliases=MappingProxyType(dict(raw.get("activation_aliases", {}))),
    )


def parse_spec(raw: dict, source: str) -> dict[str, ArchSpec]:
    """Validate one spec document; return {model_type: ArchSpec} with variants applied."""
    chk = _Checker(source)
    chk.keys(raw, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    chk.string(raw["family"], "family")
    model_types = chk.str_list(raw["model_types"], "model_types", allow_empty=False)
    if len(set(model_types)) != len(model_types):
        chk.fail("model_types", "duplicate model_type")
    if "description" in raw:
        chk.string(raw["description"], "description")
    _validate_layout(raw, chk)
    variants = raw.get("variants", {})
    if not isinstance(variants, dict):
        chk.fail("variants", "expected a JSON object")
    out = {}
    for mt in model_types:
        merged = dict(raw)
        if mt in variants:
            over = variants[mt]
            chk.keys(over, f"variants.{mt}", set(), _VARIANT_KEYS)
            for k, v in over.items():
                # Dicts of settings merge; everything else replaces.
                if k in ("config_keys", "config_defaults", "activation_aliases"):
                    merged[k] = {**merged.get(k, {}), **v}
                else:
                    merged[k] = v
            _validate_layout(merged, chk, f"variants.{mt}")
        out[mt] = _build(merged, source, mt)
    for mt in variants:
        if mt not in model_types:
            chk.fail(f"variants.{mt}", "variant for a model_type not listed in model_types")
    return out


def load_spec(path) -> dict[str, ArchSpec]:
    """Load and validate one spec file (a built-in one or a user's); {model_type: ArchSpec}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise SpecError(f"arch spec {path}: cannot read: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise SpecError(
            f"arch spec {path.name}: invalid JSON at line {err.lineno}: {err.msg}"
        ) from None
    return parse_spec(raw, path.name)


@lru_cache(maxsize=1)
def _builtin() -> Mapping[str, ArchSpec]:
    specs: dict[str, ArchSpec] = {}
    folder = resources.files("memsurgery.arch").joinpath("specs")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            raw = json.loads(entry.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(
                f"arch spec {entry.name}: invalid JSON at line {err.lineno}: {err.msg}"
            ) from None
        for mt, spec in parse_spec(raw, entry.name).items():
            if mt in specs:
                raise SpecError(
                    f"arch spec {entry.name}: model_types: {mt!r} is also in {specs[mt].source}"
                )
            specs[mt] = spec
    return MappingProxyType(specs)


def supported_model_types() -> list[str]:
    """Every model_type with a built-in spec, sorted."""
    return sorted(_builtin())


def all_specs() -> dict[str, ArchSpec]:
    """{model_type: ArchSpec} of the built-in specs."""
    return dict(_builtin())


def spec_for_model_type(model_type: str) -> ArchSpec:
    specs = _builtin()
    if model_type not in specs:
        raise InputError(
            f"unsupported architecture {model_type!r} (model_type); "
            f"supported: {', '.join(sorted(specs))}"
        )
    return specs[model_type]


def spec_for_config(config) -> ArchSpec:
    """The ArchSpec for an HF config dict (or PretrainedConfig), resolved to its model_type."""
    cfg = _as_dict(config)
    model_type = cfg.get("model_type")
    if not model_type:
        raise InputError(
            "config.json has no model_type, so the architecture is unknown; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return spec_for_model_type(str(model_type))
