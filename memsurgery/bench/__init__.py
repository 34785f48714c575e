"""`memsurgery bench ...` implementations: kernel, layer and throughput benchmarks.

Each module exposes a `run_*` function returning a JSON-able dict (the CLI calls it)
and a `__main__` for `python -m memsurgery.bench.<name>`:

- `kernels`: the embedding bag, ours vs `torch.nn.functional.embedding_bag`.
- `layer`: one memory layer's step, small vs large table.
- `throughput`: tokens/s of grafted vs base models.
"""

from __future__ import annotations

import os

from memsurgery.errors import InputError

# What the Makefile exports (MEMSURGERY_THREADS=1): on the 2-vCPU machines this project
# is measured on, torch's 2-thread pool is several times slower than one thread, and a
# ratio measured on 2 threads measures the scheduler more than the code (README, "Limits").
DEFAULT_THREADS = 1


def bench_threads(threads: int | None = None) -> int:
    """The torch thread count a benchmark runs on: `threads` when given, else
    $MEMSURGERY_THREADS (which `memsurgery --threads N` sets), else DEFAULT_THREADS."""
    if threads is None and os.environ.get("MEMSURGERY_THREADS"):
        threads = int(os.environ["MEMSURGERY_THREADS"])
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise InputError(f"--threads {threads}: must be at least 1")
    return threads


def child_env(threads: int) -> dict:
    """The environment for a benchmark's child process: this one's, with the thread count
    spelled out for torch, OpenMP and MKL, so the child cannot fall back to their defaults."""
    n = str(threads)
    return dict(os.environ, MEMSURGERY_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)


def load_average() -> float:
    """The 1-minute load average (what else was running while a ratio was measured)."""
    return round(os.getloadavg()[0], 2)
