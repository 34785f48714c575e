"""Tests for `memsurgery.ops.embedding_bag`: every backend against the naive reference.

- the naive reference against `F.embedding_bag(mode="sum")`;
- the torch (sparse) backend and the Triton backend against naive: forward, value
  gradient (sparse, densified to compare) and score gradient, on odd shapes
  (dims 576, 60, 640, 3072, 2048; bag sizes 7, 5, 20), duplicates within and across
  bags, fp32 and bf16 tables, int32 and int64 indices;
- the sparse gradient's structure (exactly the unique rows, coalesced, table dtype);
- fp64 gradcheck; the dtype rule; backend dispatch and its env override;
- int64 address arithmetic on a real > 2**31-element table (virtual memory only);
- the Triton kernels compile for sm_90 on the CPU, the forward with 16-byte loads.

Triton runs in its CPU interpreter, which only works when TRITON_INTERPRET=1 was set
before triton was first imported (`triton.jit` decides at decoration time, for our
kernels and for triton's own `tl.sum`/`tl.zeros`). Another test file may import
triton first in this process, so `test_triton_in_interpreter_subprocess` reruns this
file's `test_interp_*` tests in a fresh pytest process with the variable set from the start.
In this process those tests skip unless it already runs the interpreter (e.g.
`TRITON_INTERPRET=1 pytest ...`), which the `interpret` fixture verifies. Interpreter
cases are kept small (it is slow).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memsurgery.ops import ENV_VAR, BackendUnavailable, embedding_bag, resolve_backend
from memsurgery.ops.embedding_bag.naive import embedding_bag_naive
from memsurgery.ops.embedding_bag.sparse import embedding_bag_sparse

try:
    # Imported here, not inside a test, so our kernels are decorated under this
    # process's initial TRITON_INTERPRET, the same one triton itself saw.
    from memsurgery.ops.embedding_bag import fused

    HAS_TRITON = True
except Exception:  # noqa: BLE001 -- missing or broken triton: its tests skip
    fused = None
    HAS_TRITON = False

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- helpers


def _interpreter_state() -> str:
    """How Triton kernels run in this process: "compiled", "interpreted" or "mixed"."""
    return fused.interpreter_state()


def _wide(x: torch.Tensor) -> torch.Tensor:
    # fp32 is exact enough to measure bf16/fp32 errors and keeps big GPU checks small.
    return x.double() if x.dtype == torch.float64 else x.float()


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """RMS of the difference relative to the RMS of the reference."""
    ref, got = _wide(ref), _wide(got)
    return ((ref - got).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, rtol: float, atol: float) -> None:
    """Pass when max |diff| <= atol or the relative RMS error <= rtol; NaNs always fail."""
    assert ref.shape == got.shape, (
        f"{name}: expected shape {tuple(ref.shape)}, got {tuple(got.shape)}"
    )
    assert not torch.isnan(ref).any(), f"{name}: NaN in reference"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    diff = (_wide(ref) - _wide(got)).abs().max().item() if ref.numel() else 0.0
    ratio = rel_err(ref, got) if ref.numel() else 0.0
    msg = (
        f"{name:>14}: max diff {diff:.3e} (atol {atol:.0e}), rel err {ratio:.3e} (rtol {rtol:.0e})"
    )
    assert diff <= atol or ratio <= rtol, msg


def tol(dtype: torch.dtype) -> dict:
    # fp32: only summation order differs. bf16 tables: the value gradient is rounded
    # to bf16 (1 ulp = 0.4%) and order differences can flip that rounding.
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


def make_inputs(bags, bag_size, slots, dim, vdtype=torch.float32, idtype=torch.int64, seed=0):
    """Random bag with guaranteed duplicates: within bag 0 (all one row), within other
    bags (column 1 repeats column 0) and across bags (few slots)."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, slots, (bags, bag_size), generator=gen)
    if bag_size > 1:
        indices[1::2, 1] = indices[1::2, 0]
        indices[0] = indices[0, 0]
    values = torch.randn(slots, dim, generator=gen).to(vdtype)
    scores = torch.rand(bags, bag_size, generator=gen).softmax(-1)
    return indices.to(idtype), values, scores


def run(fn, indices, values, scores, grad_out=None, **kw):
    """Forward + backward; returns (out, dense grad_values, grad_values as returned, grad_scores)."""
    v = values.clone().requires_grad_()
    s = scores.clone().requires_grad_()
    out = fn(indices, v, s, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    gv, gs = torch.autograd.grad(out, (v, s), grad_out)
    dense = gv.to_dense() if gv.layout == torch.sparse_coo else gv
    return out, dense, gv, gs


def compare_with_naive(fn, indices, values, scores, **kw):
    ref_out, ref_gv, _, ref_gs = run(embedding_bag_naive, indices, values, scores)
    out, gv, raw_gv, gs = run(fn, indices, values, scores, **kw)
    low = [d for d in (values.dtype, scores.dtype) if d != torch.float32]
    t = tol(low[0] if low else torch.float32)  # a bf16 output is rounded too
    assert out.dtype == ref_out.dtype == scores.dtype
    assert gv.dtype == values.dtype and gs.dtype == scores.dtype
    assert_close("output", ref_out, out, **t)
    assert_close("grad values", ref_gv, gv, **t)
    assert_close("grad scores", ref_gs, gs, **t)
    return raw_gv


def check_sparse_grad(gv: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    assert gv.layout == torch.sparse_coo
    assert gv.is_coalesced()
    assert gv.shape == values.shape and gv.dtype == values.dtype
    rows = gv._indices()
    assert rows.shape[0] == 1 and rows.dtype == torch.int64
    assert torch.equal(rows[0], torch.unique(indices.long()))  # exactly the touched rows
    assert gv._values().shape == (rows.shape[1], values.shape[1])


SHAPES = [  # (bags, bag_size, slots, dim)
    (63, 7, 100, 576),
    (17, 5, 40, 60),
    (3, 4, 10, 3072),
]


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_naive_and_torch_match_F_embedding_bag(dtype):
    indices, values, scores = make_inputs(63, 7, 100, 576)
    values, scores = values.to(dtype), scores.to(dtype)
    want = F.embedding_bag(indices, values, per_sample_weights=scores, mode="sum")
    assert_close("naive vs F", want, embedding_bag_naive(indices, values, scores), 1e-6, 1e-6)
    assert_close("torch vs F", want, embedding_bag_sparse(indices, values, scores), 1e-6, 1e-6)


# --------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("idtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_matches_naive(shape, vdtype, idtype):
    indices, values, scores = make_inputs(*shape, vdtype=vdtype, idtype=idtype)
    gv = compare_with_naive(embedding_bag_sparse, indices, values, scores)
    check_sparse_grad(gv, indices, values)


def test_torch_dense_grad_equals_sparse():
    indices, values, scores = make_inputs(17, 5, 40, 60)
    _, sparse_dense, _, gs1 = run(embedding_bag_sparse, indices, values, scores, sparse_grad=True)
    _, dense, raw, gs2 = run(embedding_bag_sparse, indices, values, scores, sparse_grad=False)
    assert raw.layout == torch.strided
    assert torch.equal(sparse_dense, dense) and torch.equal(gs1, gs2)


def test_torch_chunked_paths(monkeypatch):
    """Several chunks of bags (bf16 forward gather, backward) agree with one chunk."""
    from memsurgery.ops.embedding_bag import sparse as sparse_mod

    indices, values, scores = make_inputs(63, 7, 100, 576, vdtype=torch.bfloat16)
    whole = run(embedding_bag_sparse, indices, values, scores)
    monkeypatch.setattr(sparse_mod, "_CHUNK_BYTES", 7 * 576 * 4 * 5)  # 5 bags per chunk
    chunked = run(embedding_bag_sparse, indices, values, scores)
    for name, a, b in zip(
        ("output", "grad values", "grad scores"), whole[:2] + whole[3:], chunked[:2] + chunked[3:]
    ):
        assert torch.equal(a, b), name


def test_duplicates_accumulate():
    """All occurrences of one row, in one bag and across bags, sum into its gradient."""
    indices = torch.tensor([[3, 3, 3], [3, 1, 3]])
    values = torch.randn(5, 8)
    scores = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    g = torch.randn(2, 8)
    _, gv, raw, _ = run(embedding_bag_sparse, indices, values, scores, grad_out=g)
    want3 = (0.5 + 0.25 + 0.25) * g[0] + (0.1 + 0.7) * g[1]
    assert_close("row 3", want3, gv[3], 1e-6, 1e-6)
    assert_close("row 1", 0.2 * g[1], gv[1], 1e-6, 1e-6)
    assert raw._nnz() == 2


def test_gradcheck_fp64_torch():
    indices, values, scores = make_inputs(3, 4, 6, 5)
    v = values.double().requires_grad_()
    s = scores.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, s: embedding_bag_sparse(indices, v, s, sparse_grad=False), (v, s)
    )
    # The sparse gradient is the same numbers (gradcheck needs a strided grad).
    _, dense, _, _ = run(embedding_bag_sparse, indices, v.detach(), s.detach(), sparse_grad=False)
    _, from_sparse, _, _ = run(embedding_bag_sparse, indices, v.detach(), s.detach())
    assert torch.equal(dense, from_sparse)


def test_dtype_rule():
    """Output follows scores.dtype whatever the table; gradients follow their inputs."""
    indices, values, scores = make_inputs(9, 5, 20, 60)
    for vd, sd in [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                   (torch.bfloat16, torch.bfloat16)]:  # fmt: skip
        out, gv, _, gs = run(embedding_bag_sparse, indices, values.to(vd), scores.to(sd))
        assert out.dtype == sd and gv.dtype == vd and gs.dtype == sd
        ref = embedding_bag_naive(indices, values.to(vd), scores.to(sd))
        assert_close(f"{vd}/{sd}", ref.float(), out.float(), 1e-2, 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_tables_accumulate_in_fp32(dtype):
    """Half table with half scores takes PyTorch's kernels (forward, score grad, and the
    value grad's reverse-index bag): they must accumulate in fp32, i.e. differ from an
    exact sum by one final rounding. A half-precision running sum over 256 rows (or a
    row's ~27 occurrences) would be off by far more."""
    indices, values, scores = make_inputs(32, 256, 300, 576, vdtype=dtype)
    scores = scores.to(dtype)
    g = torch.randn(32, 576, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, gv, _, gs = run(embedding_bag_sparse, indices, values, scores, grad_out=g)
    ref = (values[indices].double() * scores.double()[..., None]).sum(1)
    ref_gs = torch.einsum("bkd,bd->bk", values[indices].double(), g.double())
    contrib = (scores.double()[..., None] * g.double()[:, None, :]).reshape(-1, 576)
    ref_gv = torch.zeros(300, 576, dtype=torch.float64).index_add_(0, indices.reshape(-1), contrib)
    touched = torch.unique(indices)
    one_rounding = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # half an ulp, relative
    checks = (("output", ref, out), ("grad scores", ref_gs, gs),
              ("grad values", ref_gv[touched], gv[touched]))  # fmt: skip
    for name, want, got in checks:
        assert got.dtype == dtype
        rel = ((got.double() - want).abs() / want.abs().clamp_min(1e-2)).max().item()
        assert rel <= 1.01 * one_rounding, f"{name}: max rel err {rel:.2e} > {one_rounding:.2e}"


def test_leading_dims_and_empty():
    indices, values, scores = make_inputs(6, 5, 20, 60)
    out = embedding_bag_sparse(indices.view(2, 3, 5), values, scores.view(2, 3, 5))
    assert out.shape == (2, 3, 60)
    assert_close(
        "leading", embedding_bag_naive(indices, values, scores), out.view(6, 60), 1e-6, 1e-6
    )
    v = values.clone().requires_grad_()
    for shape in [(0, 5), (4, 0)]:
        idx = torch.zeros(shape, dtype=torch.int64)
        s = torch.zeros(shape, requires_grad=True)
        out = embedding_bag(idx, v, s)
        assert out.shape == (shape[0], 60) and not out.any()
        out.sum().backward()


def test_input_validation():
    indices, values, scores = make_inputs(4, 3, 10, 8)
    with pytest.raises(ValueError, match="indices"):
        embedding_bag(indices.float(), values, scores)
    with pytest.raises(ValueError, match="same shape"):
        embedding_bag(indices, values, scores[:, :2])
    with pytest.raises(ValueError, match="values"):
        embedding_bag(indices, values[0], scores)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_precedence(monkeypatch):
    values = torch.zeros(4, 4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", values) == "torch"  # CPU table
    monkeypatch.setenv(ENV_VAR, "naive")
    assert resolve_backend("auto", values) == "naive"  # env replaces auto
    assert resolve_backend("torch", values) == "torch"  # explicit argument wins
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", values)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", values)


def test_naive_backend_via_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "naive")
    indices, values, scores = make_inputs(4, 3, 10, 8)
    _, _, gv, _ = run(embedding_bag, indices, values, scores)
    assert gv.layout == torch.strided  # the reference ignores sparse_grad


def test_ops_name_is_the_function():
    from memsurgery import ops
    from memsurgery.ops.embedding_bag import naive, sparse  # noqa: F401

    assert callable(ops.embedding_bag) and ops.embedding_bag is embedding_bag


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_needs_the_interpreter():
    if _interpreter_state() != "compiled":
        pytest.skip("this process runs the Triton interpreter")
    indices, values, scores = make_inputs(4, 3, 10, 8)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        embedding_bag(indices, values, scores, backend="triton")
    with pytest.raises(RuntimeError):  # plain-Python callers can catch RuntimeError
        embedding_bag(indices, values, scores, backend="triton")


# --------------------------------------------------------------------------- triton (interpreter)


_CHILD_FLAG = "MEMSURGERY_EMBEDDING_BAG_INTERP_CHILD"


@pytest.fixture
def interpret():
    """The fused module, when this process runs Triton kernels in the CPU interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    if _interpreter_state() != "interpreted":
        pytest.skip(
            "runs in test_triton_in_interpreter_subprocess (needs TRITON_INTERPRET=1 at import)"
        )
    return fused


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_in_interpreter_subprocess():
    """Run every `interp` test of this file in a fresh process under TRITON_INTERPRET=1."""
    if os.environ.get(_CHILD_FLAG) == "1" or _interpreter_state() == "interpreted":
        pytest.skip("already running under the interpreter: the interp tests run in-process")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO, **{_CHILD_FLAG: "1"})
    env.pop(ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-k", "test_interp_",
         "-p", "no:cacheprovider", "-rs"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, out
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], out


def test_interp_state_is_consistent(interpret):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(interpret._bag_fwd_kernel, InterpretedFunction)


TRITON_CASES = [  # (bags, bag_size, slots, dim, table dtype, index dtype)
    (63, 7, 100, 576, torch.float32, torch.int64),
    (17, 5, 40, 60, torch.bfloat16, torch.int32),
    (3, 4, 10, 3072, torch.float32, torch.int32),
    (4, 20, 30, 2048, torch.bfloat16, torch.int64),  # several BLOCK_K steps + a tail
    (6, 9, 12, 640, torch.float32, torch.int64),
]


@pytest.mark.parametrize(
    "case", TRITON_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[3]}-{str(c[4])[6:]}-{str(c[5])[6:]}"
)
def test_interp_triton_matches_naive(interpret, case):
    bags, bag_size, slots, dim, vdtype, idtype = case
    indices, values, scores = make_inputs(bags, bag_size, slots, dim, vdtype=vdtype, idtype=idtype)
    gv = compare_with_naive(interpret.embedding_bag_triton, indices, values, scores)
    check_sparse_grad(gv, indices, values)


def test_interp_triton_dense_grad_dispatch_determinism(interpret):
    indices, values, scores = make_inputs(17, 5, 40, 60)
    sparse = run(embedding_bag, indices, values, scores, backend="triton")
    dense = run(embedding_bag, indices, values, scores, backend="triton", sparse_grad=False)
    assert sparse[2].layout == torch.sparse_coo and dense[2].layout == torch.strided
    assert torch.equal(sparse[1], dense[1])  # same kernel, same order: bitwise
    again = run(embedding_bag, indices, values, scores, backend="triton")
    assert torch.equal(sparse[1], again[1]) and torch.equal(sparse[3], again[3])  # deterministic


def test_interp_triton_strided_table_and_leading_dims(interpret):
    """A column slice of a wider table (row stride != dim), as in memory-parallel shards."""
    indices, wide, scores = make_inputs(8, 5, 20, 96)
    values = wide[:, 16:76]
    out = interpret.embedding_bag_triton(indices.view(2, 4, 5), values, scores.view(2, 4, 5))
    assert_close(
        "strided", embedding_bag_naive(indices, values, scores), out.view(8, 60), 1e-5, 1e-6
    )


def test_interp_triton_bf16_scores_fp32_table_and_empty(interpret):
    indices, values, scores = make_inputs(9, 5, 20, 60)
    compare_with_naive(interpret.embedding_bag_triton, indices, values, scores.bfloat16())
    v = values.clone().requires_grad_()
    for shape in [(0, 5), (4, 0)]:
        s = torch.zeros(shape, requires_grad=True)
        out = interpret.embedding_bag_triton(torch.zeros(shape, dtype=torch.int64), v, s)
        assert out.shape == (shape[0], 60) and not out.any()
        out.sum().backward()


def test_interp_gradcheck_fp64_triton(interpret):
    indices, values, scores = make_inputs(3, 4, 6, 5)
    v = values.double().requires_grad_()
    s = scores.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, s: interpret.embedding_bag_triton(indices, v, s, sparse_grad=False), (v, s)
    )


# --------------------------------------------------------------------------- int64 offsets


def check_large_table(fn) -> None:
    """A 2**31 + 2560-element bf16 table: rows past 2**31 / dim read and write correctly.

    `torch.empty` only reserves address space; pages are committed when written, so
    only the handful of rows set here cost memory. With int32 address arithmetic the
    rows past the boundary would be read from (and written to) wrong addresses.
    """
    psutil = pytest.importorskip("psutil")
    if psutil.virtual_memory().total < 8 * 2**30:
        pytest.skip("needs 8 GiB of RAM to reserve a 4 GiB table")
    dim = 64
    slots = 2**31 // dim + 40
    values = torch.empty(slots, dim, dtype=torch.bfloat16)
    rows = torch.tensor([0, 5, slots // 2, 2**31 // dim + 3, slots - 2, slots - 1])
    gen = torch.Generator().manual_seed(0)
    values[rows] = torch.randn(len(rows), dim, generator=gen).bfloat16()
    pick = torch.tensor([[5, 3, 0, 4], [1, 3, 3, 2], [4, 5, 5, 0]])
    indices = rows[pick]
    scores = torch.rand(3, 4, generator=gen)
    compact = values[rows]  # the same rows in a small table, indexed by `pick`
    g = torch.randn(3, dim, generator=gen)
    for idtype in (torch.int64, torch.int32):
        v = values.requires_grad_()
        s = scores.clone().requires_grad_()
        out = fn(indices.to(idtype), v, s)
        gv, gs = torch.autograd.grad(out, (v, s), g)
        vc = compact.clone().requires_grad_()
        sc = scores.clone().requires_grad_()
        ref = embedding_bag_naive(pick, vc, sc)
        rgv, rgs = torch.autograd.grad(ref, (vc, sc), g)
        assert_close(f"out {idtype}", ref, out, 1e-5, 1e-5)
        assert_close(f"grad scores {idtype}", rgs, gs, 1e-5, 1e-5)
        assert torch.equal(gv._indices()[0], torch.unique(indices))
        assert_close(f"grad values {idtype}", rgv[torch.unique(pick)], gv._values(), 1e-2, 1e-2)
        values = values.detach()


def test_int64_offsets_torch():
    check_large_table(embedding_bag_sparse)


def test_interp_int64_offsets_triton(interpret):
    check_large_table(interpret.embedding_bag_triton)


# --------------------------------------------------------------------------- benchmark helpers


def test_bench_peak_table_and_bytes_model():
    from memsurgery.bench.kernels import _bytes, peak_bandwidth_gbs

    assert peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbs("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth_gbs("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbs("Some Future GPU") is None
    shape = {"bags": 2, "bag_size": 3, "dim": 4}
    fwd, bwd = _bytes(shape, unique_rows=5, e_v=2, e_s=4, e_i=8)
    assert fwd == 6 * 4 * 2 + 6 * (8 + 4) + 2 * 4 * 4
    assert bwd == 6 * 4 * 2 + 2 * 4 * 4 + 6 * 4 * 4 + 5 * 4 * 2 + 6 * (8 + 2 * 4)


# --------------------------------------------------------------------------- compiled kernels


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    """Compile every kernel to Hopper PTX/cubin on the CPU (no GPU needed), which the
    interpreter cannot check: typing of int64 loop bounds and offsets, constexpr dtypes.
    The forward must use 16-byte vector loads when the runtime's divisibility-by-16
    specialization applies (dim and row stride multiples of 16, as for 576 or 2048)."""
    if _interpreter_state() != "compiled":
        pytest.skip("this process runs the Triton interpreter")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(kernel, types: dict, consts: dict, divisible: tuple = ()):
        names = kernel.arg_names
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

    unit = {"stride_ik": 1, "stride_sk": 1, "stride_vd": 1}
    for vty, ity in (("*bf16", "*i64"), ("*fp32", "*i32")):
        ptrs = {"idx_ptr": ity, "scores_ptr": "*fp32", "values_ptr": vty, "out_ptr": "*fp32"}
        fwd = compile_(
            fused._bag_fwd_kernel,
            ptrs,
            {**unit, "BLOCK_K": 16, "BLOCK_D": 512, "ACC": tl.float32},
            divisible=(*ptrs, "dim", "stride_ib", "stride_sb", "stride_vr", "stride_ob"),
        )
        assert "ld.global.v4" in fwd.asm["ptx"], f"forward ({vty}) lost its vector loads"
        compile_(
            fused._bag_bwd_scores_kernel,
            {"idx_ptr": ity, "values_ptr": vty, "gout_ptr": "*fp32", "gscores_ptr": "*fp32"},
            {"stride_ik": 1, "stride_vd": 1, "BLOCK_K": 16, "BLOCK_D": 512, "ACC": tl.float32},
        )
        for dense in (False, True):
            compile_(
                fused._bag_bwd_values_kernel,
                {"perm_ptr": "*i64", "seg_ptr": "*i64", "uniq_ptr": ity, "scores_ptr": "*fp32",
                 "gout_ptr": "*fp32", "gvals_ptr": vty},
                {"DENSE": dense, "BLOCK_K": 2, "BLOCK_D": 2048, "ACC": tl.float32},
            )  # fmt: skip
