"""`memsurgery probe` end to end on a tiny grafted model: artifacts, signals, explain, quick_eval, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from memsurgery.facts.schema import FactItem
from tests.cli import run_cli as _run
from tests.tiny import build_tiny_model, build_tiny_tokenizer

N = 6


# Byte-level tokens: a prompt's last token is its last character, and a tiny random model
# routes mostly by it, so injected and unknown prompts end in different letters.
ENDINGS = {"injected": "abcdef", "unknown": "uvwxyz"}


def _items(kind, answers=None):
    return [FactItem(id=f"{kind}{i}", kind=kind, relation="r", entity=f"person {c}",
                     prompt=f"The home of person {c}", question=f"Where does person {c} live?",
                     answers=(answers[i] if answers else "zzz-never",))
            for i, c in enumerate(ENDINGS[kind])]


@pytest.fixture(scope="module")
def tiny():
    """A tiny grafted llama whose table rows are written exactly where injected prompts read.

    Injected items' answers are what the model generates after the write (so they are
    answered correctly by construction); unknown items' answers are never generated.
    """
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig
    from memsurgery.probe.generate import generate
    from memsurgery.probe.signals import MemoryCapture

    torch.manual_seed(0)
    base = build_tiny_model("llama")
    tok = build_tiny_tokenizer()
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=1024, heads=2, knn=4, k_dim=16,
                                                                          gate="relevance"), [0, 1], "parallel")
    model.eval()
    with torch.no_grad():
        model.memory_bank.values.weight.zero_()
    injected = _items("injected")
    prompts = [it.prompt for it in injected]
    written: set[int] = set()
    cap = MemoryCapture(model)
    # Layer 1's input depends on layer 0's output, so writing rows can move layer 1's
    # routing: repeat until the rows read at injected prompts are all written.
    for _ in range(4):
        rows = set()
        with cap:
            for p in prompts:
                cap.set_active(True)
                model(input_ids=tok(p, return_tensors="pt")["input_ids"])
                for m in cap.layers.values():
                    rows.update(m.last_indices[0, -1].flatten().tolist())
                cap.set_active(False)
        new = sorted(rows - written)
        if not new:
            break
        with torch.no_grad():
            w = model.memory_bank.values.weight
            w[torch.tensor(new)] = 0.5 * torch.randn(len(new), w.shape[1])
        written |= set(new)
    gens = generate(model, tok, [it.prompt for it in injected])  # the probe's default length
    injected = _items("injected", answers=[g.answer or "x" for g in gens])
    unknown = _items("unknown")
    known = [FactItem(id="k0", kind="known", prompt="The capital of France is", answers=("Paris",), relation="capital")]
    return model, base, tok, injected + unknown + known


def test_generation_is_batch_invariant(tiny):
    from memsurgery.probe.generate import generate

    model, _, tok, items = tiny
    prompts = [it.prompt for it in items][:8] + ["x", "a much longer prompt than the others here"]
    batched = generate(model, tok, prompts, batch_size=16, max_new_tokens=6)
    single = [generate(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    for a, b in zip(batched, single):
        assert a.raw == b.raw
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-3)


def test_probe_writes_every_artifact(tiny, tmp_path):
    from memsurgery.probe.api import run_probe
    from memsurgery.probe.report import FILES

    model, base, tok, items = tiny
    out = tmp_path / "probe"
    report = run_probe(model, facts=[items], tokenizer=tok, baseline=base, out=out, template="both",
                       ppl_tokens=256, batch_size=4)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    data = json.loads((out / "report.json").read_text())
    for key in ("results", "configs", "versions", "n-samples", "summary", "hallucination", "calibration",
                "signals", "telemetry", "retention", "baseline", "deltas"):
        assert key in data, key
    summ = data["summary"]["completion"]
    assert summ["kinds"]["injected"]["exact_match"] == 1.0  # answers are the model's own generations
    assert summ["kinds"]["unknown"]["exact_match"] == 0.0
    assert data["results"]["memsurgery_injected"]["exact_match,completion"] == 1.0
    # every prompt of both templates, for the model and the baseline
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (2 * (len(items) - 1) + 1)  # the known item has no question
    assert {"prompt", "generation", "exact_match", "grade", "logprob_sum", "signals"} <= set(samples[0])
    # the memory signal separates written from unwritten routing (rows were written for the
    # completion prompts; qa prompts all end in "A:", which a tiny model cannot tell apart)
    from memsurgery.probe.metrics import auroc

    comp = [s for s in samples if s.get("model") != "baseline" and s["template"] == "completion"
            and s["kind"] != "known"]
    assert auroc([s["signals"]["written_weight"] for s in comp], [s["kind"] == "injected" for s in comp]) >= 0.9
    assert all(s["signals"]["written_weight"] == pytest.approx(1.0) for s in comp if s["kind"] == "injected")
    # entity-token signals: the entity "person a" ends on the (written) last token
    assert all(s["signals"]["written_weight_entity"] == pytest.approx(1.0) for s in comp if s["kind"] == "injected")
    assert all(0 <= s["signals"]["gate_entity"] <= 1 for s in comp)
    # the memory's output on the entity's tokens: non-zero exactly where written rows are read
    # (the table starts at zero), for injected and unknown items alike
    for s in comp:
        assert (s["signals"]["out_norm_entity"] > 0) == (s["signals"]["written_weight_entity"] > 0)
    assert any(s["signals"]["out_norm_entity"] > 0 for s in comp)
    first = min(int(k.split("@")[1]) for k in comp[0]["signals"] if k.startswith("out_norm_entity@"))
    for s in comp:  # the default primary signal is the lowest memory layer's value
        assert s["signals"]["out_norm_entity_first"] == s["signals"][f"out_norm_entity@{first}"]
    sig = data["signals"]["signals"]
    assert set(sig) >= {"gate", "top_score", "top_weight", "out_norm", "written_weight", "written_weight@0"}
    assert 0 <= sig["written_weight"]["auroc_injected_vs_unknown"] <= 1
    ab = data["signals"]["abstention"]
    assert ab["injected_correct_kept"] >= 0.95
    assert ab["unknown_attempted_wrong_after"] <= ab["unknown_attempted_wrong_before"]
    assert ab["unknown_attempted_wrong_before"] > 0
    tel = data["telemetry"]["custom"]
    assert set(tel) == {"0", "1"} and 0 < tel["0"]["pct_used"] <= 100 and tel["0"]["slots_per_fact"] >= 8
    assert data["retention"]["perplexity"] > 1 and data["baseline"]["retention"]["perplexity"] > 1
    # the baseline (no memory) differs from the model where the memory writes
    assert data["baseline"]["grafted"] is False and "signals" not in samples[-1]
    md = (out / "report.md").read_text()
    assert "Accuracy by kind" in md and "Memory signals" in md and report["grafted"]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action") and v and not v.startswith(("#", "data:")):
                self.urls.append(v)


def test_html_is_self_contained_and_renders(tiny, tmp_path):
    from memsurgery.probe.api import run_probe

    model, base, tok, items = tiny
    out = tmp_path / "p"
    run_probe(model, facts=[items], tokenizer=tok, baseline=base, out=out, ppl_tokens=0)
    html = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(html)
    parser.close()
    assert parser.tags.count("svg") >= 4 and "table" in parser.tags
    assert parser.urls == []
    low = html.lower()
    assert "http://" not in low.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in low and "@import" not in low
    assert low.count("<script") == low.count("<script>")  # inline only: no src, no external script
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not on PATH: screenshot part skipped (HTML checks above passed)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,2400", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_explain_lists_slots(tiny):
    from memsurgery.probe.api import explain

    model, _, tok, items = tiny
    res = explain(model, tok, items[0].prompt, top=5)  # a completion prompt whose rows are written
    assert set(res["layers"]) == {"0", "1"}
    layer = res["layers"]["0"]
    assert len(layer["slots"]) == 5 and 0 < layer["gate"] < 1
    weights = [r["weight"] for r in layer["slots"]]
    assert weights == sorted(weights, reverse=True) and all(r["written"] for r in layer["slots"])
    assert res["generation"] == items[0].answers[0] or items[0].answers[0] == "x"


def test_quick_eval(tiny):
    from memsurgery.probe.api import quick_eval

    model, _, tok, items = tiny
    res = quick_eval(model, tok, items, limit=None, max_new_tokens=12)
    assert res["kinds"]["injected"] == 1.0 and res["kinds"]["unknown"] == 0.0 and res["n"] == len(items)


def test_cli_probe_and_errors(tiny, tmp_path, capsys):
    from memsurgery.export import hf

    model, _, tok, items = tiny
    ckpt = tmp_path / "g"
    hf.save_grafted(model, ckpt, tokenizer=tok)
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
    code, out, err = _run(["probe", str(ckpt), "--facts", str(facts), "--out", str(tmp_path / "o"),
                           "--ppl-tokens", "0", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["summary"]["completion"]["kinds"]["injected"]["exact_match"] == 1.0
    assert (tmp_path / "o" / "report.html").is_file()
    # existing output without --force
    code, _, err = _run(["probe", str(ckpt), "--facts", str(facts), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--force" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answers": ["y"], "kind": "weird"}) + "\n")
    code, _, err = _run(["probe", str(ckpt), "--facts", str(bad)], capsys)
    assert code == 2 and f"{bad}:1" in err and "'kind'" in err and err.count("\n") == 1
    code, _, err = _run(["probe", str(tmp_path / "nope"), "--facts", str(facts)], capsys)
    assert code == 2 and err.count("\n") == 1
    code, out, err = _run(["probe", str(ckpt), "--explain", "Where does person 0 live?", "--json"], capsys)
    assert code == 0 and json.loads(out)["prompt"].startswith("Q: Where does person 0 live?")
