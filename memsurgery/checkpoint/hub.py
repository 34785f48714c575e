"""Hugging Face Hub ids wherever a checkpoint path is taken, and what a checkpoint says of its origin.

    resolve_checkpoint("HuggingFaceTB/SmolLM2-135M")          # -> the cached snapshot directory
    resolve_checkpoint("owner/repo@v1.0")                      # a revision (branch, tag or commit)
    resolve_checkpoint("owner/repo-GGUF/model.Q4_K_M.gguf")    # one file of a repo (GGUF repos hold many)
    resolve_checkpoint("runs/r1")                              # an existing local path is returned as is

A local path always wins: an id is only looked up when no such file or directory exists.
Downloads go through `huggingface_hub.snapshot_download` into the usual cache (HF_HUB_CACHE
or HF_HOME/hub), so `HF_HUB_OFFLINE=1` works with a pre-filled cache and nothing else.
Weights in pickle formats are left out of the download unless `allow_pickle`.

`origin(path)` says which Hub model a local checkpoint came from and under what license,
from what memsurgery recorded (memsurgery-convert.json, graft.json, memory_adapter.json),
the cache layout (`models--owner--name/snapshots/...`) and a model card's front matter;
export puts it in the model card's `base_model` / `license`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from memsurgery.errors import InputError, RuntimeFailure

# owner/name, optionally @revision, optionally /path/inside/repo.gguf (a file of the repo)
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                 r"(?P<file>(?:/[\w.-]+)*/[\w.-]+\.gguf)?(?:@(?P<rev>[\w./-]+))?$")
_NEVER = ["*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel",
          "*.pb", "onnx/*", "coreml/*", "flax_model*", "tf_model*"]
_PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
_ORIGIN_FILES = ("memory_adapter.json", "graft.json", "memsurgery-convert.json")


def parse_hub_id(spec: str | Path) -> tuple[str, str | None, str | None] | None:
    """(repo id, file in the repo or None, revision or None) when `spec` reads as a Hub id."""
    m = _ID.match(str(spec))
    if m is None or str(spec).startswith(("./", "../", "/")):
        return None
    return m["repo"], (m["file"] or "").lstrip("/") or None, m["rev"]


def is_hub_id(spec: str | Path) -> bool:
    """True for an id that names no local path (so it would be looked up on the Hub)."""
    return not Path(spec).exists() and parse_hub_id(spec) is not None


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return _env_on("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """Where snapshots are cached: HF_HUB_CACHE, else HF_HOME/hub, read now (not at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_checkpoint(spec: str | Path, *, allow_pickle: bool = False, what: str = "checkpoint") -> Path:
    """A local path for `spec`: the path itself when it exists, else the Hub snapshot (or file).

    InputError (exit 2) for a path that does not exist and is not an id, an unknown repo or
    revision, a gated repo, or an id that is not cached while offline; RuntimeFailure
    (exit 1) when the Hub cannot be reached for another reason.
    """
    if Path(spec).exists():
        return Path(spec)
    parsed = parse_hub_id(spec)
    if parsed is None:
        if Path(spec).is_absolute():
            raise InputError(f"{spec}: no such file or directory")
        raise InputError(f"{spec}: no such file or directory; give a local path or a Hugging Face Hub id "
                         f"(owner/name) of the {what}")
    repo, file, rev = parsed
    try:
        return _download(repo, file, rev, allow_pickle)
    except (InputError, RuntimeFailure):
        raise
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one line
        raise _hub_error(spec, repo, err) from None


def _download(repo: str, file: str | None, rev: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    kw = {"revision": rev, "cache_dir": hub_cache_dir(), "local_files_only": hub_offline()}
    if file is not None:
        return Path(hf_hub_download(repo, file, **kw))
    ignore = _NEVER + ([] if allow_pickle else _PICKLES)
    root = Path(snapshot_download(repo, ignore_patterns=ignore, **kw))
    if not (root / "config.json").is_file():
        ggufs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gguf"))
        hint = (f"; name one of its files, e.g. {repo}/{ggufs[0]}" if ggufs else
                f"; if it holds GGUF files, name one: {repo}/FILE.gguf")
        raise InputError(f"{repo}: the Hub snapshot has no config.json{hint}")
    return root


def _hub_error(spec, repo: str, err: Exception) -> Exception:
    from huggingface_hub import errors as E

    name = type(err).__name__
    if isinstance(err, E.GatedRepoError):
        return InputError(f"{spec}: the repository is gated; accept its terms on huggingface.co and log in "
                          "(hf auth login), or give a local path")
    if isinstance(err, E.RepositoryNotFoundError):
        return InputError(f"{spec}: no such local path, and no such repository on the Hugging Face Hub "
                          "(or it is private: hf auth login); check the path or the id")
    if isinstance(err, E.RevisionNotFoundError):
        return InputError(f"{spec}: no such revision in {repo}; check the part after @")
    if isinstance(err, (E.LocalEntryNotFoundError, getattr(E, "IncompleteSnapshotError", E.LocalEntryNotFoundError))):
        if hub_offline():
            return InputError(f"{spec}: no such local path, and not in the Hugging Face cache "
                              f"({hub_cache_dir()}) while HF_HUB_OFFLINE is set; download it once with network "
                              f"access (hf download {repo}) or give a local path")
        return RuntimeFailure(f"{spec}: no such local path, and the Hugging Face Hub cannot be reached "
                              f"(not cached in {hub_cache_dir()}); check the network, or give a local path")
    if isinstance(err, E.EntryNotFoundError):
        return InputError(f"{spec}: no such file in {repo}; check the file name")
    return RuntimeFailure(f"{spec}: downloading from the Hugging Face Hub failed ({name}: {err}); retry, "
                          "or give a local path")


def describe_source(spec: str | Path) -> str:
    """What provenance records for an input: the Hub id as given, else the absolute path."""
    return str(spec) if is_hub_id(spec) else str(Path(spec).absolute())


# ------------------------------------------------------------------ origin (for model cards)


def hub_id_of(path: str | Path) -> str | None:
    """'owner/name' when `path` lies inside a Hub cache snapshot (models--owner--name/snapshots/...)."""
    for part in Path(path).absolute().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    return None


def card_front_matter(path: str | Path) -> dict:
    """The YAML front matter of `path`/README.md (a model card), or {}."""
    import yaml

    card = Path(path) / "README.md"
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def origin(path: str | Path) -> dict:
    """{"base_model": Hub id or None, "license": str or None} of a local checkpoint directory.

    First what memsurgery recorded beside the weights (an adapter, graft or conversion names
    its base), then the cache layout, then the checkpoint's own model card."""
    root = Path(path)
    root = root if root.is_dir() else root.parent
    out: dict = {"base_model": None, "license": None}
    for name in _ORIGIN_FILES:
        try:
            rec = json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            for key in out:
                out[key] = out[key] or rec.get(key)
    own = hub_id_of(root)
    card = card_front_matter(root)
    lic = card.get("license")
    # A Hub snapshot is its own base: the card that came with it names its license.
    out["base_model"] = out["base_model"] or own
    out["license"] = out["license"] or (lic if isinstance(lic, str) else None)
    return out
