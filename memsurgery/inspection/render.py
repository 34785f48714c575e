"""Rendering the inspect report (report.py) as a few readable rich tables."""

from __future__ import annotations


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
    console.print(_source_table(report))
    console.print(_architecture_table(report))
    console.print(_parameter_table(report))
    if report.get("memory"):
        console.print(_memory_table(report["memory"]))
    if report.get("graft_estimate"):
        console.print(_estimate_table(report["graft_estimate"]))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _kv_table(title: str):
    from rich import box
    from rich.table import Table

    t = Table(
        title=title, box=box.SIMPLE, show_header=False, title_justify="left", title_style="bold"
    )
    t.add_column(style="cyan", no_wrap=True)
    t.add_column()
    return t


def _source_table(report: dict):
    src = _kv_table("Checkpoint")
    src.add_row("source", report["source"])
    src.add_row("format", report["format"])
    files = report["files"]
    shown = ", ".join(f["name"] for f in files[:3]) + (
        f", ... ({len(files)} files)" if len(files) > 3 else ""
    )
    src.add_row("files", f"{shown}  [{_bytes(report['total_bytes'])}]")
    src.add_row("dtypes", ", ".join(f"{k} x{v['tensors']}" for k, v in report["dtypes"].items()))
    src.add_row("tokenizer", "yes" if report["tokenizer"] else "no")
    return src


def _architecture_table(report: dict):
    arch = report["architecture"]
    a = _kv_table("Architecture")
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
    return a


def _parameter_table(report: dict):
    from rich import box
    from rich.table import Table

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
    return p


def _memory_table(m: dict):
    """A grafted checkpoint's memory: where, what shape, how big, how much of it is used."""
    c, p = m["config"], m["params"]
    t = _kv_table("Memory (grafted)")
    t.add_row("base model", m["base_model_type"] + (f" (grafted from {m['graft']['source']})"
                                                    if (m.get("graft") or {}).get("source") else ""))
    t.add_row("mode", f"{m['mode']} at layers {', '.join(map(str, m['layers']))}")
    t.add_row("shape", f"{c.get('slots', 0):,} slots shared, {c.get('heads')} heads, knn {c.get('knn')}, "
                       f"k_dim {c.get('k_dim')}, v_dim {c.get('v_dim')}, gate {c.get('gate')}, "
                       f"values {c.get('value_dtype')}")
    t.add_row("memory params", f"{_count(p['total'])}: value table {_count(p['value_table'])} + "
                               + ", ".join(f"layer {L} {_count(n)}" for L, n in p["per_layer"].items()))
    used = m.get("slots_used")
    if used is not None:
        frac = used["fraction"]
        t.add_row("slots used", f"{used['nonzero_rows']:,} of {used['slots']:,} value rows non-zero"
                  + (f" ({100 * frac:.2f}%)" if frac is not None else "")
                  + ("; the table started at zero, so these are the rows training wrote"
                     if used.get("value_init") == "zero" else ""))
    return t


def _estimate_table(g: dict):
    pr, gp, gb, gf, fit = (
        g["proposal"],
        g["params"],
        g["bytes"],
        g["flops_per_token"],
        g["fits_ram"],
    )
    e = _kv_table("Graft estimate")
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
    return e


def _signed(n) -> str:
    return ("-" if n < 0 else "+") + _count(abs(n))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"
