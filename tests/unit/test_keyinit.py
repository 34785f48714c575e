"""Query and key init (memsurgery.graft.keyinit) on small tables and synthetic data.

The synthetic activations imitate what makes random init fail on a real model:
a large shared mean plus a few dozen clusters.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from memsurgery.errors import InputError, MissingDependency
from memsurgery.graft.keyinit import (
    init_keys_faiss,
    init_memory_keys,
    init_query,
    measure_usage,
    query_halves,
)
from memsurgery.memory import MemoryBank, MemoryConfig, product_key_topk

D = 32


def _layer(slots=256, heads=2, knn=4, k_dim=16, qk_norm=True, seed=0):
    torch.manual_seed(seed)
    cfg = MemoryConfig.build(
        slots=slots, heads=heads, knn=knn, k_dim=k_dim, qk_norm=qk_norm, swilu=False
    )
    return MemoryBank.from_config(cfg.for_model(D)).add_layer("0")


def _clustered(n, seed, n_clusters=40, mean=4.0):
    """[n, D]: a shared offset `mean` in every coordinate + clusters + noise."""
    g = torch.Generator().manual_seed(1234)  # the same clusters for every split
    centers = torch.randn(n_clusters, D, generator=g) * 2.0 + mean
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, n_clusters, (n,), generator=g)
    return centers[label] + 0.5 * torch.randn(n, D, generator=g)


def test_query_halves_match_select():
    for qk_norm in (True, False):
        layer = _layer(qk_norm=qk_norm)
        x = torch.randn(50, D)
        q = query_halves(layer, x)  # [N, H, 2, K2]
        keys = layer.keys
        if qk_norm:
            keys = F.rms_norm(keys, (keys.shape[-1],), eps=1e-6)
        want = product_key_topk(q[:, :, 0], q[:, :, 1], keys[:, 0], keys[:, 1], layer.knn)
        got = layer.select(x)
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[1], want[1])


def test_init_keys_shape_dtype_and_info():
    layer = _layer()
    keys_before = layer.keys.detach().clone()
    info = init_keys_faiss(layer, _clustered(2000, 0), niter=5, seed=0)
    assert layer.keys.shape == keys_before.shape and layer.keys.dtype == keys_before.dtype
    assert not torch.equal(layer.keys, keys_before)
    # The default cap is 64 points per centroid: 64 * n_sub = 1024 of the 2000.
    assert info["points"] == 1024 and info["gpu"] is False and info["spherical"] is True
    assert len(info["per_half"]) == 2 * 2 and len(info["key_scale"]) == 2
    # Keys have the RMS norm of the reference init: sqrt(K2 / (3 K)).
    rms = layer.keys.detach().norm(dim=-1).pow(2).mean().sqrt().item()
    assert rms == pytest.approx((8 / (3 * 16)) ** 0.5, rel=1e-4)
    # Deterministic by seed.
    other = _layer()
    init_keys_faiss(other, _clustered(2000, 0), niter=5, seed=0)
    assert torch.equal(other.keys, layer.keys)


def test_centroids_are_kmeans_fixed_points():
    """Each key (unscaled) is the mean of the query halves assigned to it (L2 k-means)."""
    layer = _layer(slots=64, qk_norm=False)  # n_sub = 8
    acts = _clustered(3000, 0, n_clusters=8)
    info = init_keys_faiss(layer, acts, niter=50, seed=0, max_points=len(acts))
    q = query_halves(layer, acts)  # [N, H, 2, K2]
    checked = 0
    for h in range(layer.heads):
        for j in range(2):
            cents = layer.keys[h, j].detach() / info["key_scale"][h]  # [n_sub, K2]
            pts = q[:, h, j].detach()
            assign = torch.cdist(pts, cents).argmin(dim=1)
            for c in range(cents.shape[0]):
                members = pts[assign == c]
                if len(members) >= 20:
                    torch.testing.assert_close(
                        members.mean(0), cents[c], rtol=0, atol=0.05 * pts.std().item()
                    )
                    checked += 1
    assert checked >= 20


def test_spherical_centroids_point_at_their_members():
    layer = _layer(slots=64)  # qk_norm: spherical k-means on the normalized halves
    acts = _clustered(3000, 0, n_clusters=8)
    init_keys_faiss(layer, acts, niter=50, seed=0, max_points=len(acts))
    q = F.normalize(query_halves(layer, acts), dim=-1)
    keys = F.normalize(layer.keys.detach(), dim=-1)
    for h in range(layer.heads):
        for j in range(2):
            assign = (q[:, h, j] @ keys[h, j].T).argmax(dim=1)
            for c in range(keys.shape[2]):
                members = q[assign == c, h, j]
                if len(members) >= 20:
                    assert F.cosine_similarity(members.mean(0), keys[h, j, c], dim=0) > 0.999


def test_faiss_init_uses_more_slots_than_random():
    calib, held = _clustered(8000, 0), _clustered(8000, 1)
    random_layer = _layer(slots=1024, knn=8)
    faiss_layer = _layer(slots=1024, knn=8)
    init_memory_keys(faiss_layer, calib, keys="faiss", query="random", niter=10)
    assert torch.equal(random_layer.query.weight, faiss_layer.query.weight)  # query untouched
    base = measure_usage(random_layer, held)
    faiss = measure_usage(faiss_layer, held)
    assert base["tokens"] == 8000 and base["accesses"] == 8000 * 2 * 8
    assert faiss["pct_used"] >= 2 * base["pct_used"]
    assert faiss["kl_uniform_count"] < base["kl_uniform_count"]
    # PCA query init on top helps further.
    both = _layer(slots=1024, knn=8)
    info = init_memory_keys(both, calib, keys="faiss", query="pca", niter=10)
    assert measure_usage(both, held)["pct_used"] > faiss["pct_used"]
    assert info["query"]["mean_share"] > 0.5  # the synthetic data are mostly shared mean


@pytest.mark.parametrize("halves", ["split", "mixed"])
def test_pca_query_is_mean_free_whitened_and_heads_differ(halves):
    layer = _layer(k_dim=8)  # K = 8, rank 12 (3K/2) of 31: each head reads a whitened projection
    acts = _clustered(5000, 0)
    info = init_query(layer, acts, "pca", seed=0, halves=halves)
    assert info["rank"] == 12 and 0 < info["explained_variance"] <= 1
    q = layer.query(acts).detach().double()  # [N, H*K]
    assert q.mean(0).abs().max() < 1e-3 * q.std()  # the shared mean is projected out
    assert q.pow(2).mean().item() == pytest.approx(1.0, rel=1e-3)  # unit mean variance
    for h in range(2):
        cov = torch.cov(q[:, h * 8 : (h + 1) * 8].T)
        torch.testing.assert_close(
            cov, cov[0, 0] * torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0
        )
    w = layer.query.weight.detach()
    assert not torch.allclose(w[:8], w[8:16], atol=1e-3)
    # H*K > d and K > rank: still works, rank capped by the data.
    wide = _layer(k_dim=64, heads=4)
    assert init_query(wide, acts, "pca", halves=halves)["rank"] == D - 1  # mean direction removed


def test_split_halves_separate_cluster_identity():
    """halves="split": half 1 carries which-cluster, half 2 mostly within-cluster variation."""
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(6, D, generator=g) * 2 + 3
    label = torch.randint(0, 6, (6000,), generator=g)
    acts = centers[label] + 0.5 * torch.randn(6000, D, generator=g)
    layer = _layer(k_dim=16, heads=1)
    info = init_query(layer, acts, "pca", halves="split")
    assert info["between_share_half1"] > 0.9
    q = query_halves(layer, acts)[:, 0].detach()  # [N, 2, K2]
    share = []
    for j in range(2):
        means = torch.stack([q[label == c, j].mean(0) for c in range(6)])  # [6, K2]
        share.append(
            (means[label] - q[:, j].mean(0)).pow(2).sum() / (q[:, j] - q[:, j].mean(0)).pow(2).sum()
        )
    # Half 1 holds the 5 cluster-separating directions (of its 12), half 2 none of them.
    assert share[0] > 0.3 and share[1] < 0.02, share


def test_query_methods():
    layer = _layer()
    w0 = layer.query.weight.detach().clone()
    assert init_query(layer, torch.randn(10, D), "random") == {"method": "random", "changed": False}
    assert torch.equal(layer.query.weight, w0)
    init_query(layer, torch.randn(10, D), "orthogonal", seed=1)
    w = layer.query.weight.detach()
    for h in range(2):
        block = w[h * 16 : (h + 1) * 16]
        torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    wide = _layer(k_dim=64)  # K > d: orthonormal columns, unit row norms on average
    init_query(wide, torch.randn(10, D), "orthogonal")
    assert wide.query.weight.detach().pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(InputError, match="query init 'svd' is unknown"):
        init_query(layer, torch.randn(10, D), "svd")
    with pytest.raises(InputError, match="key init 'kmeans' is unknown"):
        init_memory_keys(layer, torch.randn(10, D), keys="kmeans")


def test_key_init_errors():
    layer = _layer()  # n_sub = 16
    with pytest.raises(InputError, match="at least n_sub=16 activation vectors"):
        init_keys_faiss(layer, torch.randn(15, D))
    with pytest.raises(InputError, match=r"\[N, d=32\]"):
        init_keys_faiss(layer, torch.randn(100, D + 1))
    logs = []
    info = init_keys_faiss(layer, torch.randn(5000, D), niter=2, max_points=100, log=logs.append)
    assert info["points"] == 100
    assert any("< 39 per centroid" in m for m in logs)


def test_missing_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'memsurgery\[cpu\]'"):
        init_keys_faiss(_layer(), torch.randn(100, D))
    # keys="random" never needs faiss.
    init_memory_keys(_layer(), torch.randn(100, D), keys="random", query="pca")
