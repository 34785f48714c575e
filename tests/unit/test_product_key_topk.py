"""Two-stage product-key top-k returns exactly the brute-force top-knn over all n_sub**2 slots."""

import pytest
import torch

from memsurgery.memory import brute_force_topk, product_key_topk


def _data(n, h, n_sub, k2, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return mk(n, h, k2), mk(n, h, k2), mk(h, n_sub, k2), mk(h, n_sub, k2)


@pytest.mark.parametrize(
    "n, h, n_sub, k2, knn",
    [
        (37, 3, 8, 4, 3),
        (20, 2, 16, 5, 16),
        (50, 1, 32, 8, 7),
        (10, 4, 12, 3, 1),
        (64, 2, 32, 16, 32),
    ],
)
def test_selected_set_equals_brute_force(n, h, n_sub, k2, knn):
    for seed in range(3):
        q1, q2, k1, k2_ = _data(n, h, n_sub, k2, seed)
        s, i = product_key_topk(q1, q2, k1, k2_, knn)
        bs, bi = brute_force_topk(q1, q2, k1, k2_, knn)
        assert s.shape == i.shape == (n, h, knn) and i.dtype == torch.int64
        # Same SET of slots per (token, head) and the same scores, in descending order.
        assert torch.equal(i.sort(-1).values, bi.sort(-1).values)
        torch.testing.assert_close(s, bs, rtol=0, atol=1e-12)
        assert bool((s[..., :-1] >= s[..., 1:]).all())


def test_index_decodes_to_its_score():
    q1, q2, k1, k2 = _data(9, 2, 16, 4, seed=7)
    s, i = product_key_topk(q1, q2, k1, k2, 5)
    i1, i2 = i // 16, i % 16
    for h in range(2):
        ref = (q1[:, h, None, :] * k1[h][i1[:, h]]).sum(-1) + (
            q2[:, h, None, :] * k2[h][i2[:, h]]
        ).sum(-1)
        torch.testing.assert_close(s[:, h], ref)


def test_top_slots_mix_sub_key_ranks():
    # The 2nd best slot pairs half-1's 2nd sub-key with half-2's best (not (best, 2nd)):
    # (0,0)=8.0, (1,0)=7.9, (0,1)=6.0. Slot ids are i1 * n_sub + i2 -> {0, 4}.
    n_sub = 4
    s1 = torch.tensor([5.0, 4.9, 0.0, -1.0], dtype=torch.float64)
    s2 = torch.tensor([3.0, 1.0, -9.0, -9.0], dtype=torch.float64)
    # Realize half scores with one-hot sub-keys: keys = I, q = s.
    eye = torch.eye(n_sub, dtype=torch.float64)[None]
    s, i = product_key_topk(s1.view(1, 1, -1), s2.view(1, 1, -1), eye, eye, 2)
    assert i.view(-1).tolist() == [0 * n_sub + 0, 1 * n_sub + 0]
    torch.testing.assert_close(s.view(-1), torch.tensor([8.0, 7.9], dtype=torch.float64))


def test_gradients_reach_queries_and_keys():
    q1, q2, k1, k2 = (t.requires_grad_() for t in _data(5, 2, 8, 3, seed=1))
    s, _ = product_key_topk(q1, q2, k1, k2, 3)
    s.sum().backward()
    for t in (q1, q2, k1, k2):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_knn_out_of_range():
    q1, q2, k1, k2 = _data(2, 1, 4, 2, seed=0)
    with pytest.raises(ValueError, match="knn=5"):
        product_key_topk(q1, q2, k1, k2, 5)


def test_sparse_backward_matches_dense_autograd():
    # Same scores as brute force, so the same loss; the custom backward (picked sub-keys
    # only) must give the gradients plain autograd gives through the full score matrix.
    data = _data(13, 3, 16, 6, seed=4)
    w = torch.randn(13, 3, 5, dtype=torch.float64)
    grads = []
    for fn in (product_key_topk, brute_force_topk):
        ts = [t.clone().requires_grad_() for t in data]
        s, _ = fn(*ts, 5)
        (s * w).sum().backward()
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    small = [t.requires_grad_() for t in _data(4, 2, 8, 3, seed=5)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: product_key_topk(a, b, c, d, 3)[0], small)
