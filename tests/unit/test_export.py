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


_LOAD_SCRIPT = r"""
import importlib.abc, sys
if sys.argv[2] == "plain":  # a machine without memsurgery
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "memsurgery" or name.startswith("memsurgery."):
                raise ImportError(name)
    sys.meta_path.insert(0, _Block())
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
    AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
else:
    import memsurgery
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[1])
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("loaded")
"""


def test_card_config_and_tokenizer_are_portable(grafted_dir, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from memsurgery.export import export

    run, report = grafted_dir
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "final" / "config.json").read_text())
    cfg["_model_name_or_path"] = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what a GGUF conversion used to leave
    (copy / "final" / "config.json").write_text(json.dumps(cfg))
    (copy / "recipe.yaml").write_text(f"model: {tmp_path}/smol-mem\noutput_dir: {tmp_path}/run\n")
    out = tmp_path / "exported"
    export(copy, out, probe_reports=[report], verify=False, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
           license="apache-2.0")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "memsurgery" in front["tags"] and front["base_model_relation"] == "finetune"
    assert str(tmp_path) not in card and "/tmp/" not in card and "model: smol-mem" in card
    assert "_model_name_or_path" not in json.loads((out / "config.json").read_text())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_cfg and "is_local" not in tok_cfg and tok_cfg.get("tokenizer_class")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    for mode in ("plain", "memsurgery"):
        r = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(out), mode], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
        # no trust-remote-code question and no "model of type memsurgery_llama" warning on the way
        assert "custom code" not in r.stderr and "model of type" not in r.stderr, (mode, r.stderr[-2000:])
