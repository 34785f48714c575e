"""`memsurgery export`: round trip with equal logits, manifest, reports, refusals, verification failures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from memsurgery.cli import main
from memsurgery.errors import InputError, RuntimeFailure
from tests.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def grafted_dir(tmp_path_factory):
    """A tiny grafted checkpoint with a non-zero value table, laid out as a train run dir (final/)."""
    from memsurgery.export import hf
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    torch.manual_seed(0)
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=16),
                        [1], "parallel").eval()
    with torch.no_grad():
        model.memory_bank.values.weight.normal_(0, 0.3)
    run = tmp_path_factory.mktemp("run")
    hf.save_grafted(model, run / "final", tokenizer=build_tiny_tokenizer(),
                    extra_files={"graft.json": json.dumps({"layers": [1], "mode": "parallel",
                                                           "plan": {"slots": 256}, "source_sha256": "ab" * 32})})
    (run / "plan.json").write_text(json.dumps({"steps": 20}))
    (run / "summary.json").write_text(json.dumps({"steps": 17}))  # stopped early: the real count wins
    (run / "recipe.yaml").write_text("# memsurgery train recipe.yaml\ntrain:\n  steps: 20\n")
    report = tmp_path_factory.mktemp("rep") / "probe1"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({
        "summary": {"completion": {"kinds": {"injected": {"n": 4, "exact_match": 0.75}},
                                   "relations": {"injected/r": {"n": 4, "exact_match": 0.75}}}},
        "hallucination": {"n": 2, "attempted": 1.0, "incorrect": 0.5}, "retention": None}))
    (report / "report.html").write_text("<html></html>")
    return run, report


def test_export_round_trip(grafted_dir, tmp_path):
    from memsurgery.export import MANIFEST, check_manifest, export
    from memsurgery.export import hf

    run, report = grafted_dir
    out = tmp_path / "exported"
    prov = export(run, out, probe_reports=[report])
    v = prov["verification"]
    assert v["max_abs_logit_diff"] <= v["tolerance"] and v["manifest_files"] >= 8
    assert prov["training"]["steps"] == 17 and prov["graft"]["layers"] == [1]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "modeling_memsurgery.py", "README.md", "export.json", "graft.json", MANIFEST, "recipe.yaml",
            "reports/probe1/report.json", "reports/probe1/report.html"} <= names
    card = (out / "README.md").read_text()
    assert "75.0%" in card and "steps: 17" in card and "reports/probe1/report.html" in card
    assert "## Recipe" in card and (out / "recipe.yaml").read_text().startswith("# memsurgery train")
    assert check_manifest(out) == len(names) - 1
    # reload in this process: identical logits to the source
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    src = hf.load_grafted(run / "final").eval()
    again = hf.load_grafted(out).eval()
    with torch.no_grad():
        assert torch.equal(src(ids).logits, again(ids).logits)
    # refuses to overwrite
    with pytest.raises(InputError, match="--force"):
        export(run, out, verify=False)


def test_corrupted_shard_is_caught(grafted_dir, tmp_path):
    from memsurgery.export import check_manifest, export

    run, _ = grafted_dir
    out = tmp_path / "e"
    export(run, out, verify=False)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match=shard.name):
        check_manifest(bad)
    (out / "stray.txt").write_text("x")
    with pytest.raises(RuntimeFailure, match="stray.txt is not listed"):
        check_manifest(out)


def test_failed_verification_leaves_no_output(grafted_dir, tmp_path, monkeypatch):
    import memsurgery.export.api as ex

    run, _ = grafted_dir
    # A reload that disagrees with the in-memory model (as a broken writer would produce).
    monkeypatch.setattr(ex, "_reload_logits", lambda out_dir, ids, dtype, device="cpu": torch.full((*ids.shape, 256), 9.0))
    out = tmp_path / "never"
    with pytest.raises(RuntimeFailure, match="differ"):
        ex.export(run, out)
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_dense_export_bf16_and_cli_errors(tmp_path, capsys):
    from memsurgery.export import check_manifest
    from tests.tiny import make_tiny_checkpoint_with_tokenizer

    src = make_tiny_checkpoint_with_tokenizer("qwen2", tmp_path / "dense")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(src), str(tmp_path / "o"), "--dtype", "bf16", "--json"])
        raise SystemExit(0)  # main() returns normally on success
    out, err = capsys.readouterr()
    assert exc.value.code in (0, None), err
    prov = json.loads(out)
    assert prov["dtype"] == "bfloat16" and not prov["grafted"] and prov["verification"]["max_abs_logit_diff"] <= \
        prov["verification"]["tolerance"]
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    check_manifest(tmp_path / "o")
    for argv, needle in ((["export", str(tmp_path / "missing"), str(tmp_path / "x")], "no such"),
                         (["export", str(src), str(tmp_path / "y"), "--dtype", "fp8"], "--dtype"),
                         (["export", str(src), str(tmp_path / "z"), "--report", str(tmp_path)], "report.json")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
            raise SystemExit(0)
        _, err = capsys.readouterr()
        assert exc.value.code == 2 and needle in err and err.count("\n") == 1
