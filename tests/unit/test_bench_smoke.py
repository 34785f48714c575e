"""The benchmarks run (at tiny sizes) and report what they promise; their numbers are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _bench(*args, root: tuple = ()) -> dict:
    proc = subprocess.run([sys.executable, "-m", "memsurgery", *root, "bench", *args, "--quick", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_bench_kernels_reports_both_implementations():
    result = _bench("kernels")
    text = json.dumps(result)
    assert result["shapes"], result
    shape = result["shapes"][0]
    for phase in ("forward", "backward"):
        assert {"ours", "torch"} <= set(shape["results"][phase])
        assert shape["results"][phase]["ours"]["gbs"] > 0 and shape["results"][phase]["torch"]["gbs"] > 0
    assert set(shape["speedup"]) == {"forward", "backward"}
    if result["device"] == "cpu":  # beside the speedups: the thread count and the load
        from memsurgery.bench import bench_threads

        assert result["threads"] == shape["threads"] == bench_threads() and shape["loadavg_1min"] >= 0


def test_bench_layer_reports_ratios():
    # `memsurgery --threads 2`: every child runs on 2 threads, and each ratio says so.
    result = _bench("layer", root=("--threads", "2"))
    text = json.dumps(result)
    assert "ratio" in text and "rss" in text.lower()
    assert result["settings"]["threads"] == 2
    assert [c["threads"] for c in result["configs"]] == [2] * len(result["configs"])
    for r in result["ratios"].values():
        assert r["threads"] == 2
        assert len(r["loadavg_1min"]) == 2 and all(x >= 0 for x in r["loadavg_1min"])


TINY = dict(hidden=16, heads=1, knn=4, k_dim=16, tokens=16, warmup=0, reps=1)
TINY_TABLES = [("adam", 256), ("adam", 1024), ("sgd", 256), ("sgd", 1024)]


def test_bench_layer_children_get_the_thread_count(monkeypatch, capsys):
    """With no thread setting in the environment every child is asked for 1 thread (what the
    Makefile uses), not left to torch's default of one per core, and runs on it (the first
    child really runs; the others reuse its result). `memsurgery --threads 2`, with the
    Makefile's OMP_NUM_THREADS=1 inherited: test_bench_layer_reports_ratios."""
    from memsurgery.bench import layer

    for var in ("MEMSURGERY_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(layer, "QUICK", TINY)
    monkeypatch.setattr(layer, "QUICK_TABLES", TINY_TABLES)
    specs, real = [], layer._run_child

    def run_child(spec):
        specs.append(spec)
        out = real(spec) if len(specs) == 1 else dict(first)
        if len(specs) == 1:
            first.update(out)
        return dict(out, optimizer=spec["optimizer"], slots=spec["slots"])

    first: dict = {}
    monkeypatch.setattr(layer, "_run_child", run_child)
    result = layer.run_layer_bench(json_out=True, quick=True)
    assert [s["threads"] for s in specs] == [1] * 4
    assert first["threads"] == 1  # as the child measured it: torch.get_num_threads()
    assert result["settings"]["threads"] == 1
    assert all(r["threads"] == 1 for r in result["ratios"].values())
    assert json.loads(capsys.readouterr().out)["ratios"]["sgd"]["threads"] == 1


def test_bench_threads_validation(monkeypatch):
    from memsurgery.bench import bench_threads
    from memsurgery.errors import InputError

    monkeypatch.setenv("MEMSURGERY_THREADS", "4")
    assert bench_threads() == 4 and bench_threads(2) == 2
    with pytest.raises(InputError, match="at least 1"):
        bench_threads(0)
