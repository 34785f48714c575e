"""Probe a model on fact sets: accuracy, hallucination, calibration, memory signals, retention.

    report = run_probe("out/grafted", facts=["builtin:world"], baseline="demo-out/base", out="probe/")
    quick_eval(model, tokenizer, "builtin:people?n=20", limit=64)   # the training loop's eval

Every metric is defined in docs/probe.md; the report layout follows lm-eval's
(`results`, `configs`, `versions`, `n-samples`) with memsurgery's sections added.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from memsurgery._vocab import canonical_dtype, resolve_device, torch_dtype
from memsurgery.errors import InputError
from memsurgery.facts import FactItem, limit_items, load_factset
from memsurgery.probe import metrics as M
from memsurgery.probe.generate import DEFAULT_STOPS, generate

SCHEMA = "memsurgery.probe/1"
TEMPLATES = {"qa": "Q: {question}\nA:", "completion": "{prompt}"}
TEMPLATE_CHOICES = ("auto", "qa", "completion", "both")


# ------------------------------------------------------------------ loading


def _resolve_dir(path: Path) -> Path:
    """A `memsurgery train` run directory holds its loadable model in final/."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer, info) for a grafted or dense HF directory, a run dir, or a GGUF file."""
    from memsurgery.export import hf

    from memsurgery.checkpoint.hub import describe_source, resolve_checkpoint

    src = _resolve_dir(resolve_checkpoint(path))  # a Hub id becomes its cached snapshot
    info: dict[str, Any] = {"path": describe_source(path), "loaded_from": str(src.absolute())}
    cfg = src / "config.json"
    if src.is_dir() and cfg.exists() and hf.is_grafted_config(json.loads(cfg.read_text(encoding="utf-8"))):
        model = hf.load_grafted(src, dtype=dtype)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as err:
            raise InputError(f"{src}: cannot load its tokenizer ({err}); probe needs one") from None
        info["format"] = "grafted"
    else:
        from memsurgery.checkpoint import open_checkpoint

        ck = open_checkpoint(src)
        model = ck.load_model(dtype=dtype or torch.float32)
        tokenizer = ck.load_tokenizer()
        if tokenizer is None:
            raise InputError(f"{src}: has no tokenizer; probe needs one")
        info["format"] = ck.format
    return model.to(resolve_device(device)).eval(), tokenizer, info


# ------------------------------------------------------------------ items


def render_prompts(item: FactItem, template: str) -> list[tuple[str, str]]:
    """[(template name, prompt text)] for one item under `template` (auto|qa|completion|both)."""
    out = []
    if template in ("qa", "both") and item.question:
        out.append(("qa", TEMPLATES["qa"].format(question=item.question)))
    if template in ("completion", "both") and item.prompt:
        out.append(("completion", TEMPLATES["completion"].format(prompt=item.prompt)))
    if template == "auto":
        out.append(("completion", item.prompt) if item.prompt else
                   ("qa", TEMPLATES["qa"].format(question=item.question)))
    return out


def _load_sets(facts) -> list[tuple[str, list[FactItem]]]:
    sets = []
    for spec in facts:
        if isinstance(spec, (str, Path)):
            sets.append((str(spec), load_factset(spec)))
        else:  # an in-memory list of FactItem
            sets.append(("custom", list(spec)))
    return sets


# ------------------------------------------------------------------ scoring one model


def _score(item: FactItem, set_name: str, template: str, gen, abstain_logprob: float | None) -> dict:
    abstained = M.is_abstention(gen.answer)
    if abstain_logprob is not None and not abstained and gen.logprob_mean < abstain_logprob:
        abstained = True
    em, f1 = M.score_answer(gen.answer, item.answers)
    row = {
        "id": item.id, "set": set_name, "kind": item.kind, "relation": item.relation, "entity": item.entity,
        "phrasing": item.phrasing,
        "template": template, "prompt": gen.prompt, "answers": list(item.answers),
        "generation": gen.answer, "raw": gen.raw,
        "exact_match": em, "f1": f1,
        "abstained": abstained, "grade": M.grade(gen.answer, item.answers, abstained),
        "logprob_sum": gen.logprob_sum, "logprob_mean": gen.logprob_mean, "n_tokens": gen.n_tokens,
        "confidence": math.exp(gen.logprob_sum),
    }
    if gen.memory is not None:
        for key in ("signals", "slots", "residual"):  # residual: popped before anything is written
            if key in gen.memory:
                row[key] = gen.memory[key]
    return row


class _Captures:
    """Several prompt-pass captures driven as one (generate() takes a single capture)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __enter__(self):
        for p in self.parts:
            p.__enter__()
        return self

    def __exit__(self, *exc):
        for p in self.parts:
            p.__exit__(*exc)

    def set_active(self, on: bool) -> None:
        for p in self.parts:
            p.set_active(on)

    def collect(self, attention_mask, entity_mask=None) -> list[dict]:
        merged = [dict() for _ in range(attention_mask.shape[0])]
        for p in self.parts:
            for row, got in zip(merged, p.collect(attention_mask, entity_mask)):
                row.update(got)
        return merged


def evaluate(model, tokenizer, items: list[FactItem], *, set_name: str = "custom", template: str = "auto",
             max_new_tokens: int = 12, batch_size: int = 64, stops=DEFAULT_STOPS, signals: bool = True,
             reference_values: torch.Tensor | None = None, abstain_logprob: float | None = None,
             residual_layer: int | None = None):
    """(samples, telemetry or None): every item under the template(s), scored.

    `residual_layer`: also keep each item's residual stream after that decoder layer,
    averaged over the entity's tokens (row["residual"], for the linear probe)."""
    from memsurgery.export import hf

    jobs = [(it, t, p) for it in items for t, p in render_prompts(it, template)]
    memory = None
    parts = []
    if signals and hf.is_grafted_model(model):
        from memsurgery.probe.signals import MemoryCapture

        memory = MemoryCapture(model, reference=reference_values)
        parts.append(memory)
    if residual_layer is not None:
        from memsurgery.probe.linear import ResidualCapture

        parts.append(ResidualCapture(model, residual_layer))
    prompts = [p for _, _, p in jobs]
    if parts:
        with _Captures(parts) as capture:
            gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stops=stops,
                            batch_size=batch_size, capture=capture, entities=[it.entity for it, _, _ in jobs])
    else:
        gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stops=stops,
                        batch_size=batch_size)
    capture = memory
    samples = [_score(it, set_name, t, g, abstain_logprob) for (it, t, _), g in zip(jobs, gens)]
    telemetry = None
    if capture is not None:
        telemetry = {}
        for L, counter in capture.usage.items():
            st = counter.stats()
            per_fact = [s["slots"][str(L)] for s in samples]
            st["slots_per_fact"] = sum(per_fact) / len(per_fact) if per_fact else None
            st["histogram"] = _usage_histogram(counter.counts)
            telemetry[str(L)] = st
    return samples, telemetry


def _usage_histogram(counts: torch.Tensor, n_bins: int = 12) -> dict:
    """Slots by access count on a log2 scale: bin 0 = unused, bin i = [2^(i-1), 2^i) accesses."""
    c = counts.to(torch.float64)
    bins = torch.zeros(n_bins, dtype=torch.long)
    bins[0] = int((c == 0).sum())
    nz = c[c > 0]
    if nz.numel():
        b = (torch.floor(torch.log2(nz)) + 1).clamp(max=n_bins - 1).long()
        bins += torch.bincount(b, minlength=n_bins)
    return {"edges": ["0"] + [f"{2 ** (i - 1)}+" for i in range(1, n_bins)], "slots": bins.tolist()}


# ------------------------------------------------------------------ summaries


def _group_metrics(rows: list[dict]) -> dict:
    em, em_se = M.mean_stderr([r["exact_match"] for r in rows])
    f1, _ = M.mean_stderr([r["f1"] for r in rows])
    n = len(rows)
    grades = {g: sum(r["grade"] == g for r in rows) for g in (M.CORRECT, M.INCORRECT, M.NOT_ATTEMPTED)}
    return {"n": n, "exact_match": em, "exact_match_stderr": em_se, "f1": f1,
            "correct": grades[M.CORRECT] / n if n else None,
            "incorrect": grades[M.INCORRECT] / n if n else None,
            "not_attempted": grades[M.NOT_ATTEMPTED] / n if n else None}


def summarize(samples: list[dict]) -> dict:
    """Per template: metrics by kind, by relation (within kind), overall."""
    out: dict[str, Any] = {}
    for tmpl in sorted({s["template"] for s in samples}):
        rows = [s for s in samples if s["template"] == tmpl]
        kinds = {k: _group_metrics([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})}
        rels = {}
        for k, rel in sorted({(r["kind"], r["relation"]) for r in rows}):
            rels[f"{k}/{rel or 'none'}"] = _group_metrics([r for r in rows if r["kind"] == k and r["relation"] == rel])
        out[tmpl] = {"overall": _group_metrics(rows), "kinds": kinds, "relations": rels}
    return out


def hallucination(samples: list[dict]) -> dict:
    """On unknown items: SimpleQA grade shares; attempted = CORRECT + INCORRECT."""
    rows = [s for s in samples if s["kind"] == "unknown"]
    if not rows:
        return {"n": 0, "note": "no unknown items in the fact sets"}
    g = _group_metrics(rows)
    return {"n": g["n"], "correct": g["correct"], "incorrect": g["incorrect"],
            "not_attempted": g["not_attempted"], "attempted": g["correct"] + g["incorrect"]}


def calibration(samples: list[dict], n_bins: int = 10) -> dict:
    """Confidence = exp(answer log-prob) vs correctness, over attempted items of every kind."""
    rows = [s for s in samples if not s["abstained"]]
    conf = [s["confidence"] for s in rows]
    correct = [s["exact_match"] for s in rows]
    return {"n": len(rows), "ece": M.expected_calibration_error(conf, correct, n_bins),
            "selective_auroc": M.auroc([s["logprob_sum"] for s in rows], correct),
            "selective_auroc_mean_logprob": M.auroc([s["logprob_mean"] for s in rows], correct),
            "bins": M.calibration_bins(conf, correct, n_bins)}


def signal_report(samples: list[dict], primary: str | None = None, keep: float = 0.95) -> dict | None:
    """AUROC of every memory signal as an injected(+) vs unknown(-) detector, and the abstention policy."""
    from memsurgery.probe.signals import PRIMARY_SIGNAL

    primary = primary or PRIMARY_SIGNAL
    with_sig = [s for s in samples if "signals" in s]
    if not with_sig:
        return None
    names = list(with_sig[0]["signals"])
    pos = [s for s in with_sig if s["kind"] == "injected"]
    neg = [s for s in with_sig if s["kind"] == "unknown"]
    out: dict[str, Any] = {"primary": primary, "positive": "injected", "negative": "unknown", "signals": {}}
    for name in names:
        vals = {k: [s["signals"][name] for s in with_sig if s["kind"] == k] for k in ("known", "injected", "unknown")}
        au = M.auroc([s["signals"][name] for s in pos + neg], [1] * len(pos) + [0] * len(neg)) if pos and neg else None
        means = {k: (sum(v) / len(v) if v and not any(math.isnan(x) for x in v) else None) for k, v in vals.items()}
        out["signals"][name] = {"auroc_injected_vs_unknown": au, "mean": means}
    out["abstention"] = _memory_abstention(with_sig, primary, keep)
    # Question-form prompts alone (held-out questions of injected vs unknown entities):
    # the form a user asks in, where a last-token signal cannot lean on trained wordings.
    from memsurgery.probe.knowledge import is_question

    q_pos, q_neg = [s for s in pos if is_question(s)], [s for s in neg if is_question(s)]
    if q_pos and q_neg:
        for name in names:
            out["signals"][name]["auroc_questions"] = M.auroc([s["signals"][name] for s in q_pos + q_neg],
                                                              [1] * len(q_pos) + [0] * len(q_neg))
        out["abstention_questions"] = _memory_abstention(q_pos + q_neg, primary, keep)
    return out


def _memory_abstention(samples: list[dict], name: str, keep: float, score=None) -> dict:
    """Abstain when the primary signal < t, t keeping >= `keep` of correctly answered injected items.

    `score(sample)`: the score to threshold (default: the sample's signal `name`)."""
    score = score or (lambda s: s["signals"].get(name, float("nan")))
    inj_ok = [score(s) for s in samples if s["kind"] == "injected" and s["exact_match"]]
    unk = [s for s in samples if s["kind"] == "unknown"]
    if not inj_ok or not unk:
        return {"signal": name, "threshold": None,
                "note": "needs correctly answered injected items and unknown items"}
    t = M.keep_threshold(inj_ok, keep)
    if t is None:
        return {"signal": name, "threshold": None, "note": f"signal {name} is undefined (NaN) for this model"}
    def wrong(s, use):  # attempted and not correct
        kept = not use or score(s) >= t
        return kept and not s["abstained"] and not s["exact_match"]
    inj = [s for s in samples if s["kind"] == "injected"]
    return {
        "signal": name, "threshold": t, "keep_target": keep,
        "injected_correct_kept": sum(v >= t for v in inj_ok) / len(inj_ok),
        "injected_accuracy_before": sum(s["exact_match"] for s in inj) / len(inj),
        "injected_accuracy_after": sum(s["exact_match"] and score(s) >= t for s in inj) / len(inj),
        "unknown_attempted_wrong_before": sum(wrong(s, False) for s in unk) / len(unk),
        "unknown_attempted_wrong_after": sum(wrong(s, True) for s in unk) / len(unk),
        "n_unknown": len(unk),
    }


def residual_probe(samples: list[dict], layer: int | None, keep: float = 0.95) -> dict | None:
    """Logistic-regression probe on the residual stream (injected vs unknown entity), grouped CV.

    Pops every row's "residual" vector (never written). Reported on all prompts and on
    question-form prompts, each with the keep-`keep` abstention on its out-of-fold score."""
    from memsurgery.probe.knowledge import is_question
    from memsurgery.probe.linear import grouped_cv_auroc

    rows = []
    for s in samples:
        vec = s.pop("residual", None)
        if vec is not None and s["kind"] in ("injected", "unknown"):
            rows.append((s, vec))
    if layer is None or not rows:
        return None
    out: dict[str, Any] = {"layer": layer, "features": "decoder-layer output, mean over the entity's tokens",
                           "cv": "5 folds grouped by entity"}
    for part, chosen in (("all", rows), ("questions", [r for r in rows if is_question(r[0])])):
        if not chosen:
            continue
        fit = grouped_cv_auroc(torch.stack([v for _, v in chosen]), [int(s["kind"] == "injected") for s, _ in chosen],
                               [s.get("entity") or s["id"] for s, _ in chosen])
        scores = dict(zip((id(s) for s, _ in chosen), fit.pop("scores", [])))
        fit["abstention"] = (_memory_abstention([s for s, _ in chosen], "residual_probe", keep,
                                                score=lambda s: scores[id(s)]) if scores else None)
        out[part] = fit
    return out


def retention_perplexity(model, tokenizer, n_tokens: int = 4096, seq_len: int = 256) -> dict:
    """Perplexity on held-out general English: the builtin calibration corpus's held-out split.

    Same split as `memsurgery graft` (calib 32768 tokens first, then held-out), so the
    text was never used to initialize the memory.
    """
    from memsurgery.graft.calibration import builtin_corpus, calibration_split
    from memsurgery.probe.perplexity import perplexity

    max_pos = getattr(model.config, "max_position_embeddings", None) or seq_len
    seq_len = min(seq_len, int(max_pos))
    _, heldout = calibration_split(tokenizer, builtin_corpus(), 32768, n_tokens, seq_len=seq_len, seed=0)
    return {"perplexity": perplexity(model, heldout), "tokens": int(heldout.numel()), "seq_len": seq_len,
            "source": "builtin corpus, held-out split (memsurgery/graft/calibration.py)"}


def _residual_layer(model, residual_layer) -> int | None:
    """"auto": the first memory layer of a grafted model (None for a dense one)."""
    if residual_layer != "auto":
        return residual_layer
    from memsurgery.export import hf

    return min(hf.memory_layers(model)) if hf.is_grafted_model(model) else None


def _run_one(model, tokenizer, sets, *, template, max_new_tokens, batch_size, signals, reference_values,
             ppl_tokens, abstain_logprob, primary_signal, log, residual_layer="auto") -> dict:
    t0 = time.perf_counter()
    samples: list[dict] = []
    telemetry: dict = {}
    layer = _residual_layer(model, residual_layer)
    for name, items in sets:
        log(f"probing {len(items)} facts of {name}")
        s, tel = evaluate(model, tokenizer, items, set_name=name, template=template,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, signals=signals,
                          reference_values=reference_values, abstain_logprob=abstain_logprob,
                          residual_layer=layer)
        samples += s
        if tel:
            telemetry[name] = tel
    t_gen = time.perf_counter() - t0
    res = {"residual_probe": residual_probe(samples, layer)}  # first: it pops the residual vectors
    res.update({"summary": summarize(samples), "hallucination": hallucination(samples),
                "calibration": calibration(samples), "signals": signal_report(samples, primary_signal),
                "telemetry": telemetry or None})
    if ppl_tokens:
        log(f"held-out perplexity on {ppl_tokens} tokens")
        res["retention"] = retention_perplexity(model, tokenizer, ppl_tokens)
    else:
        res["retention"] = None
    from memsurgery.probe.knowledge import knowledge

    res["knowledge"] = knowledge(samples, res["retention"])
    res["timings"] = {"generate": t_gen, "total": time.perf_counter() - t0}
    return res, samples


def _deltas(model_res: dict, base_res: dict) -> dict:
    """model - baseline for exact match per template/kind/relation, hallucination and perplexity."""
    out: dict[str, Any] = {}
    for tmpl, summ in model_res["summary"].items():
        b = base_res["summary"].get(tmpl)
        if not b:
            continue
        for group in ("kinds", "relations"):
            for key, m in summ[group].items():
                if key in b[group] and m["exact_match"] is not None and b[group][key]["exact_match"] is not None:
                    out[f"{tmpl}/{group}/{key}/exact_match"] = m["exact_match"] - b[group][key]["exact_match"]
    h, hb = model_res["hallucination"], base_res["hallucination"]
    if h.get("n") and hb.get("n"):
        out["hallucination/incorrect"] = h["incorrect"] - hb["incorrect"]
    if model_res.get("retention") and base_res.get("retention"):
        out["retention/perplexity"] = model_res["retention"]["perplexity"] - base_res["retention"]["perplexity"]
    return out


def _lm_eval_sections(res: dict, sets, template: str, max_new_tokens: int, stops, n_items: dict) -> dict:
    """lm-eval style keys: results[task]["metric,filter"], configs, versions, n-samples."""
    results, configs, versions, n_samples = {}, {}, {}, {}
    for tmpl, summ in res["summary"].items():
        for group in ("kinds", "relations"):
            for key, m in summ[group].items():
                task = f"memsurgery_{key.replace('/', '_')}"
                r = results.setdefault(task, {"alias": key})
                r[f"exact_match,{tmpl}"] = m["exact_match"]
                r[f"exact_match_stderr,{tmpl}"] = m["exact_match_stderr"] if m["exact_match_stderr"] is not None else "N/A"
                r[f"f1,{tmpl}"] = m["f1"]
                configs[task] = {"task": task, "fact_sets": [n for n, _ in sets], "output_type": "generate_until",
                                 "doc_to_text": {t: TEMPLATES[t] for t in res["summary"]},
                                 "generation_kwargs": {"until": list(stops), "do_sample": False,
                                                       "max_gen_toks": max_new_tokens},
                                 "metric_list": ["exact_match", "f1"], "template": template}
                versions[task] = 1
                n_samples[task] = {"original": m["n"], "effective": m["n"]}
    return {"results": results, "configs": configs, "versions": versions, "n-samples": n_samples}


def _check_inputs(model_or_path, baseline, facts, *, template, dtype, device, limit, out, force, lm_eval):
    """Every input checked before a model loads: (dtype name, lm-eval job or None, fact sets)."""
    from memsurgery._atomic import check_output_dir
    from memsurgery.checkpoint.hub import resolve_checkpoint
    from memsurgery.probe import lm_eval_tasks as lm_eval_mod

    if template not in TEMPLATE_CHOICES:
        raise InputError(f"--template {template}: choose one of {', '.join(TEMPLATE_CHOICES)}")
    dtype = canonical_dtype(dtype)
    resolve_device(device)
    lm_job = lm_eval_mod.prepare(*lm_eval)
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    if out is not None:
        check_output_dir(Path(out), force)
    for label, m in (("model", model_or_path), ("baseline", baseline)):
        if isinstance(m, (str, Path)):
            resolve_checkpoint(m, what=f"{label} checkpoint")  # fails (or downloads) before any work
    return dtype, lm_job, [(n, limit_items(items, limit)) for n, items in _load_sets(facts)]


def run_probe(model_or_path, facts: Sequence = ("builtin:world",), baseline=None, out=None, *,
              tokenizer=None, baseline_tokenizer=None, limit: int | None = None, template: str = "auto",
              device: str = "auto", max_new_tokens: int = 12, batch_size: int = 64, ppl_tokens: int = 4096,
              signals: bool = True, primary_signal: str | None = None, abstain_logprob: float | None = None,
              residual_layer: int | str | None = "auto", force: bool = False, dtype: str = "float32",
              lm_eval_tasks=None, lm_eval_include: str | None = None, lm_eval_limit: int | None = None,
              log=lambda msg: None) -> dict:
    """Probe a model (and optionally a baseline) on fact sets; write reports to `out` if given.

    model_or_path: a model object (then pass `tokenizer`) or a path (grafted/dense HF dir,
    `memsurgery train` run dir, GGUF file). Returns the report dict (see docs/probe.md).
    """
    from memsurgery import __version__
    from memsurgery.probe import lm_eval_tasks as lm_eval_mod

    dtype, lm_job, sets = _check_inputs(model_or_path, baseline, facts, template=template, dtype=dtype,
                                        device=device, limit=limit, out=out, force=force,
                                        lm_eval=(lm_eval_tasks, lm_eval_include, lm_eval_limit))
    n_items = {n: len(items) for n, items in sets}

    def _get(m, tok, label):
        if isinstance(m, (str, Path)):
            log(f"loading {label} {m}")
            return load_model(m, device=device, dtype=torch_dtype(dtype))
        if tok is None:
            raise InputError(f"run_probe: pass the tokenizer of the {label} model object")
        return m, tok, {"path": None, "format": "object"}

    model, tokenizer, info = _get(model_or_path, tokenizer, "model")
    kw = dict(template=template, max_new_tokens=max_new_tokens, batch_size=batch_size, signals=signals,
              ppl_tokens=ppl_tokens, abstain_logprob=abstain_logprob, primary_signal=primary_signal, log=log,
              residual_layer=residual_layer)
    base_model = None
    if baseline is not None:
        base_model, base_tok, base_info = _get(baseline, baseline_tokenizer or tokenizer, "baseline")

    ref = None
    from memsurgery.export import hf

    # Written rows are compared with the baseline's table when it is a graft of the same shape
    # (base = the untrained graft); else with zeros (parallel grafts start with a zero table).
    if base_model is not None and hf.is_grafted_model(base_model) and hf.is_grafted_model(model):
        ref = base_model.memory_bank.values.weight.detach()
    res, samples = _run_one(model, tokenizer, sets, reference_values=ref, **kw)
    if lm_job:  # lm-eval tasks on the same loaded model (report["lm_eval"])
        res["lm_eval"] = lm_eval_mod.run_lm_eval(model, tokenizer, lm_job, batch_size=batch_size, log=log)
    report: dict[str, Any] = {}
    report.update(_lm_eval_sections(res, sets, template, max_new_tokens, DEFAULT_STOPS, n_items))
    report.update({"schema": SCHEMA, "model": info, "fact_sets": n_items, "template": template,
                   "grafted": hf.is_grafted_model(model), **res})
    if base_model is not None:
        base_res, base_samples = _run_one(base_model, base_tok, sets, reference_values=None, **kw)
        if lm_job:
            base_res["lm_eval"] = lm_eval_mod.run_lm_eval(base_model, base_tok, lm_job, batch_size=batch_size,
                                                          log=log)
        report["baseline"] = {"model": base_info, "grafted": hf.is_grafted_model(base_model), **base_res}
        report["deltas"] = _deltas(res, base_res)
        for s in base_samples:
            s["model"] = "baseline"
        samples = samples + base_samples
    report["versions_memsurgery"] = {"memsurgery": __version__, "torch": torch.__version__,
                                     "transformers": __import__("transformers").__version__}
    report["settings"] = {"limit": limit, "device": str(device), "dtype": dtype, "max_new_tokens": max_new_tokens,
                          "batch_size": batch_size, "ppl_tokens": ppl_tokens, "stops": list(DEFAULT_STOPS),
                          "abstain_logprob": abstain_logprob}
    if out is not None:
        from memsurgery.probe.report import write_reports

        write_reports(report, samples, Path(out), force=force)
        log(f"wrote {out}")
    return report


# ------------------------------------------------------------------ quick eval and explain

_FACT_CACHE: dict[str, list[FactItem]] = {}


def quick_eval(model, tokenizer, facts_spec, limit: int | None = 64, *, template: str = "auto",
               max_new_tokens: int = 8, batch_size: int = 32) -> dict:
    """Fast exact-match eval for training loops: no signals, no perplexity, nothing written.

    Returns {"exact_match", "n", "kinds": {kind: exact_match}, "not_attempted_unknown"}.
    """
    if isinstance(facts_spec, (str, Path)):
        key = str(facts_spec)
        if key not in _FACT_CACHE:
            _FACT_CACHE[key] = load_factset(key)
        items = _FACT_CACHE[key]
    else:
        items = list(facts_spec)
    items = limit_items(items, limit)
    samples, _ = evaluate(model, tokenizer, items, template=template, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, signals=False)
    kinds = defaultdict(list)
    for s in samples:
        kinds[s["kind"]].append(s["exact_match"])
    unk = [s for s in samples if s["kind"] == "unknown"]
    return {"exact_match": sum(s["exact_match"] for s in samples) / max(1, len(samples)), "n": len(samples),
            "kinds": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "not_attempted_unknown": (sum(s["abstained"] for s in unk) / len(unk)) if unk else None}


@torch.no_grad()
def explain(model, tokenizer, text: str, top: int = 8, max_new_tokens: int = 12) -> dict:
    """The slots each memory layer reads at the last prompt token of `text`, with scores and gate.

    A text ending in "?" is asked with the qa template, anything else as a completion.
    """
    from memsurgery.export import hf
    from memsurgery.probe.signals import MemoryCapture

    if not hf.is_grafted_model(model):
        raise InputError("--explain needs a grafted model (this one has no memory layers)")
    prompt = TEMPLATES["qa"].format(question=text) if text.rstrip().endswith("?") else text
    capture = MemoryCapture(model)
    layers_out = {}
    with capture:
        gen = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, capture=capture)[0]
        # One more prompt pass for the raw per-slot scores (select() on the last token's input).
        capture.set_active(True)
        enc = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        model(input_ids=enc)
        for L, m in capture.layers.items():
            x_last = capture._io[L][0]
            scores, idx = m.select(x_last.to(m.query.weight.dtype))  # [1, H, k]
            weights = torch.softmax(scores.float() * m.score_scale, dim=-1)
            rows = []
            for h in range(idx.shape[1]):
                for j in range(idx.shape[2]):
                    slot = int(idx[0, h, j])
                    rows.append({"slot": slot, "head": h, "score": float(scores[0, h, j]),
                                 "weight": float(weights[0, h, j]),
                                 "written": bool(capture.context.written[slot])})
            rows.sort(key=lambda r: -r["weight"])
            gate = None if m.last_gate is None else float(m.last_gate[0, -1])
            layers_out[str(L)] = {"gate": gate, "slots": rows[:top]}
        capture.set_active(False)
    return {"prompt": prompt, "generation": gen.answer, "logprob_sum": gen.logprob_sum,
            "signals": gen.memory["signals"] if gen.memory else None, "layers": layers_out}
