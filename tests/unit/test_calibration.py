"""Calibration data and activation capture (memsurgery.graft.calibration).

Token windows are tested with a word-level fake tokenizer whose ids are unique
across the corpus, so "disjoint" can be checked token by token. Capture is
compared with a reference hook on the pre-MLP norm's output (what the MLP sees)
for a tiny llama and a tiny gemma2 (which has extra norms around the MLP).
"""

from __future__ import annotations

import json

import pytest
import torch

from memsurgery.arch import spec_for_config
from memsurgery.errors import InputError
from memsurgery.graft.calibration import (
    builtin_corpus,
    calibration_split,
    capture_mlp_inputs,
    load_texts,
    token_chunks,
)
from tests.numerics import assert_close_normwise, forward_chain, reorder_rtol
from tests.tiny import TINY_CONFIGS, build_tiny_model

# ------------------------------------------------------------------ builtin corpus


def test_builtin_corpus_is_deterministic_and_large():
    import pydoc_data.topics

    a, b = builtin_corpus(), builtin_corpus()
    assert a == b
    assert a is not b  # a fresh list each call: callers may shuffle it in place
    topics = list(dict.fromkeys(v.strip() for _, v in sorted(pydoc_data.topics.topics.items())))
    assert a[: len(topics)] == topics  # the help topics first, deduplicated
    assert len(set(a)) == len(a)
    # >= 300k SmolLM2 tokens; English prose runs ~4 characters per token (3.95 on this
    # corpus), so 1.2M characters is a cheap proxy that needs no tokenizer.
    assert sum(map(len, a)) >= 1_200_000
    assert all(len(doc.split()) >= 25 for doc in a[len(topics) :])


# ------------------------------------------------------------------ load_texts


def test_load_texts_none_is_builtin():
    assert load_texts(None) == builtin_corpus()


def test_load_texts_txt_paragraphs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("para one\nline two\n\npara two\n\n\n\npara three\n")
    assert load_texts(f) == ["para one\nline two", "para two", "para three"]


def test_load_texts_jsonl_and_json(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["a b", "", "c"]))
    )
    assert load_texts(f, field="body") == ["a b", "c"]  # empty documents dropped
    g = tmp_path / "c.json"
    g.write_text(json.dumps([{"text": "x y"}, {"text": "z"}]))
    assert load_texts(g) == ["x y", "z"]


def test_load_texts_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "n": [1, 2]}), f)
    assert load_texts(f) == ["first doc", "second doc"]


@pytest.mark.parametrize(
    "name, content, field, match",
    [
        ("missing.jsonl", None, "text", "does not exist"),
        ("c.csv", "a,b\n", "text", "unknown extension '.csv'"),
        ("empty.jsonl", "", "text", "is empty"),
        ("blank.txt", "\n\n  \n", "text", "no non-empty text"),
        ("nofield.jsonl", '{"a": "x"}\n', "text", "no field 'text' \\(fields: a\\)"),
        ("notstr.jsonl", '{"text": 1}\n', "text", "record 0 is a int"),
        ("bad.jsonl", '{"text": "x"\n', "text", "cannot read calibration file .* as json"),
    ],
)
def test_load_texts_errors(tmp_path, name, content, field, match):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    with pytest.raises(InputError, match=match) as err:
        load_texts(f, field=field)
    assert name in str(err.value)  # the message names the file
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ token windows


class WordTokenizer:
    """Word 'wN' -> id N; EOS = 0. Ids are unique across the test corpus."""

    eos_token_id = 0

    def __call__(self, docs, add_special_tokens=False, verbose=True):
        return {"input_ids": [[int(w[1:]) for w in doc.split()] for doc in docs]}


def _corpus(n_docs=50, words=37):
    return [" ".join(f"w{1 + d * words + i}" for i in range(words)) for d in range(n_docs)]


def test_calibration_split_disjoint_and_deterministic():
    tok, texts = WordTokenizer(), _corpus()
    calib, held = calibration_split(tok, texts, 300, 200, seq_len=64, seed=3)
    assert calib.shape == (5, 64) and held.shape == (4, 64)  # ceil(300/64), ceil(200/64)
    assert calib.dtype == torch.long
    a, b = set(calib.flatten().tolist()) - {0}, set(held.flatten().tolist()) - {0}
    assert a and b and not (a & b)
    again = calibration_split(tok, texts, 300, 200, seq_len=64, seed=3)
    assert torch.equal(again[0], calib) and torch.equal(again[1], held)
    other = calibration_split(tok, texts, 300, 200, seq_len=64, seed=4)
    assert not torch.equal(other[0], calib)
    # token_chunks with an offset reproduces the held-out split.
    assert torch.equal(token_chunks(tok, texts, 200, 64, seed=3, offset_tokens=calib.numel()), held)
    assert torch.equal(token_chunks(tok, texts, 300, 64, seed=3), calib)


def test_token_chunks_are_contiguous_stream():
    tok, texts = WordTokenizer(), _corpus(n_docs=3, words=10)
    ids = token_chunks(tok, texts, 33, seq_len=11, seed=0)  # 3 docs * (10 words + EOS)
    stream = ids.flatten().tolist()
    assert stream.count(0) == 3
    docs = [d for d in " ".join(map(str, stream)).split(" 0") if d.strip()]
    assert all(len(d.split()) == 10 for d in docs)  # whole documents, joined by EOS


def test_token_chunks_too_few_tokens():
    tok, texts = WordTokenizer(), _corpus(n_docs=2, words=10)
    with pytest.raises(InputError, match="has 22 tokens \\(2 documents\\) but 64 are needed"):
        token_chunks(tok, texts, 64, seq_len=32)
    with pytest.raises(InputError, match="22 tokens"):
        calibration_split(tok, texts, 16, 16, seq_len=16)
    with pytest.raises(InputError, match="n_tokens=0"):
        token_chunks(tok, texts, 0)


# ------------------------------------------------------------------ capture


def _reference_mlp_io(model, layers, ids):
    """MLP inputs (pre-MLP norm output) and MLP outputs, by plain hooks on a full forward."""
    spec = spec_for_config(model.config.to_dict())
    seen_in, seen_out, handles = {}, {}, []
    for i in layers:
        norm, mlp = spec.get_pre_mlp_norm(model, i), spec.get_mlp(model, i)
        handles.append(
            norm.register_forward_hook(lambda m, a, o, i=i: seen_in.setdefault(i, []).append(o))
        )
        handles.append(
            mlp.register_forward_hook(lambda m, a, o, i=i: seen_out.setdefault(i, []).append(o))
        )
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    d = model.config.hidden_size
    return {i: (seen_in[i][0].reshape(-1, d), seen_out[i][0].reshape(-1, d)) for i in layers}


def _no_hooks(model):
    spec = spec_for_config(model.config.to_dict())
    for i in range(len(spec.get_layers(model))):
        mlp = spec.get_mlp(model, i)
        assert not mlp._forward_pre_hooks and not mlp._forward_hooks


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_capture_matches_reference_hook(model_type):
    model = build_tiny_model(model_type)
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    ref = _reference_mlp_io(model, [0, 1], ids)
    got = capture_mlp_inputs(model, [1, 0], ids, batch_size=2)  # batches of 2, 2, 1 rows
    assert sorted(got) == [0, 1]
    # Batches of 2 / 3 rows against one of 5: the same sums on other shapes, so fp32 rounding
    # alone differs; up to layer 1's MLP output that is at most the whole forward chain of
    # 16-token rows (tests/numerics.py).
    tol = reorder_rtol(forward_chain(TINY_CONFIGS[model_type], 16))
    for i in (0, 1):
        assert got[i].shape == (80, 64) and got[i].dtype == torch.float32
        assert_close_normwise(got[i], ref[i][0], tol, f"layer {i} input")
    both = capture_mlp_inputs(model, [0, 1], ids, batch_size=3, with_outputs=True)
    for i in (0, 1):
        assert_close_normwise(both[i][0], ref[i][0], tol, f"layer {i} input")
        assert_close_normwise(both[i][1], ref[i][1], tol, f"layer {i} output")
    _no_hooks(model)


def test_capture_max_tokens_and_early_stop():
    model = build_tiny_model("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    full = capture_mlp_inputs(model, [0], ids)
    part = capture_mlp_inputs(model, [0], ids, max_tokens=21, dtype=torch.float64)
    assert part[0].shape == (21, 64) and part[0].dtype == torch.float64
    torch.testing.assert_close(part[0].float(), full[0][:21])
    # Layer 1 never runs when only layer 0 is captured.
    calls = []
    spec = spec_for_config(model.config.to_dict())
    h = spec.get_layer(model, 1).register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        capture_mlp_inputs(model, [0], ids)
    finally:
        h.remove()
    assert calls == []


def test_capture_removes_hooks_when_forward_raises():
    model = build_tiny_model("llama")
    model.train()
    bad = torch.full((2, 8), 10_000)  # out of the 256-token vocabulary
    with pytest.raises(IndexError):
        capture_mlp_inputs(model, [0, 1], bad)
    _no_hooks(model)
    assert model.training  # mode restored
    with pytest.raises(InputError, match="out of range"):
        capture_mlp_inputs(model, [7], torch.zeros(1, 4, dtype=torch.long))
    _no_hooks(model)
