"""Every bad input gives exit code 2 (or 1), exactly one line on stderr, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memsurgery.cli import main


def run_cli(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else 0
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def ckpt_copy(tiny_llama, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, dst)
    return dst


def _corrupt(path: Path, mutate) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))


def test_missing_path(tmp_path, capsys):
    code, _, err = run_cli(["inspect", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert_one_line_error(err, "nope")


def test_dir_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["inspect", str(tmp_path / "empty")], capsys)
    assert code == 2
    assert_one_line_error(err, "config.json")


def test_truncated_safetensors(ckpt_copy, capsys):
    _corrupt(ckpt_copy / "model.safetensors", lambda d: d[: len(d) // 2])
    code, _, err = run_cli(["inspect", str(ckpt_copy)], capsys)
    assert code == 2
    assert_one_line_error(err, "model.safetensors")


def test_garbage_header_length(ckpt_copy, capsys):
    def mutate(d):
        d[:8] = struct.pack("<Q", 2**62)
        return d
    _corrupt(ckpt_copy / "model.safetensors", mutate)
    code, _, err = run_cli(["inspect", str(ckpt_copy)], capsys)
    assert code == 2
    assert_one_line_error(err, "model.safetensors")


def test_garbage_header_json(ckpt_copy, capsys):
    def mutate(d):
        n = struct.unpack("<Q", bytes(d[:8]))[0]
        d[8 : 8 + n] = b"\xff" * n
        return d
    _corrupt(ckpt_copy / "model.safetensors", mutate)
    code, _, err = run_cli(["inspect", str(ckpt_copy)], capsys)
    assert code == 2
    assert_one_line_error(err, "model.safetensors")


def test_offsets_past_end(tmp_path, capsys):
    # Write a valid file, then rewrite its header so one tensor claims bytes beyond EOF.
    src = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4)}, str(src))
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["a"]["data_offsets"] = [0, 4096]
    header["a"]["shape"] = [1024]
    hb = json.dumps(header).encode()
    src.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.errors import InputError

    with pytest.raises(InputError) as exc:
        open_checkpoint(src.parent / "t.safetensors")  # no config.json either; offsets checked first or after
    assert "t.safetensors" in str(exc.value) or "config.json" in str(exc.value)


def test_offsets_past_end_in_checkpoint(ckpt_copy, capsys):
    path = ckpt_copy / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    total = len(raw) - 8 - n
    # Keep the byte length consistent with the shape but move it past the end.
    header[name]["data_offsets"] = [total + 16, total + 16 + (end - start)]
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    code, _, err = run_cli(["inspect", str(ckpt_copy)], capsys)
    assert code == 2
    assert_one_line_error(err, "model.safetensors")


def test_missing_tensor(ckpt_copy, tmp_path, capsys):
    from safetensors.torch import load_file

    sd = load_file(str(ckpt_copy / "model.safetensors"))
    missing = "model.layers.1.mlp.down_proj.weight"
    del sd[missing]
    save_file(sd, str(ckpt_copy / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", str(ckpt_copy), str(out)], capsys)
    assert code == 2
    assert_one_line_error(err, missing)
    assert not out.exists()


def test_pickle_only_refused(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    torch.save(load_file(str(tiny_llama / "model.safetensors")), d / "pytorch_model.bin")
    code, _, err = run_cli(["inspect", str(d)], capsys)
    assert code == 2
    assert_one_line_error(err, "--allow-pickle")
    code, out, err = run_cli(["inspect", str(d), "--allow-pickle", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["architecture"]["model_type"] == "llama"


def test_unsupported_architecture(ckpt_copy, capsys):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["inspect", str(ckpt_copy)], capsys)
    assert code == 2
    assert_one_line_error(err, "gpt2", "llama")


def test_output_exists_not_empty(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_cli(["convert", str(tiny_llama), str(out)], capsys)
    assert code == 2
    assert_one_line_error(err, "--force")
    assert (out / "keep.txt").read_text() == "user data"
    code, _, err = run_cli(["convert", str(tiny_llama), str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_bad_shard_size(tiny_llama, tmp_path, capsys):
    code, _, err = run_cli(["convert", str(tiny_llama), str(tmp_path / "o"), "--shard-size", "lots"], capsys)
    assert code == 2
    assert_one_line_error(err, "lots")
    assert not (tmp_path / "o").exists()


def test_interrupted_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    import memsurgery.checkpoint.writer as writer

    real = writer.save_state_dict_sharded
    calls = {"n": 0}

    def explode(*args, **kwargs):
        calls["n"] += 1
        real(*args, **kwargs)  # write real files first, then fail: a crash mid-way
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(writer, "save_state_dict_sharded", explode)
    out = tmp_path / "out"
    before = tree_digest(tiny_llama)
    code, _, err = run_cli(["convert", str(tiny_llama), str(out)], capsys)
    assert calls["n"] == 1
    assert code == 1
    assert_one_line_error(err, "disk full")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert tree_digest(tiny_llama) == before


def test_inputs_never_modified(tiny_llama, tmp_path, capsys):
    before = tree_digest(tiny_llama)
    code, _, err = run_cli(["convert", str(tiny_llama), str(tmp_path / "o")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["inspect", str(tiny_llama), "--json"], capsys)
    assert code == 0, err
    assert tree_digest(tiny_llama) == before


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(["inspect"], capsys)
    assert code == 2
    assert_one_line_error(err)
    code, _, err = run_cli(["no-such-command"], capsys)
    assert code == 2
    assert_one_line_error(err, "no-such-command")


def test_bad_proposal_names_flag(tiny_llama, capsys):
    code, _, err = run_cli(["inspect", str(tiny_llama), "--slots", "1000"], capsys)
    assert code == 2
    assert_one_line_error(err, "--slots")
    code, _, err = run_cli(["inspect", str(tiny_llama), "--layers", "0,7"], capsys)
    assert code == 2
    assert_one_line_error(err, "--layers")


def test_subprocess_no_traceback(tmp_path):
    """The installed entry point itself: a real process, real stderr."""
    proc = subprocess.run([sys.executable, "-m", "memsurgery", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "missing")
    proc = subprocess.run([sys.executable, "-m", "memsurgery", "--debug", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
