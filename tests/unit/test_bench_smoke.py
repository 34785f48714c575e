"""The benchmarks run (at tiny sizes) and report what they promise; their numbers are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys


def _bench(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "memsurgery", "bench", *args, "--quick", "--json"],
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


def test_bench_layer_reports_ratios():
    result = _bench("layer")
    text = json.dumps(result)
    assert "ratio" in text and "rss" in text.lower()
