"""Training checkpoints: atomic directories with a sha256 manifest, no pickle.

    RUN/checkpoints/step-00000020/
        trainable.safetensors   every trainable parameter, by name
        optimizer.safetensors   optimizer tensors ("<optimizer>.<param index>.<key>")
        optimizer.json          optimizer hyperparameters and non-tensor state
        state.safetensors       torch (and CUDA) RNG states, cumulative slot counts
        state.json              step, data position, python/numpy RNG, counters
        manifest.json           format, step, sha256 and size of every file above

A checkpoint is built in a hidden temporary sibling and renamed into place, and the
manifest is written last, so a crash leaves either a complete checkpoint or a
temporary directory that is ignored. Loading verifies every file against the
manifest; a damaged checkpoint is reported and the previous one is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from memsurgery._hashing import sha256_file as _sha256
from memsurgery.errors import InputError

FORMAT = "memsurgery.train.checkpoint/1"
_NAME = re.compile(r"^step-(\d{8})$")




def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    jsons: dict[str, object], keep_last: int) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep_last`; return its path."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        files = {}
        for fname, tdict in tensors.items():
            path = tmp / fname
            save_file({k: v.contiguous() for k, v in tdict.items()}, str(path))
            files[fname] = path
        for fname, obj in jsons.items():
            path = tmp / fname
            path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
            files[fname] = path
        manifest = {"format": FORMAT, "step": step,
                    "files": {f: {"sha256": _sha256(p), "bytes": p.stat().st_size} for f, p in files.items()}}
        for p in files.values():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        with open(tmp / "manifest.json", "rb") as fh:
            os.fsync(fh.fileno())
        final = root / name
        if final.exists():  # rewriting the same step (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, newest first (temporary directories excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> tuple[bool, str]:
    """(ok, reason) for one checkpoint directory."""
    man = path / "manifest.json"
    if not man.is_file():
        return False, "no manifest.json (partial write)"
    try:
        manifest = json.loads(man.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return False, f"unknown format {manifest.get('format')!r}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return False, f"unreadable manifest ({type(err).__name__})"
    for fname, meta in files.items():
        p = path / fname
        if not p.is_file():
            return False, f"{fname} is missing"
        if p.stat().st_size != meta["bytes"]:
            return False, f"{fname} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return False, f"{fname} does not match its sha256"
    return True, ""


def latest_valid(run_dir: Path, log=lambda m: None) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in list_checkpoints(run_dir):
        ok, why = verify(path)
        if ok:
            return path
        log(f"warning: checkpoint {path} is damaged ({why}); using the previous one")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, object]]:
    """({safetensors file: tensors}, {json file: object}) of a verified checkpoint."""
    from safetensors.torch import load_file

    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    tensors, jsons = {}, {}
    for fname in manifest["files"]:
        if fname.endswith(".safetensors"):
            tensors[fname] = load_file(str(path / fname))
        elif fname.endswith(".json"):
            jsons[fname] = json.loads((path / fname).read_text(encoding="utf-8"))
        else:  # pragma: no cover - we never write other kinds
            raise InputError(f"{path}: unexpected checkpoint file {fname}")
    return tensors, jsons


# ---------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) capturing torch, CUDA, numpy and python RNG states."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
