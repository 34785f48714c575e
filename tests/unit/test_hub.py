"""Hugging Face Hub ids as inputs, from a pre-filled cache with HF_HUB_OFFLINE=1 (no network here),
and `export --push-to-hub` against a stub of huggingface_hub.HfApi."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli import run_cli
from tests.tiny import make_tiny_checkpoint_with_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def prefill(cache, repo_id: str, src, revision: str = "main", commit: str = COMMIT):
    """Lay `src` (a directory, or a file) out as huggingface_hub caches a downloaded snapshot."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if src.is_dir():
        shutil.copytree(src, snap)
    else:
        snap.mkdir(parents=True)
        shutil.copy(src, snap / src.name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache holding tiny-org/tiny-llama (a dense llama with a model card)."""
    import huggingface_hub.constants as C

    dense = make_tiny_checkpoint_with_tokenizer("llama", tmp_path / "src" / "tiny-llama")
    (dense / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny\n")
    cache = tmp_path / "hf-cache"
    prefill(cache, "tiny-org/tiny-llama", dense)
    prefill(cache, "tiny-org/tiny-llama", dense, revision="v1", commit="f" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # so that "tiny-org/..." is not also a local path
    return cache


def test_inspect_probe_and_train_loader_take_a_hub_id(hub, capsys):
    code, out, err = run_cli(["inspect", "tiny-org/tiny-llama", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["architecture"]["model_type"] == "llama" and r["num_layers"] == 2
    assert r["source"].endswith(f"models--tiny-org--tiny-llama/snapshots/{COMMIT}")
    code, out, err = run_cli(["inspect", "tiny-org/tiny-llama@v1", "--json"], capsys)
    assert code == 0 and json.loads(out)["source"].endswith("f" * 40), err

    from memsurgery.facts.schema import FactItem
    from memsurgery.probe.api import run_probe
    from memsurgery.train.loop import load_model_and_tokenizer

    items = [FactItem(id="k0", prompt="The sky is", answers=["blue"], kind="known")]
    rep = run_probe("tiny-org/tiny-llama", facts=[items], ppl_tokens=0, max_new_tokens=2)
    assert rep["model"]["path"] == "tiny-org/tiny-llama" and rep["model"]["loaded_from"].endswith(COMMIT)
    model, tok = load_model_and_tokenizer("tiny-org/tiny-llama")
    assert model.config.num_hidden_layers == 2 and tok is not None


def test_graft_records_the_hub_origin_and_the_card_names_it(hub, tmp_path):
    from memsurgery.export import export
    from memsurgery.graft import graft

    _, report = graft("tiny-org/tiny-llama", tmp_path / "g", plan={"layers": [1], "slots": 256, "heads": 2,
                                                                   "knn": 4, "k_dim": 16, "calib_tokens": 256,
                                                                   "heldout_tokens": 128, "seq_len": 32,
                                                                   "kmeans_iters": 2})
    assert report["source"] == "tiny-org/tiny-llama"
    assert (report["base_model"], report["license"]) == ("tiny-org/tiny-llama", "mit")
    export(tmp_path / "g", tmp_path / "e", verify=False)
    card = (tmp_path / "e" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: tiny-org/tiny-llama" in front and "license: mit" in front


def test_a_gguf_file_of_a_hub_repo(hub, tiny_gguf, capsys):
    prefill(hub, "tiny-org/tiny-gguf", tiny_gguf)
    code, out, err = run_cli(["inspect", f"tiny-org/tiny-gguf/{tiny_gguf.name}", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["format"] == "gguf"
    # the repo alone has no config.json: the message names a file to ask for
    code, _, err = run_cli(["inspect", "tiny-org/tiny-gguf"], capsys)
    assert code == 2 and f"tiny-org/tiny-gguf/{tiny_gguf.name}" in err and err.count("\n") == 1


def test_an_uncached_id_offline_is_one_line_exit_2(hub, capsys):
    for argv in (["inspect", "nobody/nothing"], ["graft", "nobody/nothing", "out"],
                 ["probe", "nobody/nothing"], ["export", "nobody/nothing", "out"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "hf download nobody/nothing" in err, err
    # an unknown revision of a cached repo is not in the cache either
    code, _, err = run_cli(["inspect", "tiny-org/tiny-llama@nope"], capsys)
    assert code == 2 and "tiny-org/tiny-llama@nope" in err


class _StubApi:
    """Records what export would send to the Hub; `uploads` maps repo -> {path: bytes}."""

    uploads: dict = {}
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        _StubApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        from pathlib import Path

        root = Path(folder_path)
        _StubApi.uploads[repo_id] = {p.relative_to(root).as_posix(): p.read_bytes()
                                     for p in root.rglob("*") if p.is_file()}
        _StubApi.calls.append(("upload_folder", repo_id, commit_message))
        return type("Commit", (), {"oid": "c0ffee"})()


def test_push_to_hub_uploads_the_verified_export(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    import huggingface_hub.constants as C

    from memsurgery.export import check_manifest

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _StubApi)
    _StubApi.uploads, _StubApi.calls = {}, []
    src = make_tiny_checkpoint_with_tokenizer("qwen2", tmp_path / "dense")
    out = tmp_path / "exported"
    code, stdout, err = run_cli(["export", str(src), str(out), "--push-to-hub", "me/tiny", "--private",
                                 "--license", "apache-2.0", "--json"], capsys)
    assert code == 0, err
    prov = json.loads(stdout)
    assert prov["hub"] == {"repo": "me/tiny", "url": "https://huggingface.co/me/tiny", "commit": "c0ffee",
                           "files": len(_StubApi.uploads["me/tiny"]), "private": True}
    assert _StubApi.calls[0] == ("create_repo", "me/tiny", True, True)
    sent = _StubApi.uploads["me/tiny"]
    assert set(sent) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert check_manifest(out) == len(sent) - 1
    assert sent["README.md"].decode().startswith("---\n") and b"license: apache-2.0" in sent["README.md"]
    # offline: refused before any upload, the export itself stays
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["export", str(src), str(tmp_path / "e2"), "--push-to-hub", "me/tiny"], capsys)
    assert code == 2 and "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    assert (tmp_path / "e2" / "SHA256SUMS").is_file()
