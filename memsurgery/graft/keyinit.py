"""Data-driven init of a memory layer's query and product keys (faiss k-means).

A freshly built ProductKeyMemory has random keys U(+-1/sqrt(k_dim)) and a random
query; grafted into a pretrained model, whose hidden states are far from isotropic
(a large shared mean direction, a few dominant components), most tokens then pick
the same few slots and most of the table goes stale (Kim & Jung 2020). Init from
the model's own activations instead, in two steps:

1. `init_query` (method "pca"): W_q [H*K, d] maps an MLP input to a whitened,
   mean-free query whose two halves read different information (half 1: which
   cluster of activations a token is in; half 2: where inside it), so the two
   sub-key searches pick nearly independently and all n_sub**2 pairs get used.
   Each head reads its own random projection, so heads differ.
2. `init_keys_faiss`: project calibration activations with that query, exactly as
   the layer's forward does (RMS-normalized halves under qk_norm), and run k-means
   with n_sub centroids on each head's two halves [N, K/2]; the centroids become
   the sub-keys. Spherical k-means under qk_norm (scores are cosines then).

`measure_usage` runs the layer's own selection over held-out activations and
summarizes slot usage (memsurgery.telemetry.usage_stats). See docs/graft.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memsurgery.errors import InputError, MissingDependency
from memsurgery.memory.layer import _QK_EPS, ProductKeyMemory
from memsurgery.telemetry import UsageCounter

QUERY_METHODS = ("pca", "random", "orthogonal")
KEY_METHODS = ("faiss", "random")

_FAISS_HINT = "faiss is not installed; pip install 'memsurgery[cpu]' (or [gpu] on CUDA machines)"


def _require_faiss():
    """Import faiss or raise MissingDependency naming the extra to install."""
    try:
        import faiss
    except ImportError:
        raise MissingDependency(_FAISS_HINT) from None
    return faiss


def _check_acts(layer: ProductKeyMemory, acts: torch.Tensor, what: str) -> None:
    if acts.dim() != 2 or acts.shape[1] != layer.input_dim:
        raise InputError(
            f"{what}: activations must be [N, d={layer.input_dim}], got shape {tuple(acts.shape)}"
        )


def _random_orthogonal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, cols] with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols).

    Haar-distributed: QR of a Gaussian matrix with the signs of R's diagonal folded in.
    """
    tall = rows > cols
    g = torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # q: [max, min], orthonormal columns
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    q = q * sign
    return q if tall else q.T


# ------------------------------------------------------------------------------ query


def _second_moments(acts: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], E[x x^T] [d, d]) in float64, accumulated in chunks (no N x d fp64 copy)."""
    n, d = acts.shape
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = acts[i : i + chunk].to(device="cpu", dtype=torch.float64)
        s1 += x.sum(0)
        s2 += x.T @ x
    return s1 / n, s2 / n


def _kmeans_labels(z: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Plain Lloyd's k-means on z [M, r] (float32) -> labels [M]; k distinct points as init.

    Small and approximate on purpose: it only has to find the cluster structure for
    the query split (init_query), so init_query needs no faiss.
    """
    m = z.shape[0]
    cents = z[torch.randperm(m, generator=gen)[:k]].clone()  # [k, r]
    z_sq = z.pow(2).sum(1, keepdim=True)  # [M, 1]
    labels = torch.zeros(m, dtype=torch.long)
    for _ in range(iters):
        for i in range(0, m, 8192):  # [chunk, k] distances, not [M, k] at once
            dist = z_sq[i : i + 8192] - 2 * z[i : i + 8192] @ cents.T + cents.pow(2).sum(1)
            labels[i : i + 8192] = dist.argmin(1)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(cents).index_add_(0, labels, z)
        keep = counts > 0  # an empty cluster keeps its old centroid
        cents[keep] = sums[keep] / counts[keep, None].to(z.dtype)
    return labels


@torch.no_grad()
def init_query(
    layer: ProductKeyMemory,
    acts: torch.Tensor,
    method: str = "pca",
    seed: int = 0,
    *,
    halves: str = "split",
    whiten: float = 1.0,
    rank: int | None = None,
    project_mean: bool = True,
    split_points: int = 32768,
) -> dict:
    """Set layer.query.weight [H*K, d] from MLP-input activations acts [N, d].

    Methods:
      "pca"         (default) mean-free whitened projection with the two query halves
                    reading different information (see `_pca_query`). Needs N >= 2.
      "random"      leave the weight as it is (the reference init N(0, d**-0.5) of a
                    fresh layer); returns {"method": "random", "changed": False}.
      "orthogonal"  data-free: each head's [K, d] block has orthonormal rows (or
                    columns when K > d, rescaled to unit row norm); rows have unit
                    norm like the reference init's, but heads are exactly orthogonal.

    Returns info: method, halves, rank r, explained_variance (share of the mean-free
    variance in the r components), mean_share (|mu|^2 / E|x|^2: how much of the
    activation energy the shared mean carries), between_share_half1 (split only:
    share of the between-cluster variance in half 1's directions), whiten,
    project_mean, tokens.
    """
    if method not in QUERY_METHODS:
        raise InputError(f"query init {method!r} is unknown; use one of {', '.join(QUERY_METHODS)}")
    if method == "random":
        return {"method": "random", "changed": False}
    gen = torch.Generator().manual_seed(int(seed))
    if method == "orthogonal":
        _orthogonal_query(layer, gen)
        return {"method": "orthogonal", "changed": True}

    _check_acts(layer, acts, "init_query")
    if acts.shape[0] < 2:
        raise InputError(
            f"init_query: 'pca' needs at least 2 activation vectors, got {acts.shape[0]}"
        )
    if not 0.0 <= whiten <= 1.0:
        raise InputError(f"init_query: whiten={whiten} must be in [0, 1] (1 = full whitening)")
    if halves not in ("split", "mixed"):
        raise InputError(f"init_query: halves={halves!r} must be 'split' or 'mixed'")
    return _pca_query(layer, acts, gen, halves=halves, whiten=whiten, rank=rank,
                      project_mean=project_mean, split_points=split_points)


def _orthogonal_query(layer: ProductKeyMemory, gen: torch.Generator) -> None:
    H, K, d = layer.heads, layer.k_dim, layer.input_dim
    blocks = []
    for _ in range(H):
        block = _random_orthogonal(K, d, gen)  # [K, d]
        if K > d:  # orthonormal columns: rows have norm sqrt(d/K); bring them to 1
            block = block * math.sqrt(K / d)
        blocks.append(block)
    layer.query.weight.copy_(torch.cat(blocks).to(layer.query.weight.dtype))


def _pca_query(layer: ProductKeyMemory, acts: torch.Tensor, gen: torch.Generator, *, halves: str,
               whiten: float, rank: int | None, project_mean: bool, split_points: int) -> dict:
    """The "pca" query, in three steps.

    1. Mean. W_q has no bias, so a shared mean mu of the activations passes into every
       query as the constant W_q mu; under qk_norm a large mu makes all queries point
       alike and pick the same slots. With project_mean, the component along
       mu_hat = mu/|mu| is removed, P = I - mu_hat mu_hat^T: P x has mean exactly zero
       (P mu = 0), so W_q x is mean-free with no bias. (Without project_mean the PCA
       is centered but W_q x keeps the offset W_q mu; an option to measure its effect.)
    2. Whitening. With cov(P x) = U diag(lam) U^T (descending),
       z = diag(lam_r)**(-whiten/2) U_r^T P x keeps the top r = min(rank or 3K/2,
       non-negligible) components; whiten=1 gives each the same variance.
    3. Halves. A slot is a PAIR (sub-key of half 1, sub-key of half 2): n_sub**2
       slots are only reachable if the two halves pick independently. Activations
       are clustered (tokens of one kind sit together), and a cluster shows up in
       both halves, so k-means keys on two halves that read the same mixture of
       components lock each cluster to one pair (measured on SmolLM2: 4.6x fewer
       distinct top-1 pairs than independent halves would give). halves="split"
       (default) clusters z (a small Lloyd's k-means, min(n_sub, M/32) clusters on
       up to split_points tokens), orders the whitened directions by between-cluster
       variance, and gives half 1 the first ceil(r/2) ("which cluster") and half 2
       the rest ("where inside it"), which are nearly independent of the cluster.
       halves="mixed" gives both halves random mixtures of all r components.
    Each head then reads its own random orthogonal projection R_h of each half's
    directions down to K/2 dims, so heads differ. W_q is finally scaled so q
    elements have unit mean variance on `acts` (the reference regime: unit-RMS
    input, N(0, 1/d) weights; under qk_norm the scale does not change the forward).
    """
    H, K = layer.heads, layer.k_dim
    mu, second = _second_moments(acts)  # [d], [d, d]
    energy = torch.trace(second).item()
    mu_norm2 = float(mu @ mu)
    to_z, lam = _whitening(mu, second, mu_norm2, K, rank=rank, whiten=whiten, project_mean=project_mean)
    r = to_z.shape[0]
    info = {"method": "pca", "changed": True, "halves": halves, "rank": r}
    parts = None
    if halves == "split":
        parts, info["between_share_half1"] = _split_halves(layer, acts, to_z, gen, split_points)
    blocks = []
    for _ in range(H):
        if parts is None:
            blocks.append(_random_orthogonal(K, r, gen) @ to_z)  # [K, d]
        else:
            blocks += [_random_orthogonal(K // 2, p.shape[0], gen) @ p for p in parts]  # 2 x [K2, d]
    w = torch.cat(blocks)  # [H*K, d]
    # Unit mean variance of the query elements over the data: E[(w x)^2] = w S w^T.
    q_var = torch.einsum("kd,de,ke->", w, second, w).item() / w.shape[0]
    w = w / math.sqrt(q_var)
    layer.query.weight.copy_(w.to(layer.query.weight.dtype))
    info.update(
        explained_variance=float(lam[:r].sum() / lam.sum()),
        mean_share=mu_norm2 / energy if energy > 0 else 0.0,
        whiten=whiten,
        project_mean=project_mean,
        tokens=int(acts.shape[0]),
    )
    return info


def _whitening(mu, second, mu_norm2: float, K: int, *, rank: int | None, whiten: float,
               project_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of `_pca_query`: (to_z [r, d] with z = to_z x, eigenvalues of cov(P x))."""
    d = mu.shape[0]
    if project_mean and mu_norm2 > 0:
        mu_hat = mu / math.sqrt(mu_norm2)
        proj = torch.eye(d, dtype=torch.float64) - torch.outer(mu_hat, mu_hat)  # P
        cov = proj @ second @ proj  # E[(Px)(Px)^T]; Px has zero mean
    else:
        proj = torch.eye(d, dtype=torch.float64)
        cov = second - torch.outer(mu, mu)
    lam, vec = torch.linalg.eigh(cov)  # ascending
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    usable = int((lam > lam[0] * 1e-6).sum().item()) if lam[0] > 0 else 0
    if usable < 2:
        raise InputError(
            "init_query: the activations vary in fewer than 2 directions (identical tokens?)"
        )
    r = min(rank or (3 * K + 1) // 2, usable)
    return (vec[:, :r] * lam[:r].pow(-whiten / 2)).T @ proj, lam


def _split_halves(layer: ProductKeyMemory, acts, to_z, gen: torch.Generator, split_points: int):
    """Step 3 of `_pca_query`, halves="split": ((half 1 directions, half 2 directions) [r_j, d],
    share of the between-cluster variance in half 1)."""
    r = to_z.shape[0]
    m = min(acts.shape[0], split_points)
    pick = torch.randperm(acts.shape[0], generator=gen)[:m]
    z = (acts[pick].to(dtype=torch.float64, device="cpu") @ to_z.T).float()  # [M, r]
    k = max(2, min(layer.n_sub, m // 32))
    labels = _kmeans_labels(z, k, iters=8, gen=gen)
    counts = torch.bincount(labels, minlength=k).double()
    means = torch.zeros(k, r, dtype=torch.float64).index_add_(0, labels, z.double())
    means = means / counts.clamp_min(1)[:, None] - z.double().mean(0)
    between = (means.T * counts) @ means / m  # [r, r] between-cluster covariance of z
    b_lam, b_vec = torch.linalg.eigh(between)
    b_lam, b_vec = b_lam.flip(0).clamp_min(0), b_vec.flip(1)
    dirs = b_vec.T @ to_z  # [r, d], most cluster-separating first
    r1 = (r + 1) // 2
    return (dirs[:r1], dirs[r1:]), float(b_lam[:r1].sum() / b_lam.sum().clamp_min(1e-30))


# ------------------------------------------------------------------------------ keys


def query_halves(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The query halves the layer scores against its sub-keys: x [N, d] -> [N, H, 2, K/2].

    The same computation as ProductKeyMemory.select (W_q x, split, RMS norm per half
    under qk_norm); tests check the two agree.
    """
    n = x.shape[0]
    q = layer.query(x).view(n, layer.heads, 2, layer.k_dim // 2)
    if layer.config.qk_norm:
        q = F.rms_norm(q, (layer.k_dim // 2,), eps=_QK_EPS)
    return q


def _use_gpu(faiss, gpu: bool | None) -> bool:
    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu is None:
        return has_gpu_faiss and torch.cuda.is_available()
    if gpu and not has_gpu_faiss:
        raise MissingDependency(
            "gpu=True but this faiss has no GPU support (or sees no GPU); "
            "pip install 'memsurgery[gpu]' on a CUDA machine, or use gpu=False"
        )
    return bool(gpu)


@torch.no_grad()
def init_keys_faiss(
    layer: ProductKeyMemory,
    acts: torch.Tensor,
    niter: int = 10,
    seed: int = 0,
    gpu: bool | None = None,
    max_points: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Set layer.keys [H, 2, n_sub, K/2] to k-means centroids of the layer's query halves.

    acts [N, d]: MLP-input activations (after the query init). At most max_points
    (default 64 * n_sub) of them are used, a seeded random subset, sorted; fewer
    than n_sub is an InputError, fewer than 39 * n_sub works but is logged (k-means
    centroids get noisy). For each head h and half j, faiss.Kmeans(K/2, n_sub,
    niter, spherical=qk_norm) runs on the halves exactly as the forward computes
    them (query_halves). gpu=None uses GPU faiss iff it is built with GPU support,
    sees a GPU and CUDA is available. faiss runs on torch.get_num_threads() threads.

    Scale. Only the centroids' directions matter to the forward under qk_norm
    (keys are RMS-normalized) and to the ranking of slots without it (one common
    factor per head keeps every score order). So each head's centroids are scaled
    by one factor that gives them the RMS norm of the reference init
    U(+-1/sqrt(K)), sqrt(K/2 / (3K)) = 0.41: training with Adam then moves keys at
    the same relative speed as in a reference layer, and without qk_norm scores
    stay in the reference's O(1) range.

    Returns info: points, niter, gpu, time_s, key_scale (per head: keys = centroids *
    key_scale, centroids on unit-L2 data under qk_norm), and per (head, half) the mean k-means
    objective per point ("obj": squared L2 distance to the centroid, or under qk_norm
    (spherical k-means, inner-product index) the mean cosine to it) and the number of
    empty centroids.
    """
    faiss = _require_faiss()
    _check_acts(layer, acts, "init_keys_faiss")
    acts = _key_points(layer, acts, seed, max_points, log)
    n, n_sub = acts.shape[0], layer.n_sub
    use_gpu = _use_gpu(faiss, gpu)
    if log is not None:
        log(
            f"key init: faiss k-means on {'GPU' if use_gpu else 'CPU'}, {n} points, {n_sub} centroids"
        )

    t0 = time.perf_counter()
    halves = _cpu_query_halves(layer, acts)  # [N, H, 2, K2]
    threads_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    per_half = []
    scales = []  # per head: keys = centroids * scale
    spherical = bool(layer.config.qk_norm)
    target_norm = math.sqrt((layer.k_dim // 2) / (3.0 * layer.k_dim))  # RMS norm of a U(+-1/sqrt(K)) sub-key
    try:
        for h in range(layer.heads):
            cents = []
            for j in range(2):
                c, stats = _kmeans_half(faiss, halves[:, h, j], n_sub, niter, int(seed) * 1000 + 2 * h + j,
                                        spherical, use_gpu)
                per_half.append({"head": h, "half": j, **stats})
                cents.append(c)
            c2 = torch.stack(cents)  # [2, n_sub, K2]
            rms_norm = c2.norm(dim=-1).pow(2).mean().sqrt().clamp_min(1e-12)
            scales.append(float(target_norm / rms_norm))
            layer.keys[h].copy_((c2 * scales[-1]).to(layer.keys.dtype))
    finally:
        faiss.omp_set_num_threads(threads_before)
    return {
        "method": "faiss",
        "points": n,
        "niter": int(niter),
        "gpu": use_gpu,
        "spherical": spherical,
        "time_s": time.perf_counter() - t0,
        "key_scale": scales,
        "per_half": per_half,
    }


def _key_points(layer: ProductKeyMemory, acts: torch.Tensor, seed: int, max_points: int | None,
                log) -> torch.Tensor:
    """The activations k-means runs on: at most max_points (default 64 per centroid), a seeded
    random subset in their original order; InputError below one point per centroid."""
    n_sub, n = layer.n_sub, acts.shape[0]
    if n < n_sub:
        raise InputError(
            f"key init needs at least n_sub={n_sub} activation vectors (one per centroid), got {n}; "
            "capture more calibration tokens"
        )
    # 64 points per centroid (and niter=10) is plenty for slot usage: on SmolLM2 layer 15
    # (1M slots) 40/centroid + niter 5 gave 98.8% used, 64 + niter 10 98.6%; k-means
    # time is linear in both, and CPU time is what a graft is short of.
    cap = int(max_points) if max_points is not None else 64 * n_sub
    if cap < n_sub:
        raise InputError(f"max_points={cap} must be >= n_sub={n_sub}")
    if n > cap:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(n, generator=gen)[:cap].sort().values
        acts = acts[idx]
        n = cap
    if n < 39 * n_sub and log is not None:
        log(
            f"key init: {n} points for {n_sub} centroids (< 39 per centroid); centroids may be noisy"
        )
    return acts


def _cpu_query_halves(layer: ProductKeyMemory, acts: torch.Tensor) -> torch.Tensor:
    """query_halves over all points in chunks: [N, H, 2, K/2] fp32 on CPU, for faiss."""
    n = acts.shape[0]
    device = layer.query.weight.device
    halves = torch.empty(n, layer.heads, 2, layer.k_dim // 2, dtype=torch.float32)
    for i in range(0, n, 8192):
        x = acts[i : i + 8192].to(device=device, dtype=layer.query.weight.dtype)
        halves[i : i + x.shape[0]] = query_halves(layer, x).float().cpu()
    return halves


def _kmeans_half(faiss, half: torch.Tensor, n_sub: int, niter: int, seed: int, spherical: bool,
                 use_gpu: bool) -> tuple[torch.Tensor, dict]:
    """faiss k-means on one head's half [N, K2]: (centroids [n_sub, K2], {"obj", "empty"})."""
    n, k2 = half.shape
    data = half.contiguous()
    if spherical:
        # Unit L2 instead of unit RMS: the same directions (RMS norm is L2
        # norm / sqrt(K/2)), so the same clustering, and faiss's objective
        # (inner products with unit centroids) is then a mean cosine.
        data = data * (k2**-0.5)
    data = data.numpy()
    km = faiss.Kmeans(
        k2,
        n_sub,
        niter=int(niter),
        seed=int(seed),
        spherical=spherical,
        gpu=use_gpu,
        verbose=False,
        # Use exactly the points given (we subsampled already) and silence
        # faiss's own "too few points" print (we log it above).
        max_points_per_centroid=math.ceil(n / n_sub) + 1,
        min_points_per_centroid=1,
    )
    km.train(data)
    c = torch.from_numpy(km.centroids.copy())  # [n_sub, K2]
    _, assign = km.index.search(data, 1)
    sizes = torch.bincount(torch.from_numpy(assign[:, 0]).long(), minlength=n_sub)
    return c, {
        "obj": float(km.obj[-1]) / n if len(km.obj) else float("nan"),
        "empty": int((sizes == 0).sum().item()),
    }


def init_memory_keys(
    layer: ProductKeyMemory,
    acts: torch.Tensor,
    keys: str = "faiss",
    query: str = "pca",
    seed: int = 0,
    **kw,
) -> dict:
    """Query init then key init for one layer: {"query": info, "keys": info, "time_s"}.

    keys="random" leaves the sub-keys at the reference init. Extra keyword arguments
    go to init_query (halves, whiten, rank, project_mean, split_points) or init_keys_faiss (niter, gpu,
    max_points, log); the latter are ignored with keys="random".
    """
    if keys not in KEY_METHODS:
        raise InputError(f"key init {keys!r} is unknown; use one of {', '.join(KEY_METHODS)}")
    q_kw = {
        k: kw.pop(k)
        for k in ("halves", "whiten", "rank", "project_mean", "split_points")
        if k in kw
    }
    t0 = time.perf_counter()
    q_info = init_query(layer, acts, method=query, seed=seed, **q_kw)
    if keys == "faiss":
        k_info = init_keys_faiss(layer, acts, seed=seed, **kw)
    else:  # faiss options (niter, gpu, ...) are irrelevant here and ignored
        k_info = {"method": "random", "changed": False}
    return {"query": q_info, "keys": k_info, "time_s": time.perf_counter() - t0}


@torch.no_grad()
def measure_usage(layer: ProductKeyMemory, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """Slot usage of the layer's selection over activations acts [N, d].

    Runs layer.select batch by batch, weights each pick by its softmax weight (as the
    forward does), accumulates a telemetry.UsageCounter over all heads' picks and
    returns its usage_stats: slots_used, pct_used, kl_uniform_count/weight,
    gini_count/weight, top1pct_share_*, slots_for_50/90/99pct, tokens.
    """
    _check_acts(layer, acts, "measure_usage")
    counter = UsageCounter(layer.config.slots)
    device = layer.query.weight.device
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size].to(device=device, dtype=layer.query.weight.dtype)
        scores, idx = layer.select(x)  # [n, H, knn]
        w = torch.softmax(scores.float() * layer.score_scale, dim=-1)
        counter.update(idx, w, tokens=x.shape[0])
    return counter.stats()
