"""SHA-256 of files, streamed (checkpoints are gigabytes; never read one whole)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_files(paths: Iterable[str | Path]) -> str:
    """One digest over the bytes of `paths`, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])
