"""SHA256SUMS: every file of an export hashed (`sha256sum -c` format), and the check of it."""

from __future__ import annotations

from pathlib import Path

from memsurgery._hashing import sha256_file, sha256_files
from memsurgery.errors import RuntimeFailure

MANIFEST = "SHA256SUMS"


def weights_sha256(root: Path) -> str:
    """sha256 over the weight files' bytes in sorted-name order (as checkpoint.reader does)."""
    return sha256_files(sorted(root.glob("*.safetensors")))


def write_manifest(root: Path) -> list[str]:
    """Write SHA256SUMS for every file under `root` (relative POSIX paths, sorted)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [p.relative_to(root).as_posix() for p in files]


def check_manifest(root: Path) -> int:
    """Re-hash every file named in SHA256SUMS; RuntimeFailure on a missing, extra or changed file."""
    root = Path(root)
    man = root / MANIFEST
    if not man.is_file():
        raise RuntimeFailure(f"{root}: no {MANIFEST} manifest; not a memsurgery export")
    listed = {}
    for n, line in enumerate(man.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise RuntimeFailure(f"{man}:{n}: malformed manifest line")
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(set(listed) - present):
        raise RuntimeFailure(f"{root}: {name} is listed in {MANIFEST} but missing")
    for name in sorted(present - set(listed)):
        raise RuntimeFailure(f"{root}: {name} is not listed in {MANIFEST}")
    for name, digest in sorted(listed.items()):
        if sha256_file(root / name) != digest:
            raise RuntimeFailure(f"{root}: {name} does not match its SHA-256 in {MANIFEST} (corrupted or modified)")
    return len(listed)
