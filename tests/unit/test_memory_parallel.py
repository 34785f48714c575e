"""Memory-parallel sharding: 2 gloo processes on CPU checked against a single-process bank.

Each worker builds the single-process reference bank itself (same seed, same inputs)
and a second copy that it shards over the 2-rank group, so it can compare its column
slice with the reference's columns directly; it writes a JSON summary (errors seen,
its column range) that the parent checks. A worker that fails raises: the other is
killed by torch.multiprocessing and the traceback becomes this test's failure. Gloo
collectives time out after 30 s and the parent gives up after _JOIN_TIMEOUT_S, so a
desynchronized collective fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memsurgery.errors import InputError
from memsurgery.memory import MemoryBank, MemoryConfig
from memsurgery.optim import SparseRowAdam, SparseRowSGD
from memsurgery.parallel import (
    ShardedValueTable,
    column_range,
    column_seed,
    column_seeded_normal_,
    column_sizes,
    full_state_dict,
    gather_columns,
    gather_full_table,
    new_memory_parallel_group,
    shard_bank,
)
from tests.numerics import assert_close_normwise, memory_chain, reorder_rtol

WORLD = 2
_JOIN_TIMEOUT_S = 120
SMALL = {"slots": 256, "heads": 2, "knn": 4, "k_dim": 16}
D = 24
# fp32 tolerances, normwise (tests/numerics.py): the sharded and the single-process layer
# differ only in the order of their sums. Outputs: one layer's chain of sums (v_dim <= 30);
# gradients: that chain forward and backward, plus the sum over the 3 x 5 tokens, with the
# score gradient all-reduced over the ranks' column slices.
TOL = reorder_rtol(memory_chain(D, {**SMALL, "v_dim": 30}))
GRAD_TOL = reorder_rtol(2 * memory_chain(D, {**SMALL, "v_dim": 30}), 15)
# v_dim 24 and 30 split evenly over 2 ranks (12+12, 15+15), 25 unevenly (13+12).
CASES = [
    {"v_dim": 24, "gate": "none", "sparse_grad": True},
    {"v_dim": 25, "gate": "relevance", "sparse_grad": True},
    {"v_dim": 30, "gate": "none", "sparse_grad": False},
]


# ---------------------------------------------------------------------------------
# Harness.
# ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, body_name: str) -> None:
    """Process entry: init gloo, run the named body, write its JSON summary."""
    torch.set_num_threads(1)  # 2 shared cores, 2 processes
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    summary = _BODIES[body_name](rank, world)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary))
    # Leave together: rank 0 hosts the TCP store, and a rank still tearing down after it
    # exited aborts. (On failure nothing is torn down: spawn kills the other worker.)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(body_name: str, tmp_path: Path) -> list[dict]:
    """Run `body_name` on WORLD processes; return each rank's summary (fails on error/timeout)."""
    ctx = mp.spawn(
        _entry,
        args=(WORLD, _free_port(), str(tmp_path), body_name),
        nprocs=WORLD,
        join=False,
    )
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    # join() raises (with the worker's traceback) as soon as one worker fails.
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:  # only the processes this test started
                if p.is_alive():
                    p.kill()
            pytest.fail(f"memory-parallel workers did not finish in {_JOIN_TIMEOUT_S} s")
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(WORLD)]


def _config(v_dim: int, gate: str = "none") -> MemoryConfig:
    return MemoryConfig.build(**SMALL, v_dim=v_dim, gate=gate).for_model(D)


def _bank(cfg: MemoryConfig, seed: int, sparse_grad: bool = True) -> MemoryBank:
    torch.manual_seed(seed)
    bank = MemoryBank.from_config(cfg)
    for name in ("0", "1"):
        bank.add_layer(name).sparse_grad = sparse_grad
    return bank


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)


def _forward(bank: MemoryBank, x, w) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs = [layer(x) for _, layer in bank]
    return outs, sum((o * w).sum() for o in outs)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative error (relative to b's largest magnitude)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------
# Worker bodies.
# ---------------------------------------------------------------------------------


def _body_equivalence(rank: int, world: int) -> dict:
    """Forward, backward and one SparseRowAdam step: sharded == single process."""
    x, w = _inputs()
    report = []
    for case in CASES:
        cfg = _config(case["v_dim"], case["gate"])
        ref = _bank(cfg, seed=7, sparse_grad=case["sparse_grad"])
        bank = shard_bank(_bank(cfg, seed=7, sparse_grad=case["sparse_grad"]))
        table = bank.values
        assert isinstance(table, ShardedValueTable)
        c0, c1 = table.col_start, table.col_stop
        assert (c0, c1) == column_range(case["v_dim"], world, rank)
        assert tuple(table.weight.shape) == (256, c1 - c0) and table.v_dim == case["v_dim"]
        assert all(layer.value_table is table for _, layer in bank)
        assert torch.equal(table.weight, ref.values.weight[:, c0:c1])

        outs_ref, loss_ref = _forward(ref, x, w)
        outs, loss = _forward(bank, x, w)
        errs = {"out": max(_err(o, r) for o, r in zip(outs, outs_ref, strict=True))}
        for o, r in zip(outs, outs_ref, strict=True):
            assert_close_normwise(o, r, TOL, "output")
        loss_ref.backward()
        loss.backward()

        # Dense parameters: the single process's gradients, and bitwise equal on both ranks
        # (replicas must not drift apart step after step).
        ref_params = dict(ref.named_parameters())
        dense_grads = []
        errs["dense_grad"] = 0.0
        for name, p in bank.named_parameters():
            if name == "values.weight":
                continue
            assert_close_normwise(p.grad, ref_params[name].grad, GRAD_TOL, name)
            errs["dense_grad"] = max(errs["dense_grad"], _err(p.grad, ref_params[name].grad))
            dense_grads.append(p.grad.reshape(-1))
        flat = torch.cat(dense_grads)
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat)
        assert all(torch.equal(both[0], b) for b in both), "dense grads differ between ranks"

        # The slice's gradient: row-sparse (or dense) and local, = the reference's columns.
        g = table.weight.grad
        assert g.is_sparse == case["sparse_grad"]
        assert tuple(g.shape) == (256, c1 - c0)
        g_ref = _dense(ref.values.weight.grad)[:, c0:c1]
        assert_close_normwise(_dense(g), g_ref, GRAD_TOL, "table grad")
        errs["table_grad"] = _err(_dense(g), g_ref)

        # One optimizer step: SparseRowAdam on the table (its moments follow the slice),
        # SGD on the dense parameters. Not Adam there: a first Adam step is ~lr * sign(g),
        # and the key gradients include rounding-level entries (~1e-8, what is left of a
        # gradient along the key after the RMS-norm projection) whose sign is noise.
        for b in (ref, bank):
            SparseRowAdam(b.table_parameters(), lr=1e-2).step()
            SparseRowSGD(b.dense_parameters(), lr=1e-2).step()
        full = gather_full_table(table)
        # Adam's step is ~lr * sign(g) on the touched rows: lr * the gradient's relative error
        assert_close_normwise(full, ref.values.weight.detach(), GRAD_TOL, "table after step")
        errs["table_after_step"] = _err(full, ref.values.weight.detach())
        for name, p in bank.named_parameters():
            if name != "values.weight":
                assert_close_normwise(p, ref_params[name], GRAD_TOL, name)
        report.append({**case, "columns": [c0, c1], "errors": errs})
    return {"rank": rank, "cases": report}


def _body_init_and_checkpoint(rank: int, world: int) -> dict:
    """Column-seeded init, gathers, state dicts, replica verification, 1-rank groups."""
    summary: dict = {"rank": rank}

    # Direct init, explicit seed: gathered slices == one process's column-seeded table.
    t = ShardedValueTable(256, 25, seed=11)
    expect = column_seeded_normal_(torch.empty(256, 25), 11, 25**-0.5)
    assert torch.equal(gather_full_table(t), expect)
    on_dst = gather_full_table(t, dst=1)
    assert (on_dst is None) == (rank != 1)
    if on_dst is not None:
        assert torch.equal(on_dst, expect)
    assert abs(float(expect.std()) - 25**-0.5) < 0.01

    # seed=None: ranks agree on rank 0's draw even with different default generators.
    torch.manual_seed(100 + rank)
    t2 = ShardedValueTable(64, 9, dtype=torch.bfloat16)
    seeds = [None] * world
    dist.all_gather_object(seeds, t2.init_seed)
    assert len(set(seeds)) == 1, seeds
    ref9 = column_seeded_normal_(torch.empty(64, 9), seeds[0], 9**-0.5).to(torch.bfloat16)
    assert torch.equal(t2.weight, ref9[:, t2.col_start : t2.col_stop])
    summary["init_seed"] = t2.init_seed

    # Bank built directly on a sharded table: layers bind to the logical shape.
    cfg = _config(25, "relevance")
    torch.manual_seed(3)
    direct = MemoryBank(ShardedValueTable.from_config(cfg, seed=5), cfg)
    direct.add_layer("0")
    x, w = _inputs()
    _forward(direct, x, w)[1].backward()
    assert direct.values.weight.grad.is_sparse

    # Full state dict == the unsharded bank's; loads back into a differently-initialized
    # sharded bank; a rank-local state dict round-trips too.
    ref = _bank(cfg, seed=7)
    bank = shard_bank(_bank(cfg, seed=7))
    full_sd = full_state_dict(bank)
    ref_sd = ref.state_dict()
    assert list(full_sd) == list(ref_sd)
    assert all(torch.equal(full_sd[k], ref_sd[k]) for k in ref_sd)
    assert (full_state_dict(bank, dst=0) is None) == (rank != 0)
    other = shard_bank(_bank(cfg, seed=8))
    assert not torch.equal(other.values.weight, bank.values.weight)
    other.load_state_dict(ref_sd)  # full [256, 25] table -> this rank's columns
    assert torch.equal(other.values.weight, bank.values.weight)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in bank.state_dict().items())
    local_sd = bank.state_dict()
    assert tuple(local_sd["values.weight"].shape) == (256, bank.values.local_v_dim)
    fresh = shard_bank(_bank(cfg, seed=9))
    fresh.load_state_dict(local_sd)
    assert torch.equal(fresh.values.weight, bank.values.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({**local_sd, "values.weight": torch.zeros(256, 7)})

    # Optimizer moments are laid out like the slice: gather them the same way.
    _forward(bank, x, w)[1].backward()
    opt = SparseRowAdam(bank.table_parameters(), lr=1e-2)
    opt.step()
    _forward(ref, x, w)[1].backward()
    ref_opt = SparseRowAdam(ref.table_parameters(), lr=1e-2)
    ref_opt.step()
    st, ref_st = opt.state[bank.values.weight], ref_opt.state[ref.values.weight]
    m = gather_columns(st["exp_avg"], bank.values)
    assert_close_normwise(m, ref_st["exp_avg"], GRAD_TOL, "exp_avg")
    assert torch.equal(st["row_step"], ref_st["row_step"])  # replicated per-row counts

    # deepcopy keeps the group and points the copied layers at the copied table.
    clone = copy.deepcopy(bank)
    assert clone.values.group is bank.values.group
    assert all(layer.value_table is clone.values for _, layer in clone)

    # Ranks holding different banks: every rank raises the same InputError (no hang).
    with pytest.raises(InputError, match="differs between memory-parallel ranks") as info:
        shard_bank(_bank(cfg, seed=rank))
    summary["verify_message"] = str(info.value)
    with pytest.raises(InputError, match="already sharded"):
        shard_bank(bank)

    # 1-rank groups (one per rank): the bag takes the unsharded path, dst maps to the
    # group's global rank.
    solo = new_memory_parallel_group(1)
    assert dist.get_world_size(solo) == 1
    one = shard_bank(_bank(cfg, seed=7), group=solo)
    assert one.values.local_v_dim == 25
    outs, _ = _forward(one, x, w)
    outs_ref, _ = _forward(_bank(cfg, seed=7), x, w)  # `ref` took an optimizer step above
    for o, r in zip(outs, outs_ref, strict=True):
        assert_close_normwise(o, r, TOL, "1-rank output")
    assert torch.equal(gather_full_table(one.values, dst=0), one.values.weight.detach())
    return summary


_BODIES = {
    "equivalence": _body_equivalence,
    "init_and_checkpoint": _body_init_and_checkpoint,
}


# ---------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------


def test_column_sizes():
    assert column_sizes(576, 5) == [116, 115, 115, 115, 115]
    assert column_sizes(576, 5) == [len(c) for c in torch.arange(576).tensor_split(5)]
    assert column_sizes(25, 2) == [13, 12]
    assert [column_range(25, 2, r) for r in range(2)] == [(0, 13), (13, 25)]
    assert column_range(576, 5, 4) == (461, 576)
    with pytest.raises(InputError, match="cannot be split"):
        column_sizes(3, 5)


def test_column_seeded_init_is_sharding_invariant():
    full = column_seeded_normal_(torch.empty(100, 23), seed=5, std=0.5)
    for world in (1, 2, 3, 5):
        parts = []
        for r in range(world):
            c0, c1 = column_range(23, world, r)
            parts.append(column_seeded_normal_(torch.empty(100, c1 - c0), 5, 0.5, col_offset=c0))
        assert torch.equal(torch.cat(parts, dim=1), full)
    assert not torch.equal(full, column_seeded_normal_(torch.empty(100, 23), seed=6, std=0.5))
    # Columns come from distinct streams (no duplicated columns).
    assert len({column_seed(5, j) for j in range(10_000)}) == 10_000
    assert torch.corrcoef(full.t()).fill_diagonal_(0).abs().max() < 0.5


def test_sharded_matches_single_process(tmp_path):
    results = _spawn("equivalence", tmp_path)
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert [c["v_dim"] for c in res["cases"]] == [c["v_dim"] for c in CASES]
        for case in res["cases"]:
            assert case["columns"] == list(column_range(case["v_dim"], WORLD, rank))
    # The two ranks' column slices tile every table.
    for i, case in enumerate(CASES):
        cols = [res["cases"][i]["columns"] for res in results]
        assert cols[0][0] == 0 and cols[0][1] == cols[1][0] and cols[1][1] == case["v_dim"]


def test_init_checkpoint_and_verification(tmp_path):
    results = _spawn("init_and_checkpoint", tmp_path)
    assert results[0]["init_seed"] == results[1]["init_seed"]
    for res in results:
        assert "same torch.manual_seed" in res["verify_message"]
