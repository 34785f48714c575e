"""report.md / report.html from a probe report: the result first, the training curve, filterable
samples with the base beside the trained model, one signal plot, readable axes; older reports
degrade gracefully; a headless-Chromium screenshot and filter check where Chromium exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from memsurgery.probe import api, report as R, svg
from memsurgery.probe.knowledge import knowledge

RELS = ("birth_city", "employer")


def _row(i, kind, phrasing, correct, *, answered=True, signal=None, entity="e"):
    gen = "right" if correct else ("wrong" if answered else "I don't know")
    grade = "CORRECT" if correct else ("INCORRECT" if answered else "NOT_ATTEMPTED")
    row = {"id": f"{kind}/{i}@{phrasing}", "set": "custom", "kind": kind, "relation": RELS[i % 2],
           "entity": f"{entity}{i}", "phrasing": phrasing, "template": "completion",
           "prompt": f"{kind} prompt {i} {phrasing}", "answers": ["right"], "generation": gen, "raw": gen,
           "exact_match": int(correct), "f1": float(correct), "abstained": not answered, "grade": grade,
           "logprob_sum": -0.1 if correct else -2.0, "logprob_mean": -0.1, "n_tokens": 1,
           "confidence": 0.9 if correct else 0.2}
    if signal is not None:
        row["signals"] = {"out_norm_entity_first": signal, "gate": 0.5, "written_weight": 1.0}
    return row


def _samples(trained: bool) -> list[dict]:
    """8 injected entities x (1 trained + 2 held-out phrasings), 8 unknown, 10 known.

    Trained model: 6/8 trained phrasings right, 4/16 held-out right, 7/10 known right, unknown
    answered wrongly 6/8 (2 abstain); its signal separates injected (high) from unknown (low).
    Base: nothing injected right, 8/10 known right, unknown always answered wrongly."""
    out = []
    for i in range(8):
        sig = (10.0 + i) if trained else None
        out.append(_row(i, "injected", "train/completion0", trained and i < 6, signal=sig))
        out.append(_row(i, "injected", "heldout/question0", trained and i < 2, signal=sig))
        out.append(_row(i, "injected", "heldout/completion1", trained and i < 2, signal=sig))
        out.append(_row(i, "unknown", "heldout/question0", False, answered=not trained or i < 6,
                        signal=(1.0 + i) if trained else None, entity="u"))
    out += [_row(i, "known", None, i < (7 if trained else 8), signal=5.0 if trained else None) for i in range(10)]
    return out


def _sections(samples, ppl):
    retention = {"perplexity": ppl, "tokens": 100, "seq_len": 10}
    return {"summary": api.summarize(samples), "hallucination": api.hallucination(samples),
            "calibration": api.calibration(samples), "signals": api.signal_report(samples),
            "retention": retention, "knowledge": knowledge(samples, retention), "telemetry": None,
            "residual_probe": None}


@pytest.fixture
def probed(tmp_path):
    """A report as run_probe builds it, its samples (base rows marked), and a train run's metrics."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 41):
            fh.write(json.dumps({"step": step, "loss": 8.0 / step ** 0.5, "slots_touched": 1000 + step}) + "\n")
        fh.write(json.dumps({"step": 40, "eval_loss": 1.5}) + "\n")
    trained, base = _samples(True), _samples(False)
    report = {"schema": api.SCHEMA, "model": {"path": str(run / "final"), "loaded_from": str(run / "final")},
              "fact_sets": {"custom": 50}, "template": "auto", "grafted": True, **_sections(trained, 20.0)}
    report["baseline"] = {"model": {"path": str(tmp_path / "base")}, "grafted": False,
                          **_sections(base, 19.0)}
    report["deltas"] = api._deltas(report, report["baseline"])
    for s in base:
        s["model"] = "baseline"
    return report, trained + base, tmp_path


def test_result_block_comes_first_with_base_to_trained(probed):
    report, samples, tmp = probed
    R.write_reports(report, samples, tmp / "p")
    md = (tmp / "p" / "report.md").read_text()
    first = md.split("## ", 2)[1]  # the first section
    assert first.startswith("Result")
    rows = {line.split("|")[1].strip().split(" (")[0]: [c.strip() for c in line.split("|")[2:-1]]  # n, base, trained
            for line in first.splitlines() if line.startswith("| ")}
    assert rows["Reliability"] == ["8", "0.0%", "75.0%", "+75.0 pt"]
    assert rows["Generalization"] == ["16", "0.0%", "25.0%", "+25.0 pt"]
    assert rows["Locality: known facts"] == ["10", "80.0%", "70.0%", "-10.0 pt"]
    assert rows["Locality: perplexity"] == ["", "19.000", "20.000", "+5.26%"]
    assert rows["Hallucination"] == ["8", "100.0%", "75.0%", "-25.0 pt"]
    # the abstention trade-off, one sentence: the signal separates perfectly here, so every
    # unknown answer is dropped while the kept share of correct injected answers is reported
    ab = report["signals"]["abstention"]
    assert ab["unknown_attempted_wrong_after"] == 0.0
    sentence = R.abstention_sentence(report)
    assert sentence in md and "75.0% to 0.0%" in sentence and "AUROC injected vs unknown 1.00" in sentence
    html = (tmp / "p" / "report.html").read_text()
    order = [html.index(f'id="{s}"') for s in ("result", "training", "samples", "details")]
    assert order == sorted(order)
    assert html.index("Reliability") < html.index('id="training"')
    assert "class='num good'>+75.0 pt" in html and "class='num bad'>-10.0 pt" in html


def test_training_curve_from_the_run_of_the_probed_model(probed):
    report, samples, tmp = probed
    R.write_reports(report, samples, tmp / "p")
    curve = json.loads((tmp / "p" / "report.json").read_text())["training"]
    assert curve["n_steps"] == 40 and curve["steps"][:3] == [1, 2, 3] and curve["loss"][0] == 8.0
    assert curve["slots_touched"][-1] == 1040 and curve["eval_loss"] == [1.5]
    assert curve["loss_smoothed"][-1] < curve["loss_smoothed"][0]
    html = (tmp / "p" / "report.html").read_text()
    assert "Training loss" in html and "Value-table rows touched per step" in html
    # a model that is not a train run has no curve, and the page has no training section
    report2 = {**report, "model": {"path": str(tmp / "elsewhere")}}
    report2.pop("training")
    R.write_reports(report2, samples, tmp / "q")
    assert json.loads((tmp / "q" / "report.json").read_text())["training"] is None
    assert 'id="training"' not in (tmp / "q" / "report.html").read_text()


def test_samples_pair_base_beside_trained_and_show_every_outcome(probed):
    report, samples, tmp = probed
    pairs = R.paired_samples(samples)
    assert len(pairs) == len(samples) // 2
    assert all(p["base_generation"] is not None for p in pairs)
    # the first rows cover every (kind, grade) group, so errors and hallucinations are on screen
    groups = {(p["kind"], p["grade"]) for p in pairs}
    assert {(p["kind"], p["grade"]) for p in pairs[:len(groups)]} == groups
    assert ("unknown", "INCORRECT") in groups and ("known", "INCORRECT") in groups
    R.write_reports(report, samples, tmp / "p")
    html = (tmp / "p" / "report.html").read_text()
    rows = re.findall(r'<tr data-kind="(\w+)" data-grade="(\w+)" data-vs="(\w+)"', html)
    assert len(rows) == len(pairs)
    assert ("known", "INCORRECT", "broke") in rows  # base right, trained wrong: filterable
    assert ("injected", "CORRECT", "fixed") in rows


def test_one_signal_plot_the_rest_in_a_table(probed):
    report, samples, tmp = probed
    html = R.render_html(report, samples)
    captions = re.findall(r"<figcaption>([^<]*)", html)
    assert sum(c.startswith("Memory signal ") for c in captions) == 1
    assert any("out_norm_entity_first" in c for c in captions if c.startswith("Memory signal "))
    table = html[html.index("<h3>Memory signals:"):]
    table = table[:table.index("</table>")]
    for name in ("out_norm_entity_first (chosen)", "gate", "written_weight"):
        assert f"<td>{name}</td>" in table
    # the calibration chart says what its marker sizes mean
    assert "area is proportional to the number of answers" in html


def test_axes_label_small_ranges_and_constant_values():
    ticks, fmt = svg.nice_ticks(0.99996, 1.00004)
    labels = [fmt(v) for v in ticks]
    assert len(set(labels)) == len(labels) >= 3 and labels[0] != labels[-1]
    chart = svg.strip_plot("constant", {"a": [1.0, 1.0], "b": [1.0]})
    assert "every value is 1" in chart
    # titles are HTML captions (they wrap), never SVG text that a narrow chart would cut off
    long_title = "Slot usage, layer 20: slots by access count (" + "x" * 200 + ")"
    fig = svg.column_chart(long_title, ["0", "1+"], [5, 3])
    assert fig.startswith("<figure><figcaption>") and long_title not in fig.split("<svg", 1)[1].split(">", 1)[1]


def test_older_and_dense_reports_degrade(probed):
    report, samples, tmp = probed
    old = {k: v for k, v in report.items() if k not in ("knowledge", "baseline", "deltas", "signals")}
    old["model"] = {"path": "somewhere/model"}
    plain = [{k: v for k, v in s.items() if k != "signals"} for s in samples if s.get("model") != "baseline"]
    md = R.render_markdown(R._clean(old), plain)
    rows = [line for line in md.split("## Result", 1)[1].split("## ", 1)[0].splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip().split(" (")[0] for r in rows[1:]]
    # no train/held-out split known: injected facts overall, then locality and hallucination
    assert labels == ["Injected facts", "Locality: known facts", "Locality: perplexity", "Hallucination"]
    assert "Abstaining" not in md
    html = R.render_html(R._clean(old), plain)
    assert "No base model was probed" in html and "<figcaption>Memory signal" not in html
    assert 'id="training"' not in html and "base answer" not in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_page_renders_in_headless_chromium(probed):
    """Screenshot of the first screen and a filtered view's DOM (skipped where Chromium is absent, as in CI)."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the HTML checks above still ran")
    report, samples, tmp = probed
    R.write_reports(report, samples, tmp / "p")
    page = (tmp / "p" / "report.html").as_uri()
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp / "first-screen.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1100,900", page],
                   check=True, capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1100
    assert len(png) > 20_000  # a rendered page, not a blank one (a blank 1100x900 PNG is ~3 KB)
    dom = subprocess.run(args + ["--dump-dom", page + "#samples?kind=unknown&grade=INCORRECT"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    rows = re.findall(r'<tr data-kind="(\w+)" data-grade="(\w+)" data-vs="\w+"( style="display: none;")?', dom)
    visible = {(k, g) for k, g, hidden in rows if not hidden}
    assert visible == {("unknown", "INCORRECT")}
    assert "showing 6 of 6 matching" in dom
