"""Training data: files or builtin fact sets -> tokenized, packed, cached sequences.

Sources (recipe `data.train` / `data.eval`):
  path.txt              paragraphs (blank-line separated) -> {"text"} records
  path.jsonl / .json    one record per line (or a JSON array)
  path.parquet          one record per row
  builtin:corpus        general English (graft's calibration corpus), {"text"}
  builtin:people?n=20&seed=0&paraphrases=3      fact documents ({"text"})
  builtin:people-qa?n=20&seed=0&paraphrases=3   fact questions ({"prompt", "answer"})
Files are read with `datasets` (offline, private temporary cache).

Formats: `text` and `documents` read `text_field`; `qa` reads `prompt_field` and
`answer_field` and joins them with `qa_separator` ("auto": a space unless
one side already has it at the join; answer-only loss masks the
prompt's labels with -100). Every record ends with EOS when `add_eos`.

Packing (`packing: true`) joins all records into one stream cut into `seq_len`
windows (the last window may be shorter). Without packing, each record is its own
sequence; a record longer than `seq_len` is truncated with a warning
(`too_long: truncate`, the default) or refused (`too_long: refuse`). A `seq_len`
beyond the model's context length is always refused.

Tokenized sequences are cached as safetensors under `data.cache_dir` (default
$MEMSURGERY_CACHE/tokenized or ~/.cache/memsurgery/tokenized), keyed by a hash of
the source bytes, the tokenizer and every setting that changes the result.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from memsurgery._hashing import sha256_file as _file_digest
from memsurgery.errors import InputError, one_line

CACHE_VERSION = 1
VIEWS_VERSION = 1  # bump when memsurgery.facts.views renders differently
IGNORE = -100
_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


# ---------------------------------------------------------------- records


def _builtin_people(source: str, key: str) -> tuple[list[dict], str]:
    """Records of builtin:people / builtin:people-qa, and the kind ('documents' | 'qa')."""
    name, _, query = source[len("builtin:"):].partition("?")
    if name == "corpus" and not query:
        from memsurgery.graft.calibration import builtin_corpus

        return [{"text": t} for t in builtin_corpus()], "documents"
    if name not in ("people", "people-qa"):
        raise InputError(f"{key}: unknown builtin data set {source!r}; use builtin:corpus, "
                         "builtin:people?n=20 or builtin:people-qa?n=20")
    params = dict(parse_qsl(query, keep_blank_values=True))
    known = {"n": "n_people", "seed": "seed", "paraphrases": "paraphrases", "unknown": "n_unknown"}
    bad = sorted(set(params) - set(known))
    if bad:
        raise InputError(f"{key}: {source!r} has unknown parameter(s) {bad}; known: n, seed, paraphrases, unknown")
    kwargs = {}
    for k, v in params.items():
        try:
            kwargs[known[k]] = int(v)
        except ValueError:
            raise InputError(f"{key}: {source!r}: {k}={v!r} must be an integer") from None
    try:
        from memsurgery.facts.people import people_set
    except ImportError:
        raise InputError(f"{key}: {source!r} needs memsurgery.facts.people, which this install lacks; "
                         "give a .jsonl file instead") from None
    sets = people_set(**kwargs)
    if name == "people":
        return [{"text": d["text"], "entity": d["entity"]} for d in sets["documents"]], "documents"
    return [{"prompt": q["prompt"], "answer": q["answer"], "entity": q["entity"]} for q in sets["qa"]], "qa"


def load_records(source: str, spec, key: str = "data.train") -> list[dict]:
    """The records of `source` as a list of dicts of strings (only the fields the format needs)."""
    from memsurgery.graft.calibration import _quiet_datasets, _root_cause

    fmt = spec.format
    fields = [spec.prompt_field, spec.answer_field] if fmt == "qa" else [spec.text_field]
    names = ["prompt", "answer"] if fmt == "qa" else ["text"]
    if spec.at_entity:
        fields, names = fields + [spec.entity_field], names + ["entity"]
    if source.startswith("builtin:"):
        records, kind = _builtin_people(source, key)
        if (kind == "qa") != (fmt == "qa"):
            raise InputError(f"{key}: {source!r} holds {'qa' if kind == 'qa' else 'text'} records but "
                             f"data.format is {fmt!r}; "
                             f"use format {'qa' if kind == 'qa' else 'documents'}")
        if "entity" in names and not all("entity" in r for r in records):
            raise InputError(f"{key}: {source!r} has no entity names; data.memory_positions: "
                             f"{spec.memory_positions} needs them")
        return [{f: r[n] for f, n in zip(fields, names)} for r in records]

    path = Path(source)
    if not path.is_file():
        raise InputError(f"{key}: data file {path} does not exist")
    kind = _EXTS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{key}: {path} has an unknown extension {path.suffix!r}; "
                         "use .txt, .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise InputError(f"{key}: data file {path} is empty")
    if kind == "text":
        if fmt == "qa":
            raise InputError(f"{key}: {path} is plain text but data.format is qa; "
                             "give a .jsonl with prompt/answer fields")
        if spec.at_entity:
            raise InputError(f"{key}: {path} is plain text, which names no entity; data.memory_positions: "
                             f"{spec.memory_positions} needs a .jsonl with a {spec.entity_field!r} field")
        fields = ["text"]
    import tempfile

    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="memsurgery-data-") as cache:
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, **kwargs)
        except Exception as err:  # noqa: BLE001 -- datasets raises many types for a bad file
            raise InputError(one_line(f"{key}: cannot read {path} as {kind}: {_root_cause(err)}")) from None
        if ds.num_rows == 0:
            raise InputError(f"{key}: data file {path} has no records")
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            which = ("data.entity_field" if missing[0] == spec.entity_field and spec.at_entity
                     else "data.prompt_field/answer_field" if fmt == "qa" else "data.text_field")
            raise InputError(f"{key}: {path} has no field {missing[0]!r} (fields: "
                             f"{', '.join(ds.column_names)}); set {which}")
        columns = {f: list(ds[f]) for f in fields}
    records = []
    for i in range(len(columns[fields[0]])):
        rec = {}
        for f in fields:
            v = columns[f][i]
            if v is not None and not isinstance(v, str):
                raise InputError(f"{key}: {path} record {i}: field {f!r} is a {type(v).__name__}, not text")
            rec[f] = (v or "").strip() if kind == "text" else (v or "")
        if all(rec[f].strip() for f in fields):
            records.append(rec)
    if not records:
        raise InputError(f"{key}: {path} has no non-empty records in field(s) {', '.join(fields)}")
    if kind == "text":  # map back to the configured text field name
        records = [{spec.text_field: r["text"]} for r in records]
    return records


# ---------------------------------------------------------------- structured facts (format: facts)


def structured_facts(source: str, key: str = "data.train") -> list:
    """The facts to teach (memsurgery.facts.views.Fact) of builtin:people?... or a JSONL of
    {"entity", "relation", "answer"} records (records of kind "unknown" are left out)."""
    from memsurgery.facts.views import people_facts, read_fact_records

    if source.startswith("builtin:"):
        name, _, _ = source.partition("?")
        if name != "builtin:people":
            raise InputError(f"{key}: {source!r}: format facts reads builtin:people?n=... or a .jsonl of "
                             '{"entity", "relation", "answer"} records')
        from memsurgery.facts import people_factset
        from memsurgery.facts.people import Person

        return people_facts([Person(**p) for p in people_factset(source)["people"]])
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{key}: data file {path} does not exist")
    taught, _ = read_fact_records(path, label=f"{key}: {path}")
    if not taught:
        raise InputError(f"{key}: {path} holds only facts of kind unknown; nothing to teach")
    return taught


def fact_views(source: str, spec, key: str = "data.train") -> tuple[list[dict], list[dict], dict]:
    """(QA pairs, documents, info) that `format: facts` trains on, from spec.views."""
    from memsurgery.facts.templates import HELDOUT, load_templates, probe_prompt, templates_for
    from memsurgery.facts.views import documents, training_pairs

    facts = structured_facts(source, key)
    table = load_templates(spec.views.templates) if spec.views.templates else None
    qa = training_pairs(facts, table) if spec.views.qa else []
    docs = documents(facts, spec.views.documents, spec.views.seed, table) if spec.views.documents else []
    phrasings: dict[str, int] = {}
    for r in qa:
        phrasings[r["phrasing"]] = phrasings.get(r["phrasing"], 0) + 1
    f0 = facts[0]
    example = {"entity": f0.entity, "relation": f0.relation, "answer": f0.answer,
               "trained": [r["prompt"] + r["answer"] for r in qa if r["entity"] == f0.entity
                           and r["relation"] == f0.relation],
               "documents": [d["text"] for d in docs if d["entity"] == f0.entity][:1],
               "held_out_never_trained": [probe_prompt(t, f0.entity) for t in templates_for(f0.relation, table)
                                          if t.split == HELDOUT]}
    info = {"facts": len(facts), "entities": len({f.entity for f in facts}), "qa_pairs": len(qa),
            "documents": len(docs), "phrasings": phrasings, "example": example}
    return qa, docs, info


def _tokenize_documents(docs: list[dict], tokenizer, spec) -> list[tuple]:
    """Documents with answer spans: loss on the answers' tokens only when answer_only_loss."""
    eos = tokenizer.eos_token_id if spec.add_eos else None
    entity = spec.at_entity
    enc = tokenizer([d["text"] for d in docs], add_special_tokens=True, verbose=False,
                    return_offsets_mapping=True)
    out = []
    for d, ids, offsets in zip(docs, enc["input_ids"], enc["offset_mapping"]):
        ids = list(ids) + ([eos] if eos is not None else [])
        if spec.answer_only_loss:
            labels = [t if any(a < e and b > s and b > a for s, e in d["spans"]) else IGNORE
                      for t, (a, b) in zip(ids, offsets)]
            labels += [IGNORE] * (len(ids) - len(labels))
        else:
            labels = list(ids)
        if entity:
            flags = _entity_flags(d["text"], d["entity"], offsets, spec.memory_positions)
            out.append((ids, labels, flags + [0] * (len(ids) - len(flags))))
        else:
            out.append((ids, labels))
    return out


def _fact_examples(source: str, tokenizer, spec, key: str) -> tuple[list[tuple], dict]:
    qa, docs, info = fact_views(source, spec, key)
    qa_spec = spec.model_copy(update={"format": "qa", "prompt_field": "prompt", "answer_field": "answer",
                                      "entity_field": "entity"})
    examples = _tokenize(qa, tokenizer, qa_spec) if qa else []
    if docs:
        examples += _tokenize_documents(docs, tokenizer, spec)
    return examples, info


# ---------------------------------------------------------------- sequences


@dataclass
class SequenceSet:
    """Variable-length token sequences stored flat: ids/labels [total] int64, offsets [n+1].

    memory_mask [total] bool (optional, `data.memory_positions: entity`): the tokens at
    which the memory layers act during training (the entity's tokens)."""

    ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    info: dict = field(default_factory=dict)
    memory_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.labels[a:b]

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def n_targets(self) -> int:
        """Tokens that are predicted (label != -100, excluding each sequence's first position)."""
        return int(sum(int((self.get(i)[1][1:] != IGNORE).sum()) for i in range(len(self))))

    def mask(self, i: int) -> torch.Tensor | None:
        if self.memory_mask is None:
            return None
        return self.memory_mask[int(self.offsets[i]):int(self.offsets[i + 1])]

    def subset(self, idx: list[int]) -> SequenceSet:
        parts = [self.get(i) for i in idx]
        lens = torch.tensor([0] + [p[0].numel() for p in parts], dtype=torch.int64)
        mask = None
        if self.memory_mask is not None:
            mask = torch.cat([self.mask(i) for i in idx]) if idx else torch.zeros(0, dtype=torch.bool)
        return SequenceSet(
            torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64),
            torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64),
            torch.cumsum(lens, 0), dict(self.info), mask)

    @classmethod
    def from_lists(cls, seqs: list[tuple], info: dict) -> SequenceSet:
        """`seqs`: (ids, labels) or (ids, labels, memory_mask) lists, all of one kind."""
        lens = torch.tensor([0] + [len(s[0]) for s in seqs], dtype=torch.int64)
        ids = torch.tensor([t for s in seqs for t in s[0]], dtype=torch.int64)
        labels = torch.tensor([t for s in seqs for t in s[1]], dtype=torch.int64)
        mask = None
        if seqs and len(seqs[0]) > 2:
            mask = torch.tensor([bool(t) for s in seqs for t in s[2]], dtype=torch.bool)
        return cls(ids, labels, torch.cumsum(lens, 0), info, mask)


def _separator(sep: str, prompt: str, answer: str) -> str:
    """qa_separator "auto": one space unless the prompt ends or the answer starts with whitespace."""
    if sep != "auto":
        return sep
    return "" if (prompt[-1:].isspace() or answer[:1].isspace()) else " "


def _entity_flags(text: str, entity: str, offsets, positions: str = "entity") -> list[int]:
    """Per token of `text` (its character offsets): 1 where it overlaps an occurrence of `entity`
    (`positions` "entity_last": only the last token of each occurrence, where the whole name has
    been read)."""
    last_only = positions == "entity_last"
    spans, start = [], text.find(entity) if entity else -1
    while start >= 0:
        spans.append((start, start + len(entity)))
        start = text.find(entity, start + 1)
    flags = [0] * len(offsets)
    for s, e in spans:
        hit = [i for i, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
        for i in hit[-1:] if last_only else hit:
            flags[i] = 1
    return flags


def _tokenize(records: list[dict], tokenizer, spec) -> list[tuple]:
    """(ids, labels) per record, or (ids, labels, memory_mask) with `memory_positions: entity`."""
    eos = tokenizer.eos_token_id if spec.add_eos else None
    tail = [eos] if eos is not None else []
    entity = spec.at_entity
    out = []
    batch = 256
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        if spec.format == "qa":
            texts = [r[spec.prompt_field] for r in chunk]
            enc = tokenizer(texts, add_special_tokens=True, verbose=False, return_offsets_mapping=entity)
            answers = tokenizer([_separator(spec.qa_separator, r[spec.prompt_field], r[spec.answer_field])
                                 + r[spec.answer_field] for r in chunk],
                                add_special_tokens=False, verbose=False)["input_ids"]
            for j, (p, a) in enumerate(zip(enc["input_ids"], answers)):
                ids = list(p) + list(a) + tail
                if spec.answer_only_loss:
                    labels = [IGNORE] * len(p) + list(a) + tail
                else:
                    labels = list(ids)
                if entity:
                    flags = _entity_flags(texts[j], chunk[j][spec.entity_field], enc["offset_mapping"][j],
                                          spec.memory_positions)
                    out.append((ids, labels, flags + [0] * (len(ids) - len(flags))))
                else:
                    out.append((ids, labels))
        else:
            texts = [r[spec.text_field] for r in chunk]
            # Packed raw text: no BOS per document (EOS separates them); documents alone
            # get the tokenizer's usual special tokens.
            special = not (spec.format == "text" and spec.packing)
            enc = tokenizer(texts, add_special_tokens=special, verbose=False, return_offsets_mapping=entity)
            for j, ids in enumerate(enc["input_ids"]):
                ids = list(ids) + tail
                if entity:
                    flags = _entity_flags(texts[j], chunk[j][spec.entity_field], enc["offset_mapping"][j],
                                          spec.memory_positions)
                    out.append((ids, list(ids), flags + [0] * len(tail)))
                else:
                    out.append((ids, list(ids)))
    return out


def _sequences(examples, spec, key: str, log) -> tuple[list, dict]:
    """Examples -> training sequences (packed or one per record, truncated); each tuple keeps
    its optional memory mask alongside."""
    info = {"records": len(examples), "truncated": 0, "dropped_no_target": 0}
    seqs = []
    if spec.packing:
        n_parts = len(examples[0]) if examples else 2
        flat = [[t for e in examples for t in e[k]] for k in range(n_parts)]
        for a in range(0, len(flat[0]), spec.seq_len):
            seqs.append(tuple(f[a:a + spec.seq_len] for f in flat))
    else:
        for i, ex in enumerate(examples):
            if len(ex[0]) > spec.seq_len:
                if spec.too_long == "refuse":
                    raise InputError(f"{key}: record {i} has {len(ex[0])} tokens, more than data.seq_len="
                                     f"{spec.seq_len}; raise seq_len, shorten it, or set "
                                     "data.too_long: truncate")
                info["truncated"] += 1
                ex = tuple(part[:spec.seq_len] for part in ex)
            seqs.append(ex)
    kept = [s for s in seqs if len(s[0]) >= 2 and any(t != IGNORE for t in s[1][1:])]
    info["dropped_no_target"] = len(seqs) - len(kept)
    if spec.at_entity:
        info["no_entity_tokens"] = sum(not any(s[2]) for s in kept)
    return kept, info


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()


def cache_root(spec) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir)
    base = os.environ.get("MEMSURGERY_CACHE") or str(Path.home() / ".cache" / "memsurgery")
    return Path(base) / "tokenized"


def _cache_key(source: str, tokenizer, spec) -> str:
    settings = spec.model_dump(mode="json")
    for k in ("train", "eval", "cache_dir"):
        settings.pop(k, None)
    src = source
    if not source.startswith("builtin:"):
        p = Path(source)
        src = _file_digest(p) if p.is_file() else source
    if spec.format == "facts":  # the views depend on the generator and the template table
        from memsurgery.facts.templates import BUILTIN

        tpl = spec.views.templates
        src = [src, VIEWS_VERSION, _file_digest(Path(tpl)) if tpl and Path(tpl).is_file() else tpl,
               json.dumps(BUILTIN, sort_keys=True)]
    blob = json.dumps({"v": CACHE_VERSION, "src": src, "tok": _tokenizer_digest(tokenizer),
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_sequences(source: str, tokenizer, spec, *, key: str = "data.train", max_len: int | None = None,
                   log=lambda m: None) -> SequenceSet:
    """Tokenized sequences of `source` (from the cache when it has them)."""
    from safetensors.torch import load_file

    from memsurgery._atomic import atomic_file

    if max_len is not None and spec.seq_len > max_len:
        raise InputError(f"data.seq_len={spec.seq_len} is longer than the model allows "
                         f"({max_len} positions); lower data.seq_len")
    cache = cache_root(spec) / f"{_cache_key(source, tokenizer, spec)}.safetensors"
    if cache.is_file():
        try:
            t = load_file(str(cache))
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as fh:
                info = json.loads(fh.metadata().get("info", "{}"))
            info["cached"] = True
            mask = t["memory_mask"].bool() if "memory_mask" in t else None
            return SequenceSet(t["ids"], t["labels"], t["offsets"], info, mask)
        except Exception as err:  # noqa: BLE001 -- a damaged cache file is rebuilt
            log(f"warning: tokenization cache {cache} unreadable ({type(err).__name__}); rebuilding")
    views = None
    if spec.format == "facts":
        examples, views = _fact_examples(source, tokenizer, spec, key)
    else:
        examples = _tokenize(load_records(source, spec, key), tokenizer, spec)
    seqs, info = _sequences(examples, spec, key, log)
    if views is not None:
        info["views"] = views
    if not seqs:
        raise InputError(f"{key}: {source} gives no training sequences (every record is empty or "
                         "has no target tokens)")
    if info["truncated"]:
        log(f"warning: {key}: {info['truncated']} of {len(examples)} records are longer than "
            f"data.seq_len={spec.seq_len} and were truncated (data.too_long: refuse to stop instead)")
    if info["dropped_no_target"]:
        log(f"warning: {key}: {info['dropped_no_target']} sequences without target tokens were dropped")
    if info.get("no_entity_tokens"):
        log(f"warning: {key}: {info['no_entity_tokens']} sequences do not contain their entity's name: "
            f"with data.memory_positions: {spec.memory_positions} the memory learns nothing from them")
    out = SequenceSet.from_lists(seqs, info)
    try:
        data = {"ids": out.ids.contiguous(), "labels": out.labels.contiguous(), "offsets": out.offsets}
        if out.memory_mask is not None:
            data["memory_mask"] = out.memory_mask.to(torch.uint8)
        with atomic_file(cache) as fh:
            fh.write(_save_bytes(data, {"info": json.dumps(info)}))
    except OSError as err:  # a read-only cache must not stop training
        log(f"warning: cannot write tokenization cache {cache}: {err}")
    out.info["cached"] = False
    return out


def _save_bytes(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


# ---------------------------------------------------------------- order and batches


class Order:
    """Deterministic sample order: a fresh seeded permutation per epoch.

    The k-th sample of the run (over all epochs) is `perm(seed, k // n)[k % n]`, so
    a run resumed at position k sees exactly the samples it would have seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + count)]


def collate(seqs: SequenceSet, idx: list[int], pad_id: int) -> dict:
    """Right-padded batch; "memory_mask" [B, T] bool too when the set has one (pads False)."""
    parts = [seqs.get(i) for i in idx]
    width = max(p[0].numel() for p in parts)
    ids = torch.full((len(parts), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(parts), width), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(parts), width), dtype=torch.int64)
    for r, (a, b) in enumerate(parts):
        ids[r, :a.numel()] = a
        labels[r, :b.numel()] = b
        mask[r, :a.numel()] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if seqs.memory_mask is not None:
        mm = torch.zeros((len(parts), width), dtype=torch.bool)
        for r, i in enumerate(idx):
            m = seqs.mask(i)
            mm[r, :m.numel()] = m
        batch["memory_mask"] = mm
    return batch


def split_heldout(seqs: SequenceSet, fraction: float, seed: int) -> tuple[SequenceSet, SequenceSet | None]:
    if fraction <= 0:
        return seqs, None
    n = len(seqs)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise InputError(f"eval.heldout_fraction={fraction} leaves no training data ({n} sequences)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17)).tolist()
    ev = sorted(perm[:n_eval])
    tr = sorted(perm[n_eval:])
    return seqs.subset(tr), seqs.subset(ev)
