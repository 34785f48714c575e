"""Calibration data for a graft: texts -> token windows -> the activations each MLP sees.

Key init (keyinit.py) needs samples of what a memory layer will read: the input of
the MLP it sits beside (or replaces), i.e. the hidden state after the pre-MLP norm.
This module provides the three steps:

    texts = load_texts(path)                       # a user's file, or the builtin corpus
    calib, heldout = calibration_split(tok, texts, 100_000, 100_000)   # [n, T] each, disjoint
    acts = capture_mlp_inputs(model, [5, 15, 25], calib)               # {layer: [N, d]}

The builtin corpus (`builtin_corpus()`) is general English that ships with Python,
so `--calib` works offline with no data set: the 79 help topics of
`pydoc_data.topics` plus the docstrings of a fixed list of standard-library
modules, read from their source with `ast` (nothing is imported or executed).
It is deterministic for a given Python version (~113k + ~200k SmolLM2 tokens on
3.11); modules absent from a Python version are skipped.
"""

from __future__ import annotations

import ast
import math
import random
import sysconfig
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from memsurgery.errors import InputError, one_line
from memsurgery.hooks import capture_io, run_until_stopped

# ---------------------------------------------------------------- builtin corpus

# Pure-Python standard-library modules with plenty of prose in their docstrings.
# A fixed list (not a directory walk) so the corpus does not depend on what else is
# installed; the order does not matter (sorted below).
_DOC_MODULES = (
    "_pydecimal",
    "_pyio",
    "_strptime",
    "argparse",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.protocols",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.subprocess",
    "asyncio.tasks",
    "asyncio.transports",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "concurrent.futures._base",
    "concurrent.futures.process",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "dis",
    "doctest",
    "email._policybase",
    "email.charset",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.message",
    "email.policy",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib._bootstrap_external",
    "importlib.abc",
    "importlib.metadata",
    "importlib.resources.abc",
    "importlib.util",
    "inspect",
    "ipaddress",
    "json",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "logging.config",
    "logging.handlers",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing.connection",
    "multiprocessing.managers",
    "multiprocessing.pool",
    "multiprocessing.process",
    "multiprocessing.queues",
    "multiprocessing.shared_memory",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "pydoc",
    "queue",
    "random",
    "re._parser",
    "reprlib",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "symtable",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "turtle",
    "types",
    "typing",
    "unittest.case",
    "unittest.loader",
    "unittest.main",
    "unittest.mock",
    "unittest.result",
    "unittest.runner",
    "unittest.suite",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "wsgiref.handlers",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xml.sax.xmlreader",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipfile",
    "zipimport",
    "zoneinfo._zoneinfo",
)

# Docstrings shorter than this are one-liners ("Return the name.") or boilerplate.
_MIN_DOC_WORDS = 25


def _module_source(stdlib: Path, dotted: str) -> Path | None:
    """Path of a stdlib module's source (module.py or package/__init__.py), or None."""
    base = stdlib.joinpath(*dotted.split("."))
    for cand in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, public class and public function/method docstrings, in source order."""
    out = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append(doc)

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_") and child.name != "__init__":
                continue
            doc = ast.get_docstring(child)
            if doc:
                out.append(doc)
            if isinstance(child, ast.ClassDef):
                walk(child)

    walk(tree)
    return out


@lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    import pydoc_data.topics

    docs: list[str] = []
    seen: set[str] = set()
    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        doc = topics[key].strip()
        if doc and doc not in seen:  # a few topics share one text
            seen.add(doc)
            docs.append(doc)

    # Source files are read and parsed, never imported: no side effects, and the text
    # is exactly what ships with this Python version.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(_DOC_MODULES):
        src = _module_source(stdlib, name)
        if src is None:  # removed or renamed in this Python version
            continue
        try:
            tree = ast.parse(src.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for doc in _docstrings(tree):
            if len(doc.split()) >= _MIN_DOC_WORDS and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def builtin_corpus() -> list[str]:
    """General English available offline: pydoc topics + standard-library docstrings.

    Returns a new list of documents (~1,500 strings, ~1.2M characters, ~310k SmolLM2
    tokens on Python 3.11): the 79 help topics of `pydoc_data.topics` in sorted key
    order, then the module / public class / public function docstrings (at least 25
    words, deduplicated) of a fixed list of pure-Python stdlib modules, in sorted
    module order and source order. Deterministic for a given Python version; no
    network, nothing imported but `pydoc_data`. Cached after the first call (~1-3 s).
    """
    return list(_builtin_corpus())


# ---------------------------------------------------------------- user files

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@contextmanager
def _quiet_datasets():
    """`datasets` with its progress bars and warnings off, restored afterwards."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its parse errors become our InputError
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _root_cause(err: BaseException) -> str:
    """The innermost cause of a chained exception, as 'Type: message'.

    datasets wraps parse errors in a generic DatasetGenerationError; the useful text
    (e.g. "JSON parse error: Missing a comma ... in row 0") is in the cause.
    """
    while err.__cause__ is not None or (
        err.__context__ is not None and not err.__suppress_context__
    ):
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_texts(path: str | Path | None, field: str = "text") -> list[str]:
    """The documents of a calibration file, or the builtin corpus when `path` is None.

    Formats, by extension (read offline with `datasets.load_dataset`):
      .txt              one document per blank-line-separated paragraph
      .jsonl / .json    one record per line (or a JSON array of records); text in `field`
      .parquet          one row per record; text in column `field`
    Empty and whitespace-only documents are dropped. Raises InputError naming the file
    for: a missing file, an unknown extension, a file with no text, a missing field,
    a field that does not hold strings, or a file `datasets` cannot parse.
    """
    if path is None:
        return builtin_corpus()
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"calibration file {path} does not exist; give a .txt, .jsonl, .json or .parquet file"
        )
    kind = _LOADERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"calibration file {path} has an unknown extension {path.suffix!r}; "
            "use .txt (paragraphs), .jsonl/.json (records with a text field) or .parquet"
        )

    if path.stat().st_size == 0:
        raise InputError(f"calibration file {path} is empty; it needs some text")
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    # A private cache directory: nothing is left in ~/.cache, and a file edited in
    # place is never served from a stale cache.
    with (
        _quiet_datasets() as datasets,
        tempfile.TemporaryDirectory(prefix="memsurgery-calib-") as cache,
    ):
        try:
            ds = datasets.load_dataset(
                kind, data_files=str(path), split="train", cache_dir=cache, **kwargs
            )
        except Exception as err:  # noqa: BLE001 -- datasets raises many types for a bad file
            raise InputError(
                one_line(f"cannot read calibration file {path} as {kind}: {_root_cause(err)}")
            ) from None
        column = "text" if kind == "text" else field
        if ds.num_rows == 0:
            raise InputError(f"calibration file {path} is empty; it needs some text")
        if column not in ds.column_names:
            raise InputError(
                f"calibration file {path} has no field {field!r} "
                f"(fields: {', '.join(ds.column_names)}); pass the name of the text field"
            )
        values = list(ds[column])  # materialized before the cache directory goes
    texts = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, str):
            raise InputError(
                f"calibration file {path}: field {column!r} of record {i} is a {type(v).__name__}, "
                "not text; pass the name of a string field"
            )
        if kind == "text":  # paragraphs keep the newlines around them
            v = v.strip()
        if v.strip():
            texts.append(v)
    if not texts:
        where = "" if kind == "text" else f" in field {column!r}"
        raise InputError(f"calibration file {path} has no non-empty text{where}")
    return texts


# ---------------------------------------------------------------- token windows


def _token_stream(tokenizer, texts: list[str], n: int, seed: int) -> torch.Tensor:
    """The first `n` tokens of the shuffled corpus as one stream [n] (int64).

    Documents are shuffled (random.Random(seed), so the order does not depend on
    torch's global RNG), tokenized without special tokens and joined with EOS (when
    the tokenizer has one). Only as many documents as needed are tokenized.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces: list[list[int]] = []
    total = 0
    batch = 64
    for start in range(0, len(order), batch):
        docs = [texts[i] for i in order[start : start + batch]]
        # verbose=False: documents longer than model_max_length are fine here (we cut
        # windows ourselves); don't let the tokenizer warn about them.
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        for seq in ids:
            if eos is not None:
                seq = list(seq) + [eos]
            pieces.append(seq)
            total += len(seq)
        if total >= n:
            break
    if total < n:
        raise InputError(
            f"the calibration corpus has {total} tokens ({len(texts)} documents) but {n} are needed; "
            "give a larger calibration file or ask for fewer tokens"
        )
    stream = torch.tensor([t for seq in pieces for t in seq][:n], dtype=torch.long)
    return stream


def _n_chunks(n_tokens: int, seq_len: int, what: str) -> int:
    if seq_len < 1:
        raise InputError(f"seq_len={seq_len} must be >= 1")
    if n_tokens < 1:
        raise InputError(f"{what}={n_tokens} must be >= 1")
    return math.ceil(n_tokens / seq_len)


def token_chunks(
    tokenizer,
    texts: list[str],
    n_tokens: int,
    seq_len: int = 256,
    seed: int = 0,
    offset_tokens: int = 0,
) -> torch.LongTensor:
    """Contiguous token windows [n_chunks, seq_len], n_chunks = ceil(n_tokens / seq_len).

    The windows cut the shuffled token stream (see `_token_stream`) starting at
    `offset_tokens`: two calls with the same seed and non-overlapping
    [offset, offset + n_chunks * seq_len) ranges never share a token position.
    Windows may span document boundaries (documents are joined with EOS).
    InputError when the corpus is too short (the message gives its size).
    """
    n_chunks = _n_chunks(n_tokens, seq_len, "n_tokens")
    if offset_tokens < 0:
        raise InputError(f"offset_tokens={offset_tokens} must be >= 0")
    stream = _token_stream(tokenizer, texts, offset_tokens + n_chunks * seq_len, seed)
    return stream[offset_tokens:].view(n_chunks, seq_len)


def calibration_split(
    tokenizer,
    texts: list[str],
    calib_tokens: int,
    heldout_tokens: int,
    seq_len: int = 256,
    seed: int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(calib [ceil(calib_tokens/T), T], heldout [ceil(heldout_tokens/T), T]), disjoint.

    Calibration is the start of the shuffled stream, held-out the windows right after
    it: no token position is in both (documents may straddle the boundary). The
    corpus is tokenized once.
    """
    nc = _n_chunks(calib_tokens, seq_len, "calib_tokens")
    nh = _n_chunks(heldout_tokens, seq_len, "heldout_tokens")
    stream = _token_stream(tokenizer, texts, (nc + nh) * seq_len, seed)
    calib = stream[: nc * seq_len].view(nc, seq_len)
    heldout = stream[nc * seq_len :].view(nh, seq_len)
    return calib, heldout


# ---------------------------------------------------------------- activation capture


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_mlp_inputs(
    model,
    layers: list[int],
    input_ids: torch.LongTensor,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    with_outputs: bool = False,
) -> dict[int, torch.Tensor] | dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The input (and optionally output) of each chosen layer's MLP over `input_ids`.

    input_ids: [B, T] token windows (no padding). Runs the model in batches of
    `batch_size` rows with a forward pre-hook on each MLP module (found through the
    architecture spec), so what is captured is exactly what the MLP receives: the
    hidden state after the pre-MLP norm, in the model's dtype, stored as `dtype`.

    Returns {layer: [N, d]} on CPU, N = B*T tokens in row-major order (row b,
    position t -> b*T + t), or N = max_tokens when that is smaller (the first
    max_tokens in that order). With with_outputs=True: {layer: (inputs [N, d],
    outputs [N, d])}, the outputs being the MLP module's return value (before any
    post-MLP norm), which is what a module replacing the MLP must reproduce.

    The model runs in eval mode (restored after) and stops after the deepest chosen
    layer's MLP (its input, or its output with with_outputs). Hooks are removed on
    every exit path.
    """
    from memsurgery.arch import spec_for_config

    if input_ids.dim() != 2:
        raise InputError(
            f"input_ids must be [n_chunks, seq_len], got shape {tuple(input_ids.shape)}"
        )
    if not layers:
        raise InputError("capture_mlp_inputs needs at least one layer index")
    spec = spec_for_config(model.config.to_dict())
    wanted = sorted({int(i) for i in layers})
    mlps = {i: spec.get_mlp(model, i) for i in wanted}  # InputError for an out-of-range layer

    rows, seq_len = input_ids.shape
    n = rows * seq_len if max_tokens is None else min(int(max_tokens), rows * seq_len)
    if n < 1:
        raise InputError(f"max_tokens={max_tokens} leaves no tokens to capture")
    rows = math.ceil(n / seq_len)
    d = spec.hidden_size(model.config.to_dict())
    # Preallocated once: a list of per-batch tensors + torch.cat would double the peak.
    inputs = {i: torch.empty(n, d, dtype=dtype) for i in wanted}
    outputs = {i: torch.empty(n, d, dtype=dtype) for i in wanted} if with_outputs else None
    cursor = [0, 0]  # [start, stop) rows of the buffers the current batch fills

    def keep_input(i, h):
        _store(inputs[i], h, *cursor, dtype)

    def keep_output(i, out):
        _store(outputs[i], out[0] if isinstance(out, tuple) else out, *cursor, dtype)

    device = _model_device(model)
    was_training = model.training
    try:
        model.eval()
        with capture_io(mlps, outputs=with_outputs, stop_after=wanted[-1], on_input=keep_input,
                        on_output=keep_output):
            for r0 in range(0, rows, batch_size):
                r1 = min(rows, r0 + batch_size)
                cursor[0], cursor[1] = r0 * seq_len, min(n, r1 * seq_len)
                run_until_stopped(model, input_ids=input_ids[r0:r1].to(device), use_cache=False)
    finally:
        model.train(was_training)
    if outputs is None:
        return inputs
    return {i: (inputs[i], outputs[i]) for i in wanted}


def _store(buf: torch.Tensor, h: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> None:
    """Rows [start, stop) of a capture buffer from a batch's activations h [b, T, d]."""
    flat = h.reshape(-1, h.shape[-1])[: stop - start]
    buf[start:stop].copy_(flat.to(dtype))  # copy_ moves to CPU as well
