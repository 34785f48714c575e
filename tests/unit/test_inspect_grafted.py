"""`inspect` on memsurgery's own outputs: grafted and exported checkpoints describe their base
architecture, their memory and how many value rows are in use."""

from __future__ import annotations

import json
import shutil

import torch

from memsurgery.checkpoint import open_checkpoint
from memsurgery.inspection import inspect_checkpoint
from tests.cli import run_cli
from tests.tiny import build_tiny_model, build_tiny_tokenizer


def _write_rows(ckpt_dir, rows):
    """Set value-table rows `rows` to 1.0 in place (the checkpoint is a copy made by the test)."""
    from safetensors.torch import load_file, save_file

    path = ckpt_dir / "model.safetensors"
    state = load_file(str(path))
    state["memory_bank.values.weight"][rows] = 1.0
    save_file(state, str(path), metadata={"format": "pt"})


def test_grafted_checkpoint_reports_base_memory_and_slots_used(assets, tmp_path):
    copy = tmp_path / "grafted"
    shutil.copytree(assets["grafted"], copy)
    r = inspect_checkpoint(open_checkpoint(copy))
    dense = inspect_checkpoint(open_checkpoint(assets["dense"]))
    assert r["architecture"]["model_type"] == "llama" and r["num_layers"] == dense["num_layers"]
    m = r["memory"]
    assert (m["base_model_type"], m["mode"], m["layers"]) == ("llama", "parallel", [1])
    assert m["config"]["slots"] == 256 and m["config"]["heads"] == 2 and m["config"]["knn"] == 4
    assert m["params"]["value_table"] == 256 * 64 and m["params"]["total"] == r["parameters"]["by_component"]["memory"]
    # the base's parameters are the dense checkpoint's, the memory on top
    assert r["parameters"]["total"] == dense["parameters"]["total"] + m["params"]["total"]
    # a parallel graft starts with a zero table: no row is in use until training writes one
    assert m["slots_used"] == {"nonzero_rows": 0, "slots": 256, "fraction": 0.0, "value_init": "zero"}
    assert r["graft_estimate"] is None and any("already grafted" in n for n in r["notes"])
    _write_rows(copy, [3, 7, 200])
    assert inspect_checkpoint(open_checkpoint(copy))["memory"]["slots_used"]["nonzero_rows"] == 3


def test_exported_and_replace_mode_checkpoints(tmp_path, capsys):
    from memsurgery.export import export, hf
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    torch.manual_seed(0)
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=16),
                        [0, 1], "replace").eval()
    hf.save_grafted(model, tmp_path / "g", tokenizer=build_tiny_tokenizer())
    export(tmp_path / "g", tmp_path / "exported", verify=False)
    for path in (tmp_path / "g", tmp_path / "exported"):
        code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
        assert code == 0, err
        r = json.loads(out)
        assert r["memory"]["mode"] == "replace" and r["memory"]["layers"] == [0, 1]
        assert r["parameters"]["by_component"]["mlp"] == 0  # both MLPs were replaced by the memory
        assert r["memory"]["slots_used"]["nonzero_rows"] == 256  # reference init: every row non-zero
    code, out, err = run_cli(["inspect", str(tmp_path / "exported")], capsys)
    assert code == 0 and "Memory (grafted)" in out and "replace at layers 0, 1" in out
