"""What several benchmark scripts share: load a model (HF directory or GGUF), peak RSS, log lines.

Benchmarks run in the project's environment (`make setup`, then `.venv/bin/python
benchmarks/<name>.py`), where memsurgery is installed; a script imports this file as
`_common`, its own folder being first on sys.path.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def load_model(path: str | Path):
    """(fp32 causal LM in eval mode, tokenizer) from a Hugging Face directory or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kw = {}
    if p.suffix == ".gguf":
        kw, p = {"gguf_file": p.name}, p.parent
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(p, **kw)
