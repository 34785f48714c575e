#!/usr/bin/env bash
# GPU check for the embedding-bag kernels: the gpu-marked tests, then the kernel benchmark.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; results in ${OUT:-./gpu-results}/
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # tiny benchmark (smoke test, also on CPU)
#
# Needs a CUDA machine with torch + triton (+ pytest, rich, psutil) importable; no network.
# Writes: device.txt, pytest_gpu.log, bench_kernels.json, bench_kernels.log, summary.txt.
# Budget: tests <= 210 s, benchmark <= 120 s (each under `timeout`), under 6 minutes in all.
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-./gpu-results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET MEMSURGERY_EMBEDDING_BAG_BACKEND

# The repo's .venv may be a CPU-only build copied from a dev machine: use it only if it sees CUDA.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=python3
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $PY"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >"$RESULTS/device.txt" 2>&1
cat "$RESULTS/device.txt"

echo "== pytest -m gpu tests/gpu"
timeout 210 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" -rs \
  >"$RESULTS/pytest_gpu.log" 2>&1
TEST_RC=$?
tail -n 15 "$RESULTS/pytest_gpu.log"

echo "== python -m memsurgery.bench.kernels --json"
timeout 120 "$PY" -m memsurgery.bench.kernels --json ${GPU_CHECK_QUICK:+--quick} \
  >"$RESULTS/bench_kernels.json" 2>"$RESULTS/bench_kernels.log"
BENCH_RC=$?
tail -n 5 "$RESULTS/bench_kernels.log"

"$PY" - "$RESULTS/bench_kernels.json" "$TEST_RC" "$BENCH_RC" "$RESULTS/pytest_gpu.log" \
  >"$RESULTS/summary.txt" 2>&1 <<'PYEOF'
import json, sys
path, test_rc, bench_rc, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
status = "PASS" if test_rc == 0 else f"FAIL (rc {test_rc})" + (" timeout" if test_rc == 124 else "")
lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
print(f"tests: {status}: {lines[-1] if lines else 'no output'}")
try:
    report = json.load(open(path))
except Exception as err:  # benchmark failed or timed out
    print(f"benchmark: no report (rc {bench_rc}): {err}")
    sys.exit(0)
print(f"benchmark on {report['device_name']} (peak {report['peak_gbs']} GB/s), dtype {report['shapes'][0]['dtype']}")
targets = {"forward": 2500.0, "backward": 1500.0}  # GB/s on H100; and >= 3x F.embedding_bag
for shape in report["shapes"]:
    for phase in ("forward", "backward"):
        ours, ref = shape["results"][phase]["ours"], shape["results"][phase]["torch"]
        ok = ours["gbs"] >= targets[phase] and shape["speedup"][phase] >= 3.0
        frac = ours.get("peak_fraction")
        print(f"{shape['name']:>8} {phase:>8}: ours {ours['ms']:8.3f} ms {ours['gbs']:7.0f} GB/s"
              f"{'' if frac is None else f' ({100 * frac:.0f}% peak)'} | torch {ref['ms']:8.3f} ms"
              f" {ref['gbs']:7.0f} GB/s | speedup {shape['speedup'][phase]:.2f}x"
              f" | target {targets[phase]:.0f} GB/s & 3x: {'met' if ok else 'NOT met'}")
PYEOF
cat "$RESULTS/summary.txt"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
