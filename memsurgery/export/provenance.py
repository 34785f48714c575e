"""What an export records about where it came from: export.json's fields, the training run's
files, the base model and license for the card, and the probe reports copied beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from memsurgery.errors import InputError
from memsurgery.export.manifest import weights_sha256


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def training_info(run_dir: Path | None) -> dict | None:
    """A train run directory's top-level JSON files (summary.json first), steps, and recipe.yaml text."""
    if run_dir is None:
        return None
    info: dict[str, Any] = {"run_dir": str(run_dir.absolute()), "files": {}}
    # summary.json holds the steps actually run; plan.json the planned ones.
    paths = sorted(run_dir.glob("*.json"), key=lambda p: (p.name != "summary.json", p.name))
    for p in paths:
        data = read_json(p)
        if isinstance(data, dict):
            info["files"][p.name] = data
            for key in ("steps", "step", "global_step", "total_steps"):
                if isinstance(data.get(key), int) and "steps" not in info:
                    info["steps"] = data[key]
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        info["recipe"] = recipe.read_text(encoding="utf-8")
    return info


def origin_for_card(model_dir: Path, base_model: str | None, license: str | None) -> dict:
    """{base_model, license} for the model card: the flags, else what the checkpoint records."""
    from memsurgery.checkpoint.hub import origin

    found = origin(model_dir)
    return {"base_model": base_model or found["base_model"], "license": license or found["license"]}


def provenance_base(src, model_dir: Path, dtype: str, origin: dict, reports: dict) -> dict[str, Any]:
    from memsurgery import __version__
    from memsurgery.checkpoint.hub import describe_source

    return {"schema": "memsurgery.export/1", "source": describe_source(src), "loaded_from": str(model_dir.absolute()),
            "source_sha256": weights_sha256(model_dir), "dtype": dtype, "origin": origin,
            "graft": read_json(model_dir / "graft.json"), "reports": sorted(reports),
            "versions": {"memsurgery": __version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__}}


def copy_reports(tmp: Path, reports: dict) -> None:
    for name, (rdir, _) in reports.items():
        shutil.copytree(rdir, tmp / "reports" / name)


def read_reports(probe_reports) -> dict[str, tuple[Path, dict]]:
    """{name in reports/: (probe --out directory, its report.json)}; names made unique."""
    reports: dict[str, tuple[Path, dict]] = {}
    for rdir in probe_reports:
        rdir = Path(rdir)
        rep = read_json(rdir / "report.json")
        if rep is None:
            raise InputError(f"{rdir}: not a probe report directory (no readable report.json); run memsurgery probe --out")
        name = rdir.name or "probe"
        while name in reports:
            name += "_"
        reports[name] = (rdir, rep)
    return reports
