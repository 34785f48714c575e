"""Probe outputs: report.json, samples.jsonl, report.md and a self-contained report.html.

All four are written into a temporary directory renamed into place at the end
(memsurgery._atomic), so a failed probe leaves no half-written report.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from memsurgery._atomic import atomic_output_dir
from memsurgery.probe import svg

FILES = ("report.json", "samples.jsonl", "report.md", "report.html")


def _clean(obj):
    """JSON-safe: NaN/inf -> None (strict JSON readers reject NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables shared by the Markdown and HTML reports."""
    base = report.get("baseline")
    deltas = report.get("deltas") or {}
    tables = []
    for tmpl, summ in report["summary"].items():
        bsum = base["summary"].get(tmpl) if base else None
        for group, title in (("kinds", "by kind"), ("relations", "by relation")):
            header = ["group", "n", "exact match", "F1", "correct", "incorrect", "not attempted"]
            if bsum:
                header += ["baseline EM", "delta"]
            rows = []
            for key, m in summ[group].items():
                row = [key, str(m["n"]), _pct(m["exact_match"]), _num(m["f1"]), _pct(m["correct"]),
                       _pct(m["incorrect"]), _pct(m["not_attempted"])]
                if bsum:
                    bm = bsum[group].get(key)
                    d = deltas.get(f"{tmpl}/{group}/{key}/exact_match")
                    row += [_pct(bm["exact_match"]) if bm else "n/a",
                            "n/a" if d is None else f"{100 * d:+.1f} pt"]
                rows.append(row)
            tables.append((f"Accuracy {title} (template {tmpl})", header, rows))

    def side(key, fn):
        vals = [fn(report)] + ([fn(base)] if base else [])
        return [key] + vals

    h = ["metric", "model"] + (["baseline"] if base else [])
    rows = [
        side("unknown: attempted", lambda r: _pct(r["hallucination"].get("attempted"))),
        side("unknown: incorrect (hallucinated)", lambda r: _pct(r["hallucination"].get("incorrect"))),
        side("unknown: not attempted", lambda r: _pct(r["hallucination"].get("not_attempted"))),
        side("ECE", lambda r: _num(r["calibration"]["ece"])),
        side("selective AUROC (answer log-prob)", lambda r: _num(r["calibration"]["selective_auroc"])),
        side("held-out perplexity", lambda r: _num(r["retention"]["perplexity"]) if r.get("retention") else "n/a"),
    ]
    tables.append(("Hallucination, calibration, retention", h, rows))

    sig = report.get("signals")
    if sig:
        rows = [[name, _num(v["auroc_injected_vs_unknown"]), _num(v["mean"]["known"]),
                 _num(v["mean"]["injected"]), _num(v["mean"]["unknown"])]
                for name, v in sig["signals"].items() if "@" not in name]
        rows += [[name, _num(v["auroc_injected_vs_unknown"]), _num(v["mean"]["known"]),
                  _num(v["mean"]["injected"]), _num(v["mean"]["unknown"])]
                 for name, v in sig["signals"].items() if "@" in name]
        tables.append(("Memory signals (last prompt token; AUROC injected vs unknown)",
                       ["signal", "AUROC", "mean known", "mean injected", "mean unknown"], rows))
        ab = sig["abstention"]
        if ab.get("threshold") is not None:
            tables.append((f"Memory-signal abstention ({ab['signal']} >= {ab['threshold']:.4g})",
                           ["quantity", "before", "after"],
                           [["injected accuracy", _pct(ab["injected_accuracy_before"]),
                             _pct(ab["injected_accuracy_after"])],
                            ["unknown attempted-wrong", _pct(ab["unknown_attempted_wrong_before"]),
                             _pct(ab["unknown_attempted_wrong_after"])]]))
    tel = report.get("telemetry")
    if tel:
        rows = []
        for set_name, layers in tel.items():
            for L, st in layers.items():
                rows.append([set_name, L, _num(st["pct_used"], 2) + "%", _num(st.get("kl_uniform_count")),
                             _num(st.get("gini_count")), _pct(st.get("top1pct_share_count")),
                             _num(st.get("slots_per_fact"), 1)])
        tables.append(("Memory telemetry (prompt tokens)",
                       ["set", "layer", "slots used", "KL(usage||uniform)", "Gini", "top-1% share",
                        "slots per fact"], rows))
    return tables


def render_markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"# Probe report: {m.get('path') or 'in-memory model'}", "",
             f"Fact sets: {', '.join(f'{k} ({v} items)' for k, v in report['fact_sets'].items())}; "
             f"template {report['template']}; grafted: {report['grafted']}.", ""]
    if report.get("baseline"):
        lines += [f"Baseline: {report['baseline']['model'].get('path') or 'in-memory model'}", ""]
    for title, header, rows in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += ["Definitions: docs/probe.md. Every prompt and generation: samples.jsonl.", ""]
    return "\n".join(lines)


def _accuracy_chart(report: dict) -> str:
    tmpl = next(iter(report["summary"]))
    summ = report["summary"][tmpl]
    labels = list(summ["kinds"]) + list(summ["relations"])
    series = {"model": [summ["kinds"][k]["exact_match"] for k in summ["kinds"]] +
              [summ["relations"][k]["exact_match"] for k in summ["relations"]]}
    if report.get("baseline"):
        b = report["baseline"]["summary"].get(tmpl, {"kinds": {}, "relations": {}})
        series["baseline"] = [(b["kinds"].get(k) or {}).get("exact_match") for k in summ["kinds"]] + \
                             [(b["relations"].get(k) or {}).get("exact_match") for k in summ["relations"]]
    return svg.hbar_chart(f"Exact match by kind and relation (template {tmpl})", labels, series)


def render_html(report: dict, samples: list[dict]) -> str:
    charts = [_accuracy_chart(report)]
    curves = {"model": report["calibration"]["bins"]}
    if report.get("baseline"):
        curves["baseline"] = report["baseline"]["calibration"]["bins"]
    charts.append(svg.reliability_diagram("Calibration: accuracy vs exp(answer log-prob)", curves))
    for set_name, layers in (report.get("telemetry") or {}).items():
        for L, st in layers.items():
            h = st["histogram"]
            charts.append(svg.column_chart(f"Slot usage, layer {L} ({set_name}): slots by access count",
                                           h["edges"], h["slots"], log_y=True))
    sig = report.get("signals")
    if sig:
        model_rows = [s for s in samples if s.get("model") != "baseline" and "signals" in s]
        for name in [n for n in sig["signals"] if "@" not in n]:
            groups = {k: [s["signals"][name] for s in model_rows if s["kind"] == k]
                      for k in ("known", "injected", "unknown")}
            groups = {k: v for k, v in groups.items() if v}
            au = sig["signals"][name]["auroc_injected_vs_unknown"]
            charts.append(svg.strip_plot(f"Signal {name} by kind (AUROC injected vs unknown: {_num(au)})", groups))
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>memsurgery probe: {escape(str(report['model'].get('path')))}</title>",
             "<style>body{font-family:sans-serif;margin:24px;max-width:1000px}"
             "table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:left}th{background:#f0f0f0}svg{display:block;margin:12px 0}</style>",
             "</head><body>"]
    parts.append(f"<h1>Probe report</h1><p>Model: <code>{escape(str(report['model'].get('path')))}</code>"
                 f" (grafted: {report['grafted']}). Fact sets: "
                 f"{escape(', '.join(f'{k} ({v})' for k, v in report['fact_sets'].items()))}.</p>")
    if report.get("baseline"):
        parts.append(f"<p>Baseline: <code>{escape(str(report['baseline']['model'].get('path')))}</code></p>")
    parts.append("<h2>Plots</h2>")
    parts += charts
    for title, header, rows in _tables(report):
        parts.append(f"<h2>{escape(title)}</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header)
                     + "</tr>" + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                     + "</table>")
    shown = [s for s in samples if s.get("model") != "baseline"][:50]
    parts.append("<h2>Samples (first 50; all in samples.jsonl)</h2><table><tr><th>kind</th><th>prompt</th>"
                 "<th>generation</th><th>answers</th><th>grade</th><th>log-prob</th></tr>")
    for s in shown:
        parts.append(f"<tr><td>{escape(s['kind'])}</td><td>{escape(s['prompt'])}</td><td>{escape(s['generation'])}"
                     f"</td><td>{escape(' | '.join(s['answers']))}</td><td>{s['grade']}</td>"
                     f"<td>{s['logprob_sum']:.2f}</td></tr>")
    parts.append("</table><p>Definitions of every metric: docs/probe.md.</p></body></html>")
    return "\n".join(parts)


def write_reports(report: dict, samples: list[dict], out: Path, force: bool = False) -> None:
    clean = _clean(report)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for s in samples:
                fh.write(json.dumps(_clean(s), ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(render_markdown(clean), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(clean, _clean(samples)), encoding="utf-8")
        from memsurgery._atomic import publish_modes

        publish_modes(tmp)
