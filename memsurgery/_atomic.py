"""Atomic outputs: write into a temporary sibling, rename into place at the end.

A crash, a bad input discovered half-way, or Ctrl-C leaves no half-written
output behind: either the final path appears complete or nothing does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from memsurgery.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output directory unless `force`."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: output path exists and is not a directory; choose another path")
        if any(out.iterdir()) and not force:
            raise InputError(f"{out}: output directory exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds."""
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes the directory 0700; give it the permissions a plain mkdir would.
    os.chmod(tmp, 0o777 & ~_umask())
    # Swap in: move the old directory aside first so a failure never loses both.
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_modes(root: Path) -> None:
    """Ordinary permissions (0644 files, 0755 dirs, minus the umask) for everything under `root`:
    temp files are created 0600/0700."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        p.chmod((0o755 if p.is_dir() else 0o644) & ~mask)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of `path`; rename over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
