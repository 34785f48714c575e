"""ProductKeyMemory forward/backward, the shared value table, and MemoryBank sharing."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from memsurgery.errors import InputError
from memsurgery.memory import MemoryBank, MemoryConfig, ProductKeyMemory, SharedValueTable
from memsurgery.memory.topk import brute_force_topk

TINY = {"slots": 16, "heads": 2, "knn": 2, "k_dim": 8}


def _bank(seed=0, d=6, layers=("0",), dtype=None, **kw) -> MemoryBank:
    torch.manual_seed(seed)
    cfg = MemoryConfig.build(**{**TINY, **kw}).for_model(d)
    bank = MemoryBank.from_config(cfg)
    for name in layers:
        bank.add_layer(name)
    return bank.to(dtype) if dtype is not None else bank


def _reference(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The layer's math written out with a brute-force search over all slots."""
    c = layer.config
    x2 = x.reshape(-1, layer.input_dim)
    q = layer.query(x2).view(-1, c.heads, 2, c.k_dim // 2)
    q1, q2, k1, k2 = q[:, :, 0], q[:, :, 1], layer.keys[:, 0], layer.keys[:, 1]
    if c.qk_norm:
        norm = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        q1, q2, k1, k2 = norm(q1), norm(q2), norm(k1), norm(k2)
    s, i = brute_force_topk(q1, q2, k1, k2, c.knn)
    w = torch.softmax(s * c.effective_score_scale, -1)
    rows = layer.value_table.weight[i]  # [N, H, knn, V]
    bag = (w.unsqueeze(-1) * rows).sum((1, 2))
    if c.swilu:
        bag = bag * F.silu(layer.gate_proj(x2))
    out = layer.out_proj(bag)
    if c.gate == "relevance":
        out = out * torch.sigmoid(x2 @ layer.gate_weight + layer.gate_bias).unsqueeze(-1)
    return out.reshape(x.shape)


# ---- forward ---------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("swilu", [True, False])
@pytest.mark.parametrize("gate", ["none", "relevance"])
def test_forward_shape_and_math(qk_norm, swilu, gate):
    bank = _bank(qk_norm=qk_norm, swilu=swilu, gate=gate, dtype=torch.float64)
    layer = bank["0"]
    with torch.no_grad():  # a non-zero relevance gate so its weight is exercised
        if gate == "relevance":
            layer.gate_weight.normal_()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (3, 5, 6) and y.dtype == torch.float64
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-10, atol=1e-12)


def test_v_dim_differs_from_hidden_and_odd_sizes():
    torch.manual_seed(0)
    cfg = MemoryConfig.build(slots=64, heads=3, knn=5, k_dim=6, v_dim=10).for_model(7)
    bank = MemoryBank.from_config(cfg)
    layer = bank.add_layer("3")
    assert layer(torch.randn(2, 63, 7)).shape == (2, 63, 7)


def test_relevance_gate_starts_at_sigmoid_bias():
    bank_g = _bank(gate="relevance", gate_bias_init=-4.0)
    bank_n = _bank(gate="none")
    bank_n.load_state_dict(bank_g.state_dict(), strict=False)  # same values, W_q, keys, W_g, W_o
    x = torch.randn(4, 6)
    torch.testing.assert_close(bank_g["0"](x), bank_n["0"](x) * torch.sigmoid(torch.tensor(-4.0)))


def test_zeroing_output_or_values_makes_layer_exactly_zero():
    bank = _bank()
    x = torch.randn(4, 6)
    assert bank["0"](x).abs().sum() > 0
    bank["0"].zero_output_()
    assert torch.equal(bank["0"](x), torch.zeros(4, 6))
    bank2 = _bank()
    bank2.values.zero_()
    assert torch.equal(bank2["0"](x), torch.zeros(4, 6))


def test_bf16_value_table():
    bank = _bank(value_dtype="bfloat16")
    assert bank.values.weight.dtype == torch.bfloat16
    y = bank["0"](torch.randn(3, 6))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    y.sum().backward()
    assert bank.values.weight.grad.dtype == torch.bfloat16


# ---- gradients -------------------------------------------------------------------


def _well_separated_input(layer, n=5, min_gap=1e-3, tries=50):
    """fp64 input whose top-k choices (both halves and candidates) have a margin > min_gap,
    so gradcheck's tiny perturbations cannot flip a selection."""
    c = layer.config
    for seed in range(tries):
        x = torch.randn(
            n, layer.input_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            q = layer.query(x).view(n, c.heads, 2, c.k_dim // 2)
            k = layer.keys
            norm = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            q1, q2, k1, k2 = norm(q[:, :, 0]), norm(q[:, :, 1]), norm(k[:, 0]), norm(k[:, 1])
            full = brute_force_topk(q1, q2, k1, k2, c.n_sub**2)[0]  # all slots sorted
            h1 = torch.einsum("nhk,hsk->nhs", q1, k1).sort(-1, descending=True).values
            h2 = torch.einsum("nhk,hsk->nhs", q2, k2).sort(-1, descending=True).values
        gaps = [full[..., c.knn - 1] - full[..., c.knn]]
        gaps += [h[..., c.knn - 1] - h[..., c.knn] for h in (h1, h2) if c.knn < c.n_sub]
        if min(float(g.min()) for g in gaps) > min_gap:
            return x
    raise AssertionError("no well-separated input found")


def test_gradcheck_fp64_all_inputs():
    bank = _bank(gate="relevance", dtype=torch.float64)
    layer = bank["0"]
    layer.sparse_grad = False  # gradcheck compares dense Jacobians
    with torch.no_grad():
        layer.gate_weight.normal_(0, 0.3)
        layer.gate_bias.fill_(0.5)
    x = _well_separated_input(layer).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    table = bank.values.weight.detach().clone().requires_grad_()

    def g(x, table, *ps):
        # functional_call cannot reach the unregistered table; swap the Parameter for the input
        saved = layer.value_table.weight
        try:
            layer.value_table._parameters["weight"] = table
            return functional_call(layer, dict(zip(names, ps)), (x,))
        finally:
            layer.value_table._parameters["weight"] = saved

    assert torch.autograd.gradcheck(g, (x, table, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_values_get_sparse_grad_matching_dense():
    bank = _bank(layers=("0", "1"))
    x = torch.randn(2, 7, 6)
    (bank["0"](x).square().sum() + bank["1"](x).sum()).backward()
    g = bank.values.weight.grad
    assert g.layout == torch.sparse_coo
    assert g.coalesce()._nnz() <= 2 * 14 * TINY["heads"] * TINY["knn"]

    dense = copy.deepcopy(bank)
    dense.values.weight.grad = None
    for _, layer in dense:
        layer.sparse_grad = False
    (dense["0"](x).square().sum() + dense["1"](x).sum()).backward()
    assert dense.values.weight.grad.layout == torch.strided
    torch.testing.assert_close(g.to_dense(), dense.values.weight.grad)


def test_unselected_value_row_does_not_change_output():
    bank = _bank(slots=64, knn=3)
    layer = bank["0"]
    layer.record = True
    x = torch.randn(2, 3, 6)
    y = layer(x)
    used = set(layer.last_indices.reshape(-1).tolist())
    unused = [r for r in range(64) if r not in used]
    assert unused and used
    with torch.no_grad():
        bank.values.weight[unused] += 100.0
    assert torch.equal(layer(x), y)
    with torch.no_grad():
        bank.values.weight[min(used)] += 1.0
    assert not torch.equal(layer(x), y)


# ---- telemetry -------------------------------------------------------------------


def test_record_off_by_default_and_shapes_when_on():
    layer = _bank(gate="relevance")["0"]
    x = torch.randn(2, 3, 6)
    layer(x)
    assert layer.last_indices is None and layer.last_scores is None and layer.last_gate is None
    layer.record = True
    layer(x)
    assert layer.last_indices.shape == (2, 3, 2, 2) and layer.last_indices.dtype == torch.int64
    assert layer.last_scores.shape == (2, 3, 2, 2) and not layer.last_scores.requires_grad
    torch.testing.assert_close(layer.last_scores.sum(-1), torch.ones(2, 3, 2))
    assert layer.last_gate.shape == (2, 3)
    torch.testing.assert_close(layer.last_gate, torch.full((2, 3), 1 / (1 + math.exp(4.0))))
    assert int(layer.last_indices.max()) < 16


# ---- sharing ---------------------------------------------------------------------


def test_state_dict_holds_table_once_and_parameters_once():
    bank = _bank(layers=("4", "12", "20"))
    sd = bank.state_dict()
    assert [k for k in sd if not k.startswith("layers.")] == ["values.weight"]
    assert all(
        sd[k].data_ptr() != bank.values.weight.data_ptr() for k in sd if k.startswith("layers.")
    )
    assert sum(1 for p in bank.parameters() if p is bank.values.weight) == 1
    assert sum(p.numel() for p in bank.parameters()) == bank.values.weight.numel() + sum(
        p.numel() for _, layer in bank for p in layer.parameters()
    )
    for _, layer in bank:
        assert "value_table" not in dict(layer.named_children())
        assert all(p is not bank.values.weight for p in layer.parameters())
        assert layer.value_table is bank.values
    assert len(bank.dense_parameters()) + 1 == len(list(bank.parameters()))


def test_two_banks_do_not_share():
    a, b = _bank(seed=0), _bank(seed=0)
    assert a.values.weight.data_ptr() != b.values.weight.data_ptr()
    with torch.no_grad():
        a.values.weight.add_(1.0)
    assert not torch.equal(a.values.weight, b.values.weight)
    assert a["0"].value_table is a.values and b["0"].value_table is b.values


def test_load_state_dict_into_fresh_bank_reaches_all_layers():
    src = _bank(seed=1, layers=("4", "12", "20"))
    dst = _bank(seed=2, layers=("4", "12", "20"))
    x = torch.randn(3, 6)
    dst.load_state_dict(src.state_dict())
    for name in ("4", "12", "20"):
        assert dst[name].value_table is dst.values
        torch.testing.assert_close(dst[name](x), src[name](x), rtol=0, atol=0)

    dst2 = _bank(seed=3, layers=("4", "12", "20"))
    dst2.load_state_dict(src.state_dict(), assign=True)  # replaces the Parameter objects
    for name in ("4", "12", "20"):
        assert dst2[name].value_table.weight is dst2.values.weight
        torch.testing.assert_close(dst2[name](x), src[name](x), rtol=0, atol=0)


def test_deepcopy_and_to_keep_sharing():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)
            self.memory_bank = _bank(layers=("1", "2"))

    m = Model()
    m2 = copy.deepcopy(m)
    bank2 = m2.memory_bank
    assert bank2.values is not m.memory_bank.values
    for _, layer in bank2:
        assert layer.value_table is bank2.values
    with torch.no_grad():
        bank2.values.weight.zero_()
    assert m.memory_bank.values.weight.abs().sum() > 0  # original untouched

    m3 = copy.deepcopy(m).to(torch.float64)
    for _, layer in m3.memory_bank:
        assert layer.value_table.weight.dtype == torch.float64
        assert layer.value_table is m3.memory_bank.values
    assert m3.memory_bank["1"](torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64
    assert list(m.state_dict()).count("memory_bank.values.weight") == 1


def test_attach_validation():
    bank = _bank(layers=("0",))
    with pytest.raises(InputError, match="already attached"):
        bank.add_layer("0")
    with pytest.raises(InputError, match="without '.'"):
        bank.add_layer("model.layers.4")
    other = SharedValueTable(25, 6)
    with pytest.raises(InputError, match="value table is"):
        ProductKeyMemory(bank.config, other)
    # a layer built on another table is rebound to the bank's on attach
    other_ok = SharedValueTable(16, 6)
    layer = ProductKeyMemory(bank.config, other_ok)
    bank.attach("1", layer)
    assert layer.value_table is bank.values


def test_bench_child_runs_quick_in_process():
    from memsurgery.bench.layer import QUICK, _child

    r = _child(
        dict(
            QUICK,
            optimizer="adam",
            slots=1024,
            value_dtype="float32",
            warmup=1,
            reps=1,
            fixed_rows=64,
            threads=torch.get_num_threads(),  # the parent always passes it; keep this process's
        )
    )
    assert r["threads"] == torch.get_num_threads()
    assert r["step_ms"] > 0 and r["rows_touched"] > 0 and r["expected_bytes"] > r["table_bytes"]
