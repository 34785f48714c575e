"""`memsurgery export`: one standalone Hugging Face directory with the reports and a manifest.

    export("runs/r1", "out/model", probe_reports=["probe/"], dtype="bfloat16")
    export("runs/r1", "out/memory", format="memory-adapter")        # the memory alone (adapter.py)
    export("out/memory", "out/merged", base="HuggingFaceTB/SmolLM2-135M")   # adapter + base, merged

Source: a grafted checkpoint, a dense HF directory, a `memsurgery train` run directory
(its loadable model is run_dir/final/), a memory adapter (with its base), or a Hugging
Face Hub id of any of these. Output (written to a temporary sibling and renamed only
after verification; `push_to_hub` then uploads it, publish.py):

    config.json, *.safetensors, remote code (grafted), tokenizer, generation_config.json
    README.md        model card: Hub front matter, the probe's result, provenance, recipe (card.py)
    recipe.yaml      the training recipe, when the source is a train run directory
    export.json      provenance: source path and SHA-256, graft plan, training info, dtype
    graft.json       the graft report, when the source has one
    reports/<name>/  the probe report directories given
    SHA256SUMS       `sha256sum -c` format, every other file

Verification, before the rename: the manifest is re-read and re-hashed, and a
subprocess that cannot import memsurgery (remote code, plain-PyTorch memory) reloads
the directory and computes logits on a fixed input, compared with the in-memory
model. Any mismatch raises RuntimeFailure and leaves no OUT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from memsurgery.errors import InputError, RuntimeFailure
from memsurgery.export.manifest import MANIFEST, check_manifest, write_manifest  # noqa: F401 - re-exported
from memsurgery.export.provenance import (
    copy_reports,
    origin_for_card,
    provenance_base,
    read_json,
    read_reports,
    training_info,
)

FORMATS = ("merged", "memory-adapter")
_CHECK_TEXT = "The capital of France is Paris. Memory layers store facts."


# A clean process: memsurgery is made unimportable, so the checkpoint must load through
# its own remote code (grafted) or plain transformers (dense).
_RELOAD_SCRIPT = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "memsurgery" or name.startswith("memsurgery."):
            raise ImportError("memsurgery is blocked in the export verification process")
sys.meta_path.insert(0, _Block())
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
src, ids_json, out, dtype, device = sys.argv[1:6]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
model.to(device)
ids = torch.tensor(json.loads(ids_json), dtype=torch.long, device=device)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu().contiguous()
assert not any(m == "memsurgery" or m.startswith("memsurgery.") for m in sys.modules)
save_file({"logits": logits}, out)
"""


def _reload_logits(out_dir: Path, ids: torch.Tensor, dtype: str, device: str = "cpu") -> torch.Tensor:
    """Logits of `out_dir` reloaded in a subprocess without memsurgery."""
    import os

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="memsurgery-verify-") as td:
        dest = Path(td) / "logits.safetensors"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(td) / "modules"),
               "MEMSURGERY_REMOTE_FALLBACK": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(out_dir), json.dumps(ids.tolist()),
                            str(dest), dtype, device], capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            tail = " ".join(r.stderr.strip().splitlines()[-3:])
            raise RuntimeFailure(f"export verification: reloading {out_dir.name} in a clean process failed: {tail}")
        return load_file(str(dest))["logits"]


def verify_export(out_dir: Path, model=None, tokenizer=None, dtype: str = "float32") -> dict:
    """Check the manifest; with `model`, compare its logits with a clean-process reload on its device."""
    out_dir = Path(out_dir)
    n = check_manifest(out_dir)
    res: dict[str, Any] = {"manifest_files": n}
    if model is None:
        return res
    ids = _check_ids(model, tokenizer)
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model(input_ids=ids.to(device)).logits.float().cpu()
    got = _reload_logits(out_dir, ids, dtype, str(device))
    if got.shape != ref.shape:
        raise RuntimeFailure(f"export verification: reloaded logits have shape {tuple(got.shape)}, "
                             f"expected {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    # fp32: the remote-code memory must match memsurgery's to rounding; 16-bit dtypes round at every layer.
    tol = (1e-3 if dtype == "float32" else 5e-2) * max(1.0, float(ref.abs().max()))
    res.update(max_abs_logit_diff=diff, tolerance=tol, check_tokens=int(ids.numel()))
    if not diff <= tol:
        raise RuntimeFailure(f"export verification: reloaded model's logits differ by {diff:.3g} "
                             f"(> {tol:.3g}) from the in-memory model; the export is not faithful")
    return res


def _check_ids(model, tokenizer) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    if tokenizer is not None:
        ids = tokenizer(_CHECK_TEXT)["input_ids"]
        if ids and max(ids) < vocab:
            return torch.tensor([ids], dtype=torch.long)
    return (torch.arange(24, dtype=torch.long) * 7919 % vocab)[None]


# ------------------------------------------------------------------ export


def _resolve_source(src: Path) -> tuple[Path, Path | None]:
    from memsurgery.export.adapter import is_memory_adapter

    if (src / "config.json").is_file() or is_memory_adapter(src):
        return src, None
    if (src / "final" / "config.json").is_file():
        return src / "final", src
    raise InputError(f"{src}: neither a model directory (config.json), a train run directory (final/config.json) "
                     "nor a memory adapter (memory_adapter.json)")


def export(src: str | Path, out: str | Path, *, probe_reports=(), dtype: str = "float32", force: bool = False,
           max_shard_size: str | int = "2GB", verify: bool = True, device: str = "auto", format: str = "merged",
           base=None, base_model: str | None = None, license: str | None = None, check_base: bool = True,
           push_to_hub: str | None = None, private: bool = False, log=lambda msg: None) -> dict:
    """Write `src` as a standalone HF directory (or, format="memory-adapter", its memory alone) at
    `out`, verified; optionally upload it (`push_to_hub`). Returns export.json (see the module docstring)."""
    from memsurgery._atomic import check_output_dir
    from memsurgery._vocab import canonical_dtype, resolve_device
    from memsurgery.checkpoint.hub import resolve_checkpoint

    dtype = canonical_dtype(dtype)
    if format not in FORMATS:
        raise InputError(f"--format {format}: choose {' or '.join(FORMATS)}")
    dev = resolve_device(device)
    out = Path(out)
    check_output_dir(out, force)
    model_dir, run_dir = _resolve_source(resolve_checkpoint(src, what="model, run directory or adapter"))
    if out.absolute() in (model_dir.absolute(), *model_dir.absolute().parents):
        raise InputError(f"{out}: output must not be the source or contain it")
    reports = read_reports(probe_reports)
    job = dict(src=src, model_dir=model_dir, run_dir=run_dir, out=out, reports=reports, dtype=dtype, dev=dev,
               origin=origin_for_card(model_dir, base_model, license), base=base, check_base=check_base, force=force,
               verify=verify, log=log)
    if format == "memory-adapter":
        from memsurgery.export.adapter_export import export_adapter

        provenance = export_adapter(**job)
    else:
        provenance = _export_merged(**job, max_shard_size=max_shard_size)
    if push_to_hub:
        from memsurgery.export.publish import push_to_hub as push

        provenance["hub"] = push(out, push_to_hub, private=private, log=log)
    return provenance


def _export_merged(*, src, model_dir, run_dir, out, reports, dtype, dev, origin, base, check_base, force, verify,
                   log, max_shard_size) -> dict:
    from memsurgery._atomic import atomic_output_dir, publish_modes
    from memsurgery.export.card import model_card

    grafted, model, tokenizer = _load(model_dir, dtype, log, base=base, check_base=check_base)
    provenance = provenance_base(src, model_dir, dtype, origin, reports)
    provenance.update(grafted=grafted, format="merged", training=training_info(run_dir))
    card = model_card(out.name, provenance, {k: v for k, (_, v) in reports.items()})
    extra = {"README.md": card, "export.json": json.dumps(provenance, indent=2, default=str) + "\n"}
    if (provenance["training"] or {}).get("recipe"):
        extra["recipe.yaml"] = provenance["training"]["recipe"]
    if provenance["graft"] is not None:
        extra["graft.json"] = (model_dir / "graft.json").read_text(encoding="utf-8")

    with atomic_output_dir(out, force=force) as tmp:
        log(f"writing {out}")
        _write_model(tmp, model, tokenizer, grafted, extra, max_shard_size)
        copy_reports(tmp, reports)
        publish_modes(tmp)
        write_manifest(tmp)
        publish_modes(tmp)
        provenance["verification"] = None
        if verify:
            log("verifying: manifest, then logits after a clean-process reload")
            provenance["verification"] = verify_export(tmp, model.to(dev), tokenizer, dtype)
    return provenance


def _load(model_dir: Path, dtype: str, log, *, base=None, check_base: bool = True):
    """(grafted?, the model in `dtype` and eval mode, its tokenizer or None)."""
    from transformers import AutoTokenizer

    from memsurgery.export import hf
    from memsurgery.export.adapter import (
        is_memory_adapter,
        load_memory_adapter,
        read_adapter_config,
    )

    tok_dir = model_dir
    if is_memory_adapter(model_dir):
        from memsurgery.checkpoint.hub import resolve_checkpoint

        base = base or read_adapter_config(model_dir).get("base_model")
        if not base:
            raise InputError(f"{model_dir}: a memory adapter that names no base model; pass the base (--base)")
        log(f"loading base {base} and the memory adapter {model_dir}")
        model, grafted, tok_dir = load_memory_adapter(base, model_dir, check_base=check_base), True, \
            resolve_checkpoint(base)
    else:
        cfg = read_json(model_dir / "config.json") or {}
        grafted = hf.is_grafted_config(cfg)
        log(f"loading {'grafted' if grafted else 'dense'} model from {model_dir}")
        if grafted:
            model = hf.load_grafted(model_dir, dtype=torch.float32)
        else:
            from memsurgery.checkpoint import open_checkpoint

            model = open_checkpoint(model_dir).load_model(dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = getattr(torch, dtype)  # config.json names the dtype the weights are written in
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError):
        tokenizer = None
    return grafted, model, tokenizer


def _write_model(tmp: Path, model, tokenizer, grafted: bool, extra: dict, max_shard_size) -> None:
    """Weights, config, tokenizer and the extra files (model card, provenance) into `tmp`."""
    from memsurgery.checkpoint.writer import save_hf_model
    from memsurgery.export import hf

    if grafted:
        hf.save_grafted(model.to("cpu"), tmp, tokenizer=tokenizer, max_shard_size=max_shard_size, extra_files=extra)
    else:
        save_hf_model(model.to("cpu"), tmp, max_shard_size=max_shard_size, tokenizer=tokenizer)
        for name, text in extra.items():
            (tmp / name).write_text(text, encoding="utf-8")
