"""Probe outputs: report.json, samples.jsonl, report.md and a self-contained report.html.

The page opens with the result: base -> trained for reliability (injected facts in trained
phrasings), generalization (held-out phrasings), locality (known facts, perplexity),
unknown-entity hallucination, and the abstention trade-off in one sentence. Then the
training curve (when the probed model is a `memsurgery train` run, from its metrics.jsonl),
the samples (filterable by kind and grade, base beside trained), and the details: accuracy
by kind and relation, calibration, the chosen memory signal (its plot; every other signal
in a table), telemetry. The content is probe/sections.py; the HTML page probe/report_html.py.

All four files are written into a temporary directory renamed into place at the end
(memsurgery._atomic), so a failed probe leaves no half-written report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from memsurgery._atomic import atomic_output_dir
from memsurgery.probe.sections import (  # noqa: F401 - re-exported: report.summary_rows etc.
    abstention_sentence,
    display_name,
    find_metrics,
    fmt_delta,
    fmt_value,
    headline,
    paired_samples,
    summary_rows,
    tables,
    training_curve,
)

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


# ------------------------------------------------------------------ Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(cell, r)) + " |" for r in rows]


def summary_markdown(report: dict) -> list[str]:
    """The summary block as Markdown lines (also used by the export's model card)."""
    base = bool(report.get("baseline"))
    header = ["", "n"] + (["base"] if base else []) + ["trained"] + (["change"] if base else [])
    rows = [[(r["label"].strip() + (f" ({r['what']})" if r["what"] else "")) if not r["label"].startswith("  ")
             else "- " + r["label"].strip(),
             "" if r["n"] is None else str(r["n"])] + ([fmt_value(r["base"], r["kind"])] if base else [])
            + [fmt_value(r["model"], r["kind"])] + ([fmt_delta(r)] if base else []) for r in summary_rows(report)]
    lines = [headline(report), ""] if headline(report) else []
    if rows:
        lines += _md_table(header, rows) + [""]
    ab = abstention_sentence(report)
    return lines + ([ab, ""] if ab else [])


def _md_samples(pairs: list[dict], per_group: int = 3) -> list[str]:
    picks = []
    for title, test in (("hallucinations (unknown entity, answered)", lambda r: r["kind"] == "unknown"
                         and r["grade"] == "INCORRECT"),
                        ("injected facts answered wrongly", lambda r: r["kind"] == "injected" and r["grade"] != "CORRECT"),
                        ("known facts answered wrongly", lambda r: r["kind"] == "known" and r["grade"] != "CORRECT"),
                        ("correct answers", lambda r: r["grade"] == "CORRECT")):
        picks += [[title, r["prompt"], " / ".join(r["answers"]), r["generation"], r["base_generation"] or ""]
                  for r in [r for r in pairs if test(r)][:per_group]]
    if not picks:
        return []
    return ["## Samples (a few of each outcome; all in samples.jsonl, filterable in report.html)", ""] + \
        _md_table(["outcome", "prompt", "expected", "trained", "base"], picks) + [""]


def render_markdown(report: dict, samples: list[dict] | None = None) -> str:
    m = report["model"]
    lines = [f"# Probe report: {display_name(m.get('path'))}", ""]
    if report.get("baseline"):
        lines += [f"Base: {display_name(report['baseline']['model'].get('path'))}", ""]
    lines += ["## Result", ""] + summary_markdown(report)
    curve = report.get("training")
    if curve:
        lines += [f"Training ({curve['run_dir']}/{curve['metrics']}): {curve['n_steps']} steps, loss "
                  f"{curve['loss_smoothed'][0]:.3f} -> {curve['loss_smoothed'][-1]:.3f} (moving average).", ""]
    lines += _md_samples(paired_samples(samples or []))
    lines += [f"Fact sets: {', '.join(f'{k} ({v} items)' for k, v in report['fact_sets'].items())}; "
              f"template {report['template']}; grafted: {report['grafted']}.", ""]
    for title, header, rows in tables(report):
        lines += [f"## {title}", ""] + _md_table(header, rows) + [""]
    lines += ["Definitions: docs/probe.md. Every prompt and generation: samples.jsonl.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ writing


def render_html(report: dict, samples: list[dict]) -> str:
    from memsurgery.probe.report_html import render_html as _render

    return _render(report, samples)


def write_reports(report: dict, samples: list[dict], out: Path, force: bool = False) -> None:
    """The four files into `out`; adds `report["training"]` (the run's curve) when it can find one."""
    if "training" not in report:
        report["training"] = training_curve(find_metrics(report))
    clean = _clean(report)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for s in samples:
                fh.write(json.dumps(_clean(s), ensure_ascii=False) + "\n")
        clean_samples = _clean(samples)
        (tmp / "report.md").write_text(render_markdown(clean, clean_samples), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(clean, clean_samples), encoding="utf-8")
        from memsurgery._atomic import publish_modes

        publish_modes(tmp)
