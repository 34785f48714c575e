"""Replace mode, `--values distill`: fit memory layers to imitate the FFNs they replace.

In replace mode the MLP of a grafted decoder layer is removed and the memory layer
alone must produce what the MLP did. Distillation is a layer-local regression on
captured calibration pairs (calibration.capture_mlp_inputs(..., with_outputs=True)):

    minimize  E_x || memory(x) - mlp(x) ||^2 / Var(mlp(x))

over a bounded number of steps, starting from the data-driven query/keys of
keyinit.init_memory_keys. Three stages, per layer:

1. Routing. The layer's query and keys pick slots and softmax weights for every
   calibration token, once. Routing stays frozen by default: top-k selection is
   piecewise constant (its gradient reaches only the scores of the picks already
   made), and recomputing it (query matmul + sub-key scoring) would cost more than
   everything else in a step. `train_routing=True` trains query and keys as well.
2. Closed-form start. W_o starts as the identity (v_dim == d; the top principal
   directions of the targets otherwise) and, under swilu, W_g as a "neutral" gate:
   every row is the least-squares a with a.x ~ u0, silu(u0) = 1, so silu(W_g x) ~ 1
   for every token and the layer starts as a plain kernel smoother. Each routed
   slot then gets the softmax-weighted mean of the (gated) targets of the tokens
   that picked it, v_s = sum w g y / (sum w g^2 + ridge), and one least-squares
   scalar per layer (folded into W_o) fixes the overall scale (the bag adds H heads'
   means). Slots no calibration token picks are left exactly as they were.
3. Adam. Minibatch steps on the normalized MSE: the value table with
   memsurgery.optim.SparseRowAdam on its row-sparse gradient, W_g / W_o (and the
   relevance gate, and query/keys with train_routing) with torch.optim.Adam.

Targets are divided by their RMS during the fit (W_o absorbs the factor at the end),
so the learning rates do not depend on the scale of a model's MLP outputs.

All memory layers of a model read ONE shared value table: distilling layer 5 and
then layer 15 separately would let the second fit overwrite rows the first relies
on. `distill_memories` fits several layers jointly (one step = one minibatch of
every layer, summed normalized losses); `distill_memory` is its one-layer case.

`perplexity(model, input_ids)` is the held-out metric the graft orchestration
reports for a replace-mode graft. See docs/graft.md, "Replace mode".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memsurgery.errors import InputError
from memsurgery.memory.layer import ProductKeyMemory
from memsurgery.ops import embedding_bag
from memsurgery.optim import SparseRowAdam

__all__ = ["distill_memories", "distill_memory", "perplexity", "route"]

# silu(u0) = 1: the pre-activation that makes a SiLU gate pass its input unchanged.
_SILU_ONE = 1.2784645427610738
# Tokens per chunk for passes over all calibration tokens (routing, closed form,
# metrics): bounds temporaries to a few tens of MB at d = 576.
_CHUNK = 4096
# Tokens used to measure train-set MSE (before / after): a fixed, seeded subset, so
# the report costs a bounded amount whatever the calibration size.
_METRIC_TOKENS = 16384

Log = Callable[[str], None] | None


# ------------------------------------------------------------------------ routing


@torch.no_grad()
def route(layer: ProductKeyMemory, x: torch.Tensor, chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's picks for tokens x [N, d]: (indices [N, H*knn] int64, weights [N, H*knn] fp32).

    Exactly what the forward feeds the embedding bag: all heads' picks form one bag,
    weights are the per-head softmax of score_scale * scores.
    """
    n = x.shape[0]
    width = layer.heads * layer.knn
    idx = torch.empty(n, width, dtype=torch.int64)
    w = torch.empty(n, width, dtype=torch.float32)
    dev, dt = layer.query.weight.device, layer.query.weight.dtype
    for i in range(0, n, chunk):
        xb = x[i : i + chunk].to(device=dev, dtype=dt)
        scores, ind = layer.select(xb)
        wb = torch.softmax(scores.float() * layer.score_scale, dim=-1)
        idx[i : i + xb.shape[0]] = ind.reshape(-1, width).cpu()
        w[i : i + xb.shape[0]] = wb.reshape(-1, width).cpu()
    return idx, w


def _routed_forward(
    layer: ProductKeyMemory, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, sparse_grad: bool = True
) -> torch.Tensor:
    """layer(x) [n, d] given its routing (idx, w): the part of the forward after select.

    Must match ProductKeyMemory.forward; tests compare the two.
    """
    bag = embedding_bag(idx, layer.value_table.weight, w, backend=layer.backend, sparse_grad=sparse_grad)
    bag = bag.to(x.dtype)
    if layer.gate_proj is not None:
        bag = bag * F.silu(layer.gate_proj(x))
    out = layer.out_proj(bag)
    if layer.gate_weight is not None:
        gate = torch.sigmoid(x @ layer.gate_weight.to(x.dtype) + layer.gate_bias.to(x.dtype))
        out = out * gate.unsqueeze(-1)
    return out


# ------------------------------------------------------------------------ one layer's data


@dataclass
class _Job:
    """One layer being distilled: its data (targets normalized by `sigma`) and routing."""

    name: str
    layer: ProductKeyMemory
    x: torch.Tensor  # [N, d] inputs
    y: torch.Tensor  # [N, d] targets / sigma
    sigma: float  # RMS of the raw targets
    var: float  # Var(targets / sigma): total variance per element, mean-free
    idx: torch.Tensor | None = None  # [N, H*knn] frozen routing
    w: torch.Tensor | None = None
    hx: torch.Tensor | None = None  # held-out inputs
    hy: torch.Tensor | None = None  # held-out targets / sigma
    h_idx: torch.Tensor | None = None
    h_w: torch.Tensor | None = None

    def predict(self, x, idx=None, w=None) -> torch.Tensor:
        if idx is None:
            return self.layer(x)
        return _routed_forward(self.layer, x, idx, w)


def _variance(y: torch.Tensor) -> float:
    """Mean over dims of the per-dim variance (the MSE of predicting the mean)."""
    return float(y.double().var(dim=0, unbiased=False).mean())


def _check_pair(layer: ProductKeyMemory, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    d = layer.input_dim
    if x.dim() != 2 or x.shape[1] != d:
        raise InputError(f"{what}: inputs must be [N, d={d}], got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise InputError(f"{what}: targets must have the inputs' shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise InputError(f"{what}: needs at least 2 tokens, got {x.shape[0]}")


@torch.no_grad()
def _mse(job: _Job, x, y, idx, w, limit: int | None = None) -> float:
    """Mean squared error (per element, normalized targets) of the layer on (x, y)."""
    n = x.shape[0] if limit is None else min(limit, x.shape[0])
    total = 0.0
    for i in range(0, n, _CHUNK):
        j = min(n, i + _CHUNK)
        pred = job.predict(x[i:j], None if idx is None else idx[i:j], None if w is None else w[i:j])
        total += float((pred.float() - y[i:j]).double().pow(2).sum())
    return total / (n * y.shape[1])


# ------------------------------------------------------------------------ closed-form init


@torch.no_grad()
def _init_out_proj(job: _Job) -> None:
    """W_o = identity when v_dim == d, else the top principal directions of the targets."""
    lin = job.layer.out_proj  # [d, V]
    d, v = lin.weight.shape
    if v == d:
        lin.weight.copy_(torch.eye(d, dtype=lin.weight.dtype))
        return
    y = job.y[: 4 * _METRIC_TOKENS].double()
    cov = y.T @ y / y.shape[0]
    _, vec = torch.linalg.eigh(cov)  # ascending
    r = min(d, v)
    weight = torch.zeros(d, v, dtype=torch.float64)
    weight[:, :r] = vec.flip(1)[:, :r]
    lin.weight.copy_(weight.to(lin.weight.dtype))


@torch.no_grad()
def _init_neutral_gate(job: _Job, ridge: float = 1e-3) -> dict:
    """Every row of W_g = a, the ridge least-squares solution of x.a = u0 (silu(u0) = 1).

    The gate silu(W_g x) is then ~1 for every token: the layer starts as an ungated
    kernel smoother, and Adam specializes the rows (their gradients differ per
    channel). Returns the spread of the pre-activation a.x on the data.
    """
    x = job.x[: 4 * _METRIC_TOKENS].double()
    n, d = x.shape
    second = x.T @ x / n
    mean = x.mean(0)
    lam = ridge * float(torch.trace(second)) / d
    a = torch.linalg.solve(second + lam * torch.eye(d, dtype=torch.float64), _SILU_ONE * mean)
    u = x @ a
    gate = job.layer.gate_proj.weight
    gate.copy_(a.to(gate.dtype).expand_as(gate))
    g = F.silu(u)
    return {"gate_pre_mean": float(u.mean()), "gate_pre_std": float(u.std()), "gate_mean": float(g.mean()), "gate_std": float(g.std())}


@torch.no_grad()
def _init_dense_path(job: _Job, eps: float, ridge: float) -> dict:
    """Make the layer a dense SiLU MLP fitted by least squares, with the bag held at 1.

    With every value row 1/H the bag is exactly 1 (each head's softmax weights sum to
    1), and the layer is W_o silu(W_g x). W_g = a + eps * P: the neutral direction a
    (silu(a.x) ~ 1) plus the whitened principal directions P of the inputs, so the
    features silu(W_g x) ~ 1 + eps P x span an affine function of x (and a little
    curvature). W_o is the ridge least-squares map from those features to the targets.
    """
    x = job.x[: 4 * _METRIC_TOKENS].double()
    y = job.y[: 4 * _METRIC_TOKENS].double()
    n, d = x.shape
    second = x.T @ x / n
    mean = x.mean(0)
    eye = torch.eye(d, dtype=torch.float64)
    a = torch.linalg.solve(second + 1e-3 * float(torch.trace(second)) / d * eye, _SILU_ONE * mean)
    cov = second - torch.outer(mean, mean)
    lam, vec = torch.linalg.eigh(cov)
    lam, vec = lam.flip(0).clamp_min(float(lam.max()) * 1e-6), vec.flip(1)
    white = (vec / lam.sqrt()).T  # [d, d] rows: whitened principal directions
    gate = job.layer.gate_proj.weight  # [V, d]
    v = gate.shape[0]
    reps = -(-v // d)
    p = torch.cat([white] * reps)[:v]
    wg = a.unsqueeze(0) + eps * p
    gate.copy_(wg.to(gate.dtype))
    feats = F.silu(x @ wg.T)  # [n, V]
    gram = feats.T @ feats
    gram += ridge * float(torch.trace(gram)) / v * torch.eye(v, dtype=torch.float64)
    wo = torch.linalg.solve(gram, feats.T @ y).T  # [d, V]
    job.layer.out_proj.weight.copy_(wo.to(job.layer.out_proj.weight.dtype))
    return {"eps": eps}


@torch.no_grad()
def _constant_values(jobs: list[_Job]) -> dict:
    """Set every routed row to 1/H: the bag is then exactly 1 for calibration tokens."""
    heads = {j.layer.heads for j in jobs}
    if len(heads) != 1:
        raise InputError(f"dense init needs the same number of heads in every layer, got {sorted(heads)}")
    table = jobs[0].layer.value_table.weight
    picked = torch.zeros(table.shape[0], dtype=torch.bool)
    for j in jobs:
        picked[j.idx.reshape(-1)] = True
    rows = picked.nonzero().squeeze(1)
    table.index_fill_(0, rows, 1.0 / heads.pop())
    return {"rows_touched": int(rows.numel()), "slots": table.shape[0]}


def _gates(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor | None:
    return None if layer.gate_proj is None else F.silu(layer.gate_proj(x))


def _slot_sums(idx: torch.Tensor, w: torch.Tensor, rs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(unique slots U, [sum over picks of slot s of w * r[token] for each r]) for one chunk.

    Sorting the picks groups each slot's occurrences; one weighted embedding bag over
    the per-token rows r (one bag per slot) then sums them without materializing a
    row per (token, pick), as the sparse backward of the bag does.
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order_rows, perm = torch.sort(flat, stable=True)  # stable: a fixed summation order
    uniq, counts = torch.unique_consecutive(order_rows, return_counts=True)
    offsets = torch.zeros(uniq.numel(), dtype=torch.int64)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    token = perm // k
    pw = w.reshape(-1)[perm]
    sums = [F.embedding_bag(token, r, offsets, mode="sum", per_sample_weights=pw.to(r.dtype)) for r in rs]
    return uniq, sums


@torch.no_grad()
def _slot_means(jobs: list[_Job], target, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per routed slot s: v_s = sum(w g z) / (sum(w g^2) + ridge * mean density), over every
    (token, pick) of every job. `target(job, i, j)` gives (z [n, V], g [n, V] or None) for
    tokens i:j: z the value-space target, g the gate (None: 1). Returns (rows, values)."""
    table = jobs[0].layer.value_table.weight
    slots, v_dim = table.shape
    num = torch.zeros(slots, v_dim, dtype=torch.float32)
    den = torch.zeros(slots, v_dim, dtype=torch.float32)
    picked = torch.zeros(slots, dtype=torch.bool)
    for job in jobs:
        for i in range(0, job.x.shape[0], _CHUNK):
            j = min(job.x.shape[0], i + _CHUNK)
            z, g = target(job, i, j)
            z = z.float()
            g = torch.ones_like(z) if g is None else g.float()
            uniq, (zn, gd) = _slot_sums(job.idx[i:j], job.w[i:j], [z * g, g * g])
            num.index_add_(0, uniq, zn)
            den.index_add_(0, uniq, gd)
            picked[uniq] = True
    rows = picked.nonzero().squeeze(1)
    mean_den = float(den[rows].mean()) if rows.numel() else 0.0
    return rows, num[rows] / (den[rows] + ridge * mean_den)


@torch.no_grad()
def _smoother_values(jobs: list[_Job], ridge: float) -> dict:
    """Values = per-slot (gated) means of the targets in value space (W_o^T y, W_o with
    orthonormal columns). Rows no calibration token picks keep their values."""

    def target(job, i, j):
        z = job.y[i:j].float() @ job.layer.out_proj.weight.float()
        return z, _gates(job.layer, job.x[i:j])

    table = jobs[0].layer.value_table.weight
    rows, new = _slot_means(jobs, target, ridge)
    table.index_copy_(0, rows, new.to(table.dtype))
    return {"rows_touched": int(rows.numel()), "slots": table.shape[0]}


@torch.no_grad()
def _residual_values(jobs: list[_Job], ridge: float) -> float:
    """Add to the routed rows the per-slot means of what the dense path misses.

    The residual r = y - layer(x) is mapped into value space through W_o's ridge
    pseudo-inverse, averaged per slot (gated, as _slot_means), and added with the one
    step size a that minimizes the summed normalized MSE of all jobs (the table is
    shared, so one a for all). Returns a.
    """
    pinv = {}
    for job in jobs:
        wo = job.layer.out_proj.weight.double()  # [d, V]
        gram = wo.T @ wo
        gram += 1e-4 * float(torch.trace(gram)) / gram.shape[0] * torch.eye(gram.shape[0], dtype=torch.float64)
        pinv[job.name] = torch.linalg.solve(gram, wo.T).float()  # [V, d]

    def target(job, i, j):
        r = job.y[i:j].float() - job.predict(job.x[i:j], job.idx[i:j], job.w[i:j]).float()
        return r @ pinv[job.name].T, _gates(job.layer, job.x[i:j])

    table = jobs[0].layer.value_table.weight
    rows, delta = _slot_means(jobs, target, ridge)
    # Step size: pred(a) = pred(0) + a * A(delta), A linear in the table rows.
    dot = sq = 0.0
    base = table[rows].clone()
    for job in jobs:
        n = min(4 * _METRIC_TOKENS, job.x.shape[0])
        for i in range(0, n, _CHUNK):
            j = min(n, i + _CHUNK)
            p0 = job.predict(job.x[i:j], job.idx[i:j], job.w[i:j]).double()
            table.index_copy_(0, rows, (base + delta).to(table.dtype))
            p1 = job.predict(job.x[i:j], job.idx[i:j], job.w[i:j]).double()
            table.index_copy_(0, rows, base)
            d_ = p1 - p0
            r = job.y[i:j].double() - p0
            dot += float((d_ * r).sum()) / job.var
            sq += float((d_ * d_).sum()) / job.var
    a = dot / sq if sq > 0 else 0.0
    table.index_copy_(0, rows, (base + a * delta).to(table.dtype))
    return a


@torch.no_grad()
def _rescale(job: _Job, limit: int) -> float:
    """The least-squares scalar a for pred -> a * pred on (a subset of) the job's data,
    folded into W_o (so the shared table is untouched). Returns a."""
    n = min(limit, job.x.shape[0])
    dot = sq = 0.0
    for i in range(0, n, _CHUNK):
        j = min(n, i + _CHUNK)
        p = job.predict(job.x[i:j], job.idx[i:j], job.w[i:j]).double()
        dot += float((p * job.y[i:j]).sum())
        sq += float((p * p).sum())
    a = dot / sq if sq > 0 else 1.0
    job.layer.out_proj.weight.mul_(a)
    return a


# ------------------------------------------------------------------------ public API


def distill_memories(
    jobs: Mapping[str | int, tuple[ProductKeyMemory, torch.Tensor, torch.Tensor]],
    *,
    steps: int = 300,
    batch_tokens: int = 4096,
    lr_values: float = 1e-2,
    lr_dense: float = 1e-3,
    seed: int = 0,
    heldout: Mapping[str | int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    init: bool = True,
    init_method: str = "dense",
    dense_eps: float = 0.5,
    residual_values: bool = True,
    gate_init: str = "neutral",
    ridge: float = 1e-2,
    train_routing: bool = False,
    value_optimizer: str = "auto",
    eval_every: int = 0,
    log: Log = None,
) -> dict:
    """Distill several memory layers that share one value table, jointly.

    jobs: {name: (layer, inputs [N, d], targets [N, d])}: what each layer's replaced
    MLP saw and returned on calibration tokens. heldout: {name: (inputs, targets)} for
    the report (any subset of the names). init=False skips stage 2 (keeps W_o, W_g and
    values as they are). gate_init: "neutral" or "keep" (the gate as it is). Every
    other argument: see distill_memory.

    Returns {"steps", "seconds", "layers": {name: info}} with per-layer info as
    distill_memory documents.
    """
    t_start = time.perf_counter()
    if not jobs:
        raise InputError("distill_memories needs at least one layer")
    if steps < 0 or batch_tokens < 1:
        raise InputError(f"steps={steps} must be >= 0 and batch_tokens={batch_tokens} >= 1")
    if gate_init not in ("neutral", "keep"):
        raise InputError(f"gate_init={gate_init!r}: expected 'neutral' or 'keep'")
    heldout = dict(heldout or {})
    unknown = sorted(str(k) for k in heldout if k not in jobs)
    if unknown:
        raise InputError(f"heldout names {unknown} are not among the distilled layers {list(jobs)}")

    table = None
    built: list[_Job] = []
    for name, (layer, x, y) in jobs.items():
        _check_pair(layer, x, y, f"layer {name}")
        if table is None:
            table = layer.value_table
        elif layer.value_table is not table:
            raise InputError("distill_memories: the layers must share one value table (one MemoryBank)")
        dtype = layer.query.weight.dtype
        x = x.to(dtype)
        sigma = float(y.double().pow(2).mean().sqrt()) or 1.0
        yn = (y.double() / sigma).to(dtype)
        job = _Job(str(name), layer, x, yn, sigma, _variance(yn))
        if name in heldout:
            hx, hy = heldout[name]
            _check_pair(layer, hx, hy, f"held-out data of layer {name}")
            job.hx, job.hy = hx.to(dtype), (hy.double() / sigma).to(dtype)
        built.append(job)

    if any(j.layer.value_table.weight.device.type != "cpu" for j in built):
        raise InputError("distill_memories runs on CPU tensors (move the memory bank to CPU)")

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    info: dict[str, dict] = {j.name: {"tokens": int(j.x.shape[0]), "target_rms": j.sigma} for j in built}
    # Work on normalized targets: W_o carries 1/sigma during the fit, restored in `finally`.
    for j in built:
        j.layer.out_proj.weight.data.div_(j.sigma)
    try:
        t0 = time.perf_counter()
        for j in built:
            j.idx, j.w = route(j.layer, j.x)
            if j.hx is not None:
                j.h_idx, j.h_w = route(j.layer, j.hx)
        say(f"distill: routed {sum(j.x.shape[0] for j in built)} tokens in {time.perf_counter() - t0:.1f}s")

        def measure(tag: str) -> None:
            for j in built:
                rec = info[j.name]
                rec[f"train_mse_{tag}"] = _mse(j, j.x, j.y, j.idx, j.w, _METRIC_TOKENS) / j.var
                if j.hx is not None:
                    rec[f"heldout_mse_{tag}"] = _mse(j, j.hx, j.hy, j.h_idx, j.h_w) / _variance(j.hy)
                    rec[f"heldout_fve_{tag}"] = 1.0 - rec[f"heldout_mse_{tag}"]

        measure("initial")
        if init:
            t0 = time.perf_counter()
            with torch.no_grad():
                if init_method == "dense" and all(j.layer.gate_proj is not None for j in built):
                    cf = _constant_values(built)
                    for j in built:
                        info[j.name]["dense"] = _init_dense_path(j, dense_eps, 1e-4)
                        info[j.name]["rows_touched"] = cf["rows_touched"]
                    if residual_values:
                        step = _residual_values(built, ridge)
                        for j in built:
                            info[j.name]["residual_step"] = step
                else:
                    for j in built:
                        _init_out_proj(j)
                        if j.layer.gate_proj is not None and gate_init == "neutral":
                            info[j.name]["gate"] = _init_neutral_gate(j)
                    cf = _smoother_values(built, ridge)
                    for j in built:
                        info[j.name]["scale"] = _rescale(j, 4 * _METRIC_TOKENS)
                        info[j.name]["rows_touched"] = cf["rows_touched"]
            measure("closed_form")
            say(f"distill: closed-form start in {time.perf_counter() - t0:.1f}s")

        opt_info = {}
        if steps:
            opt_info = _adam(built, steps, batch_tokens, lr_values, lr_dense, seed, train_routing,
                             value_optimizer, eval_every, say)
        measure("final")
    finally:
        for j in built:
            j.layer.out_proj.weight.data.mul_(j.sigma)

    for j in built:
        rec = info[j.name]
        # Normalized MSE (= 1 - fraction of variance explained on that set).
        rec["train_fve_final"] = 1.0 - rec["train_mse_final"]
    return {"steps": steps, "seconds": time.perf_counter() - t_start, "layers": info, **opt_info}


def _value_optimizer(built: list[_Job], batch_tokens: int, lr: float, kind: str, gen: torch.Generator):
    """(optimizer for the table, dense_grad) — SparseRowAdam, or fused torch Adam when a step
    touches most rows anyway.

    A 64K-slot table read by 4,096 tokens x 128 picks has nearly every row in every
    step's gradient: the row-sparse update then does the dense work through index
    gathers and scatters (~0.8 s per step on 2 CPU cores, 20x the fused dense Adam).
    A row that never gets a gradient keeps m = v = 0 under dense Adam too, so it is
    never moved (bit-identical), as with SparseRowAdam; rows touched earlier keep
    moving on their momentum (non-lazy Adam), which is the difference.
    """
    table = built[0].layer.value_table.weight
    if kind == "auto":
        touched = torch.zeros(table.shape[0], dtype=torch.bool)
        for j in built:
            b = torch.randint(0, j.x.shape[0], (min(batch_tokens, j.x.shape[0]),), generator=gen)
            touched[j.idx[b].reshape(-1)] = True
        kind = "dense" if int(touched.sum()) >= table.shape[0] // 4 else "sparse"
    if kind == "dense":
        fused = table.dtype in (torch.float32, torch.float64, torch.bfloat16)
        return torch.optim.Adam([table], lr=lr, fused=fused or None), True
    if kind == "sparse":
        # Larger chunks than the optimizer's default: fewer, bigger index ops per step.
        return SparseRowAdam([table], lr=lr, chunk_rows=16384), False
    raise InputError(f"value_optimizer={kind!r}: expected 'auto', 'sparse' or 'dense'")


def _adam(built: list[_Job], steps, batch_tokens, lr_values, lr_dense, seed, train_routing,
          value_optimizer, eval_every, say) -> dict:
    table = built[0].layer.value_table.weight
    dense = []
    for j in built:
        for name, p in j.layer.named_parameters():
            if name in ("query.weight", "keys") and not train_routing:
                continue
            dense.append(p)
    gen = torch.Generator().manual_seed(int(seed))
    opt_v, dense_grad = _value_optimizer(built, batch_tokens, lr_values, value_optimizer, gen)
    opt_d = torch.optim.Adam(dense, lr=lr_dense)
    was = [p.requires_grad for p in [table, *dense]]
    saved_sparse = [j.layer.sparse_grad for j in built]
    for p in [table, *dense]:
        p.requires_grad_(True)
    for j in built:
        j.layer.sparse_grad = not dense_grad
    t0 = time.perf_counter()
    curve = []
    try:
        for step in range(steps):
            total = 0.0
            for j in built:
                b = torch.randint(0, j.x.shape[0], (min(batch_tokens, j.x.shape[0]),), generator=gen)
                if train_routing:
                    pred = j.layer(j.x[b])
                else:
                    pred = _routed_forward(j.layer, j.x[b], j.idx[b], j.w[b], sparse_grad=not dense_grad)
                loss = (pred - j.y[b]).pow(2).mean() / j.var
                loss.backward()
                total += float(loss.detach())
            opt_v.step()
            opt_d.step()
            opt_v.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            if eval_every and (step + 1) % eval_every == 0:
                point = {"step": step + 1, "seconds": time.perf_counter() - t0}
                for j in built:
                    if j.hx is not None and not train_routing:
                        point[j.name] = 1.0 - _mse(j, j.hx, j.hy, j.h_idx, j.h_w) / _variance(j.hy)
                curve.append(point)
                say(f"distill: step {step + 1} held-out FVE {point}")
            if (step + 1) % max(1, steps // 10) == 0:
                say(f"distill: step {step + 1}/{steps} loss {total / len(built):.4f} ({time.perf_counter() - t0:.1f}s)")
    finally:
        for p, r in zip([table, *dense], was, strict=True):
            p.requires_grad_(r)
        for j, sg in zip(built, saved_sparse, strict=True):
            j.layer.sparse_grad = sg
    if train_routing:  # the frozen routing is stale now
        for j in built:
            j.idx, j.w = route(j.layer, j.x)
            if j.hx is not None:
                j.h_idx, j.h_w = route(j.layer, j.hx)
    return {"value_optimizer": "dense" if dense_grad else "sparse", "curve": curve,
            "adam_seconds": time.perf_counter() - t0}


def distill_memory(
    layer: ProductKeyMemory,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 300,
    batch_tokens: int = 4096,
    lr_values: float = 1e-2,
    lr_dense: float = 1e-3,
    seed: int = 0,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    log: Log = None,
    **kw,
) -> dict:
    """Fit one memory layer to imitate the MLP it replaces: layer(inputs) ~ targets.

    inputs / targets [N, d]: the replaced MLP's inputs and outputs on calibration
    tokens. Trains the values (SparseRowAdam, lr_values) and W_g / W_o (torch Adam,
    lr_dense) on the target-variance-normalized MSE after the closed-form start
    (module docstring). Deterministic for a given seed. Extra keyword arguments go to
    distill_memories (init, gate_init, ridge, train_routing).

    Changes the shared value table: with several memory layers on one table use
    distill_memories, which fits them together.

    Returns info: steps, seconds, tokens, target_rms, train_mse_{initial,closed_form,
    final} (normalized: MSE / Var(targets) on up to 16,384 calibration tokens),
    heldout_mse_* and heldout_fve_* (1 - normalized MSE) when heldout is given,
    rows_touched, scale, gate (neutral-gate statistics).
    """
    res = distill_memories(
        {"0": (layer, inputs, targets)},
        steps=steps,
        batch_tokens=batch_tokens,
        lr_values=lr_values,
        lr_dense=lr_dense,
        seed=seed,
        heldout=None if heldout is None else {"0": heldout},
        log=log,
        **kw,
    )
    return {"steps": res["steps"], "seconds": res["seconds"], **res["layers"]["0"]}


# ------------------------------------------------------------------------ perplexity


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of a causal LM over token windows input_ids [B, T].

    Every position but the first of each window is predicted (B * (T - 1) tokens);
    no padding, no cache. Runs in eval mode (restored after).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise InputError(f"perplexity: input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
