"""What a probe report says, independent of its format: the summary block (base -> trained for
reliability, generalization, locality and unknown-entity hallucination, the abstention trade-off
in one sentence), the training curve of the run the model came from, the samples paired base
beside trained, and the detail tables. report.py writes it as Markdown, report_html.py as HTML.

Sections a report lacks (a dense model, an older report without `knowledge`, no phrasings)
fall back to what the report has, or are left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MAX_SAMPLE_ROWS = 4000  # rows embedded in report.html (all of them are in samples.jsonl)
MAX_CURVE_POINTS = 1500


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def display_name(path) -> str:
    """A model's path as the report shows it: the last two components (no machine-specific prefix)."""
    if not path:
        return "in-memory model"
    parts = Path(str(path)).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(path)


# ------------------------------------------------------------------ the result (first screen)


def first_summary(rep: dict) -> dict:
    summ = rep.get("summary") or {}
    return summ[next(iter(summ))] if summ else {"kinds": {}, "relations": {}}


def _em(section) -> dict | None:
    if not section or section.get("n") in (0, None):
        return None
    return {"em": section.get("exact_match"), "n": section.get("n")}


def knowledge_view(rep: dict | None) -> dict:
    """The numbers of the summary block for one model, from `knowledge` or, in older reports,
    from the per-kind summary: {reliability, generalization, questions, completions,
    injected, known, perplexity, unknown_wrong, unknown_wrong_questions, n_unknown}."""
    if not rep:
        return {}
    k = rep.get("knowledge") or {}
    kinds = first_summary(rep)["kinds"]
    gen = k.get("generalization") or {}
    hall = k.get("hallucination") or {}
    old_hall = rep.get("hallucination") or {}
    loc = k.get("locality") or {}
    ret = rep.get("retention") or {}
    return {
        "reliability": _em(k.get("reliability")),
        "generalization": _em(gen),
        "questions": _em(gen.get("questions")),
        "completions": _em(gen.get("completions")),
        # injected facts without a train/held-out split (or a report from before the split)
        "injected": _em(k.get("unsplit_injected")) or (None if k.get("reliability") or gen
                                                         else _em(kinds.get("injected"))),
        "known": _em(loc.get("known")) or _em(kinds.get("known")),
        "perplexity": loc.get("perplexity") if loc.get("perplexity") is not None else ret.get("perplexity"),
        "unknown_wrong": hall.get("attempted_wrong", old_hall.get("incorrect") if old_hall.get("n") else None),
        "unknown_wrong_questions": hall.get("attempted_wrong_questions"),
        "n_unknown": hall.get("n", old_hall.get("n")),
        "n_unknown_questions": hall.get("n_questions"),
    }


_ROWS = (  # (key, label, what it measures, higher is better)
    ("reliability", "Reliability", "injected facts asked in trained phrasings", True),
    ("generalization", "Generalization", "injected facts asked in held-out phrasings", True),
    ("questions", "  held-out questions", "", True),
    ("completions", "  held-out completions", "", True),
    ("injected", "Injected facts", "all phrasings (no train / held-out split)", True),
    ("known", "Locality: known facts", "real-world facts the base knew", True),
    ("perplexity", "Locality: perplexity", "held-out general text; lower is better", False),
    ("unknown_wrong", "Hallucination", "never-trained entities: answered and wrong", False),
    ("unknown_wrong_questions", "  on questions", "", False),
)


def summary_rows(report: dict) -> list[dict]:
    """Rows of the summary table: {label, what, n, model, base, delta, higher_better, kind}."""
    mv, bv = knowledge_view(report), knowledge_view(report.get("baseline"))
    rows = []
    for key, label, what, higher in _ROWS:
        m, b = mv.get(key), bv.get(key)
        if m is None and b is None:
            continue
        kind = "ppl" if key == "perplexity" else "pct"
        mval, bval = (m["em"] if isinstance(m, dict) else m), (b["em"] if isinstance(b, dict) else b)
        n = m["n"] if isinstance(m, dict) else (mv.get("n_unknown") if key == "unknown_wrong" else
                                               mv.get("n_unknown_questions") if key.endswith("questions")
                                               and key.startswith("unknown") else None)
        delta = None
        if mval is not None and bval is not None:
            delta = (mval - bval) / bval if kind == "ppl" and bval else (mval - bval)
        rows.append({"key": key, "label": label, "what": what, "n": n, "model": mval, "base": bval,
                     "delta": delta, "higher_better": higher, "kind": kind})
    return rows


def fmt_value(v, kind: str) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if kind == "ppl" else pct(v))


def fmt_delta(row: dict) -> str:
    d = row["delta"]
    if d is None:
        return ""
    return f"{100 * d:+.2f}%" if row["kind"] == "ppl" else f"{100 * d:+.1f} pt"


def delta_good(row: dict) -> bool | None:
    """Whether a change is for the better (None: no change worth a colour, < 0.05 pt or < 0.1%)."""
    d = row["delta"]
    if d is None or abs(d) < (1e-3 if row["kind"] == "ppl" else 5e-4):
        return None
    return (d > 0) == row["higher_better"]


def abstention(report: dict) -> tuple[dict, dict | None] | None:
    sig = report.get("signals") or {}
    ab = sig.get("abstention") or {}
    return (ab, sig.get("abstention_questions")) if ab else None


def abstention_sentence(report: dict) -> str | None:
    """The abstention trade-off in one sentence (None when the probe had no memory signal)."""
    got = abstention(report)
    if got is None:
        return None
    ab, abq = got
    sig = report["signals"]
    name = ab.get("signal")
    if ab.get("threshold") is None:
        return f"No abstention threshold on the memory signal {name}: {ab.get('note', 'not computable')}."
    au = (sig.get("signals", {}).get(name) or {}).get("auroc_injected_vs_unknown")
    text = (f"Abstaining when the memory signal {name} is below {ab['threshold']:.4g} cuts wrong answers on "
            f"unknown entities from {pct(ab['unknown_attempted_wrong_before'])} to "
            f"{pct(ab['unknown_attempted_wrong_after'])} and keeps {pct(ab['injected_correct_kept'])} of the "
            f"correctly answered injected facts (AUROC injected vs unknown {num(au, 2)}")
    if abq and abq.get("threshold") is not None:
        auq = (sig.get("signals", {}).get(name) or {}).get("auroc_questions")
        text += (f"; on question prompts {pct(abq['unknown_attempted_wrong_before'])} to "
                 f"{pct(abq['unknown_attempted_wrong_after'])}, AUROC {num(auq, 2)}")
    return text + ")."


def headline(report: dict) -> str:
    """One or two plain sentences: what training did, base -> trained."""
    mv, bv = knowledge_view(report), knowledge_view(report.get("baseline"))
    has_base = bool(report.get("baseline"))

    def both(key, fmt=pct):
        m, b = mv.get(key), bv.get(key)
        mval, bval = (m or {}).get("em") if isinstance(m, dict) else m, (b or {}).get("em") if isinstance(b, dict) else b
        return fmt(mval) + (f" (base {fmt(bval)})" if has_base and bval is not None else "")

    parts = []
    if mv.get("reliability"):
        parts.append(f"answers {both('reliability')} of the injected facts asked as in training")
    if mv.get("generalization"):
        parts.append(f"{both('generalization')} asked in phrasings it never saw")
    if mv.get("injected") and not parts:
        parts.append(f"answers {both('injected')} of the injected facts")
    if mv.get("known"):
        parts.append(f"{both('known')} of the known facts")
    text = ("The model " + ", ".join(parts) + ".") if parts else ""
    if mv.get("perplexity") is not None:
        text += f" General-text perplexity: {both('perplexity', lambda v: num(v, 3))}."
    if mv.get("unknown_wrong") is not None:
        text += f" On never-trained entities it answers wrongly {both('unknown_wrong')} of the time."
    return text.strip()


# ------------------------------------------------------------------ the training curve


def find_metrics(report: dict) -> Path | None:
    """metrics.jsonl of the `memsurgery train` run the probed model came from, if any."""
    info = report.get("model") or {}
    for key in ("loaded_from", "path"):
        p = info.get(key)
        if not p:
            continue
        p = Path(p)
        for cand in (p / "metrics.jsonl", p.parent / "metrics.jsonl"):
            if cand.is_file() and (cand.parent == p or p.name == "final"):
                return cand
    return None


def training_curve(path: Path | None) -> dict | None:
    """{run_dir, steps, loss, slots_touched, eval_steps, eval_loss} from a metrics.jsonl (thinned)."""
    if path is None:
        return None
    steps, loss, touched, ev_steps, ev_loss = [], [], [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if isinstance(rec.get("loss"), (int, float)):
            steps.append(rec["step"])
            loss.append(float(rec["loss"]))
            touched.append(rec.get("slots_touched"))
        if isinstance(rec.get("eval_loss"), (int, float)):
            ev_steps.append(rec["step"])
            ev_loss.append(float(rec["eval_loss"]))
    if not steps:
        return None
    stride = max(1, math.ceil(len(steps) / MAX_CURVE_POINTS))
    return {"metrics": path.name, "run_dir": path.parent.name, "steps": steps[::stride], "loss": loss[::stride],
            "loss_smoothed": _smooth(loss)[::stride], "slots_touched": touched[::stride],
            "eval_steps": ev_steps, "eval_loss": ev_loss, "n_steps": len(steps)}


def _smooth(values: list[float], window: int = 0) -> list[float]:
    """Trailing moving average (window ~ 5% of the run, at least 5 steps)."""
    window = window or max(5, len(values) // 20)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ------------------------------------------------------------------ samples, base beside trained


def paired_samples(samples: list[dict]) -> list[dict]:
    """One row per (item, template): the model's answer with the baseline's beside it."""
    base = {(s["id"], s["template"]): s for s in samples if s.get("model") == "baseline"}
    rows = []
    for s in samples:
        if s.get("model") == "baseline":
            continue
        b = base.get((s["id"], s["template"]))
        rows.append({"kind": s["kind"], "relation": s.get("relation") or "", "phrasing": s.get("phrasing") or "",
                     "prompt": s["prompt"], "answers": s["answers"], "generation": s["generation"],
                     "grade": s["grade"], "logprob": s.get("logprob_sum"),
                     "base_generation": b["generation"] if b else None, "base_grade": b["grade"] if b else None})
    return _interleave(rows)


def _interleave(rows: list[dict]) -> list[dict]:
    """Round-robin over (kind, grade) groups, so the first rows show every kind of outcome."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["grade"]), []).append(r)
    out, queues = [], list(groups.values())
    while queues:
        for q in queues:
            out.append(q.pop(0))
        queues = [q for q in queues if q]
    return out


# ------------------------------------------------------------------ detail tables (Markdown and HTML)


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables shared by the Markdown and HTML reports."""
    tables = _accuracy_tables(report) + _knowledge_tables(report)
    base = report.get("baseline")

    def side(key, fn):
        return [key, fn(report)] + ([fn(base)] if base else [])

    rows = [
        side("unknown: attempted", lambda r: pct(r["hallucination"].get("attempted"))),
        side("unknown: incorrect (hallucinated)", lambda r: pct(r["hallucination"].get("incorrect"))),
        side("unknown: not attempted", lambda r: pct(r["hallucination"].get("not_attempted"))),
        side("ECE", lambda r: num(r["calibration"]["ece"])),
        side("selective AUROC (answer log-prob)", lambda r: num(r["calibration"]["selective_auroc"])),
        side("held-out perplexity", lambda r: num(r["retention"]["perplexity"]) if r.get("retention") else "n/a"),
    ]
    tables.append(("Hallucination, calibration, retention", ["metric", "trained"] + (["base"] if base else []),
                   rows))
    tables += _signal_tables(report)
    lm_rows = lm_eval_rows(report)
    if lm_rows:
        tables.append(("lm-evaluation-harness tasks", ["task", "metric", "trained"]
                       + (["base"] if report.get("baseline") else []),
                       [r if report.get("baseline") else r[:3] for r in lm_rows]))
    tel = report.get("telemetry")
    if tel:
        rows = [[set_name, L, num(st["pct_used"], 2) + "%", num(st.get("kl_uniform_count")),
                 num(st.get("gini_count")), pct(st.get("top1pct_share_count")), num(st.get("slots_per_fact"), 1)]
                for set_name, layers in tel.items() for L, st in layers.items()]
        tables.append(("Memory telemetry (prompt tokens)",
                       ["set", "layer", "slots used", "KL(usage||uniform)", "Gini", "top-1% share",
                        "slots per fact"], rows))
    return tables


def _accuracy_tables(report: dict) -> list:
    base, deltas, tables = report.get("baseline"), report.get("deltas") or {}, []
    for tmpl, summ in report["summary"].items():
        bsum = base["summary"].get(tmpl) if base else None
        for group, title in (("kinds", "by kind"), ("relations", "by relation")):
            header = ["group", "n", "exact match", "F1", "correct", "incorrect", "not attempted"]
            header += ["base EM", "change"] if bsum else []
            rows = []
            for key, m in summ[group].items():
                row = [key, str(m["n"]), pct(m["exact_match"]), num(m["f1"]), pct(m["correct"]),
                       pct(m["incorrect"]), pct(m["not_attempted"])]
                if bsum:
                    bm, d = bsum[group].get(key), deltas.get(f"{tmpl}/{group}/{key}/exact_match")
                    row += [pct(bm["exact_match"]) if bm else "n/a", "n/a" if d is None else f"{100 * d:+.1f} pt"]
                rows.append(row)
            tables.append((f"Accuracy {title} (template {tmpl})", header, rows))
    return tables


def _knowledge_tables(report: dict) -> list:
    """Generalization per held-out phrasing and per relation, base beside trained."""
    gen = (report.get("knowledge") or {}).get("generalization")
    if not gen:
        return []
    bgen = ((report.get("baseline") or {}).get("knowledge") or {}).get("generalization") or {}
    tables = []
    for key, title in (("by_phrasing", "phrasing"), ("by_relation", "relation")):
        rows = [[name, str(m["n"]), pct(m["exact_match"])] + ([pct((bgen.get(key) or {}).get(name, {})
                                                                     .get("exact_match"))] if bgen else [])
                for name, m in (gen.get(key) or {}).items()]
        tables.append((f"Generalization by held-out {title}", [title, "n", "exact match"]
                       + (["base"] if bgen else []), rows))
    return tables


def _signal_tables(report: dict) -> list:
    sig = report.get("signals")
    if not sig:
        return []
    primary = (sig.get("abstention") or {}).get("signal") or sig.get("primary")
    names = sorted(sig["signals"], key=lambda n: (n != primary, n))

    def row(name):
        v = sig["signals"][name]
        return [name + (" (chosen)" if name == primary else ""), num(v["auroc_injected_vs_unknown"]),
                num(v.get("auroc_questions")), num(v["mean"]["known"]), num(v["mean"]["injected"]),
                num(v["mean"]["unknown"])]

    rows = [row(n) for n in names if "@" not in n]
    per_layer = [row(n) for n in names if "@" in n]
    probe = report.get("residual_probe") or {}
    if probe.get("all") or probe.get("questions"):
        rows.append([f"residual linear probe, layer {probe.get('layer')} (a baseline, not a memory signal)",
                     num((probe.get("all") or {}).get("auroc")), num((probe.get("questions") or {}).get("auroc")),
                     "", "", ""])
    header = ["signal", "AUROC", "AUROC questions", "mean known", "mean injected", "mean unknown"]
    tables = [("Memory signals: AUROC injected vs unknown (all prompts, question prompts) and means",
               *_drop_empty_columns(header, rows))]
    if per_layer:
        tables.append((PER_LAYER_TITLE, *_drop_empty_columns(header, per_layer)))
    got = abstention(report)
    if got and got[0].get("threshold") is not None:
        ab, abq = got
        cols = [ab] + ([abq] if abq and abq.get("threshold") is not None else [])
        header = ["quantity", "all prompts"] + (["question prompts"] if len(cols) > 1 else [])
        tables.append((f"Memory-signal abstention ({ab['signal']} >= threshold, keeping "
                       f"{pct(ab.get('keep_target'))} of correct injected answers)", header,
                       [["threshold"] + [f"{c['threshold']:.4g}" for c in cols],
                        ["injected accuracy before"] + [pct(c["injected_accuracy_before"]) for c in cols],
                        ["injected accuracy after"] + [pct(c["injected_accuracy_after"]) for c in cols],
                        ["unknown attempted-wrong before"] + [pct(c["unknown_attempted_wrong_before"]) for c in cols],
                        ["unknown attempted-wrong after"] + [pct(c["unknown_attempted_wrong_after"]) for c in cols]]))
    return tables


PER_LAYER_TITLE = "Memory signals per layer (name@layer; the signals above take the max over layers)"


def _drop_empty_columns(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Leave out columns no row has a value for (e.g. question AUROCs of a probe without questions)."""
    keep = [i for i in range(len(header)) if i == 0 or any(r[i] not in ("", "n/a") for r in rows)]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


def lm_eval_rows(report: dict) -> list[list[str]]:
    """[task, metric, trained, base] for every lm-eval result (`probe --lm-eval-tasks`)."""
    res = (report.get("lm_eval") or {}).get("results") or {}
    bres = ((report.get("baseline") or {}).get("lm_eval") or {}).get("results") or {}
    rows = []
    for task, metrics in res.items():
        for key, v in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            b = (bres.get(task) or {}).get(key)
            rows.append([task, key.removesuffix(",none"), num(float(v), 4),
                         num(float(b), 4) if isinstance(b, (int, float)) else ""])
    return rows
