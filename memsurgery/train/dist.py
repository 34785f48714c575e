"""Data-parallel helpers (torchrun): rank info, gradient averaging with row-sparse value grads.

The loss of every micro-batch is divided by the number of target tokens in the
whole global batch (all ranks, all micro-batches), so the plain SUM of the ranks'
gradients is the global gradient: no division afterwards, and a 2-process run
takes the same steps as a 1-process run at the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: NCCL needs CUDA tensors
    owned: bool = False  # True when we created the process group (and so destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device_kind: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                    device=f"cuda:{local}" if device_kind == "cuda" else "cpu", owned=owned)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        import torch.distributed as dist

        if t.device != torch.device(info.device):
            tmp = t.to(info.device)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.active:
        import torch.distributed as dist

        dist.barrier()


def reduce_dense_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """SUM every dense gradient over ranks, in one flat buffer."""
    if not info.active or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, info)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def reduce_sparse_grad(param: torch.nn.Parameter, info: DistInfo) -> None:
    """SUM a coalesced row-sparse gradient over ranks: all-gather (rows, values), then coalesce.

    Only rows some rank touched travel; the dense table is never materialized.
    """
    if not info.active:
        return
    import torch.distributed as dist

    g = param.grad
    if g is None:
        g = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64, device=param.device),
                                    torch.zeros(0, *param.shape[1:], dtype=param.dtype, device=param.device),
                                    param.shape).coalesce()
    rows, vals = g._indices()[0], g._values()
    n = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world)]
    dist.all_gather(sizes, n)
    cap = int(max(int(s) for s in sizes))
    pad_rows = torch.zeros(cap, dtype=rows.dtype, device=rows.device)
    pad_vals = torch.zeros(cap, *vals.shape[1:], dtype=vals.dtype, device=vals.device)
    pad_rows[:rows.numel()] = rows
    pad_vals[:rows.numel()] = vals
    all_rows = [torch.zeros_like(pad_rows) for _ in range(info.world)]
    all_vals = [torch.zeros_like(pad_vals) for _ in range(info.world)]
    dist.all_gather(all_rows, pad_rows)
    dist.all_gather(all_vals, pad_vals)
    r = torch.cat([ar[:int(s)] for ar, s in zip(all_rows, sizes)])
    v = torch.cat([av[:int(s)] for av, s in zip(all_vals, sizes)])
    param.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v, param.shape).coalesce()
