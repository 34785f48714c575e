"""Embedding-bag kernel benchmark: ours vs F.embedding_bag, JSON into a results folder.

    python benchmarks/bench_embedding_bag.py                  # full size, default device
    python benchmarks/bench_embedding_bag.py --quick --device cpu --results-dir /tmp/r

A thin wrapper over `memsurgery.bench.kernels.run_kernel_bench` (see there for the
shapes, the bytes model and the peak-bandwidth table). Prints the table and writes
`embedding_bag-<device>-<UTC time>.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memsurgery.bench.kernels import run_kernel_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    parser.add_argument("--results-dir", default="benchmarks/results", type=Path)
    args = parser.parse_args()
    report = run_kernel_bench(device=args.device, json_out=False, quick=args.quick)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = args.results_dir / f"embedding_bag-{report['device'].replace(':', '')}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
