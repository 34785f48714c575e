"""Knowledge-injection ablations on a grafted SmolLM2-135M (issue #7 §3).

Self-contained: graft (cached), a minimal memory-only training loop, and the
evaluation, so every choice of the knowledge-injection recipe can be measured in a
few CPU minutes:

    python benchmarks/ki_ablation.py --run baseline                       # one config
    python benchmarks/ki_ablation.py --run lr3e-2 --set lr_values=3e-2    # overrides
    python benchmarks/ki_ablation.py --table                               # markdown table of all runs

The recommended recipe (docs/results.md, "Ablations"; ~5 CPU minutes of training, ~7 in all):

    python benchmarks/ki_ablation.py --run recipe-200 --set layers=20,24,28 --set knn=8 --set steps=200 \
        --set lr_values=0.2 --set train_gate=true --set lr_gate=1e-2 --set gate_pen=1.0

Each run writes benchmarks/results/ki_ablation/<name>.json (config, metrics,
timings, loss curve, per-signal AUROC). Caches (graft keys, base evaluation,
background slot counts) live in /tmp/ki/cache and are keyed by their inputs.

What is measured (all on the same items for "before" and "after"):
- injected EM: greedy exact match of the answer tokens after the completion prompt
  ("Megan Chang majored in" -> " Accounting"), teacher-forced: the answer counts
  when the argmax at every answer position is the answer token, i.e. greedy decoding
  would produce exactly the answer (what follows it is not checked);
- known accuracy: the same check on `n_known` builtin:world facts (any alias);
- perplexity on `ppl_tokens` held-out tokens of the builtin calibration corpus
  (disjoint from the calibration, graft held-out and regularizer tokens);
- unknown attempted-wrong: the share of look-alike people's items (never trained)
  that the model answers wrongly; with abstention, an item is answered only when the
  memory signal is >= the threshold that keeps 95% of the correctly answered
  injected items;
- memory signals at the last prompt token and over the name's tokens (AUROC of
  injected vs unknown items).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEMSURGERY_THREADS", "1")

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("MEMSURGERY_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = os.environ.get("KI_BASE", str(ROOT / "demo-out" / "smollm2-135m"))
RESULTS = ROOT / "benchmarks" / "results" / "ki_ablation"
CACHE = Path(os.environ.get("KI_CACHE", "/tmp/ki/cache"))

DEFAULTS: dict = dict(
    name="baseline",
    # graft
    layers=[5, 15, 25], slots=65536, heads=4, knn=32, k_dim=256, calib_tokens=16384,
    gate="relevance", gate_bias=-4.0,
    # facts
    n_people=30, n_unknown=30, people_seed=0, paraphrases=3,
    # data / loss: "qa" (answer-only loss on QA pairs), "docs" (full-document loss), "both"
    data="qa", steps=100, batch=16, seed=0,
    # trainable groups
    value_opt="adam", lr_values=1e-2,
    train_gate=False, lr_gate=1e-2,
    train_query=False, train_out=False, lr_dense=1e-4,
    # regularizers on general text (never on the evaluated unknown people):
    # reg = none | kl (KL(base || model) on logits) | l2 (squared memory output)
    reg="none", reg_weight=1.0, reg_batch=4, reg_len=64,
    gate_pen=0.0,  # weight of the mean relevance gate on general text (with train_gate)
    # negatives: look-alike people from a third stream (disjoint from the evaluated unknown
    # ones); their prompts get an L2 on the memory output (and the gate penalty)
    neg_people=0, neg_weight=1.0,
    # sparse memory finetuning (Lin et al. 2025): only the top-t slots by TF-IDF of batch
    # access counts vs background counts get a value update (0 = off)
    smf_top_t=0, smf_bg_tokens=16384,
    # evaluation
    n_known=300, ppl_tokens=8192, eval_steps="",  # eval_steps: "50,100" extra EM checkpoints
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- model + graft


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(BASE)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def grafted(cfg: dict, base, tok):
    """The grafted model (sharing the base's weights); keys/query cached per plan."""
    from safetensors.torch import load_file, save_file

    import memsurgery
    from memsurgery.graft import hf
    from memsurgery.memory import MemoryConfig

    # knn is not part of the key: query and keys do not depend on it (set after loading)
    plan = dict(layers=sorted(cfg["layers"]), slots=cfg["slots"], heads=cfg["heads"], knn=32,
                k_dim=cfg["k_dim"], calib_tokens=cfg["calib_tokens"], heldout_tokens=2048,
                gate=cfg["gate"], mode="parallel", seed=0)
    path = CACHE / f"graft_{_key(plan)}.safetensors"
    mcfg = MemoryConfig.build(slots=plan["slots"], heads=plan["heads"], knn=plan["knn"], k_dim=plan["k_dim"],
                              gate=plan["gate"])
    if not path.exists():
        t = time.perf_counter()
        log(f"grafting {plan} (cache miss)")
        gmodel, _ = memsurgery.graft(BASE, out=None, plan=plan)
        sd = {k: v.contiguous() for k, v in gmodel.memory_bank.state_dict().items() if k != "values.weight"}
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp))
        tmp.rename(path)
        log(f"graft took {time.perf_counter() - t:.0f}s")
        del gmodel
    model = hf.graft_model(base, mcfg, plan["layers"], "parallel")
    sd = load_file(str(path))
    missing, unexpected = model.memory_bank.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"values.weight"}, (missing, unexpected)
    with torch.no_grad():
        model.memory_bank.values.weight.zero_()
        for layer in hf.memory_layers(model).values():
            if layer.gate_bias is not None:
                layer.gate_bias.fill_(cfg["gate_bias"])
            layer.knn = int(cfg["knn"])  # slots read per head (<= 32 here)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


class MemoryOff:
    """Context: every memory layer outputs zeros (the model is then exactly the base)."""

    def __init__(self, model):
        from memsurgery.graft import hf

        self.layers = list(hf.memory_layers(model).values()) if hf.is_grafted_model(model) else []

    def __enter__(self):
        for layer in self.layers:
            layer.forward = lambda x: torch.zeros_like(x)  # instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


class _Stop(Exception):
    pass


def run_to(model, layer_idx: int, ids, mask=None):
    """Forward through decoder layer `layer_idx` (inclusive) and stop (for memory-local losses)."""
    blocks = model.model.layers

    def hook(*_):
        raise _Stop

    h = blocks[layer_idx].register_forward_hook(hook)
    try:
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()


class Prefix:
    """Hidden states entering decoder block `first` for fixed sequences, computed once.

    The base is frozen and no memory sits below `first`, so everything below it is a
    constant of the sequence: training then runs only blocks first..last (3x fewer
    blocks with memories at 20-28). Sequences are right-padded to one length and run
    with the plain causal mask: a real token never attends to a later pad, so the
    real positions are computed exactly as without padding, and every batch can use
    the same mask and rotary tables.
    """

    def __init__(self, model, seqs: list[list[int]], first: int, pad: int = 2, chunk: int = 32):
        self.first = first
        self.lengths = [len(s) for s in seqs]
        ids, _ = _pad(seqs, pad)
        self.ids = ids
        blocks = model.model.layers
        store: list[torch.Tensor] = []
        kw: dict = {}

        def pre(mod, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            kw.update({k: v for k, v in kwargs.items()
                       if k in ("attention_mask", "position_embeddings", "position_ids")})
            raise _Stop

        h = blocks[first].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                for c in range(0, ids.shape[0], chunk):
                    try:
                        model.model(input_ids=ids[c : c + chunk], use_cache=False)
                    except _Stop:
                        pass
        finally:
            h.remove()
        self.h = torch.cat(store)
        self.kw = kw

    def run(self, model, idx, stop_after: int | None = None) -> torch.Tensor:
        """Blocks first..(stop_after or the last) on rows idx; final norm when run to the end."""
        h = self.h[idx]
        blocks = model.model.layers
        end = len(blocks) - 1 if stop_after is None else stop_after
        for i in range(self.first, end + 1):
            h = blocks[i](h, **self.kw)
        return model.model.norm(h) if stop_after is None else h


# ---------------------------------------------------------------- data


def token_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def people_data(cfg: dict, tok) -> dict:
    from memsurgery.facts.people import fact_items, generate_people, people_set

    d = people_set(cfg["n_people"], n_unknown=cfg["n_unknown"], seed=cfg["people_seed"],
                   paraphrases=cfg["paraphrases"])
    negs = []
    if cfg["neg_people"]:
        taken = {p["name"] for p in d["people"]} | {p["name"] for p in d["unknown"]}
        # A third stream: never the evaluated unknown people.
        for p in generate_people(cfg["neg_people"], seed=cfg["people_seed"] + 2_000_017, prefix="n",
                                 exclude=taken):
            negs += [it["prompt"] for it in fact_items(p, "negative")]
    return {"raw": d, "neg_prompts": negs}


def fact_rows(tok, items: list[dict]) -> list[dict]:
    """Items {prompt, answers, entity, kind} -> rows with token ids (one per alias)."""
    rows = []
    for i, it in enumerate(items):
        p = token_ids(tok, it["prompt"])
        name_len = 0
        if it.get("entity") and it["prompt"].startswith(it["entity"]):
            name_len = len(token_ids(tok, it["entity"]))
        for a in it["answers"]:
            rows.append({"item": i, "prompt": p, "answer": token_ids(tok, " " + a.strip()), "name_len": name_len})
    return rows


def known_items(n: int, seed: int = 0) -> list[dict]:
    from memsurgery.facts.world import world_facts

    facts = [f if isinstance(f, dict) else f.__dict__ for f in world_facts()]
    facts = [dict(prompt=f["prompt"], answers=list(f["answers"]), entity=f.get("entity"), kind="known")
             for f in facts]
    rng = random.Random(seed)
    rng.shuffle(facts)
    return facts[:n]


def general_windows(tok, n_tokens: int, seq_len: int, offset: int) -> torch.Tensor:
    from memsurgery.graft.calibration import load_texts, token_chunks

    return token_chunks(tok, load_texts(None), n_tokens, seq_len=seq_len, seed=0, offset_tokens=offset)


# disjoint ranges of the shuffled builtin stream: graft uses [0, calib + 2048)
PPL_OFFSET = 40_000
REG_OFFSET = 60_000
BG_OFFSET = 120_000


# ---------------------------------------------------------------- evaluation


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def score_rows(model, rows: list[dict], signals: bool, batch: int = 64, pad: int = 2) -> dict:
    """Greedy teacher-forced exact match per row, and memory signals per row."""
    from memsurgery.graft import hf

    mem = hf.memory_layers(model) if (signals and hf.is_grafted_model(model)) else {}
    written = None
    if mem:
        written = model.memory_bank.values.weight.abs().amax(dim=1) > 0  # values start at zero
    cap: dict = {}
    handles = []
    for L, layer in mem.items():
        layer.record = True
        handles.append(layer.register_forward_hook(
            lambda m, a, o, L=L: cap.__setitem__(L, (a[0].detach(), o.detach()))))
    correct = [False] * len(rows)
    sig_rows: list[dict] = [dict() for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]) + len(rows[i]["answer"]))
    try:
        for b0 in range(0, len(order), batch):
            idx = order[b0 : b0 + batch]
            seqs = [rows[i]["prompt"] + rows[i]["answer"] for i in idx]
            ids, mask = _pad(seqs, pad)
            h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            pos_b, pos_t, tgt = [], [], []
            for r, i in enumerate(idx):
                lp, la = len(rows[i]["prompt"]), len(rows[i]["answer"])
                for j in range(la):
                    pos_b.append(r)
                    pos_t.append(lp - 1 + j)
                    tgt.append(rows[i]["answer"][j])
            pred = model.lm_head(h[pos_b, pos_t]).argmax(-1).tolist()
            k = 0
            for r, i in enumerate(idx):
                la = len(rows[i]["answer"])
                correct[i] = pred[k : k + la] == tgt[k : k + la]
                k += la
            if not mem:
                continue
            for L, layer in mem.items():
                x, out = cap[L]  # [B, T, d]
                w = layer.last_scores  # [B, T, H, k]
                sl = layer.last_indices
                g = layer.last_gate
                H = w.shape[2]
                wr = (w * written[sl].to(w.dtype)).sum(dim=(-1, -2)) / H  # [B, T]
                onorm = out.norm(dim=-1)  # [B, T]
                topw = w.amax(dim=-1).mean(-1)  # [B, T]
                for r, i in enumerate(idx):
                    lp, nl = len(rows[i]["prompt"]), rows[i]["name_len"]
                    p = lp - 1
                    s = sig_rows[i]
                    raw, _ = layer.select(x[r, p : p + 1])
                    s[f"score_last@{L}"] = float(raw.amax())
                    s[f"written_last@{L}"] = float(wr[r, p])
                    s[f"norm_last@{L}"] = float(onorm[r, p])
                    s[f"topw_last@{L}"] = float(topw[r, p])
                    s[f"norm_prompt_max@{L}"] = float(onorm[r, :lp].max())
                    if g is not None:
                        s[f"gate_last@{L}"] = float(g[r, p])
                        s[f"gate_prompt_max@{L}"] = float(g[r, :lp].max())
                    if nl:
                        s[f"written_name@{L}"] = float(wr[r, :nl].mean())
                        s[f"written_name_max@{L}"] = float(wr[r, :nl].max())
                        s[f"norm_name@{L}"] = float(onorm[r, :nl].max())
                        if g is not None:
                            s[f"gate_name@{L}"] = float(g[r, :nl].max())
    finally:
        for hd in handles:
            hd.remove()
        for layer in mem.values():
            layer.record = False
            layer.last_indices = layer.last_scores = layer.last_gate = None
    # aggregate over layers: max
    for s in sig_rows:
        for name in {k.split("@")[0] for k in list(s)}:
            s[name] = max(v for k, v in s.items() if k.startswith(name + "@"))
    return {"correct": correct, "signals": sig_rows}


def per_item(rows: list[dict], res: dict, n_items: int) -> tuple[list[bool], list[dict]]:
    ok = [False] * n_items
    sig: list[dict] = [dict() for _ in range(n_items)]
    for r, row in enumerate(rows):
        ok[row["item"]] |= res["correct"][r]
        if not sig[row["item"]]:
            sig[row["item"]] = res["signals"][r]
    return ok, sig


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(pos > neg) + 0.5 P(tie) (Mann-Whitney)."""
    if not pos or not neg:
        return float("nan")
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        avg = (i + j + 1) / 2  # ranks i+1..j
        rank_sum += avg * sum(1 for t in allv[i:j] if t[1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def abstention(sig_name: str, inj_ok, inj_sig, unk_ok, unk_sig, known_ok=None, known_sig=None,
               keep: float = 0.95) -> dict:
    """Threshold keeping `keep` of the correct injected answers; effect on unknown/known items."""
    vals = sorted(s[sig_name] for s, ok in zip(inj_sig, inj_ok) if ok and sig_name in s)
    if not vals:
        return {}
    thr = vals[math.floor((1 - keep) * len(vals))]  # >= keep of them are >= thr
    kept = sum(1 for v in vals if v >= thr) / len(vals)
    n_unk = len(unk_ok)
    wrong_before = sum(1 for ok in unk_ok if not ok) / n_unk
    wrong_after = sum(1 for ok, s in zip(unk_ok, unk_sig) if not ok and s.get(sig_name, -1e9) >= thr) / n_unk
    out = {"threshold": thr, "injected_correct_kept": kept, "unknown_attempted_wrong_before": wrong_before,
           "unknown_attempted_wrong_after": wrong_after,
           "reduction": (1 - wrong_after / wrong_before) if wrong_before else float("nan")}
    if known_ok is not None:
        kc = [s.get(sig_name, -1e9) >= thr for s, ok in zip(known_sig, known_ok) if ok]
        out["known_correct_abstained"] = 1 - (sum(kc) / len(kc)) if kc else float("nan")
    return out


def evaluate(model, tok, cfg: dict, data: dict, known: list[dict], ppl_ids, *, signals=True,
             ppl=True, do_known=True) -> dict:
    from memsurgery.graft.distill import perplexity

    t = time.perf_counter()
    d = data["raw"]
    inj = [f for f in d["facts"] if f["kind"] == "injected"]
    unk = [f for f in d["facts"] if f["kind"] == "unknown"]
    out: dict = {}
    r_inj, r_unk = fact_rows(tok, inj), fact_rows(tok, unk)
    inj_ok, inj_sig = per_item(r_inj, score_rows(model, r_inj, signals), len(inj))
    unk_ok, unk_sig = per_item(r_unk, score_rows(model, r_unk, signals), len(unk))
    out["injected_em"] = sum(inj_ok) / len(inj)
    out["unknown_acc"] = sum(unk_ok) / len(unk)
    out["injected_em_by_relation"] = {}
    for rel in sorted({f["relation"] for f in inj}):
        sel = [ok for ok, f in zip(inj_ok, inj) if f["relation"] == rel]
        out["injected_em_by_relation"][rel] = sum(sel) / len(sel)
    known_ok = known_sig = None
    if do_known:
        r_known = fact_rows(tok, known)
        known_ok, known_sig = per_item(r_known, score_rows(model, r_known, signals), len(known))
        out["known_acc"] = sum(known_ok) / len(known)
        out["known_ok"] = [int(x) for x in known_ok]
    if ppl:
        out["ppl"] = perplexity(model, ppl_ids)
    if signals and inj_sig and inj_sig[0]:
        names = sorted(inj_sig[0])
        out["auroc"] = {n: auroc([s[n] for s in inj_sig if n in s], [s[n] for s in unk_sig if n in s])
                        for n in names}
        # AUROC over correctly answered injected items vs unknown (the abstention use)
        out["auroc_correct"] = {
            n: auroc([s[n] for s, ok in zip(inj_sig, inj_ok) if ok and n in s], [s[n] for s in unk_sig if n in s])
            for n in names if "@" not in n}
        agg = [n for n in names if "@" not in n]
        # every signal, per layer too: one layer's reading can separate far better than the max
        out["abstention"] = {n: abstention(n, inj_ok, inj_sig, unk_ok, unk_sig, known_ok, known_sig)
                             for n in names}
        out["items"] = {"injected_ok": [int(x) for x in inj_ok], "unknown_ok": [int(x) for x in unk_ok],
                        "injected_signals": inj_sig, "unknown_signals": unk_sig,
                        "known_signals": known_sig}
        out["signal_means"] = {n: {"injected": sum(s[n] for s in inj_sig) / len(inj_sig),
                                   "unknown": sum(s[n] for s in unk_sig) / len(unk_sig)} for n in agg}
    out["unknown_attempted_wrong"] = sum(1 for ok in unk_ok if not ok) / len(unk)
    out["eval_seconds"] = time.perf_counter() - t
    return out


def base_eval(cfg: dict, base, tok, data, known, ppl_ids) -> dict:
    key = _key({k: cfg[k] for k in ("n_people", "n_unknown", "people_seed", "paraphrases", "n_known",
                                     "ppl_tokens")} | {"v": 2})
    path = CACHE / f"base_eval_{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log("evaluating the base model (cache miss)")
    res = evaluate(base, tok, cfg, data, known, ppl_ids, signals=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------- training


def build_examples(cfg: dict, tok, data: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, loss positions) per training sequence; a position p predicts ids[p]."""
    d = data["raw"]
    qa, docs = [], []
    for q in d["qa"]:
        p, a = token_ids(tok, q["prompt"]), token_ids(tok, q["answer"])
        qa.append((p + a, list(range(len(p), len(p) + len(a)))))
    for doc in d["documents"]:
        ids = token_ids(tok, doc["text"])
        docs.append((ids, list(range(1, len(ids)))))
    return {"qa": qa, "docs": docs}


class Batcher:
    def __init__(self, pool: list, batch: int, rng: random.Random):
        self.pool, self.batch, self.rng, self.order = pool, batch, rng, []

    def next(self) -> list:
        out = []
        while len(out) < self.batch:
            if not self.order:
                self.order = list(range(len(self.pool)))
                self.rng.shuffle(self.order)
            out.append(self.pool[self.order.pop()])
        return out


def lm_loss(model, examples: list, pad: int = 2) -> torch.Tensor:
    ids, mask = _pad([e[0] for e in examples], pad)
    h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    pb, pt, tgt = [], [], []
    for r, (seq, pos) in enumerate(examples):
        for p in pos:
            pb.append(r)
            pt.append(p - 1)
            tgt.append(seq[p])
    logits = model.lm_head(h[pb, pt])
    return F.cross_entropy(logits.float(), torch.tensor(tgt)), mask


def prefix_loss(model, pools: dict, picks: list, tf: torch.Tensor | None = None, mem=None):
    """Mean next-token loss over the loss positions of the picked examples (prefix-cached).

    With `tf` (and the memory layers recording), slot access counts of the real
    (unpadded) positions are added to it: SMF's term frequencies."""
    logits_all, tgt_all, masks = [], [], []
    for name, idx in picks:
        examples, pre = pools[name]
        h = pre.run(model, idx)
        if tf is not None:
            valid = torch.zeros(len(idx), pre.h.shape[1], dtype=torch.bool)
            for r, i in enumerate(idx):
                valid[r, : pre.lengths[i]] = True
            for layer in mem.values():
                picked = layer.last_indices[valid].reshape(-1)
                tf.index_add_(0, picked, torch.ones(picked.numel()))
        pb, pt, tgt = [], [], []
        for r, i in enumerate(idx):
            seq, pos = examples[i]
            for p in pos:
                pb.append(r)
                pt.append(p - 1)
                tgt.append(seq[p])
        logits_all.append(model.lm_head(h[pb, pt]))
        tgt_all += tgt
        m = torch.zeros(len(idx), pre.h.shape[1], dtype=torch.long)
        for r, i in enumerate(idx):
            m[r, : pre.lengths[i]] = 1
        masks.append(m)
    loss = F.cross_entropy(torch.cat(logits_all).float(), torch.tensor(tgt_all))
    return loss, masks[0]


def background_df(model, cfg: dict, tok) -> torch.Tensor:
    """Per-slot document frequency over background windows (SMF's IDF), cached."""
    from memsurgery.graft import hf

    key = _key({k: cfg[k] for k in ("layers", "slots", "heads", "knn", "k_dim", "calib_tokens", "gate",
                                     "smf_bg_tokens")})
    path = CACHE / f"bg_df_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    log("counting background slot accesses (cache miss)")
    seq = 256
    ids = general_windows(tok, cfg["smf_bg_tokens"], seq, BG_OFFSET)
    mem = hf.memory_layers(model)
    df = torch.zeros(cfg["slots"], dtype=torch.float32)
    for layer in mem.values():
        layer.record = True
    try:
        with torch.no_grad():
            for r in range(ids.shape[0]):
                run_to(model, max(mem), ids[r : r + 1])
                seen = torch.zeros(cfg["slots"], dtype=torch.bool)
                for layer in mem.values():
                    seen[layer.last_indices.reshape(-1)] = True
                df += seen.float()
    finally:
        for layer in mem.values():
            layer.record = False
    df = torch.cat([df, torch.tensor([float(ids.shape[0])])])  # last entry: number of documents
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(df, path)
    return df


def train(model, tok, cfg: dict, data: dict) -> dict:
    from memsurgery.graft import hf
    from memsurgery.optim.sparse import SparseRowAdam, SparseRowSGD

    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    mem = hf.memory_layers(model)
    bank = model.memory_bank
    values = bank.values.weight
    values.requires_grad_(True)
    if cfg["value_opt"] == "adam":
        vopt = SparseRowAdam([values], lr=cfg["lr_values"], chunk_rows=16384)
    else:
        vopt = SparseRowSGD([values], lr=cfg["lr_values"], chunk_rows=16384)
    dense_groups = []
    gate_params = [p for layer in mem.values() for p in (layer.gate_weight, layer.gate_bias) if p is not None]
    if cfg["train_gate"] and gate_params:
        dense_groups.append({"params": gate_params, "lr": cfg["lr_gate"]})
    dense = []
    for layer in mem.values():
        if cfg["train_query"]:
            dense += [layer.query.weight, layer.keys]
        if cfg["train_out"]:
            dense += [layer.out_proj.weight] + ([layer.gate_proj.weight] if layer.gate_proj is not None else [])
    if dense:
        dense_groups.append({"params": dense, "lr": cfg["lr_dense"]})
    for g in dense_groups:
        for p in g["params"]:
            p.requires_grad_(True)
    dopt = torch.optim.Adam(dense_groups) if dense_groups else None
    n_trainable = values.numel() + sum(p.numel() for g in dense_groups for p in g["params"])

    ex = build_examples(cfg, tok, data)
    first, last = min(mem), max(mem)
    names = {"qa": ["qa"], "docs": ["docs"], "both": ["qa", "docs"]}[cfg["data"]]
    t_prefix = time.perf_counter()
    pools = {n: (ex[n], Prefix(model, [e[0] for e in ex[n]], first)) for n in names}
    batchers = [Batcher(list(range(len(ex[n]))), max(1, cfg["batch"] // len(names)), rng) for n in names]
    reg_pre = None
    if cfg["reg"] != "none" or cfg["gate_pen"] > 0:
        n_win = max(64, cfg["reg_batch"] * 16)
        reg_ids = general_windows(tok, n_win * cfg["reg_len"], cfg["reg_len"], REG_OFFSET)
        reg_pre = Prefix(model, reg_ids.tolist(), first)
    neg_pre = None
    if data["neg_prompts"]:
        neg_seqs = [token_ids(tok, p) for p in data["neg_prompts"]]
        neg_pre = Prefix(model, neg_seqs, first)
    log(f"prefix caches built in {time.perf_counter() - t_prefix:.1f}s (blocks {first}..)")
    smf = None
    if cfg["smf_top_t"]:
        df = background_df(model, cfg, tok)
        n_docs = float(df[-1])
        smf = torch.log((n_docs + 1) / (df[:-1] + 1))  # IDF per slot

    cap: dict = {}
    handles = [layer.register_forward_hook(lambda m, a, o, L=L: cap.__setitem__(L, (a[0], o)))
               for L, layer in mem.items()]
    curve = []
    eval_at = {int(s) for s in str(cfg["eval_steps"]).split(",") if s.strip()}
    em_curve = {}
    model.train()
    t0 = time.perf_counter()
    c0 = time.process_time()  # CPU seconds: what an idle machine would take (the dev VM is shared)
    slots_touched = torch.zeros(cfg["slots"], dtype=torch.bool)
    try:
        for step in range(1, cfg["steps"] + 1):
            picks = [(n, b.next()) for n, b in zip(names, batchers)]
            if smf is not None:
                for layer in mem.values():
                    layer.record = True
            tf = torch.zeros(cfg["slots"]) if smf is not None else None
            loss, _ = prefix_loss(model, pools, picks, tf, mem)
            total = loss
            parts = {"lm": float(loss.detach())}
            if smf is not None:
                for layer in mem.values():
                    layer.record = False
                score = tf * smf
                top = torch.topk(score, min(cfg["smf_top_t"], int((tf > 0).sum()))).indices
                keep = torch.zeros(cfg["slots"], dtype=torch.bool)
                keep[top] = True
            if reg_pre is not None:
                sel = torch.randint(0, reg_pre.h.shape[0], (cfg["reg_batch"],))
                if cfg["reg"] == "kl":
                    with torch.no_grad(), MemoryOff(model):
                        base_lp = F.log_softmax(model.lm_head(reg_pre.run(model, sel)).float(), -1)
                    lp = F.log_softmax(model.lm_head(reg_pre.run(model, sel)).float(), -1)
                    reg = F.kl_div(lp, base_lp, log_target=True, reduction="none").sum(-1).mean()
                    total = total + cfg["reg_weight"] * reg
                    parts["kl"] = float(reg)
                if cfg["reg"] == "l2" or cfg["gate_pen"] > 0:
                    reg_pre.run(model, sel, stop_after=last)
                    if cfg["reg"] == "l2":
                        reg = sum(cap[L][1].pow(2).sum(-1).mean() for L in mem)
                        total = total + cfg["reg_weight"] * reg
                        parts["l2"] = float(reg)
                    if cfg["gate_pen"] > 0:
                        # the gate recomputed with grad (layer.last_gate is detached)
                        gp = sum(torch.sigmoid(cap[L][0] @ mem[L].gate_weight + mem[L].gate_bias).mean()
                                 for L in mem) / len(mem)
                        total = total + cfg["gate_pen"] * gp
                        parts["gate_pen"] = float(gp)
            if neg_pre is not None:
                nsel = rng.sample(range(neg_pre.h.shape[0]), min(neg_pre.h.shape[0], max(4, cfg["batch"] // 2)))
                neg_pre.run(model, nsel, stop_after=last)
                m = torch.zeros(len(nsel), neg_pre.h.shape[1], dtype=torch.bool)
                for r, i in enumerate(nsel):
                    m[r, : neg_pre.lengths[i]] = True
                nreg = sum(cap[L][1][m].pow(2).sum(-1).mean() for L in mem)
                total = total + cfg["neg_weight"] * nreg
                parts["neg_l2"] = float(nreg)
                if cfg["gate_pen"] > 0 and cfg["train_gate"]:
                    # the gate should stay shut on people the memory was not taught
                    gn = sum(torch.sigmoid(cap[L][0][m] @ mem[L].gate_weight + mem[L].gate_bias).mean()
                             for L in mem) / len(mem)
                    total = total + cfg["neg_weight"] * gn
                    parts["neg_gate"] = float(gn)
            vopt.zero_grad()
            if dopt:
                dopt.zero_grad()
            total.backward()
            g = values.grad
            if g is not None:
                if g.is_sparse:
                    g = g.coalesce()
                    rows = g.indices()[0]
                    if smf is not None:
                        k = keep[rows]
                        g = torch.sparse_coo_tensor(g.indices()[:, k], g.values()[k], g.shape).coalesce()
                        values.grad = g
                        rows = g.indices()[0]
                    slots_touched[rows] = True
                vopt.step()
            if dopt:
                dopt.step()
            curve.append({"step": step, "loss": float(total), **parts, "t": time.perf_counter() - t0})
            if step % 10 == 0 or step == 1:
                log(f"step {step}/{cfg['steps']} " + " ".join(f"{k}={v:.4f}" for k, v in parts.items())
                    + f" ({time.perf_counter() - t0:.0f}s)")
            if step in eval_at:
                model.eval()
                em_curve[step] = evaluate(model, tok, cfg, data, [], None, signals=False, ppl=False,
                                          do_known=False)["injected_em"]
                log(f"  step {step}: injected EM {em_curve[step]:.3f}")
                model.train()
    finally:
        for h in handles:
            h.remove()
        model.eval()
        values.requires_grad_(False)
        for g in dense_groups:
            for p in g["params"]:
                p.requires_grad_(False)
    train_s = time.perf_counter() - t0 - 0.0
    return {"train_seconds": train_s, "train_cpu_seconds": time.process_time() - c0, "curve": curve, "em_curve": em_curve, "trainable_params": n_trainable,
            "slots_written": int((values.abs().amax(1) > 0).sum()), "slots_touched": int(slots_touched.sum())}


# ---------------------------------------------------------------- driver


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        if "," in v:
            return [int(t) for t in v.split(",")]
        return v


def run(cfg: dict) -> dict:
    t_all = time.perf_counter()
    base, tok = load_base()
    data = people_data(cfg, tok)
    known = known_items(cfg["n_known"])
    ppl_ids = general_windows(tok, cfg["ppl_tokens"], 256, PPL_OFFSET)
    before = base_eval(cfg, base, tok, data, known, ppl_ids)
    log(f"base: injected {before['injected_em']:.3f} known {before['known_acc']:.3f} ppl {before['ppl']:.3f} "
        f"unknown attempted-wrong {before['unknown_attempted_wrong']:.3f}")
    model = grafted(cfg, base, tok)
    tr = train(model, tok, cfg, data)
    try:  # the trained memory, for re-analysis (scratch, not a deliverable)
        from safetensors.torch import save_file

        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.memory_bank.state_dict().items()},
                  str(CACHE / f"trained_{cfg['name']}.safetensors"))
    except OSError as err:
        log(f"could not save the trained memory: {err}")
    after = evaluate(model, tok, cfg, data, known, ppl_ids, signals=True)
    flips = sum(1 for a, b in zip(before["known_ok"], after["known_ok"]) if a and not b)
    gains = sum(1 for a, b in zip(before["known_ok"], after["known_ok"]) if b and not a)
    best = max(after.get("auroc", {}).items(), key=lambda kv: kv[1], default=(None, float("nan")))
    res = {
        "name": cfg["name"], "config": cfg, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": "2-core CPU VM, 1 torch thread (shared with other jobs)",
        "before": {k: v for k, v in before.items() if k != "known_ok"},
        "after": {k: v for k, v in after.items() if k != "known_ok"},
        "known_flips": {"lost": flips, "gained": gains},
        "train": {k: v for k, v in tr.items()},
        "best_signal": {"name": best[0], "auroc": best[1],
                        "abstention": after.get("abstention", {}).get(best[0])},
        "total_seconds": time.perf_counter() - t_all,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{cfg['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(path)
    log(summary_line(res))
    return res


def summary_line(r: dict) -> str:
    b, a = r["before"], r["after"]
    bs = r["best_signal"]
    ab = bs.get("abstention") or {}
    return (f"{r['name']}: injected EM {a['injected_em']:.3f} | known {b['known_acc']:.3f}->{a['known_acc']:.3f} | "
            f"ppl {b['ppl']:.3f}->{a['ppl']:.3f} ({100 * (a['ppl'] / b['ppl'] - 1):+.2f}%) | "
            f"best signal {bs['name']} AUROC {bs['auroc']:.3f} | unknown attempted-wrong "
            f"{ab.get('unknown_attempted_wrong_before', float('nan')):.3f}->"
            f"{ab.get('unknown_attempted_wrong_after', float('nan')):.3f} | train {r['train']['train_seconds']:.0f}s")


def table() -> str:
    """Markdown table of every result JSON (oldest first)."""
    rows = []
    for p in sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(p.read_text())
        b, a, bs, c = r["before"], r["after"], r["best_signal"], r["config"]
        ab = bs.get("abstention") or {}
        diff = {k: v for k, v in c.items() if k != "name" and DEFAULTS.get(k) != v}
        rows.append(
            f"| {r['name']} | {', '.join(f'{k}={v}' for k, v in diff.items())} "
            f"| {a['injected_em'] * 100:.1f} | {b['known_acc'] * 100:.1f} → {a['known_acc'] * 100:.1f} "
            f"| {b['ppl']:.2f} → {a['ppl']:.2f} ({100 * (a['ppl'] / b['ppl'] - 1):+.2f}%) | {bs['name']} "
            f"{bs['auroc']:.3f} | {ab.get('unknown_attempted_wrong_before', float('nan')) * 100:.0f} → "
            f"{ab.get('unknown_attempted_wrong_after', float('nan')) * 100:.0f} "
            f"(kept {ab.get('injected_correct_kept', float('nan')) * 100:.0f}%) "
            f"| {r['train']['train_seconds']:.0f} |")
    head = ("| run | settings (vs defaults) | injected EM % | known acc % | ppl | best signal, AUROC "
            "| unknown attempted-wrong % with abstention | train s |\n|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run name (results/<name>.json)")
    ap.add_argument("--set", action="append", default=[], help="key=value config override")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(table())
        return
    cfg = dict(DEFAULTS)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in cfg:
            raise SystemExit(f"unknown key {k!r}; known: {', '.join(cfg)}")
        cfg[k] = parse_value(v) if not isinstance(cfg[k], str) else v
    if args.run:
        cfg["name"] = args.run
    run(cfg)


if __name__ == "__main__":
    main()
