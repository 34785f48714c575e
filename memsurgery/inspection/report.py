"""The `inspect` report: what a checkpoint is, and what grafting a memory into it would cost.

`inspect_checkpoint(ckpt, proposal)` reads only a `Checkpoint`'s config and
tensor headers (no weights are loaded) and returns a JSON-serializable dict;
`render_inspect` prints it as rich tables. The dict is a stable, versioned
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
  graft_estimate  (see `graft_estimate`):
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

import math
import re
from dataclasses import dataclass, replace

from memsurgery.arch import ArchSpec, spec_for_config
from memsurgery.errors import InputError

SCHEMA = "memsurgery.inspect/1"
COMPONENTS = ("embedding", "attention", "mlp", "norms", "lm_head", "other")
# Saved buffers that are not parameters (old Llama checkpoints store RoPE frequencies).
_NON_PARAM_SUFFIXES = (".rotary_emb.inv_freq",)


# ---------------------------------------------------------------- proposal


@dataclass
class GraftProposal:
    """The memory a user proposes to graft; defaults suit small models.

    `layers=None` means 3 evenly spaced layers (see `default_memory_layers`);
    `v_dim=None` means the model's hidden size.
    """

    slots: int = 65536
    heads: int = 4
    knn: int = 32
    k_dim: int = 256
    layers: list[int] | None = None
    v_dim: int | None = None

    @property
    def n_sub(self) -> int:
        return math.isqrt(self.slots) if self.slots > 0 else 0

    def resolve(self, num_layers: int, hidden_size: int) -> GraftProposal:
        """A validated copy with `layers` and `v_dim` filled in; InputError names the bad flag."""
        slots = _as_int(self.slots, "--slots")
        if slots <= 0:
            raise InputError(f"--slots {slots}: must be positive, e.g. 64K or 1M")
        n_sub = math.isqrt(slots)
        if n_sub * n_sub != slots:
            lo, hi = n_sub * n_sub, (n_sub + 1) ** 2
            raise InputError(
                f"--slots {slots}: must be a perfect square (slots = n_sub^2); "
                f"nearest: {lo} ({n_sub}^2) or {hi} ({n_sub + 1}^2)"
            )
        heads = _as_int(self.heads, "--heads")
        if heads < 1:
            raise InputError(f"--heads {heads}: must be at least 1")
        k_dim = _as_int(self.k_dim, "--k-dim")
        if k_dim < 2 or k_dim % 2:
            raise InputError(
                f"--k-dim {k_dim}: must be even and at least 2 (each query is split in two halves)"
            )
        knn = _as_int(self.knn, "--knn")
        if not 1 <= knn <= n_sub:
            raise InputError(f"--knn {knn}: must be between 1 and n_sub = sqrt(slots) = {n_sub}")
        v_dim = hidden_size if self.v_dim is None else _as_int(self.v_dim, "--v-dim")
        if v_dim < 1:
            raise InputError(f"--v-dim {v_dim}: must be at least 1")
        if self.layers is None:
            layers = default_memory_layers(num_layers)
        else:
            layers = [_as_int(x, "--layers") for x in self.layers]
            if not layers:
                raise InputError("--layers: give at least one layer, e.g. 8,16,24")
            bad = [x for x in layers if not 0 <= x < num_layers]
            if bad:
                raise InputError(
                    f"--layers {','.join(map(str, layers))}: layer {bad[0]} is out of range; "
                    f"this model has {num_layers} layers (0..{num_layers - 1})"
                )
            if len(set(layers)) != len(layers):
                raise InputError(f"--layers {','.join(map(str, layers))}: a layer is listed twice")
            layers = sorted(layers)
        return replace(
            self, slots=slots, heads=heads, knn=knn, k_dim=k_dim, v_dim=v_dim, layers=layers
        )


def _as_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{flag} {value!r}: expected an integer") from None
    return value


def default_memory_layers(num_layers: int, count: int = 3) -> list[int]:
    """`count` layers at the centres of equal slices of the stack.

    24 layers -> 4, 12, 20 (the Memory+ reference placement); 30 -> 5, 15, 25;
    fewer layers than `count` -> every layer.
    """
    n = min(count, num_layers)
    return [((2 * k + 1) * num_layers) // (2 * n) for k in range(n)]


_SLOTS_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")


def parse_slots(text) -> int:
    """Slot count from "65536", "64K" (65536) or "1M" (1048576): binary K/M/G suffixes.

    Anything else raises InputError naming --slots.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = _SLOTS_RE.match(str(text))
    if not m:
        raise InputError(
            f"--slots {text!r}: expected an integer or a K/M suffix (binary), e.g. 65536, 64K, 1M"
        )
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if value <= 0:
        raise InputError(f"--slots {text!r}: must be positive")
    return value


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


def inspect_checkpoint(
    ckpt, proposal: GraftProposal | None = None, *, ram_bytes: int | None = None
) -> dict:
    """The report dict (schema in the module docstring) for an opened `Checkpoint`."""
    config = ckpt.config
    # Names are classified in the spec's canonical naming (see ArchSpec.canonical_name).
    spec = spec_for_config(config)
    d = spec.hidden_size(config)
    inter = spec.intermediate_size(config)
    n_layers = spec.num_layers(config)
    vocab = spec.vocab_size(config)
    heads = spec.num_heads(config)
    act = spec.activation(config)
    notes: list[str] = []

    # Resolve the proposal first: a bad flag should fail before any other work.
    proposal = (proposal or GraftProposal()).resolve(n_layers, d)

    names = {name: spec.canonical_name(name) for name in ckpt.tensors}
    has_lm_head = any(_classify(spec, c) == "lm_head" for c in names.values())
    explicit_tie = spec.tie_explicit(config)
    # A config that does not say (e.g. some GGUF-derived configs) is decided by the weights.
    tied = explicit_tie if explicit_tie is not None else not has_lm_head
    if tied and has_lm_head:
        notes.append("lm_head is stored but tied to the embedding; counted once")
    if not tied and not has_lm_head:
        notes.append("config says untied embeddings but the checkpoint has no lm_head weight")

    by_component = dict.fromkeys(COMPONENTS, 0)
    per_layer: dict[int, dict[str, int]] = {}
    dtypes: dict[str, dict[str, int]] = {}
    other_names = []
    for name, info in ckpt.tensors.items():
        canon = names[name]
        if canon.endswith(_NON_PARAM_SUFFIXES):
            continue
        n = _numel(info.shape)
        entry = dtypes.setdefault(str(info.dtype), {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += n
        entry["bytes"] += int(info.nbytes)
        comp = _classify(spec, canon)
        if comp == "lm_head" and tied:
            continue
        by_component[comp] += n
        if comp == "other":
            other_names.append(canon)
        hit = spec.layer_index_of(canon)
        if hit is not None:
            slot = per_layer.setdefault(hit[0], dict.fromkeys(COMPONENTS, 0))
            slot[comp] += n
    if by_component["embedding"] == 0:
        notes.append(f"no embedding weight ({spec.embedding}.weight) found")
    if other_names:
        shown = ", ".join(sorted(other_names)[:3]) + (" ..." if len(other_names) > 3 else "")
        notes.append(
            f"{len(other_names)} tensors not placed by the {spec.family} spec "
            f"({shown}) counted as 'other'"
        )
    missing_layers = [i for i in range(n_layers) if i not in per_layer]
    if missing_layers:
        notes.append(
            f"{len(missing_layers)} of {n_layers} layers have no weights in the checkpoint"
        )
    total = sum(by_component.values())

    layer0 = per_layer.get(0, dict.fromkeys(COMPONENTS, 0))
    mlp_per_layer = layer0["mlp"] or 3 * d * inter
    # Dense matmul FLOPs per token ~ 2 x weights used in matmuls: embedding lookups cost
    # nothing, but the output projection runs even when it shares the embedding's weights.
    dense_flops = 2 * (total - by_component["embedding"]) + (2 * vocab * d if tied else 0)

    architectures = list(config.get("architectures") or []) or None
    if architectures is None:
        # GGUF-derived configs name no class; use the one transformers would load, so a
        # GGUF and its converted directory describe the same architecture.
        architectures = _default_architectures(spec.model_type)
        if architectures:
            notes.append(f"config names no architectures; assuming {architectures[0]}")

    files = [{"name": str(n), "bytes": int(b)} for n, b in ckpt.files]
    report = {
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
        "num_layers": n_layers,
        "hidden_size": d,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tied_embeddings": bool(tied),
        "embedding_scale": spec.embedding_multiplier(config),
        "attention": {
            "heads": heads,
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
            "params_per_layer": mlp_per_layer,
        },
        "layer_params": sum(layer0.values()),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["params"])),
        "parameters": {"total": total, "by_component": by_component},
        "notes": notes,
        "graft_estimate": graft_estimate(
            proposal,
            hidden_size=d,
            intermediate_size=inter,
            dense_params=total,
            dense_flops_per_token=dense_flops,
            ram_bytes=ram_bytes,
        ),
    }
    return report


def _default_architectures(model_type: str | None) -> list[str] | None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")
    return [name] if name else None


def graft_estimate(
    proposal: GraftProposal,
    *,
    hidden_size: int,
    intermediate_size: int,
    dense_params: int,
    dense_flops_per_token: int,
    ram_bytes: int | None = None,
) -> dict:
    """Parameters, bytes, FLOPs/token and RAM fit of a *resolved* proposal (see module doc).

    One value table (slots x v_dim) is shared by all memory layers; each memory
    layer owns its query projection, sub-keys, SiLU gate W_g, output W_o and a
    scalar relevance gate. FLOPs count multiply-adds as 2 and leave out top-k
    selection and softmax (comparisons, not matmuls) and attention scores (which
    depend on context length).
    """
    if proposal.layers is None or proposal.v_dim is None:
        raise ValueError("graft_estimate needs a resolved proposal (GraftProposal.resolve)")
    d, inter = hidden_size, intermediate_size
    H, k_dim, knn, v_dim = proposal.heads, proposal.k_dim, proposal.knn, proposal.v_dim
    slots, n_sub, n_mem = proposal.slots, proposal.n_sub, len(proposal.layers)

    table = slots * v_dim
    layer = {
        "query": d * H * k_dim,
        "sub_keys": H * 2 * n_sub * (k_dim // 2),
        "gate": d * v_dim,  # W_g: silu gate on the bag output
        "out": v_dim * d,  # W_o
        "relevance_gate": d + 1,  # scalar gate per token (weight + bias)
    }
    layer["total"] = sum(layer.values())
    mem_total = table + n_mem * layer["total"]

    added = {
        "query_proj": 2 * d * H * k_dim,
        "sub_key_scores": 2 * H * 2 * n_sub * (k_dim // 2),
        "candidates": H * knn * knn,  # knn^2 candidate sums per head
        "bag": 2 * H * knn * v_dim,  # weighted sum of knn value rows per head
        "gates": 2 * 2 * d * v_dim,  # W_g and W_o
        "relevance_gate": 2 * d,
    }
    added["total"] = sum(added.values())
    removed = 2 * 3 * d * inter  # the gated MLP: gate, up, down
    net_parallel = n_mem * added["total"]
    net_replace = n_mem * (added["total"] - removed)

    if ram_bytes is None:
        import psutil

        ram_bytes = psutil.virtual_memory().total
    model_fp32 = 4 * dense_params
    mem_fp32 = 4 * mem_total
    adam = 2 * 4 * table  # row-wise Adam: two fp32 copies of the table
    required = model_fp32 + mem_fp32 + adam

    return {
        "proposal": {
            "slots": slots,
            "n_sub": n_sub,
            "heads": H,
            "knn": knn,
            "k_dim": k_dim,
            "v_dim": v_dim,
            "layers": list(proposal.layers),
        },
        "params": {
            "value_table": table,
            "per_layer": layer,
            "all_layers": n_mem * layer["total"],
            "total": mem_total,
            "dense_model": dense_params,
        },
        "bytes": {
            "fp32": 4 * mem_total,
            "bf16": 2 * mem_total,
            "adam_state_fp32": adam,
            "fp32_with_adam": 4 * mem_total + adam,
        },
        "flops_per_token": {
            "added_per_layer": added,
            "removed_per_layer_replace": removed,
            "net_parallel": net_parallel,
            "net_replace": net_replace,
            "dense_model": dense_flops_per_token,
            "relative_to_dense": {
                "parallel": round(net_parallel / dense_flops_per_token, 6)
                if dense_flops_per_token
                else None,
                "replace": round(net_replace / dense_flops_per_token, 6)
                if dense_flops_per_token
                else None,
            },
        },
        "fits_ram": {
            "ram_bytes": int(ram_bytes),
            "model_fp32_bytes": model_fp32,
            "memory_fp32_bytes": mem_fp32,
            "adam_state_bytes": adam,
            "required_bytes": required,
            "fits": required <= ram_bytes,
        },
    }


# -------------------------------------------------------------- rendering


def _count(n) -> str:
    """134515008 -> '134.5M' (decimal units, as parameter counts are usually quoted)."""
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _bytes(n) -> str:
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def render_inspect(report: dict, console) -> None:
    """Print the report as a few readable rich tables."""
    from rich import box
    from rich.table import Table

    def kv_table(title: str) -> Table:
        t = Table(
            title=title, box=box.SIMPLE, show_header=False, title_justify="left", title_style="bold"
        )
        t.add_column(style="cyan", no_wrap=True)
        t.add_column()
        return t

    arch = report["architecture"]
    src = kv_table("Checkpoint")
    src.add_row("source", report["source"])
    src.add_row("format", report["format"])
    files = report["files"]
    shown = ", ".join(f["name"] for f in files[:3]) + (
        f", ... ({len(files)} files)" if len(files) > 3 else ""
    )
    src.add_row("files", f"{shown}  [{_bytes(report['total_bytes'])}]")
    src.add_row("dtypes", ", ".join(f"{k} x{v['tensors']}" for k, v in report["dtypes"].items()))
    src.add_row("tokenizer", "yes" if report["tokenizer"] else "no")
    console.print(src)

    a = kv_table("Architecture")
    classes = ", ".join(arch["architectures"] or []) or "-"
    a.add_row("model", f"{arch['model_type']} (family {arch['family']}; {classes})")
    a.add_row("layers", str(report["num_layers"]))
    a.add_row("hidden size", str(report["hidden_size"]))
    att = report["attention"]
    a.add_row(
        "attention",
        f"{att['heads']} heads / {att['kv_heads']} KV heads, head_dim {att['head_dim']}"
        f" ({att['layout']}, {_count(att['params_per_layer'])} params/layer)",
    )
    mlp = report["mlp"]
    a.add_row(
        "MLP",
        f"{mlp['kind']} {mlp['hidden_size']}->{mlp['intermediate_size']}"
        f" ({mlp['layout']}, {_count(mlp['params_per_layer'])} params/layer)",
    )
    a.add_row(
        "vocab",
        f"{report['vocab_size']} ({'tied' if report['tied_embeddings'] else 'untied'} embeddings"
        + (f", scaled x{report['embedding_scale']:.4g}" if report["embedding_scale"] != 1.0 else "")
        + ")",
    )
    console.print(a)

    params = report["parameters"]
    p = Table(
        title=f"Parameters: {params['total']:,} ({_count(params['total'])})",
        box=box.SIMPLE,
        title_justify="left",
        title_style="bold",
    )
    p.add_column("component", style="cyan")
    p.add_column("params", justify="right")
    p.add_column("share", justify="right")
    for comp, n in params["by_component"].items():
        if n or comp in ("embedding", "attention", "mlp"):
            share = f"{100 * n / params['total']:.1f}%" if params["total"] else "-"
            p.add_row(comp, f"{n:,}", share)
    console.print(p)

    g = report["graft_estimate"]
    pr, gp, gb, gf, fit = (
        g["proposal"],
        g["params"],
        g["bytes"],
        g["flops_per_token"],
        g["fits_ram"],
    )
    e = kv_table("Graft estimate")
    e.add_row(
        "proposal",
        f"{pr['slots']:,} slots ({pr['n_sub']}^2), {pr['heads']} heads, knn {pr['knn']}, "
        f"k_dim {pr['k_dim']}, v_dim {pr['v_dim']}, layers {','.join(map(str, pr['layers']))}",
    )
    ratio = (
        f" ({gp['total'] / gp['dense_model']:.2f}x the dense model)" if gp["dense_model"] else ""
    )
    e.add_row(
        "memory params",
        f"{_count(gp['total'])}: shared table {_count(gp['value_table'])} "
        f"+ {len(pr['layers'])} x {_count(gp['per_layer']['total'])} per layer{ratio}",
    )
    e.add_row(
        "memory bytes",
        f"{_bytes(gb['fp32'])} fp32, {_bytes(gb['bf16'])} bf16; "
        f"{_bytes(gb['fp32_with_adam'])} fp32 with Adam state",
    )
    rel = gf["relative_to_dense"]
    e.add_row(
        "FLOPs/token",
        f"+{_count(gf['added_per_layer']['total'])} per memory layer; "
        f"parallel {_signed(gf['net_parallel'])} ({_pct(rel['parallel'])}), "
        f"replace {_signed(gf['net_replace'])} ({_pct(rel['replace'])}) "
        f"vs dense ~{_count(gf['dense_model'])}",
    )
    verdict = "[green]fits[/]" if fit["fits"] else "[red]does not fit[/]"
    e.add_row(
        "RAM (training)",
        f"{verdict}: {_bytes(fit['required_bytes'])} needed "
        f"(model {_bytes(fit['model_fp32_bytes'])} + memory {_bytes(fit['memory_fp32_bytes'])} "
        f"+ Adam {_bytes(fit['adam_state_bytes'])}) of {_bytes(fit['ram_bytes'])}",
    )
    console.print(e)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _signed(n) -> str:
    return ("-" if n < 0 else "+") + _count(abs(n))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"
