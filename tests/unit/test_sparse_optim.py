"""SparseRowAdam / SparseRowSGD: untouched rows bit-identical, touched rows exact, resumable."""

import copy
import math

import pytest
import torch

from memsurgery.errors import InputError
from memsurgery.optim import SparseRowAdam, SparseRowSGD


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(
        torch.as_tensor(rows).view(1, -1), values, shape, check_invariants=True
    )


def _steps(seed, rows_per_step, shape, n_steps, dtype=torch.float64):
    """A reproducible list of (rows, values) sparse gradients; rows may repeat within a step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        rows = torch.randint(0, shape[0], (rows_per_step,), generator=g)
        out.append((rows, torch.randn(rows_per_step, *shape[1:], generator=g, dtype=dtype)))
    return out


class RowAdamReference:
    """Adam per row, written out: a row's step count advances only when it is touched."""

    def __init__(self, p, lr, betas, eps):
        self.p, self.lr, (self.b1, self.b2), self.eps = p.clone(), lr, betas, eps
        self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)
        self.t = [0] * p.shape[0]

    def step(self, rows, values):
        g = torch.zeros_like(self.p).index_add_(0, rows, values)  # duplicates summed
        for r in sorted(set(rows.tolist())):
            self.t[r] += 1
            t = self.t[r]
            self.m[r] = self.b1 * self.m[r] + (1 - self.b1) * g[r]
            self.v[r] = self.b2 * self.v[r] + (1 - self.b2) * g[r] ** 2
            m_hat = self.m[r] / (1 - self.b1**t)
            v_hat = self.v[r] / (1 - self.b2**t)
            self.p[r] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)


def test_untouched_rows_bit_identical_and_touched_rows_match_hand_adam():
    shape = (40, 5)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    ref = RowAdamReference(p.detach(), lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    opt = SparseRowAdam([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8, chunk_rows=3)  # many chunks
    for rows, values in _steps(0, 12, shape, n_steps=6):
        before = p.detach().clone()
        p.grad = _sparse(rows, values, shape)
        opt.step()
        untouched = sorted(set(range(shape[0])) - set(rows.tolist()))
        assert torch.equal(p.detach()[untouched], before[untouched])
        ref.step(rows, values)
        torch.testing.assert_close(p.detach(), ref.p, rtol=1e-12, atol=1e-14)
    assert opt.state[p]["row_step"].tolist() == ref.t


def test_global_bias_correction_matches_torch_sparse_adam():
    shape = (30, 4)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    # eps tiny: SparseAdam adds eps before bias correction, we add it after (Adam's form).
    ours = SparseRowAdam([p], lr=0.1, betas=(0.8, 0.95), eps=1e-14, bias_correction="global")
    theirs = torch.optim.SparseAdam([q], lr=0.1, betas=(0.8, 0.95), eps=1e-14)
    for rows, values in _steps(1, 9, shape, n_steps=8):
        p.grad = _sparse(rows, values, shape)
        q.grad = _sparse(rows, values, shape)
        ours.step()
        theirs.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-11, atol=1e-12)


def test_row_and_global_agree_when_every_row_is_touched_and_first_touch_differs():
    shape = (6, 3)
    p1 = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    row = SparseRowAdam([p1], lr=0.01)
    glob = SparseRowAdam([p2], lr=0.01, bias_correction="global")
    all_rows = torch.arange(6)
    for _ in range(3):
        vals = torch.randn(6, 3, dtype=torch.float64)
        p1.grad, p2.grad = _sparse(all_rows, vals, shape), _sparse(all_rows, vals, shape)
        row.step()
        glob.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-12, atol=0)
    # Now only row 0 is touched for 50 steps; then row 5 is touched again after a long gap.
    for _ in range(50):
        for p, o in ((p1, row), (p2, glob)):
            p.grad = _sparse([0], torch.ones(1, 3, dtype=torch.float64), shape)
            o.step()
    fresh1 = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    fresh2 = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    r1, g1 = (
        SparseRowAdam([fresh1], lr=0.01),
        SparseRowAdam([fresh2], lr=0.01, bias_correction="global"),
    )
    for _ in range(60):  # row 1 first touched at step 61: per-row moves by lr as a fresh Adam would
        for p, o in ((fresh1, r1), (fresh2, g1)):
            p.grad = _sparse([0], torch.ones(1, 3, dtype=torch.float64), (2, 3))
            o.step()
    for p, o in ((fresh1, r1), (fresh2, g1)):
        p.grad = _sparse([1], torch.ones(1, 3, dtype=torch.float64), (2, 3))
        o.step()
    assert math.isclose(-float(fresh1.detach()[1, 0]), 0.01, rel_tol=1e-6)
    # global count: m_hat = 0.1 / (1 - 0.9**61), v_hat = 0.001 / (1 - 0.999**61): not lr
    t = 61
    want = 0.01 * (0.1 / (1 - 0.9**t)) / (math.sqrt(0.001 / (1 - 0.999**t)) + 1e-8)
    assert (
        math.isclose(-float(fresh2.detach()[1, 0]), want, rel_tol=1e-6) and abs(want - 0.01) > 0.002
    )


def test_dense_grad_matches_torch_adam():
    torch.manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(7, 5)),
        torch.nn.Parameter(torch.randn(5)),
        torch.nn.Parameter(torch.tensor(0.3)),
    ]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours, theirs = SparseRowAdam(ps, lr=0.02, chunk_rows=2), torch.optim.Adam(qs, lr=0.02)
    for _ in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_duplicate_rows_are_coalesced_first():
    shape = (10, 3)
    rows = torch.tensor([2, 7, 2, 2, 7, 9])
    vals = torch.randn(6, 3, dtype=torch.float64)
    summed = _sparse(rows, vals, shape).coalesce()
    assert summed._nnz() == 3
    p1 = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = SparseRowAdam([p1], lr=0.1), SparseRowAdam([p2], lr=0.1)
    p1.grad, p2.grad = _sparse(rows, vals, shape), summed
    o1.step()
    o2.step()
    assert torch.equal(p1, p2)
    assert o1.state[p1]["row_step"].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("moment_dtype", [None, "bfloat16"])
def test_state_dict_round_trip_resumes_identically(moment_dtype):
    shape = (20, 4)
    steps = _steps(3, 7, shape, n_steps=5, dtype=torch.float32)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = SparseRowAdam([p], lr=0.01, moment_dtype=moment_dtype)
    for rows, vals in steps[:3]:
        p.grad = _sparse(rows, vals, shape)
        opt.step()
    saved_p, saved_opt = p.detach().clone(), copy.deepcopy(opt.state_dict())

    q = torch.nn.Parameter(saved_p.clone())
    opt2 = SparseRowAdam([q], lr=0.01, moment_dtype=moment_dtype)
    opt2.load_state_dict(saved_opt)
    want = torch.bfloat16 if moment_dtype == "bfloat16" else torch.float32
    assert opt2.state[q]["exp_avg"].dtype == want and opt2.state[q]["row_step"].dtype == torch.int32
    for rows, vals in steps[3:]:
        p.grad, q.grad = _sparse(rows, vals, shape), _sparse(rows, vals, shape)
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


def test_bf16_table_with_bf16_moments_leaves_untouched_rows():
    shape = (50, 8)
    p = torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16))
    opt = SparseRowAdam([p], lr=0.01, moment_dtype=torch.bfloat16)
    before = p.detach().clone()
    p.grad = _sparse([3, 4], torch.randn(2, 8).to(torch.bfloat16), shape)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    mask = torch.ones(50, dtype=torch.bool)
    mask[[3, 4]] = False
    assert torch.equal(p.detach()[mask], before[mask])
    assert not torch.equal(p.detach()[3], before[3])


def test_sgd_touched_rows_exact_untouched_bit_identical():
    shape = (12, 3)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    before = p.detach().clone()
    rows, vals = torch.tensor([1, 5, 1]), torch.randn(3, 3, dtype=torch.float64)
    p.grad = _sparse(rows, vals, shape)
    SparseRowSGD([p], lr=0.5, chunk_rows=1).step()
    want = before.clone()
    want[1] -= 0.5 * (vals[0] + vals[2])
    want[5] -= 0.5 * vals[1]
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15)
    assert torch.equal(p.detach()[[0, 2, 3, 4, 6, 7]], before[[0, 2, 3, 4, 6, 7]])

    d = torch.nn.Parameter(torch.ones(4))
    d.grad = torch.full((4,), 2.0)
    SparseRowSGD([d], lr=0.25).step()
    assert torch.equal(d.detach(), torch.full((4,), 0.5))


def test_sgd_bf16_rounds_once():
    p = torch.nn.Parameter(torch.ones(4, 2, dtype=torch.bfloat16))
    p.grad = _sparse([0, 0], torch.full((2, 2), 0.001, dtype=torch.bfloat16), (4, 2))
    SparseRowSGD([p], lr=1.0).step()
    assert torch.equal(
        p.detach()[0],
        (torch.ones(2) - 2 * torch.tensor(0.001, dtype=torch.bfloat16).float()).to(torch.bfloat16),
    )


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(InputError, match="weight decay"):
        SparseRowAdam([p], weight_decay=0.01)
    with pytest.raises(InputError, match="weight decay"):
        SparseRowSGD([p], weight_decay=0.01)
    with pytest.raises(InputError, match="momentum"):
        SparseRowSGD([p], momentum=0.9)
    with pytest.raises(InputError, match="bias_correction"):
        SparseRowAdam([p], bias_correction="none")
    with pytest.raises(InputError, match="moment_dtype"):
        SparseRowAdam([p], moment_dtype="float16")
    opt = SparseRowAdam([p])
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[0], [1]]), torch.tensor([1.0]), (3, 2), check_invariants=True
    )  # 2 sparse dims
    with pytest.raises(InputError, match="row-sparse"):
        opt.step()


def test_works_with_memory_layer_sparse_grads():
    from memsurgery.memory import MemoryBank, MemoryConfig

    torch.manual_seed(0)
    bank = MemoryBank.from_config(
        MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=8).for_model(12)
    )
    layer = bank.add_layer("0")
    layer.record = True
    opt = SparseRowAdam(
        [{"params": bank.table_parameters(), "lr": 1e-2}, {"params": bank.dense_parameters()}]
    )
    before = bank.values.weight.detach().clone()
    layer(torch.randn(3, 12)).square().sum().backward()
    opt.step()
    touched = sorted(set(layer.last_indices.reshape(-1).tolist()))
    changed = (bank.values.weight.detach() != before).any(-1).nonzero().view(-1).tolist()
    assert changed == touched
    opt.zero_grad()
    assert bank.values.weight.grad is None
