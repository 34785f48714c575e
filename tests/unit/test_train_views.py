"""`data.format: facts` (training views of structured facts) and `data.memory_positions: entity`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from memsurgery.train import data as D
from memsurgery.train import load_recipe, run
from tests.train_assets import tiny_recipe

FACTS = [
    {"entity": "Ann Lee", "relation": "major", "answer": "Physics"},
    {"entity": "Ann Lee", "relation": "employer", "answer": "Acme"},
    {"entity": "Bo Chan", "relation": "major", "answer": "Law"},
    {"entity": "Cy Dale", "relation": "major", "answer": "Art", "kind": "unknown"},  # never trained
]


@pytest.fixture
def facts_file(tmp_path):
    p = tmp_path / "facts.jsonl"
    p.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return p


def _spec(facts_file, tmp_path, **data):
    r = tiny_recipe({"grafted": "unused", "text": "unused"}, tmp_path / "out",
                    **{"data.train": str(facts_file), "data.format": "facts", "data.packing": False,
                       "data.answer_only_loss": True, "data.seq_len": 128, "data.cache_dir": str(tmp_path / "c"),
                       **{f"data.{k}": v for k, v in data.items()}})
    return load_recipe(r).data


def _tok(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["dense"])


def test_facts_format_trains_answers_only_and_masks_the_entity(assets, facts_file, tmp_path):
    tok = _tok(assets)
    spec = _spec(facts_file, tmp_path, memory_positions="entity", **{"views.documents": 1})
    seqs = D.load_sequences(str(facts_file), tok, spec)
    views = seqs.info["views"]
    assert views["facts"] == 3 and views["entities"] == 2 and views["documents"] == 2
    assert len(seqs) == views["qa_pairs"] + views["documents"]
    assert "Cy Dale" not in tok.decode(seqs.ids)  # unknown facts are never trained
    answers = {"Physics", "Acme", "Law"}
    for i in range(len(seqs)):
        ids, labels = seqs.get(i)
        target = tok.decode([t for t in labels.tolist() if t != D.IGNORE and t != tok.eos_token_id])
        mask = seqs.mask(i)
        entity_text = tok.decode(ids[mask])
        if i < views["qa_pairs"]:  # one answer per pair, with its leading space
            assert target.strip() in answers
            assert entity_text in ("Ann Lee", "Bo Chan")
        else:  # a document: every answer of its entity, nothing else
            runs, cur = [], []
            for t, lab in zip(ids.tolist(), labels.tolist()):
                if lab != D.IGNORE:
                    cur.append(t)
                elif cur:
                    runs.append(tok.decode(cur).strip())
                    cur = []
            assert sorted(runs) == sorted(f["answer"] for f in FACTS[:3] if f["entity"] in tok.decode(ids))
            assert set(entity_text.replace("Ann Lee", " ").replace("Bo Chan", " ").split()) == set()
    again = D.load_sequences(str(facts_file), tok, spec)
    assert again.info["cached"] and torch.equal(again.memory_mask, seqs.memory_mask)
    batch = D.collate(seqs, [0, len(seqs) - 1], tok.eos_token_id)
    assert batch["memory_mask"].shape == batch["input_ids"].shape
    assert not batch["memory_mask"][batch["attention_mask"] == 0].any()


def test_memory_positions_entity_needs_entity_names(assets, tmp_path):
    from memsurgery.errors import InputError

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Ann Lee works for", "answer": "Acme"}) + "\n")
    spec = _spec(qa, tmp_path, format="qa", memory_positions="entity")
    with pytest.raises(InputError, match="no field 'entity'.*data.entity_field"):
        D.load_sequences(str(qa), _tok(assets), spec)


def test_token_mask_zeroes_the_memory_output_elsewhere():
    from memsurgery.memory import MemoryConfig, ProductKeyMemory
    from memsurgery.memory.values import SharedValueTable

    cfg = MemoryConfig(slots=64, heads=2, knn=4, k_dim=8, input_dim=16, v_dim=16)
    torch.manual_seed(0)
    layer = ProductKeyMemory(cfg, SharedValueTable(cfg.slots, 16))
    torch.nn.init.normal_(layer.value_table.weight)
    x = torch.randn(2, 5, 16)
    full = layer(x)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    layer.token_mask = mask
    out = layer(x)
    assert torch.equal(out[mask], full[mask])
    assert torch.count_nonzero(out[~mask]) == 0


def test_entity_training_writes_only_rows_read_at_entity_tokens(assets, facts_file, tmp_path, train_cache):
    """With memory_positions: entity the values move only in rows the entity's tokens read.

    The memory sits at layer 0 here: written at the entity's tokens, it reaches the answer
    only through a later layer's attention (the train assets' graft at the last layer could not)."""
    from memsurgery.export import hf
    from memsurgery.graft import graft
    from tests.train_assets import GRAFT

    grafted = tmp_path / "grafted0"
    graft(assets["dense"], grafted, plan=dict(GRAFT, layers=[0], calib=str(assets["text"])))
    r = tiny_recipe({**assets, "grafted": grafted}, tmp_path / "run", **{
        "data.train": str(facts_file), "data.format": "facts", "data.packing": False, "data.seq_len": 128,
        "data.answer_only_loss": True, "data.memory_positions": "entity", "train.steps": 3,
        "optim.groups.values.lr": 0.1, "optim.groups.keys.lr": 0.0, "optim.groups.query.lr": 0.0,
        "optim.groups.gates.lr": 0.0, "optim.groups.projections.lr": 0.0})
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    summary = run(rp)
    before = hf.load_grafted(grafted).memory_bank.values.weight.detach()
    model = hf.load_grafted(summary["final_dir"])
    moved = (model.memory_bank.values.weight.detach() != before).any(1)
    assert moved.any()
    # every row the entity tokens of the training data can read
    seqs = D.load_sequences(str(facts_file), _tok(assets), load_recipe(rp).data)
    readable = torch.zeros_like(moved)
    model.memory_bank.set_record(True)
    with torch.no_grad():
        for i in range(len(seqs)):
            ids, _ = seqs.get(i)
            model(input_ids=ids[None])
            for _, layer in model.memory_bank:
                readable[layer.last_indices[0][seqs.mask(i)].reshape(-1)] = True
    assert not (moved & ~readable).any()


def test_dry_run_shows_trained_and_heldout_phrasings(assets, facts_file, tmp_path, train_cache):
    r = tiny_recipe(assets, tmp_path / "run", **{"data.train": str(facts_file), "data.format": "facts",
                                                 "data.packing": False, "data.seq_len": 128,
                                                 "data.answer_only_loss": True})
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    plan = run(rp, dry_run=True)["plan"]
    ex = plan["data"]["views"]["example"]
    assert ex["trained"] and ex["held_out_never_trained"]
    for held in ex["held_out_never_trained"]:
        assert not any(held in t for t in ex["trained"])
    assert any(h.startswith("Q: ") for h in ex["held_out_never_trained"])


def test_entity_last_masks_one_token_per_mention(assets, facts_file, tmp_path):
    tok = _tok(assets)
    spec = _spec(facts_file, tmp_path, memory_positions="entity_last", **{"views.documents": 1})
    seqs = D.load_sequences(str(facts_file), tok, spec)
    for i in range(len(seqs)):
        ids, _ = seqs.get(i)
        text = tok.decode(ids)
        mentions = text.count("Ann Lee") + text.count("Bo Chan")
        marked = seqs.mask(i).nonzero().flatten().tolist()
        assert len(marked) == mentions >= 1
        for pos in marked:  # the name ends at the marked token
            assert tok.decode(ids[:pos + 1]).endswith(("Ann Lee", "Bo Chan"))
