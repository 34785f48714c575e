"""Training fast paths: logits at target positions only, and the frozen-prefix cache.

Both must give the loss and the gradients of the plain forward; the cache must turn
itself off wherever it would not, and a resumed cached run stays bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memsurgery.train import data as D
from tests.numerics import assert_close_normwise, forward_chain, reorder_rtol
from tests.tiny import TINY_CONFIGS
from tests.train_assets import GRAFT, tiny_recipe

pytestmark = pytest.mark.usefixtures("train_cache")

# The fast paths compute the same sums on other shapes (logits of the target rows only; a
# prefix computed in other batches): fp32 rounding differs, nothing else. The loss sums
# <= 5 x 32 tokens' log-probabilities, each at the end of the forward chain; a gradient entry
# sums over the same tokens products that went through the forward and the backward pass
# (tests/numerics.py).
_CHAIN = forward_chain(TINY_CONFIGS["llama"], 32, GRAFT)
LOSS_TOL = reorder_rtol(_CHAIN, 5 * 32)
GRAD_TOL = reorder_rtol(2 * _CHAIN, 5 * 32)


def qa_recipe(assets, out, **over) -> dict:
    """Memory-only training on 24 QA pairs, answer-only loss: each pair is read 2+ times."""
    base = {"data.train": str(assets["qa"]), "data.format": "qa", "data.answer_only_loss": True,
            "data.seq_len": 32, "data.packing": False, "train.steps": 12, "train.batch_size": 4,
            "checkpoint.every": 4, "checkpoint.keep_last": 3,
            "optim.groups.values": {"lr": 0.05}, "optim.groups.relevance_gate": {"lr": 1e-2}}
    return tiny_recipe(assets, out, **dict(base, **over))


def _setup(assets):
    from memsurgery.train.loop import load_model_and_tokenizer
    from memsurgery.train.recipe import DataSpec

    model, tok = load_model_and_tokenizer(str(assets["grafted"]))
    with torch.no_grad():  # a fresh graft's values are zero: no gate gradient to compare
        model.memory_bank.values.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    spec = DataSpec(train=str(assets["qa"]), format="qa", answer_only_loss=True, seq_len=32, packing=False)
    seqs = D.load_sequences(spec.train, tok, spec, key="data.train", max_len=None, log=lambda m: None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, seqs, pad


def _grads(model, batch, **kw):
    from contextlib import nullcontext

    from memsurgery.train.fastpath import loss_sum

    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    bank = model.memory_bank
    trained = {n: p for n, p in bank.named_parameters() if n.endswith("values.weight") or "gate" in n}
    for p in trained.values():
        p.requires_grad_(True)
    loss, n = loss_sum(model, batch, torch.device("cpu"), nullcontext, **kw)
    loss.backward()
    g = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for k, p in trained.items()}
    return float(loss.detach()), n, g


def test_logits_at_targets_give_the_same_loss_and_gradients(assets):
    from memsurgery.train.fastpath import keeps_logits

    model, seqs, pad = _setup(assets)
    assert keeps_logits(model)
    # duplicate indices and rows of different lengths (padding inside the batch)
    idx = [0, 5, 5, 11, 23]
    batch = D.collate(seqs, idx, pad)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1
    full = _grads(model, batch, keep=False)
    kept = _grads(model, batch, keep=True)
    assert full[1] == kept[1] > 0
    assert kept[0] == pytest.approx(full[0], rel=LOSS_TOL)
    assert full[2].keys() == kept[2].keys() and len(full[2]) >= 2
    for k in full[2]:
        assert full[2][k].abs().sum() > 0, k  # a gradient that is all zeros would compare equal anyway
        assert_close_normwise(kept[2][k], full[2][k], GRAD_TOL, k)


def test_prefix_cache_gives_the_same_loss_and_gradients(assets):
    from contextlib import nullcontext

    from memsurgery.train.fastpath import PrefixCache

    model, seqs, pad = _setup(assets)
    first = min(model.memory_layers())
    assert first >= 1
    # built in chunks of 3: the cached rows come from other batches than the ones trained on
    cache = PrefixCache(model, first, seqs, 3, pad, torch.device("cpu"), nullcontext)
    assert cache.flat.shape == (seqs.n_tokens, model.config.hidden_size)
    idx = [7, 2, 2, 19]
    batch = D.collate(seqs, idx, pad)
    full = _grads(model, batch, keep=True)
    cached = _grads(model, batch, keep=True, prefix=cache, idx=idx)
    assert cached[0] == pytest.approx(full[0], rel=LOSS_TOL)
    for k in full[2]:
        assert_close_normwise(cached[2][k], full[2][k], GRAD_TOL, k)
    # the model is whole again afterwards
    assert len(model.decoder_layers()) == model.config.num_hidden_layers


def _plan(summary) -> dict:
    return json.loads((Path(summary["run_dir"]) / "plan.json").read_text())


def test_memory_run_with_cache_matches_run_without(assets, tmp_path):
    from memsurgery.train import run

    msgs: list[str] = []
    on = run(qa_recipe(assets, tmp_path / "on"), log=msgs.append)
    off = run(qa_recipe(assets, tmp_path / "off", **{"train.prefix_cache": False}), log=lambda m: None)
    assert _plan(on)["prefix_cache"]["enabled"] and any(m.startswith("prefix cache: layers 0-0") for m in msgs)
    assert not _plan(off)["prefix_cache"]["enabled"]
    assert _plan(off)["prefix_cache"]["why_not"] == "train.prefix_cache is off"
    assert len(on["losses"]) == 12
    assert on["losses"][-1] < on["losses"][0]  # it trains
    torch.testing.assert_close(torch.tensor(on["losses"]), torch.tensor(off["losses"]), rtol=1e-3, atol=1e-5)


class _Killed(Exception):
    pass


def test_cached_run_resumes_bit_identically(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from memsurgery.train import loop, run

    ref = run(qa_recipe(assets, tmp_path / "a"), log=lambda m: None)
    assert _plan(ref)["prefix_cache"]["enabled"]
    rec_b = qa_recipe(assets, tmp_path / "b")
    real = loop._save

    def save_then_die(run_dir, step, *a, **k):
        out = real(run_dir, step, *a, **k)
        if step == 8:
            raise _Killed  # the same recipe, stopped right after its step-8 checkpoint
        return out

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(_Killed):
        run(rec_b, log=lambda m: None)
    monkeypatch.setattr(loop, "_save", real)
    s = run(rec_b, resume=True, log=lambda m: None)
    assert s["resumed_from"].endswith("step-00000008")
    a = load_file(str(Path(ref["last_checkpoint"]) / "trainable.safetensors"))
    b = load_file(str(Path(s["last_checkpoint"]) / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["losses"] == ref["losses"][8:]


@pytest.mark.parametrize(("over", "reason"), [
    ({"train.method": "full"}, "method full trains the layers below the memory"),
    ({"optim.groups.norms": {"lr": 1e-4}}, "trains below the first memory layer"),
    ({"train.steps": 2}, "read fewer than twice"),
    ({"train.prefix_cache_max_mb": 1, "data.train": None}, "MB (train.prefix_cache_max_mb 1)"),
])
def test_cache_turns_itself_off_with_a_reason(assets, tmp_path, over, reason):
    from memsurgery.train import run

    over = dict(over)
    if over.get("data.train", 1) is None:  # a text set big enough to pass the 1 MB budget
        big = tmp_path / "big.txt"
        big.write_text("\n\n".join(Path(assets["text"]).read_text() for _ in range(30)))
        over.update({"data.train": str(big), "data.format": "text", "data.answer_only_loss": False,
                     "train.steps": 400, "train.batch_size": 64})
    rec = qa_recipe(assets, tmp_path / "r", **over)
    s = run(rec, dry_run=True, log=lambda m: None)
    pc = s["plan"]["prefix_cache"]
    assert not pc["enabled"] and reason in pc["why_not"], pc


def test_cache_that_disagrees_with_the_full_forward_is_dropped(assets, tmp_path, monkeypatch):
    """An architecture whose forward changes `inputs_embeds` (Gemma scales it) must not train on the cache."""
    from memsurgery.train import fastpath, run

    real = fastpath.PrefixCache.hidden
    monkeypatch.setattr(fastpath.PrefixCache, "hidden", lambda self, idx, w: 2.0 * real(self, idx, w))
    msgs: list[str] = []
    s = run(qa_recipe(assets, tmp_path / "r"), log=msgs.append)
    pc = _plan(s)["prefix_cache"]
    assert not pc["enabled"] and "differ" in pc["why_not"]
    assert any(m.startswith("prefix cache: off (cached and full forwards differ") for m in msgs)
    off = run(qa_recipe(assets, tmp_path / "off", **{"train.prefix_cache": False}), log=lambda m: None)
    assert s["losses"] == off["losses"]  # trained on the plain forwards
