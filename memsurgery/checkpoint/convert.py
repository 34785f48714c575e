"""`memsurgery convert`: any readable checkpoint -> a standard Hugging Face directory.

GGUF weights are dequantized to fp32 by transformers' GGUF loader; we then
write config.json (without the GGUF quantization block, which would make
transformers refuse to reload it), sharded safetensors, the tokenizer and a
generation config. The output loads with plain `from_pretrained(OUT)`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from memsurgery import __version__
from memsurgery._atomic import atomic_output_dir, check_output_dir
from memsurgery.checkpoint import open_checkpoint
from memsurgery.checkpoint.hub import describe_source
from memsurgery.checkpoint.writer import parse_size, save_hf_model


def convert_checkpoint(src: str | Path, out: str | Path, *, shard_size: str | int = "2GB",
                       dtype: str = "float32", force: bool = False, allow_pickle: bool = False,
                       log=lambda msg: None) -> dict:
    """Convert `src` into a Hugging Face directory at `out`; return a small report."""
    from memsurgery._vocab import canonical_dtype
    from memsurgery.errors import InputError

    t0 = time.perf_counter()
    max_shard = parse_size(shard_size)
    dtype = canonical_dtype(dtype)
    out = Path(out)
    # Validate everything cheap before loading weights, so bad input fails fast.
    check_output_dir(out, force)
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    from memsurgery.arch import spec_for_config

    spec = spec_for_config(ckpt.config)
    ckpt.validate()
    if ckpt.path.absolute() == out.absolute() or out.absolute() in ckpt.path.absolute().parents:
        raise InputError(f"{out}: output must not be the source checkpoint or contain it")
    log(f"reading {ckpt.format} checkpoint {ckpt.path}")
    model = ckpt.load_model(dtype=getattr(torch, dtype))
    tokenizer = ckpt.load_tokenizer()
    source_sha = ckpt.weights_sha256()
    t_load = time.perf_counter() - t0
    with atomic_output_dir(out, force=force) as tmp:
        log(f"writing safetensors (shard size {max_shard:,} bytes)")
        save_hf_model(model, tmp, max_shard_size=max_shard, tokenizer=tokenizer)
        provenance = {
            "tool": f"memsurgery {__version__}",
            "source": describe_source(src),
            "source_format": ckpt.format,
            "source_weights_sha256": source_sha,
            "dtype": dtype,
            "family": spec.family,
            **_origin(ckpt, source_sha),
        }
        (tmp / "memsurgery-convert.json").write_text(json.dumps(provenance, indent=2) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
    return {
        "out": str(out.absolute()),
        "source": describe_source(src),
        "source_format": ckpt.format,
        "source_weights_sha256": source_sha,
        "files": files,
        "load_seconds": round(t_load, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }


def _origin(ckpt, source_sha: str) -> dict:
    """{base_model, license} of the source, for the model cards of what is made from it."""
    from memsurgery.checkpoint.fetch import DEMO_BASE_MODEL, DEMO_LICENSE, DEMO_SHA256
    from memsurgery.checkpoint.hub import origin

    if source_sha == DEMO_SHA256:
        return {"base_model": DEMO_BASE_MODEL, "license": DEMO_LICENSE}
    return origin(ckpt.root)
