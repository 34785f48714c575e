"""Benchmark: the embedding bag, ours vs `torch.nn.functional.embedding_bag`, side by side.

    python -m memsurgery.bench.kernels                 # full size on the default device
    python -m memsurgery.bench.kernels --quick         # tiny sizes, for CI
    python -m memsurgery.bench.kernels --json --device cuda

Shapes (bags x rows per bag, slots x dim): the paper's 4,096 x 128 over a
1,048,576 x 2,048 table, and SmolLM2's dim 576 with the same bags and slots.
Indices are uniform over the table (a trained memory's access is skewed; uniform
gives the most unique rows, i.e. the hardest case for the value gradient).

Implementations:
- "ours": `memsurgery.ops.embedding_bag` -- Triton on CUDA, the torch-sparse path on CPU;
  backward returns the row-sparse gradient.
- "torch": `F.embedding_bag(mode="sum", per_sample_weights=scores)`; its backward with
  `sparse=False` (a dense table-sized gradient) is what PyTorch users get.
- "torch_sparse": the same with `sparse=True` (backward only): PyTorch supports
  per_sample_weights there, but returns an *uncoalesced* gradient with one row per
  occurrence (N rows, duplicates not merged), so an optimizer still has to coalesce.

Dtypes: bf16 table and bf16 scores on CUDA, fp32 on CPU by default (`--dtype`); PyTorch
requires per_sample_weights in the table's dtype, so both implementations get the same
inputs. (With bf16, PyTorch's CPU kernel accumulates in bf16, ours in fp32.)

Memory: a shape whose table plus gradients would not fit 75% of free memory is run with
fewer slots (halved until it fits) and records `slots_requested`; the bytes moved per
call are the same, but more of the table is touched (higher U / slots).

Timing: median of `reps` runs after `warmup`; CUDA events on GPU, perf_counter on CPU.
Backward times only the backward (`autograd.grad` on a kept graph), gradients for both
the table and the scores.

Bytes model (the minimal traffic of the operation, identical for every implementation,
so GB/s ratios are speed ratios). N = bags * bag_size, U = unique rows, D = dim,
e_v / e_s / e_i = bytes per table / score / index element:

    forward  = N*D*e_v              gathered rows
             + N*(e_i + e_s)        indices and scores
             + bags*D*e_s           output (scores' dtype)
    backward = N*D*e_v              rows re-read for grad_scores
             + bags*D*e_s           grad_out read for grad_scores
             + N*D*e_s              grad_out read once per occurrence for the value grad
             + U*D*e_v              unique-row gradient written
             + N*(e_i + 2*e_s)      indices and scores read, grad_scores written

A dense-gradient implementation really moves more (it zeroes and writes slots*D); that
shows up as its lower effective GB/s. `speedup` = torch ms / ours ms.

Peak bandwidth (GB/s) used for `peak_fraction` on CUDA, matched on the device name:
H200 4,800; H100 SXM (HBM3) 3,350; H100 PCIe 2,000; H100 NVL 3,900; A100 80GB SXM
2,039; A100 80GB PCIe 1,935; A100 40GB 1,555; L40S 864; A10G 600; L4 300 (vendor specs).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PAPER = dict(name="paper", bags=4096, bag_size=128, slots=1 << 20, dim=2048)
SMOLLM2 = dict(name="smollm2", bags=4096, bag_size=128, slots=1 << 20, dim=576)
QUICK_SHAPES = [
    dict(name="paper-quick", bags=256, bag_size=32, slots=1 << 14, dim=2048),
    dict(name="smollm2-quick", bags=256, bag_size=32, slots=1 << 14, dim=576),
]

# (substring of torch.cuda.get_device_name(), peak GB/s); first match wins, so the
# more specific names come first.
PEAK_BANDWIDTH_GBS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB parts
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("L4", 300.0),
]


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """Vendor peak memory bandwidth for a CUDA device name, or None when unknown."""
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key in device_name:
            return gbs
    return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timer(device: torch.device, fn, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bytes(shape: dict, unique_rows: int, e_v: int, e_s: int, e_i: int) -> tuple[int, int]:
    """(forward bytes, backward bytes) of the bytes model in the module docstring."""
    n = shape["bags"] * shape["bag_size"]
    d = shape["dim"]
    fwd = n * d * e_v + n * (e_i + e_s) + shape["bags"] * d * e_s
    bwd = n * d * e_v + shape["bags"] * d * e_s + n * d * e_s + unique_rows * d * e_v
    bwd += n * (e_i + 2 * e_s)
    return fwd, bwd


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _fit_slots(shape: dict, device: torch.device, e_v: int) -> dict:
    """Shrink the table (halving slots) until the run's peak fits 75% of free memory.

    Peak ~ table + the larger of torch's dense gradient (slots*D*e_v) and ours (the
    expected U = slots*(1 - exp(-N/slots)) rows, fp32 plus a cast for half tables),
    plus ~1 GiB of temporaries. A shrunk shape records `slots_requested`.
    """
    shape = dict(shape)
    budget = 0.75 * _available_bytes(device)
    n = shape["bags"] * shape["bag_size"]
    while True:
        slots, dim = shape["slots"], shape["dim"]
        table = slots * dim * e_v
        unique = slots * (1.0 - math.exp(-n / slots))
        ours = unique * dim * (4 + (e_v if e_v != 4 else 0))
        if table + max(table, ours) + (1 << 30) <= budget or slots <= n // 4:
            return shape
        shape.setdefault("slots_requested", slots)
        shape["slots"] = slots // 2


def _make_table(slots: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # normal_ in place, in chunks of rows: no fp32 temporary the size of the table.
    table = torch.empty(slots, dim, dtype=dtype, device=device)
    step = max(1, (256 << 20) // (dim * table.element_size()))
    for start in range(0, slots, step):
        table[start : start + step].normal_(0.0, dim**-0.5)
    return table


def _bench_shape(
    shape: dict,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    reps: int,
    peak: float | None,
) -> dict:
    from memsurgery.ops import resolve_backend

    shape = _fit_slots(shape, device, torch.tensor([], dtype=dtype).element_size())
    bags, bag_size, slots, dim = shape["bags"], shape["bag_size"], shape["slots"], shape["dim"]
    gen = torch.Generator(device=device).manual_seed(0)
    _log(
        f"[kernels] {shape['name']}: {bags}x{bag_size} bags over {slots}x{dim} {dtype} on {device}"
    )
    table = _make_table(slots, dim, dtype, device).requires_grad_()
    indices = torch.randint(0, slots, (bags, bag_size), generator=gen, device=device)
    scores = torch.rand(bags, bag_size, generator=gen, device=device).softmax(-1).to(dtype)
    scores.requires_grad_()
    grad_out = torch.randn(bags, dim, generator=gen, device=device).to(dtype)
    unique_rows = int(torch.unique(indices).numel())
    nbytes = _bytes(shape, unique_rows, table.element_size(), scores.element_size(), indices.element_size())
    inputs = (indices, table, scores, grad_out)
    results = _time_impls(inputs, resolve_backend("auto", table), nbytes, device, warmup, reps, peak)
    speedup = {
        phase: round(results[phase]["torch"]["ms"] / results[phase]["ours"]["ms"], 3)
        for phase in ("forward", "backward")
    }
    return dict(
        shape,
        dtype=str(dtype).removeprefix("torch."),
        unique_rows=unique_rows,
        bytes=dict(forward=nbytes[0], backward=nbytes[1]),
        results=results,
        speedup=speedup,
    )


def _time_impls(inputs: tuple, ours_backend: str, nbytes: tuple[int, int], device, warmup: int, reps: int,
                peak: float | None) -> dict:
    """Forward and backward timings of ours and F.embedding_bag (dense and sparse grad)."""
    from memsurgery.ops import embedding_bag

    indices, table, scores, grad_out = inputs
    fwd_bytes, bwd_bytes = nbytes

    def ours():
        return embedding_bag(indices, table, scores)

    def torch_ref(sparse: bool = False):
        return F.embedding_bag(indices, table, per_sample_weights=scores, mode="sum", sparse=sparse)

    def backward_of(make_out):
        out = make_out()

        def step():
            torch.autograd.grad(out, (table, scores), grad_out, retain_graph=True)

        return step

    def entry(impl: str, ms: float, nbytes: int) -> dict:
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = dict(impl=impl, ms=round(ms, 4), gbs=round(gbs, 2))
        if peak:
            row["peak_fraction"] = round(gbs / peak, 4)
        return row

    results: dict = {"forward": {}, "backward": {}}
    with torch.no_grad():
        results["forward"]["ours"] = entry(
            ours_backend, _timer(device, ours, warmup, reps), fwd_bytes
        )
        results["forward"]["torch"] = entry(
            "F.embedding_bag", _timer(device, torch_ref, warmup, reps), fwd_bytes
        )
    results["backward"]["ours"] = entry(
        f"{ours_backend} (row-sparse grad)", _timer(device, backward_of(ours), warmup, reps),
        bwd_bytes,
    )  # fmt: skip
    gc.collect()
    results["backward"]["torch"] = entry(
        "F.embedding_bag sparse=False (dense grad)",
        _timer(device, backward_of(torch_ref), warmup, reps),
        bwd_bytes,
    )
    gc.collect()
    try:
        results["backward"]["torch_sparse"] = entry(
            "F.embedding_bag sparse=True (uncoalesced grad, N rows)",
            _timer(device, backward_of(lambda: torch_ref(sparse=True)), warmup, reps),
            bwd_bytes,
        )
    except RuntimeError as err:  # a PyTorch build that refuses psw + sparse
        results["backward"]["torch_sparse"] = {
            "impl": "F.embedding_bag sparse=True",
            "error": str(err).splitlines()[0],
        }
    return results


_SHORT = {"ours": "ours", "torch": "torch", "torch_sparse": "torch sp"}


def _threads_load(shape: dict) -> str:
    t = shape.get("threads")
    return ("" if t is None else f"{t} thr, ") + f"load {shape['loadavg_1min']:.2f}"


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"embedding bag on {report['device_name']} ({report['device']})"
    if report.get("peak_gbs"):
        title += f", peak {report['peak_gbs']:.0f} GB/s"
    caption = "; ".join(
        f"{s['name']}: {s['bags']}x{s['bag_size']} rows of {s['slots']}x{s['dim']} {s['dtype']}, "
        f"ours = {s['results']['forward']['ours']['impl']}"
        for s in report["shapes"]
    )
    table = Table(
        title=title,
        caption=caption
        + ". torch = F.embedding_bag (dense grad), torch sp = sparse=True (uncoalesced grad); "
        "speedup = torch ms / ours ms (threads, 1-min load average)",
    )
    for col in ("shape", "phase", "impl", "ms", "GB/s", "% peak", "speedup"):
        table.add_column(col, justify="left" if col in ("shape", "phase", "impl") else "right")
    for shape in report["shapes"]:
        for phase in ("forward", "backward"):
            for key, row in shape["results"][phase].items():
                if "error" in row:
                    table.add_row(shape["name"], phase, _SHORT[key], "-", "-", "-", "n/a")
                    continue
                frac = row.get("peak_fraction")
                table.add_row(
                    shape["name"], phase, _SHORT[key], f"{row['ms']:.2f}", f"{row['gbs']:.1f}",
                    f"{100 * frac:.0f}%" if frac is not None else "-",
                    f"{shape['speedup'][phase]:.2f}x ({_threads_load(shape)})" if key == "ours" else "",
                )  # fmt: skip
    Console().print(table)


def run_kernel_bench(
    device: str = "auto",
    json_out: bool = False,
    quick: bool = False,
    dtype: str | None = None,
    threads: int | None = None,
) -> dict:
    """Time the embedding bag (ours vs F.embedding_bag) at the paper's and SmolLM2's shapes.

    Args:
        device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
        json_out: print the report as JSON on stdout instead of a rich table.
        quick: tiny shapes and few reps (seconds on CPU), for CI.
        dtype: table and score dtype, "bfloat16" or "float32"; default bf16 on CUDA,
            fp32 on CPU.
        threads: torch CPU threads for the run (default: $MEMSURGERY_THREADS, else 1, what
            the Makefile uses). On a shared, oversubscribed machine 1 thread gives steadier
            numbers: every multi-threaded op then pays a scheduling delay for its second thread.
    Returns:
        The report dict: device, peak bandwidth, per shape the timings, GB/s, peak
        fraction (CUDA) and speedup; see the module docstring for the bytes model.
    """
    from memsurgery.bench import bench_threads, load_average

    torch.set_num_threads(bench_threads(threads))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)  # fmt: skip
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = peak_bandwidth_gbs(name)
        dtype = getattr(torch, dtype or "bfloat16")
        warmup, reps = (2, 5) if quick else (3, 20)
    else:
        import platform

        name = platform.processor() or platform.machine()
        peak = None
        dtype = getattr(torch, dtype or "float32")
        warmup, reps = 1, 3  # a full-size CPU backward takes seconds
    shapes = QUICK_SHAPES if quick else [PAPER, SMOLLM2]
    report = dict(
        bench="embedding_bag",
        device=str(dev),
        device_name=name,
        peak_gbs=peak,
        torch=torch.__version__,
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        quick=quick,
        warmup=warmup,
        reps=reps,
        shapes=[],
    )
    for shape in shapes:
        row = _bench_shape(shape, dev, dtype, warmup, reps, peak)
        # beside each speedup: what it ran on, and the load while it ran
        row.update(threads=report["threads"], loadavg_1min=load_average())
        report["shapes"].append(row)
        gc.collect()  # free this shape's table before the next one is allocated
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        _render(report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", action="store_true", dest="json_out", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: $MEMSURGERY_THREADS, else 1)")
    run_kernel_bench(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
