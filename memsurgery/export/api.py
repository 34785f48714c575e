"""`memsurgery export`: one standalone Hugging Face directory with the reports and a manifest.

    export("runs/r1", "out/model", probe_reports=["probe/"], dtype="bfloat16")

Source: a grafted checkpoint, a dense HF directory, or a `memsurgery train` run
directory (its loadable model is run_dir/final/). Output (written to a temporary
sibling and renamed only after verification):

    config.json, *.safetensors, remote code (grafted), tokenizer, generation_config.json
    README.md        model card: probe summary, recipe (graft plan, training recipe), provenance
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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from memsurgery._hashing import sha256_file, sha256_files
from memsurgery.errors import InputError, RuntimeFailure

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MANIFEST = "SHA256SUMS"
_CHECK_TEXT = "The capital of France is Paris. Memory layers store facts."


def _weights_sha256(root: Path) -> str:
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
src, ids_json, out, dtype = sys.argv[1:5]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().contiguous()
assert not any(m == "memsurgery" or m.startswith("memsurgery.") for m in sys.modules)
save_file({"logits": logits}, out)
"""


def _reload_logits(out_dir: Path, ids: torch.Tensor, dtype: str) -> torch.Tensor:
    """Logits of `out_dir` reloaded in a subprocess without memsurgery."""
    import os

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="memsurgery-verify-") as td:
        dest = Path(td) / "logits.safetensors"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(td) / "modules"),
               "MEMSURGERY_REMOTE_FALLBACK": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(out_dir), json.dumps(ids.tolist()),
                            str(dest), dtype], capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            tail = " ".join(r.stderr.strip().splitlines()[-3:])
            raise RuntimeFailure(f"export verification: reloading {out_dir.name} in a clean process failed: {tail}")
        return load_file(str(dest))["logits"]


def verify_export(out_dir: Path, model=None, tokenizer=None, dtype: str = "float32") -> dict:
    """Check the manifest; with `model`, compare its logits with a clean-process reload."""
    out_dir = Path(out_dir)
    n = check_manifest(out_dir)
    res: dict[str, Any] = {"manifest_files": n}
    if model is None:
        return res
    ids = _check_ids(model, tokenizer)
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model(input_ids=ids.to(device)).logits.float().cpu()
    got = _reload_logits(out_dir, ids, dtype)
    if got.shape != ref.shape:
        raise RuntimeFailure(f"export verification: reloaded logits have shape {tuple(got.shape)}, "
                             f"expected {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    # fp32: the remote-code memory must match memsurgery's to rounding; bf16 rounds at every layer.
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


# ------------------------------------------------------------------ provenance and model card


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _training_info(run_dir: Path | None) -> dict | None:
    """A train run directory's top-level JSON files (summary.json first), steps, and recipe.yaml text."""
    if run_dir is None:
        return None
    info: dict[str, Any] = {"run_dir": str(run_dir.absolute()), "files": {}}
    # summary.json holds the steps actually run; plan.json the planned ones.
    paths = sorted(run_dir.glob("*.json"), key=lambda p: (p.name != "summary.json", p.name))
    for p in paths:
        data = _read_json(p)
        if isinstance(data, dict):
            info["files"][p.name] = data
            for key in ("steps", "step", "global_step", "total_steps"):
                if isinstance(data.get(key), int) and "steps" not in info:
                    info["steps"] = data[key]
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        info["recipe"] = recipe.read_text(encoding="utf-8")
    return info


def _probe_summary(report: dict) -> list[str]:
    lines = []
    tmpl = next(iter(report.get("summary") or {}), None)
    if tmpl is None:
        return lines
    summ = report["summary"][tmpl]
    for kind, m in summ["kinds"].items():
        lines.append(f"| {kind} | {m['n']} | {100 * (m['exact_match'] or 0):.1f}% |")
    for rel, m in summ["relations"].items():
        lines.append(f"| {rel} | {m['n']} | {100 * (m['exact_match'] or 0):.1f}% |")
    return lines


def model_card(name: str, provenance: dict, reports: dict[str, dict]) -> str:
    lines = ["---", "library_name: transformers", "tags: [memsurgery, memory-layers]", "---", "", f"# {name}", "",
             "Exported by memsurgery: a Hugging Face checkpoint"
             + (" with a grafted shared product-key memory (Memory+)." if provenance["grafted"] else "."), "",
             "```python", "from transformers import AutoModelForCausalLM",
             f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)', "```", "",
             "## Provenance", "",
             f"- source: `{provenance['source']}` (loaded from `{provenance['loaded_from']}`)",
             f"- source weights SHA-256: `{provenance['source_sha256']}`",
             f"- dtype: {provenance['dtype']}"]
    graft = provenance.get("graft")
    if graft:
        lines += [f"- graft: layers {graft.get('layers')}, mode {graft.get('mode')}, "
                  f"{(graft.get('plan') or {}).get('slots')} slots; base SHA-256 `{graft.get('source_sha256')}`",
                  f"- graft plan: `{json.dumps(graft.get('plan'), sort_keys=True)}`"]
    train = provenance.get("training")
    if train:
        lines.append(f"- training run: `{train['run_dir']}`, steps: {train.get('steps', 'unknown')}")
        if train.get("recipe"):
            lines += ["", "## Recipe", "", "```yaml", train["recipe"].rstrip(), "```"]
    for rname, rep in reports.items():
        lines += ["", f"## Probe: {rname}", "", "| group | n | exact match |", "|---|---|---|"]
        lines += _probe_summary(rep)
        h = rep.get("hallucination") or {}
        if h.get("n"):
            lines.append(f"\nUnknown items: {100 * h['attempted']:.1f}% attempted, "
                         f"{100 * h['incorrect']:.1f}% hallucinated (answered wrongly).")
        ret = rep.get("retention")
        if ret:
            lines.append(f"\nHeld-out perplexity: {ret['perplexity']:.3f} ({ret['tokens']} tokens).")
        lines.append(f"\nFull report: `reports/{rname}/report.html`.")
    lines += ["", f"Every file's SHA-256 is in `{MANIFEST}` (`sha256sum -c {MANIFEST}`).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ export


def _resolve_source(src: Path) -> tuple[Path, Path | None]:
    if (src / "config.json").is_file():
        return src, None
    if (src / "final" / "config.json").is_file():
        return src / "final", src
    raise InputError(f"{src}: neither a model directory (config.json) nor a train run directory (final/config.json)")


def export(src: str | Path, out: str | Path, *, probe_reports=(), dtype: str = "float32", force: bool = False,
           max_shard_size: str | int = "2GB", verify: bool = True, log=lambda msg: None) -> dict:
    """Write `src` as a standalone HF directory at `out` (see the module docstring); returns export.json."""
    from memsurgery import __version__
    from memsurgery._atomic import atomic_output_dir, check_output_dir, publish_modes

    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such model or run directory")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: choose float32 or bfloat16")
    dtype = "float32" if DTYPES[dtype] == torch.float32 else "bfloat16"
    out = Path(out)
    check_output_dir(out, force)
    model_dir, run_dir = _resolve_source(src)
    if out.absolute() in (model_dir.absolute(), *model_dir.absolute().parents):
        raise InputError(f"{out}: output must not be the source or contain it")
    reports = _read_reports(probe_reports)
    grafted, model, tokenizer = _load(model_dir, dtype, log)

    provenance: dict[str, Any] = {
        "schema": "memsurgery.export/1", "source": str(src.absolute()), "loaded_from": str(model_dir.absolute()),
        "source_sha256": _weights_sha256(model_dir), "grafted": grafted, "dtype": dtype,
        "graft": _read_json(model_dir / "graft.json"), "training": _training_info(run_dir),
        "reports": sorted(reports), "versions": {"memsurgery": __version__, "torch": torch.__version__,
                                                  "transformers": __import__("transformers").__version__},
    }
    card = model_card(out.name, provenance, {k: v for k, (_, v) in reports.items()})
    extra = {"README.md": card, "export.json": json.dumps(provenance, indent=2, default=str) + "\n"}
    if (provenance["training"] or {}).get("recipe"):
        extra["recipe.yaml"] = provenance["training"]["recipe"]
    if provenance["graft"] is not None:
        extra["graft.json"] = (model_dir / "graft.json").read_text(encoding="utf-8")

    with atomic_output_dir(out, force=force) as tmp:
        log(f"writing {out}")
        _write_model(tmp, model, tokenizer, grafted, extra, max_shard_size)
        for name, (rdir, _) in reports.items():
            shutil.copytree(rdir, tmp / "reports" / name)
        publish_modes(tmp)
        write_manifest(tmp)
        publish_modes(tmp)
        if verify:
            log("verifying: manifest, then logits after a clean-process reload")
            provenance["verification"] = verify_export(tmp, model, tokenizer, dtype)
        else:
            provenance["verification"] = None
    return provenance


def _read_reports(probe_reports) -> dict[str, tuple[Path, dict]]:
    """{name in reports/: (probe --out directory, its report.json)}; names made unique."""
    reports: dict[str, tuple[Path, dict]] = {}
    for rdir in probe_reports:
        rdir = Path(rdir)
        rep = _read_json(rdir / "report.json")
        if rep is None:
            raise InputError(f"{rdir}: not a probe report directory (no readable report.json); run memsurgery probe --out")
        name = rdir.name or "probe"
        while name in reports:
            name += "_"
        reports[name] = (rdir, rep)
    return reports


def _load(model_dir: Path, dtype: str, log):
    """(grafted?, the model in `dtype` and eval mode, its tokenizer or None)."""
    from transformers import AutoTokenizer

    from memsurgery.export import hf

    cfg = _read_json(model_dir / "config.json") or {}
    grafted = hf.is_grafted_config(cfg)
    log(f"loading {'grafted' if grafted else 'dense'} model from {model_dir}")
    if grafted:
        model = hf.load_grafted(model_dir, dtype=torch.float32)
    else:
        from memsurgery.checkpoint import open_checkpoint

        model = open_checkpoint(model_dir).load_model(dtype=torch.float32)
    model = model.to(DTYPES[dtype]).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    return grafted, model, tokenizer


def _write_model(tmp: Path, model, tokenizer, grafted: bool, extra: dict, max_shard_size) -> None:
    """Weights, config, tokenizer and the extra files (model card, provenance) into `tmp`."""
    from memsurgery.export import hf

    if grafted:
        hf.save_grafted(model, tmp, tokenizer=tokenizer, max_shard_size=max_shard_size, extra_files=extra)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in extra.items():
            (tmp / name).write_text(text, encoding="utf-8")
