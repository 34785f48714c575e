"""Batched greedy decoding with stop sequences and answer log-probabilities.

Prompts are sorted by length and left padded (so every row's last prompt token is at
index -1, where the memory signals are read); position ids follow the attention mask.
Each step appends the argmax token; a row stops at EOS or once its text (leading
spaces ignored) contains a stop sequence, and its answer is the text before the first
stop. The answer's log-probability sums the greedy tokens up to the one that
completes the answer (at least one token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# No "," stop: some answers contain one ("January 27, 1994"); metrics.answer_candidates
# tries the text before the first comma instead.
DEFAULT_STOPS = ("\n", ". ", ";", "?", "!", "Q:")


@dataclass
class Generation:
    prompt: str
    answer: str  # generated text cut at the first stop, leading spaces removed
    raw: str  # everything generated
    n_tokens: int  # tokens counted in the answer's log-probability
    logprobs: list = field(default_factory=list)  # per generated token
    memory: dict | None = None  # {"signals": ..., "slots": ...} of a grafted model

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs[: self.n_tokens]))

    @property
    def logprob_mean(self) -> float:
        return self.logprob_sum / max(1, self.n_tokens)


def _cut(text: str, stops) -> tuple[str, bool]:
    body = text.lstrip(" ")
    cut = min((i for i in (body.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return body, False
    return body[:cut], True


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def _cache_kw(model) -> str:
    # transformers >= 5.2x renamed past_key_values to cache (the old name warns).
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _keep_last(model) -> dict:
    # Only the last position's logits are needed from the prompt pass.
    import inspect

    try:
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


def _past(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _entity_tokens(tokenizer, prompt: str, entity: str | None) -> list[bool] | None:
    """Per prompt token: does it overlap the entity's characters (first occurrence)? None if unknown."""
    if not entity or entity not in prompt:
        return None
    start = prompt.find(entity)
    end = start + len(entity)
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):  # slow tokenizers have no offsets
        return None
    return [a < end and b > start and b > a for a, b in offsets]


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts, max_new_tokens, stops, capture, entities=None) -> list[Generation]:
    device = _device(model)
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    B, T = len(enc), max(len(e) for e in enc)
    pad = _pad_id(tokenizer)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(enc):
        ids[b, T - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[b, T - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)

    if capture is not None:
        capture.set_active(True)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **_keep_last(model))
        memory = [None] * B
        if capture is not None:
            ent = None
            if entities is not None:
                ent = torch.zeros((B, T), dtype=torch.bool)
                for b, (p, e) in enumerate(zip(prompts, entities)):
                    flags = _entity_tokens(tokenizer, p, e)
                    if flags is not None and len(flags) == len(enc[b]):
                        ent[b, T - len(enc[b]):] = torch.tensor(flags, dtype=torch.bool)
            memory = capture.collect(mask, ent)
    finally:
        if capture is not None:
            capture.set_active(False)

    eos = _eos_ids(model, tokenizer)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    past, logits = _past(out), out.logits[:, -1]
    cache_kw = _cache_kw(model)
    pos = pos[:, -1:]
    for step in range(max_new_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)
        nxt = lp.argmax(dim=-1)
        chosen = lp.gather(1, nxt[:, None])[:, 0].cpu().tolist()
        nxt_list = nxt.cpu().tolist()
        for b in range(B):
            if done[b]:
                continue
            if nxt_list[b] in eos:
                done[b] = True
                continue
            tokens[b].append(nxt_list[b])
            logps[b].append(chosen[b])
            if _cut(tokenizer.decode(tokens[b]), stops)[1]:
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    use_cache=True, **{cache_kw: past})
        past, logits = _past(out), out.logits[:, -1]

    results = []
    for b in range(B):
        raw = tokenizer.decode(tokens[b])
        answer, _ = _cut(raw, stops)
        answer = answer.strip()
        n_keep = max(1, len(tokens[b])) if tokens[b] else 0
        for k in range(1, len(tokens[b]) + 1):
            if len(tokenizer.decode(tokens[b][:k]).strip()) >= len(answer):
                n_keep = k
                break
        results.append(Generation(prompts[b], answer, raw, n_keep, logps[b], memory[b]))
    return results


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 12, stops=DEFAULT_STOPS,
             batch_size: int = 64, capture=None, entities: list[str | None] | None = None) -> list[Generation]:
    """Greedy answers for `prompts`, in input order (batched by similar length).

    `entities` (one per prompt, or None) marks the entity's tokens for the *_entity memory signals.
    """
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            ents = [entities[i] for i in chunk] if entities is not None else None
            for i, g in zip(chunk, _generate_batch(model, tokenizer, [prompts[i] for i in chunk],
                                                   max_new_tokens, stops, capture, ents)):
                out[i] = g
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
