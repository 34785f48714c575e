"""Causal tracing (ROME-style) to choose graft layers from measurement: `--layers auto`.

Meng et al. (ROME, 2022) found that factual recall runs through mid-layer MLPs at
the last token of the subject. This module measures the same thing on the model
being grafted, so the memory goes where the model already does its fact lookup:

    facts   = load_facts(None)                       # bundled set, or a user's JSONL
    profile = trace_layers(model, tokenizer, facts)  # per-layer indirect effect
    layers  = choose_layers(profile, k=3)            # strongest layers, spread out
    render_trace(profile, console, chosen=layers)

(`trace_checkpoint` does the first three for an opened Checkpoint: `inspect --trace`.)

For every fact the model gets right (the greedy continuation of the prompt is one
of the answers), three kinds of run:

  clean      the prompt as is; every layer's MLP output is recorded, and
             p_clean = P(first answer token);
  corrupted  Gaussian noise added to the input embeddings of the subject tokens
             (std 3x the std of subject-token embeddings, as ROME), so the model
             can no longer tell who the subject is: p_corrupted;
  restored   corrupted, except that layer L's MLP output at the last subject token
             (with `window` > 1, the MLPs of `window` layers around L) is put back
             to its clean value: p_restored(L).

The indirect effect of layer L is p_restored(L) - p_corrupted: how much of the
recall comes back when just that MLP sees the real subject. It is averaged over
facts and noise samples; `normalized` divides by p_clean - p_corrupted (the most
any restoration could bring back), aggregated over facts first so that facts the
noise barely hurt cannot blow the ratio up.

Cost: per fact one clean forward plus one batched forward of samples x
(num_layers + 1) rows (a corrupted baseline and one restoration per layer, all
with the same noise draw per sample). All rows agree up to the last subject token,
so the batched forward only runs the tokens from there on, after a KV cache of
the rest: for "The capital of France is", 2 of 5 tokens.

`choose_layers` never picks the first layer by default: its MLP output dominates
each token's residual (in SmolLM2-135M it is ~30x the embedding's norm), so
restoring it mostly undoes the noise itself; see its docstring.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from memsurgery.errors import InputError, UsageError, one_line

BUNDLED_FACTS = "trace_facts.jsonl"

# Defaults sized for a ~135M model on 2 CPU cores in well under a minute (see
# docs/graft.md); larger models on a GPU can afford more facts and samples.
DEFAULT_MAX_FACTS = 50
DEFAULT_SAMPLES = 2
NOISE_MULTIPLIER = 3.0  # ROME: noise std = 3 x the std of subject embeddings
MAX_ANSWER_TOKENS = 8  # answers are checked token by token; longer ones are cut here


# ------------------------------------------------------------------------ facts


def bundled_facts_path() -> Path:
    """Path of the bundled fact set (built by scripts/make_trace_facts.py)."""
    return Path(str(resources.files("memsurgery").joinpath("data", BUNDLED_FACTS)))


def _check_fact(raw, where: str, space_answers: bool = False) -> dict:
    """Validate one fact record; return it as {"id","prompt","subject","answers","relation"}.

    With `space_answers`, answers that should continue the prompt after a space get one.
    """
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    prompt, subject = raw.get("prompt"), raw.get("subject")
    answers = raw.get("answers", raw.get("answer"))
    if isinstance(answers, str):  # a single answer is a common shorthand
        answers = [answers]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(subject, str) or not subject.strip():
        raise InputError(f"{where}: 'subject' must be a non-empty string")
    if subject not in prompt:
        raise InputError(
            f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}"
        )
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise InputError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    # Answers continue the prompt: "... is" + " Paris". An answer written without
    # its leading space would tokenize as a word fragment the model never predicts.
    if space_answers and not prompt[-1].isspace():
        answers = [a if a[0].isspace() else " " + a for a in answers]
    return {
        "id": str(raw.get("id", where)),
        "prompt": prompt,
        "subject": subject,
        "answers": answers,
        "relation": str(raw.get("relation", "")),
    }


def load_facts(path: str | Path | None = None) -> list[dict]:
    """Facts for tracing from a JSONL file (one object per line), or the bundled set for None.

    Each record needs "prompt", "subject" (a substring of the prompt) and "answers"
    (a list; a single "answer" string is accepted too); "id" and "relation" are
    optional. A JSON array of such objects is accepted as well. Answers continue
    the prompt, so when the prompt does not end in whitespace an answer written
    without its leading space gets one ("Lima" -> " Lima"); facts passed straight
    to `trace_layers` are taken as they are. Raises InputError, naming the file and
    line, for anything unusable.
    """
    p = bundled_facts_path() if path is None else Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"trace facts {p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"trace facts {p}: is a directory; pass a .jsonl file") from None
    except UnicodeDecodeError:
        raise InputError(f"trace facts {p}: not UTF-8 text; expected JSON lines") from None
    except OSError as err:
        raise InputError(f"trace facts {p}: cannot read: {err.strerror or err}") from None

    records: list[tuple[str, object]] = []
    if text.lstrip().startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(
                f"trace facts {name}: invalid JSON at line {err.lineno}: {err.msg}"
            ) from None
        records = [(f"{name} item {i + 1}", r) for i, r in enumerate(arr)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{name}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(f"trace facts {name}:{lineno}: invalid JSON: {err.msg}") from None
    if not records:
        raise InputError(f"trace facts {p}: no facts in the file")
    facts = [_check_fact(r, where, space_answers=True) for where, r in records]
    seen: set[str] = set()
    for f in facts:
        if f["id"] in seen:
            raise InputError(f"trace facts {name}: duplicate id {f['id']!r}")
        seen.add(f["id"])
    return facts


# ------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if ids and isinstance(ids[0], list):  # some tokenizers always batch
        ids = ids[0]
    return [int(i) for i in ids]


def _subject_positions(tokenizer, prompt: str, subject: str, ids: list[int]) -> list[int]:
    """Token positions of the (first occurrence of the) subject in the tokenized prompt."""
    start = prompt.index(subject)
    end = start + len(subject)
    if getattr(tokenizer, "is_fast", False):
        # Character offsets are exact even when BPE merges a leading space into the token.
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if (
            offsets
            and isinstance(offsets[0], list)
            and offsets[0]
            and isinstance(offsets[0][0], (list, tuple))
        ):
            offsets = offsets[0]
        if len(offsets) == len(ids):
            pos = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
            if pos:
                return pos
    # Slow tokenizers: the subject covers the tokens between the prefix before it and
    # the prefix through it (exact whenever the subject starts and ends on token bounds).
    lo = len(_encode(tokenizer, prompt[:start])) if start else _n_leading_special(tokenizer)
    hi = len(_encode(tokenizer, prompt[:end]))
    lo, hi = min(lo, len(ids) - 1), min(max(hi, lo + 1), len(ids))
    return list(range(lo, hi))


def _n_leading_special(tokenizer) -> int:
    """How many special tokens the tokenizer puts before any text (BOS: 1, none: 0)."""
    return len(_encode(tokenizer, ""))


def _answer_ids(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> list[int]:
    """Token ids of `answer` as the model would produce them right after `prompt`."""
    full = _encode(tokenizer, prompt + answer)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :][:MAX_ANSWER_TOKENS]
    # The tokenizer merged across the boundary or appends specials: encode alone.
    return _encode(tokenizer, answer, special=False)[:MAX_ANSWER_TOKENS]


# --------------------------------------------------------------------- running


def _model_parts(model):
    """(input embedding module, [MLP module per layer]) via the architecture spec."""
    from memsurgery.arch import spec_for_config

    spec = spec_for_config(model.config)
    n = len(spec.get_layers(model))
    embed = model.get_input_embeddings()
    if embed is None:
        raise InputError(f"{type(model).__name__} has no input embedding module to corrupt")
    return embed, [spec.get_mlp(model, i) for i in range(n)]


def _main_output(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def _hooks(
    embed,
    mlps: Sequence[torch.nn.Module],
    *,
    noise: torch.Tensor | None = None,
    noise_pos: Sequence[int] = (),
    restore: dict[int, torch.Tensor] | None = None,
    restore_pos: Sequence[int] = (),
    clean: Sequence[torch.Tensor] | None = None,
    record: list | None = None,
):
    """Install the tracing hooks for one forward pass; removed on exit.

    Positions are relative to the tokens of this forward (a cached prefix is not counted).

    noise        [B, len(noise_pos), d]: added to the embedding output of row b at noise_pos
    restore      {layer: LongTensor of rows}: in those rows the layer's MLP output at
                 `restore_pos` is overwritten with `clean[layer]` ([len(restore_pos), d],
                 the clean run's values there)
    record       a list to fill with each layer's MLP output of row 0, [T, d]
    """
    handles = []
    try:
        if noise is not None:
            npos = torch.as_tensor(list(noise_pos), dtype=torch.long)

            def add_noise(_mod, _args, out):
                h = _main_output(out).clone()
                h[:, npos.to(h.device)] += noise.to(device=h.device, dtype=h.dtype)
                return _replace_output(out, h)

            handles.append(embed.register_forward_hook(add_noise))
        if record is not None:
            record.clear()
            record.extend([None] * len(mlps))
            for j, mlp in enumerate(mlps):

                def rec(_mod, _args, out, j=j):
                    record[j] = _main_output(out)[0].detach().clone()

                handles.append(mlp.register_forward_hook(rec))
        if restore:
            rpos = torch.as_tensor(list(restore_pos), dtype=torch.long)
            for j, rows in restore.items():
                if rows.numel() == 0:
                    continue

                def put_back(_mod, _args, out, j=j, rows=rows):
                    h = _main_output(out).clone()
                    r, p = rows.to(h.device), rpos.to(h.device)
                    # Advanced indexing [rows x positions]: every restored row gets
                    # the clean activations at every restore position.
                    h[r[:, None], p[None, :]] = clean[j].to(h.dtype).unsqueeze(0)
                    return _replace_output(out, h)

                handles.append(mlps[j].register_forward_hook(put_back))
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model, ids: torch.Tensor, cache=None, *, keep_cache: bool = False):
    """(softmax at the last position [B, V] fp32, cache or None) for `ids` after `cache`."""
    kwargs = {"input_ids": ids, "use_cache": keep_cache or cache is not None}
    if cache is not None:
        kwargs[_cache_argument(model)] = cache
    # Only the last position's logits are needed: skips the vocab projection for every
    # other position (all causal LMs of transformers >= 4.45 take logits_to_keep).
    out = model(**kwargs, logits_to_keep=1)
    keys = out.keys()  # by key: the old attribute name warns on transformers >= 5.24
    new_cache = out["cache"] if "cache" in keys else out.get("past_key_values")
    return out["logits"][:, -1].float().softmax(-1), new_cache


def _cache_argument(model) -> str:
    """The forward's KV-cache keyword: "cache" (transformers >= 5.24) or "past_key_values"."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_prefix(cache, n_tokens: int, rows: int):
    """A private copy of `cache` cut to its first `n_tokens`, repeated to `rows` rows; None if empty."""
    if cache is None or n_tokens == 0:
        return None
    cache = copy.deepcopy(cache)  # forwards extend a cache in place; keep the original
    extra = cache.get_seq_length() - n_tokens
    if extra:
        cache.crop(-extra)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


def _noise_draw(
    seed: int, k: int, samples: int, n_tokens: int, dim: int, std: float
) -> torch.Tensor:
    """The noise for the k-th traced fact, [samples, n_tokens, dim]: fixed by (seed, k) alone.

    Drawn on the CPU from its own generator so results do not depend on the device,
    on the global RNG state, or on how many facts were traced before.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return torch.randn(samples, n_tokens, dim, generator=gen) * std


def _window(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for `layer`: `window` of them centred on it, clipped."""
    # window 1 -> [L]; 10 -> [L-5, L+5); near the ends the window is cut, not shifted.
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def _known_answer(model, device, items: list[dict], batch_size: int = 16) -> None:
    """Mark which facts the model answers: teacher-forced greedy check of each answer.

    Sets item["target"] (first answer token) and item["answer"] when some answer's
    every token is the model's top-1 given the prompt and the answer so far, i.e. greedy
    decoding would produce it. Sequences are right-padded into batches: positions
    before the padding are unaffected under causal attention, so no mask is needed.
    """
    seqs = []  # (item index, answer, answer ids, sequence)
    for i, it in enumerate(items):
        for ans, aids in it["answer_ids"]:
            if aids:
                seqs.append((i, ans, aids, it["ids"] + aids[:-1]))
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        width = max(len(s[3]) for s in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (_, _, _, s) in enumerate(chunk):
            batch[r, : len(s)] = torch.tensor(s)
        pred = model(input_ids=batch.to(device), use_cache=False).logits.argmax(-1).cpu()
        for r, (i, ans, aids, _) in enumerate(chunk):
            it = items[i]
            start = len(it["ids"]) - 1
            got = pred[r, start : start + len(aids)].tolist()
            if got == aids and "target" not in it:
                it["target"], it["answer"] = aids[0], ans


def _stratified(items: list[dict], limit: int) -> list[dict]:
    """Up to `limit` items, taken round-robin across relations (file order within each).

    The bundled set is mostly capitals; round-robin keeps the traced sample from being
    one relation only, and is deterministic without a seed.
    """
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["fact"]["relation"], []).append(it)
    out: list[dict] = []
    queues = [list(g) for g in groups.values()]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


@torch.no_grad()
def trace_layers(
    model,
    tokenizer,
    facts: Sequence[dict],
    *,
    noise: float | None = None,
    samples: int = DEFAULT_SAMPLES,
    window: int = 1,
    max_facts: int = DEFAULT_MAX_FACTS,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Per-layer causal-tracing profile of MLP outputs at the last subject token.

    Returns {"layers", "indirect_effect", "normalized", "stderr", "facts_used", "facts_skipped",
    "facts_known", "clean_prob_mean", "corrupted_prob_mean", "noise_std", "samples",
    "window", "seed", "relations", "fact_ids", "seconds"}; `facts_skipped` counts the
    facts the model does not answer (they are not traced). Raises InputError when it
    answers none.
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    _check_settings(samples, window, max_facts, noise)
    facts = [_check_fact(f, f"fact {i + 1}") for i, f in enumerate(facts)]
    if not facts:
        raise InputError("no trace facts given")

    embed, mlps = _model_parts(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make the runs noisy and non-deterministic
    try:
        items = [_tokenized(tokenizer, f) for f in facts]
        _known_answer(model, device, items)
        known = [it for it in items if "target" in it]
        say(f"the model answers {len(known)} of {len(items)} trace facts")
        if not known:
            raise InputError(
                f"the model answers none of the {len(items)} trace facts correctly; "
                "pass --layers explicitly or --trace FACTS with facts it knows"
            )
        chosen = _stratified(known, max_facts)
        noise_std = _noise_std(embed, chosen, device) if noise is None else float(noise)
        restore = _restore_rows(samples, window, len(mlps))
        runs = []  # (p_clean, p_corrupted, effect per layer) per fact
        for k, it in enumerate(chosen):
            draw = (seed, k, noise_std, samples)
            runs.append(_trace_fact(model, embed, mlps, it, draw, restore, device))
            if (k + 1) % 10 == 0 or k + 1 == len(chosen):
                say(f"traced {k + 1}/{len(chosen)} facts")
    finally:
        model.train(was_training)
    return {
        **_effects(runs, len(mlps)),
        "facts_used": len(chosen),
        "facts_known": len(known),
        "facts_skipped": len(items) - len(known),
        **_clean_and_corrupted(runs),
        "noise_std": round(noise_std, 6),
        "samples": samples,
        "window": window,
        "seed": seed,
        "relations": dict(Counter(it["fact"]["relation"] for it in chosen)),
        "fact_ids": [it["fact"]["id"] for it in chosen],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _check_settings(samples: int, window: int, max_facts: int, noise: float | None) -> None:
    if samples < 1:
        raise UsageError(f"trace samples must be at least 1, got {samples}")
    if window < 1:
        raise UsageError(f"trace window must be at least 1 layer, got {window}")
    if max_facts < 1:
        raise UsageError(f"trace max_facts must be at least 1, got {max_facts}")
    if noise is not None and not (noise > 0 and math.isfinite(noise)):
        raise UsageError(f"trace noise must be a positive number, got {noise}")


def _tokenized(tokenizer, fact: dict) -> dict:
    """A fact with its prompt ids, subject positions and each answer's ids after the prompt."""
    ids = _encode(tokenizer, fact["prompt"])
    return {
        "fact": fact,
        "ids": ids,
        "subj": _subject_positions(tokenizer, fact["prompt"], fact["subject"], ids),
        "answer_ids": [
            (a, _answer_ids(tokenizer, ids, fact["prompt"], a)) for a in fact["answers"]
        ],
    }


def _noise_std(embed, chosen: list[dict], device) -> float:
    """ROME's noise level: 3x the spread of the subject tokens' embeddings.

    Measured at the embedding module's output, so that families that scale embeddings
    inside the module (Gemma) get noise in the units the model sees.
    """
    embs = [
        _main_output(embed(torch.tensor([it["ids"]], device=device)))[0, it["subj"]]
        for it in chosen
    ]
    return NOISE_MULTIPLIER * torch.cat(embs).float().std().item()


def _restore_rows(samples: int, window: int, n_layers: int) -> dict[int, torch.Tensor]:
    """{layer: the batch rows in which that layer's MLP output is restored}.

    A sample's rows are its corrupted baseline (row 0) and one restoration per layer
    (row 1 + L restores the window around L).
    """
    rows_per_sample = n_layers + 1
    restore_rows: dict[int, list[int]] = {j: [] for j in range(n_layers)}
    for s in range(samples):
        for layer in range(n_layers):
            for j in _window(layer, window, n_layers):
                restore_rows[j].append(s * rows_per_sample + 1 + layer)
    return {j: torch.tensor(r, dtype=torch.long) for j, r in restore_rows.items()}


def _trace_fact(model, embed, mlps, it: dict, draw: tuple, restore: dict, device):
    """(p_clean, p_corrupted, indirect effect [layers]) of one fact.

    `draw` = (seed, k, noise std, samples): the k-th traced fact's noise (_noise_draw).
    """
    seed, k, noise_std, samples = draw
    rows_per_sample = len(mlps) + 1
    ids = torch.tensor([it["ids"]], device=device)
    target, subj = it["target"], it["subj"]
    first, last = subj[0], subj[-1]
    clean_mlp: list = []
    with _hooks(embed, mlps, record=clean_mlp):
        probs, clean_cache = _forward(model, ids, keep_cache=True)
    p_clean = probs[0, target].item()

    # One noise draw per sample, shared by that sample's baseline and all its
    # restorations, so their difference measures only the restoration.
    noise = _noise_draw(seed, k, samples, len(subj), clean_mlp[0].shape[-1], noise_std)

    # Every row is identical up to the last subject token (the prefix is clean,
    # the subject's noise is per sample), so only the tokens from the last subject
    # token on are run at full batch width; the rest comes from the KV cache:
    #   tokens [0, first)     clean, cut from the clean run's cache
    #   tokens [first, last)  corrupted, one row per sample
    #   tokens [last, T)      samples x (1 + n_layers) rows
    cache = _cache_prefix(clean_cache, first, samples)
    if last > first:
        with _hooks(embed, mlps, noise=noise[:, :-1], noise_pos=range(last - first)):
            _, cache = _forward(
                model, ids[:, first:last].expand(samples, -1), cache, keep_cache=True
            )
    if cache is not None:
        cache.batch_repeat_interleave(rows_per_sample)
    with _hooks(
        embed,
        mlps,
        noise=noise[:, -1:].repeat_interleave(rows_per_sample, dim=0),
        noise_pos=[0],
        restore=restore,
        restore_pos=[0],
        clean=[out[last : last + 1] for out in clean_mlp],
    ):
        probs, _ = _forward(model, ids[:, last:].expand(samples * rows_per_sample, -1), cache)
    p = probs[:, target].view(samples, rows_per_sample).mean(0).cpu()
    return p_clean, p[0].item(), p[1:] - p[0]


def _effects(runs: list[tuple], n_layers: int) -> dict:
    """The profile's per-layer columns: mean indirect effect, normalized, standard error."""
    effects = [e for _, _, e in runs]
    per_fact = torch.stack(effects)  # [facts, layers]
    ie = per_fact.mean(0)
    # Spread across facts (not noise samples): says whether two layers' effects differ.
    stderr = per_fact.std(0) / math.sqrt(len(effects)) if len(effects) > 1 else torch.zeros_like(ie)
    clean = _clean_and_corrupted(runs)
    gap = clean["clean_prob_mean"] - clean["corrupted_prob_mean"]
    normalized = (ie / gap) if gap > 1e-6 else torch.zeros_like(ie)
    return {
        "layers": list(range(n_layers)),
        "indirect_effect": [float(v) for v in ie],
        "normalized": [float(v) for v in normalized],
        "stderr": [float(v) for v in stderr],
    }


def _clean_and_corrupted(runs: list[tuple]) -> dict:
    clean_p = [c for c, _, _ in runs]
    corrupt_p = [c for _, c, _ in runs]
    return {"clean_prob_mean": sum(clean_p) / len(clean_p),
            "corrupted_prob_mean": sum(corrupt_p) / len(corrupt_p)}


def trace_checkpoint(src, facts: str, log: Callable[[str], None] | None = None) -> dict:
    """`inspect --trace`: the profile of an opened Checkpoint over a fact JSONL ("builtin":
    the bundled set), with the layers `graft --layers auto` would choose under "chosen"."""
    items = load_facts(None if facts == "builtin" else facts)
    tokenizer = src.load_tokenizer()
    if tokenizer is None:
        raise InputError(f"{src.path}: has no tokenizer; --trace needs one")
    model = src.load_model()
    profile = trace_layers(model, tokenizer, items, log=log)
    profile["chosen"] = choose_layers(profile, k=3)
    return profile


# ---------------------------------------------------------------- choosing layers


def _best_spread(effects: list[float], allowed: list[bool], k: int, gap: int) -> list[int] | None:
    """Indices of k allowed entries, pairwise >= gap apart, with the largest total effect (DP)."""
    n = len(effects)
    neg = -math.inf
    # best[i][c]: the largest total of c picks among indices >= i (-inf: impossible)
    best = [[0.0] + [neg] * k for _ in range(n + gap + 1)]
    for i in range(n - 1, -1, -1):
        for c in range(1, k + 1):
            take = best[i + gap][c - 1] + effects[i] if allowed[i] else neg
            best[i][c] = max(best[i + 1][c], take)
    if best[0][k] == neg:
        return None
    out, i, c = [], 0, k
    while c:
        if best[i + 1][c] == best[i][c]:
            i += 1
        else:
            out.append(i)
            i, c = i + gap, c - 1
    return out


def choose_layers(
    profile: dict, k: int = 3, min_gap: int = 2, *, exclude: Sequence[int] = (0,)
) -> list[int]:
    """The `k` layers with the highest indirect effect, pairwise at least `min_gap` apart; sorted.

    Greedy: take the strongest layer, then the strongest one not within `min_gap` of a
    layer already taken, and so on. When greedy boxes itself in (a pick in the middle
    blocks the only spread that fits), fall back to the spread with the largest total
    effect. Raises UsageError when no k layers fit.

    `exclude` (default: the first layer) is never chosen, nor is any layer whose
    restoration window (profile["window"]) covers an excluded layer. Why layer 0: in
    the models measured (SmolLM2) the first MLP's output at a token is ~30x the norm
    of the token's embedding, so it is in effect part of the embedding; restoring it
    undoes the corruption itself (most of the effect) rather than locating recall,
    and a memory there would see little more than the token id.
    """
    if k < 1:
        raise UsageError(f"the number of graft layers must be at least 1, got {k}")
    if min_gap < 1:
        raise UsageError(f"min_gap must be at least 1, got {min_gap}")
    layers = list(profile["layers"])
    effects = [float(v) for v in profile["indirect_effect"]]
    if len(layers) != len(effects) or not layers:
        raise InputError(
            "trace profile: 'layers' and 'indirect_effect' must be non-empty and of equal length"
        )
    n, window = len(layers), int(profile.get("window", 1))
    excluded = {layers.index(x) for x in exclude if x in layers}
    allowed = [not any(j in excluded for j in _window(i, window, n)) for i in range(n)]
    effects = [e if math.isfinite(e) else -1e9 for e in effects]  # NaN/inf: last resort only
    order = sorted((i for i in range(n) if allowed[i]), key=lambda i: (-effects[i], i))
    picked: list[int] = []
    for i in order:  # ties go to the earlier layer
        if all(abs(i - j) >= min_gap for j in picked):
            picked.append(i)
            if len(picked) == k:
                break
    if len(picked) < k:
        picked = _best_spread(effects, allowed, k, min_gap)
    if picked is None:
        why = (
            f" outside layers {sorted(layers[i] for i in range(n) if not allowed[i])}"
            if excluded
            else ""
        )
        raise UsageError(
            f"cannot choose {k} layers at least {min_gap} apart{why} from a {n}-layer model; "
            "ask for fewer layers or pass --layers explicitly"
        )
    return sorted(layers[i] for i in picked)


# ----------------------------------------------------------------------- report


def render_trace(profile: dict, console, chosen: Sequence[int] | None = None) -> None:
    """Print the profile: a summary line and one table row per layer with a text bar."""
    from rich.table import Table

    effects = profile["indirect_effect"]
    # Layer 0 usually dwarfs the rest (see choose_layers), which would flatten every
    # other bar to nothing: scale to the largest of the other layers and cut longer
    # bars with an arrow.
    rest = [abs(v) for layer, v in zip(profile["layers"], effects) if layer != 0]
    top = max(rest or [abs(v) for v in effects] or [0.0]) or 1.0
    width = 30
    chosen = set(chosen or ())
    table = Table(
        title=one_line(
            f"Causal trace: MLP at the last subject token, {profile['facts_used']} facts "
            f"({profile['facts_known']} known, {profile['facts_skipped']} skipped), "
            f"{profile.get('samples', '?')} noise samples, window {profile.get('window', 1)}"
        ),
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    table.add_column("effect ± se", justify="right")
    table.add_column("normalized", justify="right")
    table.add_column("", no_wrap=True)
    stderr = profile.get("stderr") or [None] * len(effects)
    for layer, v, nv, se in zip(profile["layers"], effects, profile["normalized"], stderr):
        n = round(abs(v) / top * width)
        bar = ("█" if v >= 0 else "░") * min(n, width) + ("▶" if n > width else "")
        bar = bar or "·"
        mark = " ◀" if layer in chosen else ""
        eff = f"{v:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
        table.add_row(str(layer), eff, f"{nv:+.1%}", f"[cyan]{bar}[/cyan]{mark}")
    console.print(table)
    console.print(
        f"p(answer): clean {profile['clean_prob_mean']:.3f}, "
        f"corrupted {profile['corrupted_prob_mean']:.3f} (noise std {profile['noise_std']:.4g}); "
        f"{profile['seconds']:.1f} s"
        + (f"; chosen layers {', '.join(map(str, sorted(chosen)))}" if chosen else "")
    )
