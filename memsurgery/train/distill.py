"""Replace mode, `--values distill`: fit memory layers to imitate the MLPs they replace.

In replace mode the MLP of a grafted decoder layer is removed and its memory layer
alone must produce what the MLP did. Distillation is a layer-local regression on
captured calibration pairs (calibration.capture_mlp_inputs(..., with_outputs=True)),

    minimize  E_x || memory(x) - mlp(x) ||^2 / Var(mlp(x))

in a bounded number of steps, from the query/keys of keyinit.init_memory_keys. Per layer:

1. Routing. The layer's query and keys pick slots and softmax weights for every
   calibration token, once. Routing then stays frozen: top-k selection is piecewise
   constant (its gradient reaches only the scores of picks already made), and
   recomputing it costs more than the rest of a step. `train_routing=True` trains
   query and keys too (about twice the time per step).
2. Closed-form start, init="dense" (the default with swilu). With every value row
   1/H the bag is exactly 1 (each head's softmax weights sum to 1), so the layer is
   the dense SiLU network W_o silu(W_g x). W_g = a + eps * P, where a is the
   least-squares "neutral" direction with a.x ~ u0, silu(u0) = 1 (hidden states have
   a large shared mean, so a.x is nearly constant: silu(a.x) = 1 +- 0.03..0.08 on
   SmolLM2) and P the whitened principal directions of x; the features
   silu(W_g x) ~ 1 + eps P x then span an affine function of x, and W_o is the ridge
   least-squares map from them to the targets. An affine map already explains about
   half the variance of an MLP's output (held-out 0.45-0.61 on SmolLM2 layers 5/15/25)
   and keeps most of the model's perplexity; a per-slot "mean of the routed targets"
   start explains far less (0.04-0.17 with three layers on one table).
   init="smoother" is that start: identity W_o, neutral gate, each routed slot the
   softmax-weighted mean of its tokens' targets, one least-squares scale folded into
   W_o. It is the only closed form without swilu (there is no dense path then).
   Slots no calibration token picks keep their values in both.
3. Adam. Minibatch steps on the normalized MSE: the value table with SparseRowAdam on
   its row-sparse gradient, or fused torch Adam when a step touches most rows anyway
   (see _value_optimizer); W_g / W_o (and the relevance gate; query/keys with
   train_routing) with torch.optim.Adam at lr_dense (0 freezes them). Most of the gain
   is in the values: they learn where the dense path is wrong, region by region.

Targets are divided by their RMS during the fit (W_o carries the factor back), so
learning rates do not depend on the scale of a model's MLP outputs.

All memory layers of a model read ONE shared value table: distilling layer 5 and then
layer 15 separately would let the second fit move rows the first relies on.
`distill_memories` fits several layers jointly (a step takes one minibatch of every
layer and sums their normalized losses); `distill_memory` is its one-layer case.

A graft calls this for `--values distill` (memsurgery/graft/api.py); the held-out
perplexity it then reports is memsurgery/probe/perplexity.py. Measurements and
defaults: docs/graft.md, "Replace mode"; benchmarks/replace_distill.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memsurgery.errors import InputError
from memsurgery.memory.layer import ProductKeyMemory
from memsurgery.ops import embedding_bag
from memsurgery.optim import SparseRowAdam

__all__ = ["DEFAULTS", "INIT_METHODS", "distill_memories", "distill_memory", "route"]

INIT_METHODS = ("dense", "smoother", "none")

# silu(u0) = 1: the pre-activation at which a SiLU gate passes its input unchanged.
_SILU_ONE = 1.2784645427610738
# Tokens per chunk for passes over all calibration tokens (routing, closed form,
# metrics): temporaries stay at a few tens of MB at d = 576.
_CHUNK = 4096
# Tokens for the closed-form fits' statistics and the train-set metrics: bounded cost
# whatever the calibration size (the first tokens; calibration windows are shuffled).
_FIT_TOKENS = 65536
_METRIC_TOKENS = 16384

Log = Callable[[str], None] | None


# ------------------------------------------------------------------------ routing


@torch.no_grad()
def route(
    layer: ProductKeyMemory, x: torch.Tensor, chunk: int = _CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's picks for tokens x [N, d]: (indices [N, H*knn] int64, weights [N, H*knn] fp32).

    Exactly what its forward feeds the embedding bag: all heads' picks form one bag,
    weighted by each head's softmax of score_scale * scores.
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


def _relevance(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor | None:
    """The relevance gate per token [n] (None when the layer has none)."""
    if layer.gate_weight is None:
        return None
    return torch.sigmoid(x @ layer.gate_weight.to(x.dtype) + layer.gate_bias.to(x.dtype))


def _routed_forward(
    layer: ProductKeyMemory,
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    sparse_grad: bool = True,
) -> torch.Tensor:
    """layer(x) [n, d] given its routing (idx, w): ProductKeyMemory.forward after select.

    Must match the layer's forward (tests compare them).
    """
    table = layer.value_table.weight
    bag = embedding_bag(idx, table, w, backend=layer.backend, sparse_grad=sparse_grad).to(x.dtype)
    if layer.gate_proj is not None:
        bag = bag * F.silu(layer.gate_proj(x))
    out = layer.out_proj(bag)
    gate = _relevance(layer, x)
    return out if gate is None else out * gate.unsqueeze(-1)


# ------------------------------------------------------------------------ one layer's data


@dataclass
class _Job:
    """One layer being distilled: data (targets divided by `sigma`) and frozen routing."""

    name: str
    layer: ProductKeyMemory
    x: torch.Tensor  # [N, d] inputs
    y: torch.Tensor  # [N, d] targets / sigma
    sigma: float  # RMS of the raw targets
    var: float  # mean per-dim variance of y (the MSE of predicting the mean)
    idx: torch.Tensor | None = None  # [N, H*knn]
    w: torch.Tensor | None = None
    hx: torch.Tensor | None = None  # held-out inputs
    hy: torch.Tensor | None = None  # held-out targets / sigma
    h_idx: torch.Tensor | None = None
    h_w: torch.Tensor | None = None

    def predict(self, x, idx, w) -> torch.Tensor:
        return _routed_forward(self.layer, x, idx, w)


def _variance(y: torch.Tensor) -> float:
    """Mean over dims of the per-dim variance."""
    return float(y.double().var(dim=0, unbiased=False).mean())


def _check_pair(layer: ProductKeyMemory, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    d = layer.input_dim
    if x.dim() != 2 or x.shape[1] != d:
        raise InputError(f"{what}: inputs must be [N, d={d}], got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise InputError(
            f"{what}: targets must have the inputs' shape {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise InputError(f"{what}: needs at least 2 tokens, got {x.shape[0]}")


@torch.no_grad()
def _nmse(job: _Job, x, y, idx, w, limit: int | None = None) -> float:
    """Mean squared error per element of the layer on (x, y) (normalized targets)."""
    n = x.shape[0] if limit is None else min(limit, x.shape[0])
    total = 0.0
    for i in range(0, n, _CHUNK):
        j = min(n, i + _CHUNK)
        pred = job.predict(x[i:j], idx[i:j], w[i:j])
        total += float((pred.double() - y[i:j].double()).pow(2).sum())
    return total / (n * y.shape[1])


# ------------------------------------------------------------------------ closed-form starts


def _neutral_direction(x: torch.Tensor) -> torch.Tensor:
    """a [d] (float64): the ridge least-squares solution of x.a = u0 over the tokens x."""
    n, d = x.shape
    second = x.T @ x / n
    lam = 1e-3 * float(torch.trace(second)) / d
    return torch.linalg.solve(second + lam * torch.eye(d, dtype=x.dtype), _SILU_ONE * x.mean(0))


@torch.no_grad()
def _constant_values(jobs: list[_Job]) -> int:
    """Set every row some calibration token picks to 1/H (the bag is then 1). Returns the count."""
    heads = {j.layer.heads for j in jobs}
    if len(heads) != 1:
        raise InputError(
            f"init='dense' needs the same number of heads in every layer, got {sorted(heads)}"
        )
    table = jobs[0].layer.value_table.weight
    picked = torch.zeros(table.shape[0], dtype=torch.bool)
    for j in jobs:
        picked[j.idx.reshape(-1)] = True
    rows = picked.nonzero().squeeze(1)
    table.index_fill_(0, rows, 1.0 / heads.pop())
    return int(rows.numel())


@torch.no_grad()
def _dense_path(job: _Job, eps: float, ridge: float = 1e-4) -> dict:
    """W_g = a + eps * P (neutral direction + whitened principal directions), W_o = the
    ridge least-squares map from silu(W_g x) (times the relevance gate) to the targets.

    With the bag at 1 the layer is then this dense fit. Returns the fit's train FVE.
    """
    x = job.x[:_FIT_TOKENS].double()
    y = job.y[:_FIT_TOKENS].double()
    d = x.shape[1]
    a = _neutral_direction(x)
    lam, vec = torch.linalg.eigh(torch.cov(x.T))  # ascending
    lam, vec = lam.flip(0).clamp_min(float(lam.max()) * 1e-6), vec.flip(1)
    white = (vec / lam.sqrt()).T  # [d, d]: rows whiten the principal directions
    gate = job.layer.gate_proj.weight  # [V, d]
    v_dim = gate.shape[0]
    p = torch.cat([white] * -(-v_dim // d))[:v_dim]  # v_dim > d repeats the directions
    wg = a.unsqueeze(0) + eps * p
    gate.copy_(wg.to(gate.dtype))

    feats = F.silu(x @ wg.T)  # [n, V]
    rel = _relevance(job.layer, x)
    if rel is not None:
        feats = feats * rel.unsqueeze(1)
    gram = feats.T @ feats
    gram += ridge * float(torch.trace(gram)) / v_dim * torch.eye(v_dim, dtype=torch.float64)
    wo = torch.linalg.solve(gram, feats.T @ y).T  # [d, V]
    job.layer.out_proj.weight.copy_(wo.to(job.layer.out_proj.weight.dtype))
    resid = (feats @ wo.T - y).pow(2).mean(0).sum() / y.var(0, unbiased=False).sum()
    return {"dense_fit_fve": 1.0 - float(resid), "gate_pre_std": float((x @ a).std())}


def _slot_sums(
    idx: torch.Tensor, w: torch.Tensor, rs: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(slots U picked in this chunk, [per slot: sum over its picks of w * r[token]] per r).

    Sorting the picks groups each slot's occurrences; one weighted embedding bag over
    the per-token rows r (a bag per slot) sums them without a row per (token, pick),
    as the bag's sparse backward does. Stable sort: a fixed summation order.
    """
    k = idx.shape[1]
    ordered, perm = torch.sort(idx.reshape(-1), stable=True)
    uniq, counts = torch.unique_consecutive(ordered, return_counts=True)
    offsets = torch.zeros(uniq.numel(), dtype=torch.int64)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    token, pw = perm // k, w.reshape(-1)[perm]
    sums = [
        F.embedding_bag(token, r, offsets, mode="sum", per_sample_weights=pw.to(r.dtype))
        for r in rs
    ]
    return uniq, sums


@torch.no_grad()
def _smoother(jobs: list[_Job], ridge: float) -> int:
    """init='smoother': identity W_o (principal directions of the targets if v_dim != d),
    neutral gate, each routed slot v = sum(w g z) / (sum(w g^2) + ridge * mean), z = W_o^T y,
    jointly over the jobs; then one least-squares scale per job folded into W_o.
    Returns the number of rows set."""
    table = jobs[0].layer.value_table.weight
    slots, v_dim = table.shape
    for job in jobs:
        lin = job.layer.out_proj  # [d, V]
        d = lin.weight.shape[0]
        if v_dim == d:
            lin.weight.copy_(torch.eye(d, dtype=lin.weight.dtype))
        else:
            y = job.y[:_FIT_TOKENS].double()
            _, vec = torch.linalg.eigh(y.T @ y)
            basis = torch.zeros(d, v_dim, dtype=torch.float64)
            r = min(d, v_dim)
            basis[:, :r] = vec.flip(1)[:, :r]
            lin.weight.copy_(basis.to(lin.weight.dtype))
        if job.layer.gate_proj is not None:
            a = _neutral_direction(job.x[:_FIT_TOKENS].double())
            job.layer.gate_proj.weight.copy_(
                a.to(table.dtype).expand_as(job.layer.gate_proj.weight)
            )

    num = torch.zeros(slots, v_dim, dtype=torch.float32)
    den = torch.zeros(slots, v_dim, dtype=torch.float32)
    picked = torch.zeros(slots, dtype=torch.bool)
    for job in jobs:
        layer = job.layer
        for i in range(0, job.x.shape[0], _CHUNK):
            j = min(job.x.shape[0], i + _CHUNK)
            x = job.x[i:j]
            z = job.y[i:j].float() @ layer.out_proj.weight.float()  # [n, V]
            g = (
                torch.ones_like(z)
                if layer.gate_proj is None
                else F.silu(layer.gate_proj(x)).float()
            )
            uniq, (zn, gd) = _slot_sums(job.idx[i:j], job.w[i:j], [z * g, g * g])
            num.index_add_(0, uniq, zn)
            den.index_add_(0, uniq, gd)
            picked[uniq] = True
    rows = picked.nonzero().squeeze(1)
    if rows.numel():
        mean_den = float(den[rows].mean())
        table.index_copy_(0, rows, (num[rows] / (den[rows] + ridge * mean_den)).to(table.dtype))

    # The bag adds H heads' means (and a relevance gate scales the output): one
    # least-squares scalar per job fixes the overall scale.
    for job in jobs:
        n = min(_FIT_TOKENS, job.x.shape[0])
        dot = sq = 0.0
        for i in range(0, n, _CHUNK):
            j = min(n, i + _CHUNK)
            p = job.predict(job.x[i:j], job.idx[i:j], job.w[i:j]).double()
            dot += float((p * job.y[i:j].double()).sum())
            sq += float((p * p).sum())
        job.layer.out_proj.weight.mul_(dot / sq if sq > 0 else 1.0)
    return int(rows.numel())


# ------------------------------------------------------------------------ Adam


def _value_optimizer(built: list[_Job], batch_tokens: int, lr: float, kind: str):
    """(optimizer for the table, "dense" | "sparse").

    "sparse": SparseRowAdam on the row-sparse gradient. "dense": fused torch Adam on a
    dense gradient. "auto": dense when a step makes at least 2 picks per row on average
    (sum over layers of batch x H x knn >= 2 x slots). Then nearly every row is in every
    step's gradient, and the row-sparse update does the dense work through gathers and
    scatters: 0.8 s a step for a 64K x 576 table on 2 CPU cores against 0.04 s for fused
    Adam, for the same update. A row that never gets a gradient keeps m = v = 0 under
    dense Adam, so it is never moved either. Where rows are touched now and then (1M
    slots), dense Adam would keep moving a row on its momentum for steps after each
    touch; the lazy row-sparse update does not.
    """
    table = built[0].layer.value_table.weight
    if kind == "auto":
        picks = sum(min(batch_tokens, j.x.shape[0]) * j.idx.shape[1] for j in built)
        kind = "dense" if picks >= 2 * table.shape[0] else "sparse"
    if kind == "dense":
        return torch.optim.Adam([table], lr=lr, fused=True), "dense"
    if kind == "sparse":
        # Bigger chunks than the optimizer's default (~455 rows of 576): a few large
        # index ops per step instead of hundreds of small ones (3x faster here).
        return SparseRowAdam([table], lr=lr, chunk_rows=16384), "sparse"
    raise InputError(f"value_optimizer={kind!r}: expected 'auto', 'sparse' or 'dense'")


def _adam(
    built: list[_Job],
    steps: int,
    batch_tokens: int,
    lr_values: float,
    lr_dense: float,
    seed: int,
    train_routing: bool,
    value_optimizer: str,
    eval_every: int,
    say,
) -> dict:
    """Minibatch Adam on the summed normalized MSE of all jobs. Returns optimizer info."""
    table = built[0].layer.value_table.weight
    dense = []
    if lr_dense > 0:
        for j in built:
            for name, p in j.layer.named_parameters():
                if train_routing or name not in ("query.weight", "keys"):
                    dense.append(p)
    gen = torch.Generator().manual_seed(int(seed))
    opt_v, kind = _value_optimizer(built, batch_tokens, lr_values, value_optimizer)
    opt_d = torch.optim.Adam(dense, lr=lr_dense) if dense else None
    t0 = time.perf_counter()
    curve = []
    with _training(built, table, dense, sparse_grad=kind == "sparse"):
        for step in range(steps):
            total = _adam_step(built, batch_tokens, gen, train_routing, kind == "sparse")
            for opt in (opt_v, opt_d):
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if eval_every and (step + 1) % eval_every == 0 and not train_routing:
                curve.append(_heldout_point(built, step + 1, t0, say))
            if (step + 1) % max(1, steps // 10) == 0:
                say(
                    f"distill: step {step + 1}/{steps} loss {total / len(built):.4f} "
                    f"({time.perf_counter() - t0:.1f}s)"
                )
    if train_routing:  # the frozen routing is stale now
        for j in built:
            j.idx, j.w = route(j.layer, j.x)
            if j.hx is not None:
                j.h_idx, j.h_w = route(j.layer, j.hx)
    return {"value_optimizer": kind, "adam_seconds": time.perf_counter() - t0, "curve": curve}


@contextmanager
def _training(built: list[_Job], table, dense: list, sparse_grad: bool):
    """Only the table and `dense` require grad inside, with the layers' sparse_grad set; restored after."""
    params = [table] + [p for j in built for p in j.layer.parameters()]
    saved = [(p, p.requires_grad) for p in params] + [(j.layer, j.layer.sparse_grad) for j in built]
    for p in params:
        p.requires_grad_(False)
    for p in [table, *dense]:
        p.requires_grad_(True)
    for j in built:
        j.layer.sparse_grad = sparse_grad
    try:
        yield
    finally:
        for obj, flag in saved:
            if isinstance(obj, ProductKeyMemory):
                obj.sparse_grad = flag
            else:
                obj.requires_grad_(flag)


def _adam_step(built: list[_Job], batch_tokens: int, gen, train_routing: bool, sparse_grad: bool) -> float:
    """Gradients of one minibatch of every job's normalized MSE; returns the summed loss."""
    total = 0.0
    for j in built:
        b = torch.randint(0, j.x.shape[0], (min(batch_tokens, j.x.shape[0]),), generator=gen)
        if train_routing:
            pred = j.layer(j.x[b])
        else:
            pred = _routed_forward(j.layer, j.x[b], j.idx[b], j.w[b], sparse_grad)
        loss = (pred - j.y[b]).pow(2).mean() / j.var
        loss.backward()
        total += float(loss.detach())
    return total


def _heldout_point(built: list[_Job], step: int, t0: float, say) -> dict:
    """One point of the held-out FVE curve (eval_every), logged."""
    point = {"step": step, "seconds": time.perf_counter() - t0}
    for j in built:
        if j.hx is not None:
            point[j.name] = 1.0 - _nmse(j, j.hx, j.hy, j.h_idx, j.h_w) / _variance(j.hy)
    say(
        f"distill: step {step} held-out FVE "
        + ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k not in ("step", "seconds"))
    )
    return point


# ------------------------------------------------------------------------ public API

# Measured on SmolLM2-135M layer 15 (64K slots, 100k calibration tokens, held-out FVE):
# at equal tokens 150 x 2048 beat 60 x 4096 (0.660 vs 0.654); held-out FVE saturates
# near 240 x 2048 (0.668; train 0.81: overfitting beyond), so 150 steps keep most of
# the gain at ~40 s per layer on 2 CPU cores. lr_values 1e-2 ~ 3e-2 > 3e-3 > 1e-3 at a
# fixed step budget; lr_dense 1e-3 adds +0.008 over frozen W_g/W_o, 3e-3 is unstable.
DEFAULTS = {
    "steps": 150,
    "batch_tokens": 2048,
    "lr_values": 1e-2,
    "lr_dense": 1e-3,
}


def distill_memories(
    jobs: Mapping[str | int, tuple[ProductKeyMemory, torch.Tensor, torch.Tensor]],
    *,
    steps: int = DEFAULTS["steps"],
    batch_tokens: int = DEFAULTS["batch_tokens"],
    lr_values: float = DEFAULTS["lr_values"],
    lr_dense: float = DEFAULTS["lr_dense"],
    seed: int = 0,
    heldout: Mapping[str | int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    init: str = "dense",
    dense_eps: float = 0.5,
    ridge: float = 1e-2,
    train_routing: bool = False,
    value_optimizer: str = "auto",
    eval_every: int = 0,
    log: Log = None,
) -> dict:
    """Distill several memory layers that share one value table, jointly.

    jobs: {name: (layer, inputs [N, d], targets [N, d])}, what each replaced MLP saw
    and returned on calibration tokens. heldout: {name: (inputs, targets)} for the
    report (any subset of the names). init: "dense" (swilu layers; others fall back
    to "smoother"), "smoother", or "none" (keep W_o, W_g and values: e.g. more steps
    on an already distilled memory). dense_eps: weight of the principal directions in
    W_g (module docstring); ridge: shrinkage of the smoother's per-slot means.
    value_optimizer: "auto", "sparse" or "dense" (_value_optimizer). eval_every: log
    the held-out FVE every that many steps (and return the curve). Other arguments: see
    distill_memory.

    Returns {"steps", "seconds", "value_optimizer", "adam_seconds", "curve",
    "layers": {str(name): info}}, info as distill_memory documents.
    """
    t_start = time.perf_counter()
    _check_settings(jobs, steps, batch_tokens, init, lr_values, lr_dense)
    heldout = dict(heldout or {})
    unknown = sorted(str(k) for k in heldout if k not in jobs)
    if unknown:
        raise InputError(f"heldout names {unknown} are not among the distilled layers {list(jobs)}")
    built = _build_jobs(jobs, heldout)

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    info: dict[str, dict] = {
        j.name: {"tokens": int(j.x.shape[0]), "target_rms": j.sigma} for j in built
    }
    opt_info: dict = {"value_optimizer": None, "adam_seconds": 0.0, "curve": []}
    # Fit on normalized targets: W_o carries 1/sigma meanwhile, restored in `finally`.
    with torch.no_grad():
        for j in built:
            j.layer.out_proj.weight.div_(j.sigma)
    try:
        t0 = time.perf_counter()
        for j in built:
            j.idx, j.w = route(j.layer, j.x)
            if j.hx is not None:
                j.h_idx, j.h_w = route(j.layer, j.hx)
        say(
            f"distill: routed {sum(j.x.shape[0] for j in built)} tokens in {time.perf_counter() - t0:.1f}s"
        )
        _measure(built, info, "initial")
        if init != "none":
            _closed_form_start(built, init, dense_eps, ridge, info, say)
        if steps:
            opt_info = _adam(built, steps, batch_tokens, lr_values, lr_dense, seed, train_routing,
                             value_optimizer, eval_every, say)
        _measure(built, info, "final")
    finally:
        with torch.no_grad():
            for j in built:
                j.layer.out_proj.weight.mul_(j.sigma)
    return {"steps": steps, "seconds": time.perf_counter() - t_start, **opt_info, "layers": info}


def _check_settings(jobs, steps: int, batch_tokens: int, init: str, lr_values: float, lr_dense: float) -> None:
    if not jobs:
        raise InputError("distill_memories needs at least one layer")
    if steps < 0 or batch_tokens < 1:
        raise InputError(f"steps={steps} must be >= 0 and batch_tokens={batch_tokens} >= 1")
    if init not in INIT_METHODS:
        raise InputError(f"init={init!r}: expected one of {', '.join(INIT_METHODS)}")
    if lr_values < 0 or lr_dense < 0:
        raise InputError(
            f"learning rates must be >= 0, got lr_values={lr_values}, lr_dense={lr_dense}"
        )


def _build_jobs(jobs: Mapping, heldout: dict) -> list[_Job]:
    """One _Job per layer: checked data in the layer's dtype, targets divided by their RMS."""
    table = None
    built: list[_Job] = []
    for name, (layer, x, y) in jobs.items():
        _check_pair(layer, x, y, f"layer {name}")
        if table is None:
            table = layer.value_table
        elif layer.value_table is not table:
            raise InputError(
                "distill_memories: the layers must share one value table (one MemoryBank)"
            )
        if layer.query.weight.device.type != "cpu" or table.weight.device.type != "cpu":
            raise InputError("distill_memories runs on CPU: move the memory bank to CPU first")
        dtype = layer.query.weight.dtype
        sigma = float(y.double().pow(2).mean().sqrt()) or 1.0
        yn = (y.double() / sigma).to(dtype)
        job = _Job(str(name), layer, x.to(dtype), yn, sigma, _variance(yn) or 1.0)
        if name in heldout:
            hx, hy = heldout[name]
            _check_pair(layer, hx, hy, f"held-out data of layer {name}")
            job.hx, job.hy = hx.to(dtype), (hy.double() / sigma).to(dtype)
        built.append(job)
    return built


def _measure(built: list[_Job], info: dict, tag: str) -> None:
    """Train (and held-out) MSE and fraction of variance explained, as info[layer][*_{tag}]."""
    for j in built:
        rec = info[j.name]
        nmse = _nmse(j, j.x, j.y, j.idx, j.w, _METRIC_TOKENS)
        rec[f"train_mse_{tag}"] = nmse * j.sigma**2
        rec[f"train_fve_{tag}"] = 1.0 - nmse / j.var
        if j.hx is not None:
            nmse = _nmse(j, j.hx, j.hy, j.h_idx, j.h_w)
            rec[f"heldout_mse_{tag}"] = nmse * j.sigma**2
            rec[f"heldout_fve_{tag}"] = 1.0 - nmse / _variance(j.hy)


def _closed_form_start(built: list[_Job], init: str, dense_eps: float, ridge: float, info: dict, say) -> None:
    """The closed-form start (module docstring, 2.): "dense", or "smoother" without swilu."""
    t0 = time.perf_counter()
    method = init
    if method == "dense" and any(j.layer.gate_proj is None for j in built):
        method = "smoother"  # without swilu there is no dense path to fit
    with torch.no_grad():
        if method == "dense":
            rows = _constant_values(built)
            for j in built:
                info[j.name].update(_dense_path(j, dense_eps))
        else:
            rows = _smoother(built, ridge)
    for j in built:
        info[j.name].update(init=method, rows_set=rows)
    _measure(built, info, "closed_form")
    say(f"distill: closed-form start ({method}) in {time.perf_counter() - t0:.1f}s")


def distill_memory(
    layer: ProductKeyMemory,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = DEFAULTS["steps"],
    batch_tokens: int = DEFAULTS["batch_tokens"],
    lr_values: float = DEFAULTS["lr_values"],
    lr_dense: float = DEFAULTS["lr_dense"],
    seed: int = 0,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    log: Log = None,
    **kw,
) -> dict:
    """Fit one memory layer to imitate the MLP it replaces: layer(inputs) ~ targets.

    inputs / targets [N, d]: the replaced MLP's inputs and outputs on calibration
    tokens (call keyinit.init_memory_keys on the inputs first). Closed-form start
    (init="dense": the gated path as an affine fit, values 1/H), then `steps` Adam
    steps of `batch_tokens` tokens on the target-variance-normalized MSE: the values
    at lr_values (SparseRowAdam, or fused Adam when a step touches most rows), W_g /
    W_o at lr_dense (0 freezes them). Routing stays frozen. Deterministic for a seed.
    Extra keyword arguments go to distill_memories (init, dense_eps, ridge,
    train_routing, value_optimizer, eval_every).

    Changes the shared value table: with several memory layers on one table use
    distill_memories, which fits them together.

    Returns info: steps, seconds (total), adam_seconds, value_optimizer, tokens,
    target_rms, init, rows_set (rows the closed form wrote), train_mse_* / train_fve_*
    for * in initial, closed_form, final (MSE in the targets' units and fraction of
    variance explained, on up to 16,384 calibration tokens), heldout_mse_* /
    heldout_fve_* when heldout is given, dense_fit_fve (init="dense").
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
    layer_info = res.pop("layers")["0"]
    return {**res, **layer_info}
