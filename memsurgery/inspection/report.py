"""The `inspect` report: what a checkpoint is, and what grafting a memory into it would cost.

`inspect_checkpoint(ckpt, proposal)` reads only a `Checkpoint`'s config and
tensor headers (no weights are loaded) and returns a JSON-serializable dict;
`render_inspect` (render.py) prints it as rich tables. The dict is a stable, versioned
format ("schema": "memsurgery.inspect/1"); fields are only ever added within
a schema version.

Report (all counts are integers; bytes are bytes):
  schema, source (path as given), format ("safetensors" | "gguf" | "pickle"),
  files [{name, bytes}], total_bytes, tokenizer (bool)
  architecture {model_type, family, architectures (HF class names or null)}
  num_layers, hidden_size, intermediate_size, vocab_size, tied_embeddings,
  embedding_scale (float: Gemma multiplies embeddings by sqrt(hidden); 1.0 otherwise)
  attention {heads, kv_heads, head_dim, layout ("separate" | "fused_qkv"), params_per_layer}
  mlp {kind (e.g. "gated-silu"), activation, layout ("separate" | "fused_gate_up"),
       hidden_size, intermediate_size, params_per_layer}
  layer_params (parameters of one decoder layer: layer 0)
  dtypes {DTYPE: {tensors, params, bytes}}
  parameters {total, by_component {embedding, attention, mlp, norms, lm_head, other}}
      (tied weights counted once: a stored lm_head tied to the embedding is skipped)
  notes [str]  (anything odd about the checkpoint, in words)
  memory  (null for a dense checkpoint; for a grafted or exported one, see grafted.py):
      {base_model_type, mode, layers, config (the MemoryConfig), format_version,
       params {value_table, per_layer {layer: n}, total},
       slots_used {nonzero_rows, slots, fraction, value_init} (null if not readable lazily),
       graft {source, source_sha256, base_model} (from graft.json, when present)}
      (architecture, shapes and parameters then describe the base family; parameters
      by_component gains "memory")
  graft_estimate  (null for a grafted checkpoint; else see `estimate.graft_estimate`):
      proposal {slots, n_sub, heads, knn, k_dim, v_dim, layers}  (resolved: defaults filled in)
      params {value_table, per_layer {query, sub_keys, gate, out, relevance_gate, total},
              all_layers, total, dense_model}
      bytes {fp32, bf16, adam_state_fp32, fp32_with_adam}
      flops_per_token {added_per_layer {query_proj, sub_key_scores, candidates, bag, gates,
                       relevance_gate, total}, removed_per_layer_replace, net_parallel,
                       net_replace, dense_model, relative_to_dense {parallel, replace}}
      fits_ram {ram_bytes, model_fp32_bytes, memory_fp32_bytes, adam_state_bytes,
                required_bytes, fits}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memsurgery.arch import ArchSpec, spec_for_config
from memsurgery.inspection.estimate import GraftProposal, graft_estimate
from memsurgery.inspection.grafted import MEMORY_PREFIX, memory_section, split_grafted

SCHEMA = "memsurgery.inspect/1"
COMPONENTS = ("embedding", "attention", "mlp", "norms", "lm_head", "other")
# Saved buffers that are not parameters (old Llama checkpoints store RoPE frequencies).
_NON_PARAM_SUFFIXES = (".rotary_emb.inv_freq",)

# ------------------------------------------------------------- the report


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _classify(spec: ArchSpec, name: str) -> str:
    """Component of one (canonical) weight name."""

    def under(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    if under(spec.embedding):
        return "embedding"
    if under(spec.lm_head):
        return "lm_head"
    if under(spec.final_norm):
        return "norms"
    hit = spec.layer_index_of(name)
    if hit is None:
        return "other"
    parts = hit[1].split(".")
    if parts[0] == spec.attn_module:
        return "norms" if len(parts) > 1 and parts[1] in spec.qk_norms else "attention"
    if parts[0] == spec.mlp_module:
        return "mlp"
    if parts[0] in spec.layer_norm_modules():
        return "norms"
    return "other"


@dataclass
class _Counts:
    """Parameter counts of one checkpoint, read from its tensor headers."""

    by_component: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    per_layer: dict[int, dict[str, int]] = field(default_factory=dict)
    dtypes: dict[str, dict[str, int]] = field(default_factory=dict)
    other_names: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_component.values())


def inspect_checkpoint(
    ckpt, proposal: GraftProposal | None = None, *, ram_bytes: int | None = None
) -> dict:
    """The report dict (schema in the module docstring) for an opened `Checkpoint`."""
    # A grafted (or exported) checkpoint is described as its base family plus its memory.
    config, block = split_grafted(ckpt.config)
    # Names are classified in the spec's canonical naming (see ArchSpec.canonical_name).
    spec = spec_for_config(config)
    sizes = _sizes(spec, config)
    # Resolve the proposal first: a bad flag should fail before any other work.
    if block is None:
        proposal = (proposal or GraftProposal()).resolve(sizes["layers"], sizes["hidden"])

    notes: list[str] = []
    names = {name: spec.canonical_name(name) for name in ckpt.tensors if not name.startswith(MEMORY_PREFIX)}
    tied = _tied_embeddings(spec, config, names, notes)
    counts = _count_parameters(ckpt, spec, names, tied, grafted=block is not None)
    notes += _count_notes(spec, counts, sizes["layers"])
    if block is not None:
        notes.append("already grafted: no graft estimate (graft the dense base checkpoint to price another memory)")
    architectures = list(ckpt.config.get("architectures") or []) or None
    if architectures is None:
        # GGUF-derived configs name no class; use the one transformers would load, so a
        # GGUF and its converted directory describe the same architecture.
        architectures = _default_architectures(spec.model_type)
        if architectures:
            notes.append(f"config names no architectures; assuming {architectures[0]}")
    files = [{"name": str(n), "bytes": int(b)} for n, b in ckpt.files]
    return {
        "schema": SCHEMA,
        "source": str(ckpt.path),
        "format": ckpt.format,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "tokenizer": bool(ckpt.has_tokenizer),
        "architecture": {
            "model_type": spec.model_type,
            "family": spec.family,
            "architectures": architectures,
        },
        **_shape_sections(spec, config, sizes, counts, tied),
        "notes": notes,
        "graft_estimate": None if block is not None else _estimate(sizes, counts, tied, proposal, ram_bytes),
        "memory": None if block is None else memory_section(ckpt, block),
    }


def _sizes(spec: ArchSpec, config: dict) -> dict:
    """The sizes the report needs, all read up front: a config lacking one fails at once."""
    return {"hidden": spec.hidden_size(config), "intermediate": spec.intermediate_size(config),
            "layers": spec.num_layers(config), "vocab": spec.vocab_size(config),
            "heads": spec.num_heads(config), "activation": spec.activation(config)}


def _tied_embeddings(spec: ArchSpec, config: dict, names: dict[str, str], notes: list[str]) -> bool:
    """Whether lm_head shares the embedding's weights; odd combinations are noted."""
    has_lm_head = any(_classify(spec, c) == "lm_head" for c in names.values())
    explicit_tie = spec.tie_explicit(config)
    # A config that does not say (e.g. some GGUF-derived configs) is decided by the weights.
    tied = explicit_tie if explicit_tie is not None else not has_lm_head
    if tied and has_lm_head:
        notes.append("lm_head is stored but tied to the embedding; counted once")
    if not tied and not has_lm_head:
        notes.append("config says untied embeddings but the checkpoint has no lm_head weight")
    return tied


def _count_parameters(ckpt, spec: ArchSpec, names: dict[str, str], tied: bool, grafted: bool = False) -> _Counts:
    """Parameters by component, by layer and by dtype (a tied lm_head is counted once)."""
    counts = _Counts()
    if grafted:
        counts.by_component["memory"] = 0
    for name, info in ckpt.tensors.items():
        if name not in names:  # a grafted checkpoint's memory_bank.* tensors
            n = _numel(info.shape)
            entry = counts.dtypes.setdefault(str(info.dtype), {"tensors": 0, "params": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["params"] += n
            entry["bytes"] += int(info.nbytes)
            counts.by_component["memory"] += n
            continue
        canon = names[name]
        if canon.endswith(_NON_PARAM_SUFFIXES):
            continue
        n = _numel(info.shape)
        entry = counts.dtypes.setdefault(str(info.dtype), {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += n
        entry["bytes"] += int(info.nbytes)
        comp = _classify(spec, canon)
        if comp == "lm_head" and tied:
            continue
        counts.by_component[comp] += n
        if comp == "other":
            counts.other_names.append(canon)
        hit = spec.layer_index_of(canon)
        if hit is not None:
            slot = counts.per_layer.setdefault(hit[0], dict.fromkeys(COMPONENTS, 0))
            slot[comp] += n
    return counts


def _count_notes(spec: ArchSpec, counts: _Counts, n_layers: int) -> list[str]:
    """What the counts say is odd about the checkpoint, in words."""
    notes = []
    if counts.by_component["embedding"] == 0:
        notes.append(f"no embedding weight ({spec.embedding}.weight) found")
    other = counts.other_names
    if other:
        shown = ", ".join(sorted(other)[:3]) + (" ..." if len(other) > 3 else "")
        notes.append(
            f"{len(other)} tensors not placed by the {spec.family} spec "
            f"({shown}) counted as 'other'"
        )
    missing_layers = [i for i in range(n_layers) if i not in counts.per_layer]
    if missing_layers:
        notes.append(
            f"{len(missing_layers)} of {n_layers} layers have no weights in the checkpoint"
        )
    return notes


def _layer0(counts: _Counts) -> dict[str, int]:
    return counts.per_layer.get(0, dict.fromkeys(COMPONENTS, 0))


def _shape_sections(spec: ArchSpec, config: dict, sizes: dict, counts: _Counts, tied: bool) -> dict:
    """The report's keys from num_layers through parameters: the model's shape and counts."""
    d, inter, act = sizes["hidden"], sizes["intermediate"], sizes["activation"]
    layer0 = _layer0(counts)
    return {
        "num_layers": sizes["layers"],
        "hidden_size": d,
        "intermediate_size": inter,
        "vocab_size": sizes["vocab"],
        "tied_embeddings": bool(tied),
        "embedding_scale": spec.embedding_multiplier(config),
        "attention": {
            "heads": sizes["heads"],
            "kv_heads": spec.num_kv_heads(config),
            "head_dim": spec.head_dim(config),
            "layout": "fused_qkv" if spec.qkv_proj else "separate",
            "params_per_layer": layer0["attention"],
        },
        "mlp": {
            "kind": f"gated-{act}",
            "activation": act,
            "layout": "fused_gate_up" if spec.mlp_kind == "fused_gated" else "separate",
            "hidden_size": d,
            "intermediate_size": inter,
            "params_per_layer": layer0["mlp"] or 3 * d * inter,
        },
        "layer_params": sum(layer0.values()),
        "dtypes": dict(sorted(counts.dtypes.items(), key=lambda kv: -kv[1]["params"])),
        "parameters": {"total": counts.total, "by_component": counts.by_component},
    }


def _estimate(sizes: dict, counts: _Counts, tied: bool, proposal: GraftProposal,
              ram_bytes: int | None) -> dict:
    """The graft estimate of the resolved proposal against this model's sizes."""
    d, vocab = sizes["hidden"], sizes["vocab"]
    total = counts.total
    # Dense matmul FLOPs per token ~ 2 x weights used in matmuls: embedding lookups cost
    # nothing, but the output projection runs even when it shares the embedding's weights.
    dense_flops = 2 * (total - counts.by_component["embedding"]) + (2 * vocab * d if tied else 0)
    return graft_estimate(
        proposal,
        hidden_size=d,
        intermediate_size=sizes["intermediate"],
        dense_params=total,
        dense_flops_per_token=dense_flops,
        ram_bytes=ram_bytes,
    )


def _default_architectures(model_type: str | None) -> list[str] | None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")
    return [name] if name else None
