"""Causal tracing (memsurgery/inspection/trace.py) on tiny random models.

A random model knows no facts, so each test fact's answer is whatever the model
predicts for its prompt (a byte-level fake tokenizer makes every character one
token). The restoration machinery is checked against a plain reference: full-length
forwards with the hooks, one run per restoration, no KV cache and no batching.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from memsurgery.errors import InputError, UsageError
from memsurgery.inspection import trace as tr
from tests.tiny import build_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP barriers
    make 2 threads 10-50x slower than 1; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ByteTokenizer:
    """One token per Latin-1 character (the tiny models have 256 ids); optional BOS = 1."""

    is_fast = False

    def __init__(self, bos: bool = True):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, **_):
        ids = list(text.encode("latin-1"))
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


PROMPTS = [  # (prompt, subject): subjects at the start and in the middle, 2-5 tokens
    ("The capital of Xy is", "Xy"),
    ("Bob lives in Paris and", "Paris"),
    ("Qz is found in", "Qz"),
    ("The symbol of gold is", "gold"),
    ("A cat of Kent says:", "Kent"),
    ("Rome is a city in", "Rome"),
    ("The dog named Rex eats", "Rex"),
    ("Water boils in Lima at", "Lima"),
]


def _facts(model, tok, prompts=PROMPTS):
    """Facts the model 'knows': the answer is its own greedy next character."""
    facts = []
    for i, (prompt, subject) in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        answer = chr(top)
        if answer.strip():  # whitespace answers are not valid facts
            rel = "start" if prompt.startswith(subject) else "middle"
            facts.append(
                {
                    "id": f"f{i}",
                    "prompt": prompt,
                    "subject": subject,
                    "answers": [answer],
                    "relation": rel,
                }
            )
    assert len(facts) >= 3, "too few usable test prompts"
    return facts


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request):
    model = build_tiny_model(request.param, seed=0)
    tok = ByteTokenizer()
    return model, tok, _facts(model, tok)


# ------------------------------------------------------------------- reference


def _reference(
    model,
    tok,
    fact,
    draw,
    *,
    restore_layers=(),
    restore_all_positions=False,
    restore_embedding=False,
):
    """P(target) of one full-length forward with noise `draw` [n_subj, d] on the subject."""
    embed, mlps = tr._model_parts(model)
    ids_list = tok(fact["prompt"])["input_ids"]
    ids = torch.tensor([ids_list])
    subj = tr._subject_positions(tok, fact["prompt"], fact["subject"], ids_list)
    target = tok(fact["answers"][0], add_special_tokens=False)["input_ids"][0]
    clean, emb_clean = [], {}
    with torch.no_grad():
        with tr._hooks(embed, mlps, record=clean):
            p_clean = tr._forward(model, ids)[0][0, target].item()
        pos = list(range(len(ids_list))) if restore_all_positions else [subj[-1]]
        handles = []
        if restore_embedding:  # registered after the noise hook, so it runs after it
            emb_clean["v"] = embed(ids)[0, subj]

            def put_emb(_m, _a, out):
                out = out.clone()
                out[:, subj] = emb_clean["v"]
                return out

        with tr._hooks(
            embed,
            mlps,
            noise=draw[None],
            noise_pos=subj,
            restore={j: torch.tensor([0]) for j in restore_layers},
            restore_pos=pos,
            clean=[c[pos] for c in clean],
        ):
            if restore_embedding:
                handles.append(embed.register_forward_hook(put_emb))
            try:
                p = tr._forward(model, ids)[0][0, target].item()
            finally:
                for h in handles:
                    h.remove()
    return p_clean, p


# ------------------------------------------------------------------ the hooks


def test_restoring_everything_gives_clean_and_nothing_gives_corrupted(tiny):
    model, tok, facts = tiny
    n_layers = model.config.num_hidden_layers
    for f in facts[:3]:
        n_subj = len(f["subject"])
        gen = torch.Generator().manual_seed(1)
        draw = 3 * torch.randn(n_subj, model.config.hidden_size, generator=gen)
        p_clean, p_all = _reference(
            model,
            tok,
            f,
            draw,
            restore_layers=range(n_layers),
            restore_all_positions=True,
            restore_embedding=True,
        )
        assert p_all == pytest.approx(p_clean, abs=1e-6)
        # Embedding restored but MLPs written from the wrong layer would break this:
        # the MLP restore writes exactly the clean value of its own layer.
        _, p_none = _reference(model, tok, f, draw)
        _, p_emb = _reference(model, tok, f, draw, restore_embedding=True)
        assert p_emb == pytest.approx(p_clean, abs=1e-6)
        # The noise does change the answer (random tiny models are near uniform: relative).
        assert abs(p_none - p_clean) > 1e-3 * p_clean


def test_batched_cached_trace_matches_reference(tiny):
    """One fact, one sample: the profile equals full-length single runs (KV cache, batching)."""
    model, tok, facts = tiny
    n_layers = model.config.num_hidden_layers
    d = model.config.hidden_size
    for f in facts[:4]:
        prof = tr.trace_layers(model, tok, [f], noise=0.7, samples=1, seed=5)
        assert prof["facts_used"] == 1
        draw = tr._noise_draw(5, 0, 1, len(f["subject"]), d, 0.7)[0]
        p_clean, p_corr = _reference(model, tok, f, draw)
        assert prof["clean_prob_mean"] == pytest.approx(p_clean, abs=1e-5)
        assert prof["corrupted_prob_mean"] == pytest.approx(p_corr, abs=1e-5)
        for layer in range(n_layers):
            _, p_rest = _reference(model, tok, f, draw, restore_layers=[layer])
            assert prof["indirect_effect"][layer] == pytest.approx(p_rest - p_corr, abs=1e-5)


def test_window_restores_neighbouring_layers(tiny):
    model, tok, facts = tiny
    d = model.config.hidden_size
    f = facts[0]
    prof = tr.trace_layers(model, tok, [f], noise=0.7, samples=1, window=3)
    draw = tr._noise_draw(0, 0, 1, len(f["subject"]), d, 0.7)[0]
    _, p_corr = _reference(model, tok, f, draw)
    _, p_both = _reference(model, tok, f, draw, restore_layers=[0, 1])
    # 2 layers, window 3: each layer's window covers both layers.
    assert prof["indirect_effect"] == pytest.approx([p_both - p_corr] * 2, abs=1e-5)


def test_subject_at_position_zero_without_bos():
    model = build_tiny_model("llama", seed=0)
    tok = ByteTokenizer(bos=False)
    facts = _facts(
        model,
        tok,
        [
            ("Xy is the capital of", "Xy"),
            ("Qz has a", "Qz"),
            ("Mo was born in", "Mo"),
            ("Ab is", "Ab"),
        ],
    )
    f = facts[0]
    prof = tr.trace_layers(model, tok, [f], noise=0.5, samples=1)
    draw = tr._noise_draw(0, 0, 1, len(f["subject"]), model.config.hidden_size, 0.5)[0]
    _, p_corr = _reference(model, tok, f, draw)
    _, p_rest = _reference(model, tok, f, draw, restore_layers=[1])
    assert prof["corrupted_prob_mean"] == pytest.approx(p_corr, abs=1e-5)
    assert prof["indirect_effect"][1] == pytest.approx(p_rest - p_corr, abs=1e-5)


# ------------------------------------------------------------------- the profile


def test_profile_shape_and_determinism(tiny):
    model, tok, facts = tiny
    unknown = {"id": "u", "prompt": "Nobody knows", "subject": "Nobody", "answers": ["\x7fzz"]}
    logs = []
    a = tr.trace_layers(model, tok, facts + [unknown], samples=2, seed=3, log=logs.append)
    b = tr.trace_layers(model, tok, facts + [unknown], samples=2, seed=3)
    c = tr.trace_layers(model, tok, facts + [unknown], samples=2, seed=4)
    n = model.config.num_hidden_layers
    assert a["layers"] == list(range(n))
    assert len(a["indirect_effect"]) == len(a["normalized"]) == n
    assert a["facts_used"] == a["facts_known"] == len(facts) and a["facts_skipped"] == 1
    assert a["noise_std"] > 0 and a["seconds"] >= 0
    strip = lambda p: {k: v for k, v in p.items() if k != "seconds"}
    assert strip(a) == strip(b)
    assert a["indirect_effect"] != c["indirect_effect"]
    assert any("answers" in m for m in logs)
    gap = a["clean_prob_mean"] - a["corrupted_prob_mean"]
    if gap > 1e-6:  # the noise may even help a random model; then normalized is 0
        assert a["normalized"][0] == pytest.approx(
            a["indirect_effect"][0] / gap, rel=1e-3, abs=1e-5
        )


def test_max_facts_is_spread_over_relations(tiny):
    model, tok, facts = tiny
    prof = tr.trace_layers(model, tok, facts, samples=1, max_facts=2)
    assert prof["facts_used"] == 2 and prof["facts_known"] == len(facts)
    if len({f["relation"] for f in facts}) > 1:
        assert set(prof["relations"]) == {"start", "middle"}


def test_no_known_fact_is_an_input_error(tiny):
    model, tok, _ = tiny
    facts = [{"prompt": "Zq is", "subject": "Zq", "answers": ["\x00\x00\x00"]}]
    with pytest.raises(InputError, match="answers none of the 1 trace facts"):
        tr.trace_layers(model, tok, facts)


def test_bad_arguments(tiny):
    model, tok, facts = tiny
    for kw in ({"samples": 0}, {"window": 0}, {"max_facts": 0}, {"noise": -1.0}):
        with pytest.raises(UsageError):
            tr.trace_layers(model, tok, facts, **kw)


def test_model_mode_is_restored(tiny):
    model, tok, facts = tiny
    model.train()
    try:
        tr.trace_layers(model, tok, facts[:1], samples=1)
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------------ choose_layers


def _profile(effects):
    return {"layers": list(range(len(effects))), "indirect_effect": effects}


def test_choose_layers_top_k_with_spacing():
    eff = [0.0, 0.1, 0.9, 0.8, 0.7, 0.0, 0.5, 0.4, 0.0, 0.3]
    assert tr.choose_layers(_profile(eff), k=3, min_gap=2) == [2, 4, 6]
    assert tr.choose_layers(_profile(eff), k=3, min_gap=1) == [2, 3, 4]
    assert tr.choose_layers(_profile(eff), k=1) == [2]
    got = tr.choose_layers(_profile(eff), k=3, min_gap=3)
    assert len(got) == 3 and all(b - a >= 3 for a, b in itertools.pairwise(got))


def test_choose_layers_falls_back_when_greedy_boxes_itself_in():
    # Greedy takes 1 then 3 and finds nothing else 2 apart; {0, 2, 4} fits.
    eff = [0.5, 1.0, 0.4, 0.9, 0.3]
    assert tr.choose_layers(_profile(eff), k=3, min_gap=2, exclude=()) == [0, 2, 4]
    eff = [0.0, 0.5, 1.0, 0.4, 0.9, 0.3]  # the same behind an excluded layer 0
    assert tr.choose_layers(_profile(eff), k=3, min_gap=2) == [1, 3, 5]


def test_choose_layers_excludes_layer_zero_and_windows_covering_it():
    eff = [1.0, 0.9, 0.8, 0.1, 0.2, 0.3, 0.0]
    assert tr.choose_layers(_profile(eff), k=2) == [1, 5]
    assert tr.choose_layers(_profile(eff), k=2, exclude=()) == [0, 2]
    # window 3: layer 1's restorations include layer 0, so it is excluded too.
    assert tr.choose_layers({**_profile(eff), "window": 3}, k=2) == [2, 5]
    with pytest.raises(UsageError, match=r"outside layers \[0, 1\]"):
        tr.choose_layers({**_profile(eff), "window": 3}, k=3, min_gap=3)


def test_choose_layers_ignores_nan_and_errors():
    eff = [0.0, 0.2, float("nan"), 0.1]
    assert tr.choose_layers(_profile(eff), k=1) == [1]
    assert tr.choose_layers(_profile(eff), k=2, min_gap=1) == [1, 3]
    assert tr.choose_layers(_profile(eff), k=3, min_gap=1) == [1, 2, 3]  # NaN only when needed
    with pytest.raises(UsageError, match="cannot choose 3 layers at least 2 apart from a 4-layer"):
        tr.choose_layers(_profile([0.1] * 4), k=3, min_gap=2, exclude=())
    with pytest.raises(UsageError):
        tr.choose_layers(_profile([0.1] * 4), k=0)


def test_render_trace_prints_every_layer():
    from rich.console import Console

    prof = {
        "layers": [0, 1, 2],
        "indirect_effect": [0.1, -0.05, 0.3],
        "normalized": [0.2, -0.1, 0.6],
        "facts_used": 5,
        "facts_known": 5,
        "facts_skipped": 2,
        "samples": 3,
        "window": 1,
        "clean_prob_mean": 0.5,
        "corrupted_prob_mean": 0.0,
        "noise_std": 0.3,
        "seconds": 1.5,
    }
    con = Console(record=True, width=100)
    tr.render_trace(prof, con, chosen=[2])
    text = con.export_text()
    assert "+0.3000" in text and "-0.0500" in text and "◀" in text and "chosen layers 2" in text
    prof["indirect_effect"] = [5.0, -0.05, 0.3]  # layer 0 off the scale: its bar is cut
    con = Console(record=True, width=100)
    tr.render_trace(prof, con)
    assert "█" * 30 + "▶" in con.export_text()


# ------------------------------------------------------------------ load_facts


def test_bundled_facts_parse():
    facts = tr.load_facts(None)
    assert 100 <= len(facts) <= 250
    assert len({f["id"] for f in facts}) == len(facts)
    assert {f["relation"] for f in facts} >= {"capital", "element_symbol"}
    for f in facts:
        assert f["subject"] in f["prompt"]
        assert f["answers"] and all(a.startswith(" ") for a in f["answers"])
    assert any(
        f["prompt"] == "The capital of France is" and " Paris" in f["answers"] for f in facts
    )


def test_bundled_facts_match_generator():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pytest.importorskip("countryinfo")
    pytest.importorskip("pycountry")
    pytest.importorskip("periodictable")
    r = subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "make_trace_facts.py"),
            "--check",
            "--out",
            str(tr.bundled_facts_path()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_load_facts_user_file_and_normalization(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(
        json.dumps({"prompt": "The capital of Peru is", "subject": "Peru", "answer": "Lima"})
        + "\n\n"
        + json.dumps(
            {"id": "x", "prompt": "Gold: ", "subject": "Gold", "answers": ["Au"], "relation": "sym"}
        )
        + "\n"
    )
    a, b = tr.load_facts(p)
    assert a["answers"] == [" Lima"] and a["id"] == "f.jsonl:1" and a["relation"] == ""
    assert b["answers"] == ["Au"]  # prompt ends in whitespace: no space added
    arr = tmp_path / "f.json"
    arr.write_text(json.dumps([{"prompt": "A B", "subject": "B", "answers": [" c"]}]))
    assert tr.load_facts(arr)[0]["answers"] == [" c"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "no facts"),
        ("{not json\n", r"f.jsonl:1: invalid JSON"),
        ('{"prompt": "a b", "subject": "b"}\n', "'answers' must be"),
        ('{"prompt": "a b", "subject": "z", "answers": [" c"]}\n', "does not occur in the prompt"),
        ('{"prompt": "", "subject": "z", "answers": [" c"]}\n', "'prompt' must be"),
        ('{"prompt": "a b", "subject": "b", "answers": []}\n', "'answers' must be"),
        ("[1, 2]", "expected a JSON object"),
        (
            (
                '{"id": 1, "prompt": "a b", "subject": "b", "answers": "c"}\n'
                '{"id": 1, "prompt": "a b", "subject": "b", "answers": "c"}\n'
            ),
            "duplicate id",
        ),
    ],
)
def test_load_facts_errors(tmp_path, content, match):
    p = tmp_path / "f.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as err:
        tr.load_facts(p)
    assert "\n" not in str(err.value)


def test_load_facts_missing_and_binary(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        tr.load_facts(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        tr.load_facts(tmp_path)
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        tr.load_facts(bad)
