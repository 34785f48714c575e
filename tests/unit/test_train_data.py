"""Training data: file formats, QA answer-only labels, packing, length limits, cache, order."""

from __future__ import annotations

import json

import pytest
import torch

from memsurgery.errors import InputError
from memsurgery.train import data as D
from memsurgery.train.recipe import DataSpec
from tests.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSURGERY_CACHE", str(tmp_path / "cache"))


def _spec(train, **kw):
    return DataSpec(train=str(train), **kw)


def test_text_packing_fills_windows(tmp_path, tok):
    p = tmp_path / "a.txt"
    p.write_text("alpha beta gamma.\n\n\ndelta epsilon.\n\nzeta " * 5)
    s = D.load_sequences(str(p), tok, _spec(p, seq_len=16))
    n_expected = sum(len(t.encode()) + 1 for t in ["alpha beta gamma.", "delta epsilon."] * 5)  # +EOS
    assert s.n_tokens >= n_expected - 10  # paragraphs stripped; every byte a token
    lens = (s.offsets[1:] - s.offsets[:-1]).tolist()
    assert all(n == 16 for n in lens[:-1]) and 2 <= lens[-1] <= 16
    assert torch.equal(s.ids, s.labels)  # raw text: every token is a target
    assert tok.eos_token_id in s.ids.tolist()


def test_qa_answer_only_loss_masks_prompt(tmp_path, tok):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"q": "Capital of X?", "a": "Y"}) + "\n" + json.dumps({"q": "Z is", "a": " W"}) + "\n")
    spec = _spec(p, format="qa", prompt_field="q", answer_field="a", answer_only_loss=True, packing=False,
                 one_fact_per_sequence=True)
    s = D.load_sequences(str(p), tok, spec)
    assert len(s) == 2
    ids, labels = s.get(0)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1].tolist()) == "Capital of X? Y"  # "auto" separator adds the space
    n_prompt = len("Capital of X?")
    assert (labels[:n_prompt] == D.IGNORE).all() and torch.equal(labels[n_prompt:], ids[n_prompt:])
    ids2, _ = s.get(1)
    assert tok.decode(ids2[:-1].tolist()) == "Z is W"  # the answer already has its space
    full = D.load_sequences(str(p), tok, _spec(p, format="qa", prompt_field="q", answer_field="a", packing=False))
    assert torch.equal(full.get(0)[0], full.get(0)[1])


def test_parquet_documents(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["first doc", "second doc", ""]}), p)
    s = D.load_sequences(str(p), tok, _spec(p, format="documents", text_field="body", packing=False))
    assert len(s) == 2 and tok.decode(s.get(1)[0].tolist()).startswith("second doc")


def test_too_long_truncates_with_warning_or_refuses(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "x" * 50}) + "\n" + json.dumps({"text": "short"}) + "\n")
    msgs = []
    s = D.load_sequences(str(p), tok, _spec(p, format="documents", packing=False, seq_len=20), log=msgs.append)
    assert (s.offsets[1:] - s.offsets[:-1]).tolist() == [20, 6]
    assert any("truncated" in m and "1 of 2" in m for m in msgs)
    with pytest.raises(InputError, match="record 0 has 51 tokens"):
        D.load_sequences(str(p), tok, _spec(p, format="documents", packing=False, seq_len=20, too_long="refuse"))
    with pytest.raises(InputError, match="longer than the model allows"):
        D.load_sequences(str(p), tok, _spec(p, seq_len=512), max_len=128)


@pytest.mark.parametrize("content,kw,needle", [
    ("", {}, "is empty"),
    ('{"body": "x"}\n', {"format": "documents"}, "has no field 'text'"),
    ('{"prompt": "x"}\n', {"format": "qa"}, "has no field 'answer'"),
    ('{"text": 3}\n', {"format": "documents"}, "not text"),
    ('{"text": "  "}\n', {"format": "documents"}, "no non-empty records"),
    ("plain\n", {"format": "qa"}, "plain text but data.format is qa"),
])
def test_bad_data_errors(tmp_path, tok, content, kw, needle):
    ext = ".txt" if content.startswith("plain") else ".jsonl"
    p = tmp_path / f"bad{ext}"
    p.write_text(content)
    with pytest.raises(InputError, match=needle):
        D.load_sequences(str(p), tok, _spec(p, **kw))


def test_missing_file_and_unknown_builtin(tmp_path, tok):
    with pytest.raises(InputError, match="does not exist"):
        D.load_sequences(str(tmp_path / "none.jsonl"), tok, _spec("x"))
    with pytest.raises(InputError, match="unknown builtin"):
        D.load_sequences("builtin:nothing", tok, _spec("x"))
    with pytest.raises(InputError, match="unknown parameter"):
        D.load_sequences("builtin:people?m=3", tok, _spec("x", format="documents"))


def test_builtin_people(tok):
    pytest.importorskip("memsurgery.facts.people")
    docs = D.load_sequences("builtin:people?n=2&seed=0&paraphrases=2", tok,
                            _spec("x", format="documents", packing=False, seq_len=512))
    assert len(docs) == 4
    qa = D.load_sequences("builtin:people-qa?n=2&seed=0", tok,
                          _spec("x", format="qa", packing=False, answer_only_loss=True, seq_len=128))
    assert len(qa) > 2 and (qa.get(0)[1] == D.IGNORE).any()
    with pytest.raises(InputError, match="holds qa records"):
        D.load_sequences("builtin:people-qa?n=2", tok, _spec("x", format="documents"))


def test_cache_hit_and_key(tmp_path, tok):
    p = tmp_path / "a.txt"
    p.write_text("one two three four five six seven\n\neight nine ten")
    a = D.load_sequences(str(p), tok, _spec(p, seq_len=8))
    b = D.load_sequences(str(p), tok, _spec(p, seq_len=8))
    assert a.info["cached"] is False and b.info["cached"] is True
    assert torch.equal(a.ids, b.ids) and torch.equal(a.offsets, b.offsets)
    c = D.load_sequences(str(p), tok, _spec(p, seq_len=6))
    assert c.info["cached"] is False
    p.write_text("changed text entirely")  # new bytes -> new key
    assert D.load_sequences(str(p), tok, _spec(p, seq_len=8)).info["cached"] is False


def test_order_is_seeded_and_resumable():
    o = D.Order(7, seed=3)
    full = o.take(0, 20)
    assert D.Order(7, seed=3).take(5, 15) == full[5:]
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert full[:7] != full[7:14] or full[7:14] != full[14:] + full[:1]
    assert D.Order(7, seed=4).take(0, 7) != full[:7]


def test_collate_pads_and_masks():
    s = D.SequenceSet.from_lists([([5, 6, 7], [5, 6, 7]), ([8, 9], [D.IGNORE, 9])], {})
    b = D.collate(s, [0, 1], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [D.IGNORE, 9, D.IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    tr, ev = D.split_heldout(s, 0.5, seed=0)
    assert len(tr) == 1 and len(ev) == 1
