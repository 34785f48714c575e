"""`memsurgery export SRC OUT --format memory-adapter`: the memory of a memory-only training
run (or of a fresh graft) as an adapter over its unchanged base (files: adapter.py).

The base is `--base`, else the graft's recorded source (graft.json), else its recorded Hub
id. Before anything is written: the base's weight files must hash to what the graft
recorded, and every non-memory tensor of the trained model must equal the base's (so base +
adapter is the trained model; `method: full` or `lora` runs change the base and are
refused). After writing, the adapter is loaded back onto the base from the files and its
logits compared with the trained model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memsurgery.errors import InputError, RuntimeFailure


def _find_base(model_dir: Path, base, origin: dict, graft: dict | None):
    from memsurgery.checkpoint.hub import is_hub_id

    if base is not None:
        return base
    recorded = (graft or {}).get("source")
    if recorded and (Path(recorded).exists() or is_hub_id(recorded)):
        return recorded
    if origin.get("base_model"):
        return origin["base_model"]
    raise InputError(f"{model_dir}: cannot find the base model the memory was grafted onto "
                     f"(graft.json source {recorded!r} is not here); pass it with --base")


def _open_base(base, graft: dict | None, check_base: bool):
    from memsurgery.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    sha = ck.weights_sha256()
    want = (graft or {}).get("source_sha256")
    if check_base and want and sha != want:
        raise InputError(f"{base}: weights SHA-256 {sha[:12]}... is not the graft's base ({want[:12]}...); "
                         "give the checkpoint the memory was grafted onto (--base), or --no-check-base")
    return ck.load_model(dtype=torch.float32).eval(), sha


def export_adapter(*, src, model_dir, run_dir, out, reports, dtype, dev, origin, base, check_base, force, verify,
                   log) -> dict:
    from memsurgery._atomic import atomic_output_dir, publish_modes
    from memsurgery.export import hf
    from memsurgery.export.adapter import base_differences, save_memory_adapter
    from memsurgery.export.card import adapter_card
    from memsurgery.export.manifest import write_manifest
    from memsurgery.export.provenance import copy_reports, provenance_base, read_json, training_info

    if not hf.is_grafted_config(read_json(model_dir / "config.json") or {}):
        raise InputError(f"{src}: --format memory-adapter needs a grafted model (this one has no memory)")
    graft = read_json(model_dir / "graft.json")
    base = _find_base(model_dir, base, origin, graft)
    log(f"loading the grafted model from {model_dir} and its base {base}")
    model = hf.load_grafted(model_dir, dtype=torch.float32).eval()
    base_model, base_sha = _open_base(base, graft, check_base)
    changed = base_differences(model, base_model)
    if changed:
        raise InputError(f"{src}: {len(changed)} base tensors differ from {base} (e.g. {changed[0]}): training "
                         "changed the base, so the memory alone does not reproduce the model; export the merged "
                         "checkpoint (--format merged)")
    provenance = provenance_base(src, model_dir, dtype, origin, reports)
    provenance.update(grafted=True, format="memory-adapter", training=training_info(run_dir),
                      base={"model": str(base), "weights_sha256": base_sha})
    with atomic_output_dir(out, force=force) as tmp:
        log(f"writing {out}")
        meta = save_memory_adapter(model, tmp, base_weights_sha256=base_sha, base_model=origin.get("base_model"),
                                   license=origin.get("license"), dtype=getattr(torch, dtype))
        files = {"README.md": adapter_card(out.name, meta, {k: v for k, (_, v) in reports.items()}),
                 "export.json": json.dumps(provenance, indent=2, default=str) + "\n"}
        if graft is not None:
            files["graft.json"] = (model_dir / "graft.json").read_text(encoding="utf-8")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        copy_reports(tmp, reports)
        publish_modes(tmp)
        write_manifest(tmp)
        publish_modes(tmp)
        provenance["verification"] = None
        if verify:
            log("verifying: the adapter loaded back onto the base gives the trained model's logits")
            provenance["verification"] = _verify(tmp, model, base_model, dtype, dev)
    return provenance


def _verify(tmp: Path, model, base_model, dtype: str, dev) -> dict:
    from memsurgery.export.adapter import load_memory_adapter
    from memsurgery.export.manifest import check_manifest

    n = check_manifest(tmp)
    again = load_memory_adapter(base_model, tmp).to(dev)
    ids = (torch.arange(24, dtype=torch.long) * 7919 % int(model.config.vocab_size))[None].to(dev)
    with torch.no_grad():
        ref = model.to(dev)(input_ids=ids).logits.float()
        got = again(input_ids=ids).logits.float()
    diff = float((got - ref).abs().max())
    # float32: the same tensors, the same arithmetic (exactly equal in practice); 16-bit: rounded values
    tol = (1e-5 if dtype == "float32" else 5e-2) * max(1.0, float(ref.abs().max()))
    if not diff <= tol:
        raise RuntimeFailure(f"export verification: base + adapter logits differ by {diff:.3g} (> {tol:.3g}) "
                             "from the trained model's; the adapter is not faithful")
    return {"manifest_files": n, "max_abs_logit_diff": diff, "tolerance": tol, "check_tokens": int(ids.numel())}
