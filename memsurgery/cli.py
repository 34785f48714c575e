"""The `memsurgery` command line: a Typer app whose commands are thin wrappers.

Each command parses flags, calls one library function and renders its result.
`main()` turns every MemsurgeryError (and click usage errors) into a single
line on stderr with exit code 2 (bad input) or 1 (runtime failure); `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.2x vendors click; older releases use click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

_Abort = getattr(_click_exc, "Abort", None) or typer.Abort
_Exit = getattr(_click_exc, "Exit", None) or typer.Exit
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())

from memsurgery.errors import InputError, MemsurgeryError, one_line

app = typer.Typer(
    name="memsurgery",
    help="Graft shared product-key memory layers into dense transformer checkpoints.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(help="Benchmarks (timings are ratios measured side by side in one run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_STATE = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch (default: $MEMSURGERY_THREADS, else torch's default)."),
) -> None:
    _STATE["debug"] = debug or os.environ.get("MEMSURGERY_DEBUG") == "1"
    threads = threads or (int(os.environ["MEMSURGERY_THREADS"]) if os.environ.get("MEMSURGERY_THREADS") else None)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads {threads}: must be at least 1")
        import torch

        # On small shared VMs, torch's 2-thread pool can be slower than one thread
        # (measured here: SmolLM2 decode 17 vs 2.2 tok/s); let users choose.
        torch.set_num_threads(threads)


def _console():
    from rich.console import Console

    return Console()


def _emit_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------- commands


@app.command()
def version() -> None:
    """Print the memsurgery version."""
    from memsurgery import __version__

    print(__version__)



@app.command()
def convert(
    src: Path = typer.Argument(..., help="GGUF file, HF directory, or .safetensors file beside a config.json."),
    out: Path = typer.Argument(..., help="Output directory (must not exist or be empty unless --force)."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard, e.g. 2GB, 500MB."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weight dtype written: fp32, bf16 or fp16."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin inputs (pickle)."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    """Convert a checkpoint (GGUF or safetensors) into a standard Hugging Face directory."""
    from memsurgery.checkpoint.convert import convert_checkpoint

    # Progress goes to stdout so that stderr carries nothing but the one-line error.
    log = (lambda m: None) if json_out else _console().print
    report = convert_checkpoint(src, out, shard_size=shard_size, dtype=dtype, force=force,
                                allow_pickle=allow_pickle, log=log)
    if json_out:
        _emit_json(report)
    else:
        _console().print(f"[green]converted[/] {report['source']} -> {report['out']} "
                         f"({len(report['files'])} files, {report['total_seconds']} s)")


@app.command("inspect")
def inspect_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint: HF directory, .safetensors file or .gguf file."),
    json_out: bool = typer.Option(False, "--json", help="Print the stable JSON report (docs/cli.md)."),
    slots: str = typer.Option("64K", "--slots", help="Proposed memory slots (perfect square), e.g. 64K, 1M."),
    heads: int = typer.Option(4, "--heads", help="Proposed memory heads."),
    knn: int = typer.Option(32, "--knn", help="Proposed top-k per head."),
    k_dim: int = typer.Option(256, "--k-dim", help="Proposed key dimension (even)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Proposed layers, e.g. 8,16,24 (default: 3 evenly spaced)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin inputs (pickle)."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Also run causal tracing (loads the weights): a fact JSONL, or 'builtin'; prints the per-layer profile that graft --layers auto uses."),
) -> None:
    """Describe a checkpoint without loading its weights, plus a graft estimate."""
    from memsurgery.checkpoint import open_checkpoint
    from memsurgery.inspection import GraftProposal, inspect_checkpoint, parse_slots, render_inspect

    layer_list = _parse_layers(layers)
    proposal = GraftProposal(slots=parse_slots(slots), heads=heads, knn=knn, k_dim=k_dim, layers=layer_list)
    src = open_checkpoint(ckpt, allow_pickle=allow_pickle)
    report = inspect_checkpoint(src, proposal)
    if trace is not None:
        report["trace"] = _run_trace(src, trace, quiet=json_out)
    if json_out:
        _emit_json(report)
    else:
        render_inspect(report, _console())
        if trace is not None:
            from memsurgery.inspection.trace import render_trace

            render_trace(report["trace"], _console(), chosen=report["trace"]["chosen"])


def _run_trace(src, facts_path: str, quiet: bool) -> dict:
    """Causal tracing over a fact set: the per-layer MLP profile `graft --layers auto` uses."""
    from memsurgery.inspection import trace as tr

    facts = tr.load_facts(None if facts_path == "builtin" else facts_path)
    tokenizer = src.load_tokenizer()
    if tokenizer is None:
        raise InputError(f"{src.path}: has no tokenizer; --trace needs one")
    model = src.load_model()
    profile = tr.trace_layers(model, tokenizer, facts, log=None if quiet else _console().print)
    profile["chosen"] = tr.choose_layers(profile, k=3)
    return profile


def _parse_layers(text: Optional[str]) -> Optional[List[int]]:
    if text is None or text.strip() == "":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated layer numbers, e.g. 8,16,24") from None


@app.command()
def graft(
    ckpt: Path = typer.Argument(..., help="Dense source checkpoint (HF directory, .safetensors or .gguf)."),
    out: Path = typer.Argument(..., help="Output directory for the grafted checkpoint."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="graft.yaml with the same fields; flags override it."),
    layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 8,16,24, 'auto' (causal tracing) or 'default' (3 evenly spaced)."),
    slots: Optional[str] = typer.Option(None, "--slots", help="Memory slots, a perfect square: 64K, 1M (default 1M)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Memory heads (default 4)."),
    knn: Optional[int] = typer.Option(None, "--knn", help="Slots read per head per token (default 32)."),
    k_dim: Optional[int] = typer.Option(None, "--k-dim", help="Query/key dimension, even (default 256)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="parallel (beside the FFN, default) or replace (instead of it)."),
    keys: Optional[str] = typer.Option(None, "--keys", help="faiss (k-means on activations, default) or random."),
    query_init: Optional[str] = typer.Option(None, "--query-init", help="pca (default), orthogonal or random."),
    values: Optional[str] = typer.Option(None, "--values", help="zero | random | distill (default: zero for parallel, distill for replace)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="relevance | none (default: relevance for parallel, none for replace)."),
    value_dtype: Optional[str] = typer.Option(None, "--value-dtype", help="float32 (default) or bfloat16 value table."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: .txt/.jsonl/.parquet (default: bundled general English)."),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help="Calibration tokens for key init (default 32768)."),
    heldout_tokens: Optional[int] = typer.Option(None, "--heldout-tokens", help="Held-out tokens for usage stats and checks (default 16384)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="Joint optimizer steps over the replaced layers for --values distill (default 150)."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Fact JSONL for --layers auto (default: bundled facts)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT; skip the RAM check."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model.bin inputs (pickle)."),
    json_out: bool = typer.Option(False, "--json", help="Print the graft report as JSON."),
) -> None:
    """Graft a shared product-key memory into a dense checkpoint (docs/graft.md)."""
    from memsurgery.graft.api import graft as run_graft
    from memsurgery.graft.plan import load_plan_file

    fields = load_plan_file(plan_file) if plan_file else {}
    flags = dict(layers=layers, slots=slots, heads=heads, knn=knn, k_dim=k_dim, mode=mode, keys=keys,
                 query_init=query_init, values=values, gate=gate, value_dtype=value_dtype, calib=calib,
                 calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, distill_steps=distill_steps,
                 trace_facts=trace, seed=seed)
    fields.update({k: v for k, v in flags.items() if v is not None})
    log = (lambda m: None) if json_out else _console().print
    _, report = run_graft(ckpt, out, plan=fields, force=force, allow_pickle=allow_pickle, log=log)
    if json_out:
        _emit_json(report)
    else:
        _render_graft(report)


def _render_graft(report: dict) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="slot usage on held-out tokens (random vs faiss keys)")
    for col in ("layer", "random % used", "faiss % used", "random KL", "faiss KL", "faiss gini"):
        table.add_column(col, justify="right")
    for layer, u in report["usage"].items():
        r, f = u["random"], u.get("faiss")
        table.add_row(layer, f"{r['pct_used']:.2f}", f"{f['pct_used']:.2f}" if f else "-",
                      f"{r['kl_uniform_count']:.3f}", f"{f['kl_uniform_count']:.3f}" if f else "-",
                      f"{f['gini_count']:.3f}" if f else "-")
    console.print(table)
    console.print(f"check: {report['check']}")
    console.print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items()))


@app.command("fetch-demo")
def fetch_demo() -> None:
    """Download (once) and verify the demo checkpoint, SmolLM2-135M-Instruct GGUF; print its path."""
    from memsurgery.checkpoint.fetch import fetch_demo_checkpoint

    print(fetch_demo_checkpoint(log=_console().print))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for everything the demo writes."),
    people: Optional[int] = typer.Option(None, "--people", help="Fictional people to teach (6 facts each; default 20)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default 150)."),
    world_limit: Optional[int] = typer.Option(None, "--world-limit", help="Real-world facts probed (default 200)."),
    json_out: bool = typer.Option(False, "--json", help="Print the inspect report as JSON."),
) -> None:
    """The main job: fetch SmolLM2-135M -> convert -> inspect -> graft -> train -> probe -> export."""
    from memsurgery.demo import run_demo

    run_demo(out, console=_console(), json_out=json_out, people=people, steps=steps, world_limit=world_limit)


@bench_app.command("kernels")
def bench_kernels(
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (seconds), for smoke tests."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Embedding-bag forward/backward: ours vs torch.nn.functional.embedding_bag, GB/s side by side."""
    from memsurgery.bench.kernels import run_kernel_bench

    # run_kernel_bench prints its own table, or the JSON document with json_out.
    run_kernel_bench(device=device, json_out=json_out, quick=quick)


@bench_app.command("throughput")
def bench_throughput(
    ckpt: Optional[Path] = typer.Argument(None, help="Dense checkpoint (default: the demo SmolLM2)."),
    slots: str = typer.Option("1M", "--slots", help="Memory slots."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Memory layers (default 3 evenly spaced)."),
    reps: int = typer.Option(3, "--reps", help="Timed repetitions per model."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (seconds), for smoke tests."),
) -> None:
    """Tokens/s of grafted (parallel, replace) vs base: batch-1 decode and 8x256 prefill, one run."""
    from memsurgery.bench.throughput import render, run_throughput_bench
    from memsurgery.memory import parse_slots

    log = (lambda m: None) if json_out else _console().print
    result = run_throughput_bench(ckpt, slots=parse_slots(slots), layers=_parse_layers(layers), reps=reps,
                                  quick=quick, log=log)
    if json_out:
        _emit_json(result)
    else:
        render(result, _console())


@bench_app.command("layer")
def bench_layer(
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (seconds), for smoke tests."),
) -> None:
    """One memory layer's step (fwd+bwd+sparse optimizer) at small vs large tables: time ratio, peak RSS."""
    from memsurgery.bench.layer import run_layer_bench

    run_layer_bench(json_out=json_out, quick=quick)  # prints a table, or the JSON with json_out


from memsurgery.commands import probe as _probe_cmds  # noqa: E402
from memsurgery.commands import train as _train_cmds  # noqa: E402

_train_cmds.register(app)
_probe_cmds.register(app)


# ------------------------------------------------------------------------ entry


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point with one-line errors and exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEMSURGERY_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="memsurgery", standalone_mode=False)
    except MemsurgeryError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(str(err))}\n")
        sys.exit(err.exit_code)
    except _Exit as err:
        sys.exit(getattr(err, "exit_code", 0))
    except _Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(1)
    except _NoArgsIsHelp as err:  # bare group: show its help, usage exit code
        ctx = getattr(err, "ctx", None)
        sys.stderr.write((ctx.get_help() if ctx else "see memsurgery --help") + "\n")
        sys.exit(2)
    except _click_exc.ClickException as err:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(err.format_message())} (see memsurgery --help)\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; no output was written\n")
        sys.exit(130)
    except MemoryError:
        if debug:
            raise
        sys.stderr.write("error: out of memory; use a smaller configuration\n")
        sys.exit(1)
    except Exception as err:  # an unexpected bug: still one line unless --debug
        if debug:
            raise
        sys.stderr.write(
            f"error: internal error: {type(err).__name__}: {one_line(str(err))} "
            "(rerun with --debug for the traceback)\n"
        )
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
