"""Memory-parallel: the shared value table sharded column-wise over a process group.

Memory+ (Berges et al. 2024, arXiv:2412.09764) splits the value table along the value dimension:
with W ranks in a *memory-parallel group*, rank r stores columns [c0_r, c1_r) of every
row, i.e. a `[slots, cols_r]` slice of the logical `[slots, v_dim]` table. Everything
else is replicated across the group: every rank sees the same tokens, runs the same
query / product-key search (so the same indices and scores), and holds the same dense
layer parameters, exactly as in a tensor-parallel group. Per memory layer and step:

    forward   scores' = scores                                    (identity)
              local   = embedding_bag(indices, slice_r, scores')  [N, cols_r]
              bag     = all_gather(local) along columns           [N, v_dim]
    backward  grad local    = grad bag[:, c0_r:c1_r]              (no communication)
              grad slice_r  = row-sparse COO [slots, cols_r], local to the rank
              grad scores   = all_reduce_sum(partial grad scores)  [N, B]

Why the backward needs no gather: the loss is computed identically on every rank
(replicated tokens and parameters), so `grad bag` is identical everywhere and each
rank keeps the columns it owns. Why the scores need a sum: the local op's
`grad scores[n, j] = <grad bag[n], row[idx[n, j]]>` only covers this rank's columns;
summing the W partial dot products gives the full one, so the query and keys get the
gradient a single process would compute (and the same one on every rank).

Column split: `torch.tensor_split` sizes (the first `v_dim % W` ranks get one column
more): v_dim = 576 over 5 ranks -> 116, 115, 115, 115, 115. The all-gather pads every
slice to the widest one (collectives need equal sizes; gloo has no uneven all-gather)
and trims after.

The group must hold ranks that see the same tokens. Combine with data parallelism by
making separate groups (`new_memory_parallel_group(size)` partitions the world into
consecutive blocks); the table's gradient is then also summed over the data-parallel
replicas of each shard, which this module does not do.

Not DTensor (the reference uses `Shard(1)`): our bag is a custom autograd op with a
row-sparse COO gradient (and a Triton kernel on GPU); on DTensor it would need its own
sharding rule, and SparseRowAdam would receive DTensor gradients instead of the plain
COO tensors it is written and tested for (sparse DTensor gradients are not something
we rely on). Two explicit collectives per layer keep the kernels and optimizers
unchanged and make the communication visible. See docs/memory-layer.md,
"Memory-parallel sharding", for initialization, optimizer state and checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memsurgery.errors import InputError
from memsurgery.memory.config import MemoryConfig
from memsurgery.memory.bank import MemoryBank
from memsurgery.memory.values import SharedValueTable
from memsurgery.ops import embedding_bag

# Column-seeded init generates this many fp32 values per block (bounds the transient).
_INIT_BLOCK_ELEMENTS = 4 << 20
# Rows of the padded slice sent per collective when gathering a whole table (bounds
# the transient of a checkpoint gather to ~W * this many bytes per chunk, not W tables).
_GATHER_CHUNK_BYTES = 64 << 20
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------
# Column layout.
# ---------------------------------------------------------------------------------


def column_sizes(v_dim: int, world: int) -> list[int]:
    """Widths of the W column slices of a `v_dim`-wide table (torch.tensor_split rule).

    The first `v_dim % world` slices are one column wider: (576, 5) -> [116, 115, 115, 115, 115].
    """
    if world < 1:
        raise InputError(f"memory-parallel world size {world} must be >= 1")
    if v_dim < world:
        raise InputError(
            f"v_dim={v_dim} cannot be split over {world} memory-parallel ranks "
            "(each rank needs at least one column); use a smaller memory-parallel group"
        )
    base, extra = divmod(v_dim, world)
    return [base + 1 if r < extra else base for r in range(world)]


def column_range(v_dim: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s columns in a `v_dim`-wide table over `world` ranks."""
    sizes = column_sizes(v_dim, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ---------------------------------------------------------------------------------
# Sharding-invariant initialization.
# ---------------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    """One splitmix64 finalization: a bijective 64-bit mix (nearby inputs -> unrelated outputs)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def column_seed(seed: int, column: int) -> int:
    """The generator seed of one column of a column-seeded table (63 bits, for manual_seed)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ column) & ((1 << 63) - 1)


@torch.no_grad()
def column_seeded_normal_(
    weight: torch.Tensor, seed: int, std: float, col_offset: int = 0
) -> torch.Tensor:
    """Fill `weight` [slots, c] with N(0, std): column j from its own stream (seed, col_offset + j).

    A row-major `normal_` over the whole table cannot be reproduced one column slice at
    a time (each slice would need the whole table's random stream). Seeding each
    *column* instead makes the values a function of (seed, global column) only, so:

        full = SharedValueTable(slots, v_dim); column_seeded_normal_(full.weight, s, std)
        slice_r = columns [c0, c1) of full   ==   column_seeded_normal_(w_r, s, std, c0)

    whatever the world size, device or dtype: values are drawn by a CPU generator in
    fp32 and then cast/copied into `weight`. Each rank draws only its own columns.
    Returns `weight`.
    """
    if weight.dim() != 2:
        raise InputError(
            f"column-seeded init needs a [slots, cols] tensor, got {tuple(weight.shape)}"
        )
    slots, cols = weight.shape
    step = max(1, _INIT_BLOCK_ELEMENTS // max(1, slots))
    gen = torch.Generator(device="cpu")
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        # [columns, slots] so each column's stream fills a contiguous row of the buffer.
        block = torch.empty(c1 - c0, slots, dtype=torch.float32)
        for j in range(c0, c1):
            gen.manual_seed(column_seed(seed, col_offset + j))
            block[j - c0].normal_(0.0, std, generator=gen)
        weight[:, c0:c1].copy_(block.t())
    return weight


def _shared_seed(group) -> int:
    """A seed every rank of `group` agrees on: each rank draws one from its default
    generator (so all ranks consume the same RNG and stay in lock-step for the dense
    layers' init that follows) and rank 0's draw is broadcast."""
    mine = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(_comm_device(group))
    dist.broadcast(mine, src=_global_rank(group, 0), group=group)
    return int(mine.item())


# ---------------------------------------------------------------------------------
# Collectives as autograd functions.
# ---------------------------------------------------------------------------------


def _require_dist() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "memory-parallel sharding needs torch.distributed initialized "
            "(dist.init_process_group(...), e.g. under torchrun)"
        )


def _comm_device(group) -> torch.device:
    """Where small control tensors (seeds, fingerprints) must live for `group`'s backend:
    NCCL only moves CUDA tensors, gloo CPU ones (and CUDA ones by staging)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_rank(group, group_rank: int) -> int:
    """Global rank of `group_rank` in `group` (collectives' src/dst take global ranks)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [..., c] -> contiguous [..., width], zero-padded on the right."""
    if t.shape[-1] == width:
        return t.contiguous()
    return F.pad(t, (0, width - t.shape[-1])).contiguous()


def _all_gather_cols(local: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
    """Every rank's [..., sizes[r]] slice, concatenated along the last dim: [..., sum(sizes)]."""
    width = max(sizes)
    sent = _pad_cols(local, width)
    parts = [torch.empty_like(sent) for _ in sizes]
    dist.all_gather(parts, sent, group=group)
    return torch.cat([p[..., :s] for p, s in zip(parts, sizes, strict=True)], dim=-1)


class _CopyToMemoryParallel(torch.autograd.Function):
    """Identity on replicated scores; backward sums the per-rank partial gradients."""

    @staticmethod
    def forward(ctx, scores, group):
        ctx.group = group
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        # A private contiguous copy: all_reduce works in place, and autograd may hand the
        # same gradient buffer to other consumers.
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed, None


class _GatherColumns(torch.autograd.Function):
    """local [..., cols_r] -> full [..., v_dim]; backward keeps this rank's columns.

    The backward sends nothing: grad_full is identical on every rank of the group
    (replicated loss), so each rank's share is a slice of its own copy.
    """

    @staticmethod
    def forward(ctx, local, sizes, start, group):
        ctx.start, ctx.stop = start, start + local.shape[-1]
        return _all_gather_cols(local, sizes, group)

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[..., ctx.start : ctx.stop].contiguous(), None, None, None


class _GroupRef:
    """Holds a process group so that copy.deepcopy of a module keeps the same group
    (a ProcessGroup cannot be copied; a copied table still belongs to its group)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------------------------
# The sharded table.
# ---------------------------------------------------------------------------------


class ShardedValueTable(SharedValueTable):
    """This rank's column slice of a `[slots, v_dim]` value table, memory-parallel over `group`.

    weight: [slots, cols_r] parameter (columns [col_start, col_stop) of the logical
    table); `v_dim` reports the logical width, `local_v_dim` the slice's. Its gradient
    is row-sparse COO [slots, cols_r], local to the rank: SparseRowAdam / SparseRowSGD
    drive it unchanged (moments follow the slice; per-row step counts come out equal on
    every rank, since every rank sees the same rows).

    `bag()` bags the slice with the ordinary op and all-gathers the columns, so
    ProductKeyMemory layers bound to this table work unchanged. Every rank of `group`
    must call the layers on the same tokens, in the same order (collectives inside).

    Build it from a full table (`shard_value_table`, `shard_bank`) or directly, each rank
    drawing only its slice: `seed=s` gives the column-seeded init (gathering the slices
    equals `column_seeded_normal_(full, s, v_dim**-0.5)` in one process, any world
    size); `seed=None` agrees on a seed drawn from the ranks' default generators.
    `init=False` leaves the slice uninitialized (to be loaded).

    state_dict(): "weight" is the [slots, cols_r] slice (rank-local). load_state_dict()
    accepts that slice or the full [slots, v_dim] table (the rank takes its columns).
    """

    def __init__(
        self,
        slots: int,
        v_dim: int,
        group=None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
        init: bool = True,
    ):
        # Not SharedValueTable.__init__: that would allocate and initialize the full table.
        nn.Module.__init__(self)
        _require_dist()
        if slots < 1 or v_dim < 1:
            raise InputError(f"value table needs positive sizes, got slots={slots}, v_dim={v_dim}")
        self._group_ref = _GroupRef(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise InputError(
                "this process is not a member of the memory-parallel group it was given"
            )
        self.world_size = dist.get_world_size(group)
        self.logical_v_dim = v_dim
        self.col_sizes = tuple(column_sizes(v_dim, self.world_size))
        self.col_start, self.col_stop = column_range(v_dim, self.world_size, self.rank)
        self.seed = seed
        self.init_seed: int | None = None  # the seed reset_parameters last used
        self.weight = nn.Parameter(
            torch.empty(slots, self.col_stop - self.col_start, dtype=dtype, device=device)
        )
        if init:
            self.reset_parameters()

    @classmethod
    def from_config(
        cls,
        config: MemoryConfig,
        device: torch.device | str | None = None,
        *,
        group=None,
        seed: int | None = None,
    ) -> ShardedValueTable:
        """A sharded table sized from `config` (slots, value_dim, value_dtype)."""
        return cls(
            config.slots,
            config.value_dim,
            group,
            dtype=config.torch_value_dtype,
            device=device,
            seed=seed,
        )

    @property
    def group(self):
        """The memory-parallel process group (None: the default world group)."""
        return self._group_ref.group

    @property
    def v_dim(self) -> int:
        return self.logical_v_dim

    @property
    def local_v_dim(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, v_dim**-0.5) with the logical v_dim, column-seeded (see column_seeded_normal_).

        With `seed=None` the ranks first agree on a seed (a collective), so this must be
        called on every rank of the group.
        """
        seed = self.seed if self.seed is not None else _shared_seed(self.group)
        # Recorded so that a run can log it and rebuild the same table (any world size).
        self.init_seed = seed
        column_seeded_normal_(self.weight, seed, self.v_dim**-0.5, col_offset=self.col_start)

    def bag(
        self,
        indices: torch.Tensor,
        scores: torch.Tensor,
        backend: str = "auto",
        sparse_grad: bool = True,
    ) -> torch.Tensor:
        """indices, scores [N, B] (identical on every rank) -> bag [N, v_dim] (identical too).

        Local bag of the slice ([N, cols_r], its row-sparse gradient stays local), then
        an all-gather of the columns. The scores' gradient is all-reduced in backward.
        """
        if self.world_size == 1:
            return super().bag(indices, scores, backend=backend, sparse_grad=sparse_grad)
        scores = _CopyToMemoryParallel.apply(scores, self.group)
        local = embedding_bag(
            indices, self.weight, scores, backend=backend, sparse_grad=sparse_grad
        )
        return _GatherColumns.apply(local, self.col_sizes, self.col_start, self.group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept the full [slots, v_dim] table (a checkpoint written by full_state_dict or by
        # an unsharded run) as well as this rank's slice: take our columns of a full one.
        key = prefix + "weight"
        full = state_dict.get(key)
        if (
            isinstance(full, torch.Tensor)
            and self.local_v_dim != self.v_dim
            and tuple(full.shape) == (self.slots, self.v_dim)
        ):
            state_dict = dict(state_dict)
            state_dict[key] = full[:, self.col_start : self.col_stop].contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"slots={self.slots}, v_dim={self.v_dim}, columns=[{self.col_start}, {self.col_stop}) "
            f"rank {self.rank}/{self.world_size}, dtype={self.weight.dtype}"
        )


# ---------------------------------------------------------------------------------
# Sharding a table / a bank.
# ---------------------------------------------------------------------------------


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[4] float64 summary of a tensor (sum, sum of squares, first, last), chunked so a
    huge table never gets a float64 copy. Equal tensors give equal fingerprints up to
    summation order (threads), hence the tolerance in _check_replicated."""
    flat = t.detach().reshape(-1)
    out = torch.zeros(4, dtype=torch.float64, device=flat.device)
    if flat.numel() == 0:
        return out
    step = 1 << 22
    for a in range(0, flat.numel(), step):  # on the tensor's device: no table-sized transfer
        c = flat[a : a + step].to(torch.float64)
        out[0] += c.sum()
        out[1] += c.square().sum()
    out[2] = flat[0]
    out[3] = flat[-1]
    return out


def _check_replicated(named: Iterable[tuple[str, torch.Tensor]], group, what: str) -> None:
    """Raise InputError on every rank if the tensors differ between ranks of `group`.

    One all-reduce of MAX and one of MIN over all fingerprints, so every rank reaches the
    same verdict (no rank raises while another waits in a later collective).
    """
    named = list(named)
    if not named:
        return
    device = _comm_device(group)
    prints = torch.stack([_fingerprint(t).to(device) for _, t in named])  # [P, 4]
    hi, lo = prints.clone(), prints.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    bad = ((hi - lo).abs() > 1e-9 * hi.abs().clamp_min(1.0)).any(dim=1)
    if bool(bad.any()):
        names = [n for (n, _), b in zip(named, bad.tolist(), strict=True) if b]
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise InputError(
            f"{what} differs between memory-parallel ranks ({shown}); every rank must build "
            "the same bank (same torch.manual_seed before building it, or load one checkpoint)"
        )


def shard_value_table(
    table: SharedValueTable, group=None, verify: bool = True
) -> ShardedValueTable:
    """This rank's column slice of a full table that every rank of `group` holds identically.

    Copies columns [c0_r, c1_r) into a new ShardedValueTable (same dtype, device and
    requires_grad); `table` is left untouched (drop it to free its memory). With
    `verify`, first checks that every rank's table is the same (a fingerprint all-reduce).
    Every rank holds the full table for a moment: for tables too big for that, build
    ShardedValueTable directly (column-seeded init) or load a full checkpoint into it.
    """
    _require_dist()
    if isinstance(table, ShardedValueTable):
        raise InputError("the value table is already sharded")
    if verify:
        _check_replicated([("values.weight", table.weight)], group, "the value table")
    out = ShardedValueTable(
        table.slots,
        table.v_dim,
        group,
        dtype=table.weight.dtype,
        device=table.weight.device,
        init=False,
    )
    with torch.no_grad():
        out.weight.copy_(table.weight[:, out.col_start : out.col_stop])
    out.weight.requires_grad_(table.weight.requires_grad)
    return out


def shard_bank(bank: MemoryBank, group=None, verify: bool = True) -> MemoryBank:
    """Shard `bank`'s value table over `group` in place and rebind every layer; returns `bank`.

    `bank.values` becomes a ShardedValueTable (state-dict key "values.weight" now holds
    the rank's [slots, cols_r] slice); the layers' dense parameters stay replicated.
    With `verify`, checks first that every rank holds the same bank (table and every
    layer parameter). Build optimizers after this: the table's Parameter is replaced.
    """
    if isinstance(bank.values, ShardedValueTable):
        raise InputError("the memory bank's value table is already sharded")
    _require_dist()
    if verify:
        _check_replicated(bank.named_parameters(), group, "the memory bank")
    sharded = shard_value_table(bank.values, group, verify=False)
    bank.values = sharded
    for _, layer in bank:
        layer.bind_values(sharded)
    return bank


# ---------------------------------------------------------------------------------
# Gathering: checkpoints, optimizer state.
# ---------------------------------------------------------------------------------


def gather_columns(
    local: torch.Tensor, table: ShardedValueTable, dst: int | None = None
) -> torch.Tensor | None:
    """Gather a [rows, cols_r] tensor sharded like `table` into the full [rows, v_dim].

    For the table's weight (see gather_full_table) or anything laid out like it, e.g.
    SparseRowAdam's exp_avg / exp_avg_sq. `dst=None`: every rank gets the full tensor;
    `dst=k`: only group rank k does (the others return None). Rows go in chunks of
    ~64 MB of padded slice, so the transient is chunk-sized, not W tables.
    Collective: call it on every rank of the group.
    """
    _require_dist()
    if local.dim() != 2 or local.shape[1] != table.local_v_dim:
        raise InputError(
            f"gather_columns expects a [rows, {table.local_v_dim}] slice, got {tuple(local.shape)}"
        )
    group, sizes = table.group, table.col_sizes
    rows, width = local.shape[0], max(sizes)
    receive = dst is None or dst == table.rank
    full = (
        torch.empty(rows, table.v_dim, dtype=local.dtype, device=local.device) if receive else None
    )
    step = max(1, _GATHER_CHUNK_BYTES // max(1, width * local.element_size()))
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    for a in range(0, max(rows, 1), step):
        b = min(rows, a + step)
        sent = _pad_cols(local[a:b], width)
        if dst is None:
            parts = [torch.empty_like(sent) for _ in sizes]
            dist.all_gather(parts, sent, group=group)
        else:
            parts = [torch.empty_like(sent) for _ in sizes] if receive else None
            dist.gather(sent, parts, dst=_global_rank(group, dst), group=group)
        if receive:
            for p, s0, s in zip(parts, starts, sizes, strict=True):
                full[a:b, s0 : s0 + s] = p[:, :s]
    return full


def gather_full_table(table: ShardedValueTable, dst: int | None = None) -> torch.Tensor | None:
    """The full [slots, v_dim] table from every rank's slice (detached); see gather_columns."""
    return gather_columns(table.weight.detach(), table, dst=dst)


def full_state_dict(module: nn.Module, dst: int | None = None) -> dict | None:
    """`module.state_dict()` with every ShardedValueTable's weight gathered to full width.

    The result has the keys and shapes of the unsharded module (a bank, or a model holding
    one), so it is written, loaded and compared like any single-process checkpoint, and
    loads back into a module sharded over any number of ranks (the sharded table takes
    its columns of the full weight on load). `dst=None`: every rank gets it; `dst=k`: only
    group rank k (the others return None). Collective: call on every rank.
    """
    state = module.state_dict()
    complete = True
    for name, sub in module.named_modules():
        if isinstance(sub, ShardedValueTable):
            key = f"{name}.weight" if name else "weight"
            full = gather_full_table(sub, dst=dst)
            if full is None:
                complete = False
            else:
                state[key] = full
    return state if complete else None


def new_memory_parallel_group(size: int | None = None):
    """Partition the world into consecutive blocks of `size` ranks; return this rank's group.

    `size=None`: the whole world (returns None, the default group). Every rank must call
    it (dist.new_group is collective over the world), with the same `size`.
    """
    _require_dist()
    world, rank = dist.get_world_size(), dist.get_rank()
    if size is None or size == world:
        return None
    if size < 1 or world % size:
        raise InputError(f"memory-parallel group size {size} must divide the world size {world}")
    mine = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return mine
