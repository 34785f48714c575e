"""Row-sparse optimizers for memory value tables: lazy Adam and plain SGD.

A value table has millions of rows and one step touches the few hundred thousand
its tokens picked; its gradient is a row-sparse COO tensor (indices [1, U], values
[U, ...]). Both optimizers here update exactly the touched rows, at a cost that
grows with U and never with the table size: no full-table op on any step (moments
are allocated once, at the first step, as zeros; `zero_grad(set_to_none=True)`, the default,
frees the sparse grad without touching the table). Rows not in the gradient are
left bit-identical. Dense gradients are accepted too (every row counts as touched),
so one optimizer can also drive the layers' small dense parameters.

Never weight decay: decaying only touched rows would shrink frequently-used slots and
leave the rest, and decaying all rows is an O(slots) sweep per step. Both classes
refuse a non-zero weight_decay.

SparseRowAdam bias correction (`bias_correction=`):
  "row" (default)  each row keeps its own step count t_r, advanced only when the row
                   is touched; its update is that of a fresh Adam fed only this row's
                   gradients: m_hat = m / (1 - b1**t_r), v_hat = v / (1 - b2**t_r).
                   A row touched for the first time at global step 10,000 then moves
                   by lr * g / (|g| + eps) ~ lr, as Adam's first step does. With one
                   global count it would move by lr * (1-b1) / sqrt(1-b2) ~ 3.2 lr
                   (b = 0.9, 0.999), since its moments are still near their zero init
                   while the correction assumes 10,000 updates. Cost: an int32 per row.
  "global"         one count per parameter, advanced on every step that has a gradient:
                   torch.optim.SparseAdam's lazy semantics (rows' moments still update
                   only when touched). Kept for comparison and parity tests.
Moments are not decayed while a row is untouched (lazy Adam, as SparseAdam).
The update is torch.optim.Adam's form, p -= lr * m_hat / (sqrt(v_hat) + eps);
SparseAdam adds eps to sqrt(v) before bias correction, which differs by eps-sized
terms only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.optim import Optimizer

from memsurgery.errors import InputError

# Rows per chunk are chosen so one fp32 temporary is about this big: bounds the extra
# memory of a step (a 1M x 576 table touched at 230K rows would otherwise build
# several 0.5 GB temporaries) while keeping per-chunk Python overhead negligible.
_CHUNK_ELEMENTS = 256 << 10

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _closure_loss(closure):
    """torch.optim's closure convention: re-evaluate the loss (with grad) when one is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, dt in _DTYPES.items():
            if dt == dtype:
                return name
    elif dtype in _DTYPES:
        return dtype
    raise InputError(f"moment_dtype={dtype!r} is not supported; use one of {list(_DTYPES)} or None")


def _refuse_weight_decay(weight_decay: float, name: str) -> None:
    if weight_decay:
        raise InputError(
            f"{name} does not do weight decay (got weight_decay={weight_decay}): decaying only the "
            "touched rows would shrink popular slots, decaying all rows costs O(slots) per step; "
            "use weight_decay=0 for value tables"
        )


def _chunks(n: int, row_elems: int, chunk_rows: int | None) -> Iterator[slice]:
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, row_elems))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _sparse_rows(
    p: torch.Tensor, grad: torch.Tensor, unique: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [U] int64, values [U, ...]) of a row-sparse COO gradient.

    unique=True: rows are unique (duplicates summed). A tensor whose rows are already
    strictly increasing is used as is: autograd's AccumulateGrad re-wraps every sparse
    .grad as "uncoalesced" even when the backward built it coalesced, and a needless
    coalesce() would sort the indices and copy every gradient row (seconds per step for
    a 1M-row table touched at 230K rows). Checking the order is O(U) on the indices only.
    unique=False: rows may repeat (for ops that sum duplicates themselves, e.g. index_add_).
    """
    if grad.layout != torch.sparse_coo:
        raise InputError(f"expected a dense or sparse COO gradient, got layout {grad.layout}")
    if grad.sparse_dim() != 1 or grad.dense_dim() != p.dim() - 1:
        raise InputError(
            "expected a row-sparse gradient (sparse_dim 1, like nn.Embedding(sparse=True)), got "
            f"sparse_dim={grad.sparse_dim()}, dense_dim={grad.dense_dim()} for a {p.dim()}-D parameter"
        )
    if unique and not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()  # sums duplicate rows, sorts
    return grad._indices()[0], grad._values()


class SparseRowAdam(Optimizer):
    """Lazy Adam over rows: only the rows present in a sparse gradient are updated.

    Args:
        params: parameters or param groups (row-sparse or dense gradients).
        lr, betas, eps: as torch.optim.Adam.
        bias_correction: "row" (per-row step count, default) or "global"; see module doc.
        moment_dtype: storage dtype of m and v: "float32", "bfloat16", "float64" or None
            (None -> the parameter's dtype). Arithmetic is fp32 (fp64 for fp64 params).
        chunk_rows: rows processed per chunk (None -> about 256K elements, ~1 MB in fp32).
        weight_decay: must be 0; present only to refuse it loudly.

    State per parameter: exp_avg, exp_avg_sq (param shape, moment_dtype) and either
    row_step (int32 [rows], "row") or step (float32 scalar, "global").
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        bias_correction: str = "row",
        moment_dtype: str | torch.dtype | None = None,
        chunk_rows: int | None = None,
        weight_decay: float = 0.0,
    ):
        _refuse_weight_decay(weight_decay, "SparseRowAdam")
        if not lr >= 0.0:
            raise InputError(f"SparseRowAdam: lr={lr} must be >= 0")
        if not eps >= 0.0:
            raise InputError(f"SparseRowAdam: eps={eps} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise InputError(f"SparseRowAdam: betas={tuple(betas)} must each be in [0, 1)")
        if bias_correction not in ("row", "global"):
            raise InputError(
                f"SparseRowAdam: bias_correction={bias_correction!r} must be 'row' or 'global'"
            )
        if chunk_rows is not None and chunk_rows < 1:
            raise InputError(f"SparseRowAdam: chunk_rows={chunk_rows} must be >= 1")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "bias_correction": bias_correction,
            "moment_dtype": _dtype_name(moment_dtype),
            "chunk_rows": chunk_rows,
        }
        super().__init__(params, defaults)

    # ---- state --------------------------------------------------------------------

    def _moment_dtype(self, group: dict, p: torch.Tensor) -> torch.dtype:
        name = group["moment_dtype"]
        return _DTYPES[name] if name else p.dtype

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            mdt = self._moment_dtype(group, p)
            # Allocated in full once (torch.zeros writes every page): resident memory is
            # the whole table's worth from the first step, never growing afterwards.
            state["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=mdt, memory_format=torch.contiguous_format
            )
            if group["bias_correction"] == "row":
                rows = p.shape[0] if p.dim() else 1
                state["row_step"] = torch.zeros(rows, dtype=torch.int32, device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer.load_state_dict, then restore moment dtypes (torch casts floating
        state to the parameter's dtype, which would undo a bf16 moment_dtype)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                mdt = self._moment_dtype(group, p)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != mdt:
                        state[key] = state[key].to(mdt)
                if "row_step" in state:
                    state["row_step"] = state["row_step"].to(torch.int32)

    # ---- step ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(group, p)
                if p.grad.is_sparse:
                    rows, values = _sparse_rows(p, p.grad)
                    self._update_sparse(group, p, state, rows, values)
                else:
                    self._update_dense(group, p, state, p.grad)
        return loss

    def _bias_terms(self, group: dict, state: dict, t: torch.Tensor | None, ndim: int):
        """(1 - b1**t, sqrt(1 - b2**t)) as scalars ("global") or [c, 1, ...] tensors ("row")."""
        b1, b2 = group["betas"]
        if t is None:  # global
            step = float(state["step"])
            return 1.0 - b1**step, math.sqrt(1.0 - b2**step)
        tf = t.to(torch.float64).view(-1, *([1] * (ndim - 1)))
        bc1 = 1.0 - torch.pow(b1, tf)
        bc2_sqrt = (1.0 - torch.pow(b2, tf)).sqrt_()
        return bc1, bc2_sqrt

    @staticmethod
    def _math(g, m, v, bc1, bc2_sqrt, group):
        """In place on fp32/fp64 chunks m, v (the new moments); returns the update to
        subtract from p in a new tensor (m and v stay valid for writing back).

        lr * m_hat / (sqrt(v_hat) + eps) is computed as
        m * (lr * sqrt(bc2) / bc1) / (sqrt(v) + eps * sqrt(bc2)): the same value with one
        pass fewer over the chunk (the per-row factors are [c, 1] columns).
        """
        b1, b2 = group["betas"]
        m.lerp_(g, 1.0 - b1)  # m = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        if isinstance(bc2_sqrt, torch.Tensor):
            eps_t = (group["eps"] * bc2_sqrt).to(m.dtype)
            step = (group["lr"] * bc2_sqrt / bc1).to(m.dtype)
        else:
            eps_t = group["eps"] * bc2_sqrt
            step = group["lr"] * bc2_sqrt / bc1
        upd = torch.sqrt(v).add_(eps_t)
        return torch.div(m, upd, out=upd).mul_(step)

    def _update_sparse(self, group, p, state, rows, values) -> None:
        row_mode = "row_step" in state
        if not row_mode:
            state["step"] += 1  # per step with a gradient, as SparseAdam (even if empty)
        if rows.numel() == 0:
            return
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        acc = torch.promote_types(p.dtype, torch.float32)
        exact_add = p.dtype == acc  # fp32/fp64 params: index_add_ of -update is exact p - update
        row_elems = values[0].numel() if values.dim() > 1 else 1
        for sl in _chunks(rows.numel(), row_elems, group["chunk_rows"]):
            r = rows[sl]
            t = None
            if row_mode:
                t = state["row_step"].index_select(0, r).add_(1)
                state["row_step"].index_copy_(0, r, t)
            bc1, bc2_sqrt = self._bias_terms(group, state, t, p.dim())
            g = values[sl].to(acc)
            m = m_all.index_select(0, r).to(acc)
            v = v_all.index_select(0, r).to(acc)
            upd = self._math(g, m, v, bc1, bc2_sqrt, group)
            m_all.index_copy_(0, r, m.to(m_all.dtype))
            v_all.index_copy_(0, r, v.to(v_all.dtype))
            if exact_add:
                p.index_add_(0, r, upd, alpha=-1)
            else:  # bf16 params: subtract in fp32, round once
                p.index_copy_(0, r, p.index_select(0, r).to(acc).sub_(upd).to(p.dtype))

    def _update_dense(self, group, p, state, grad) -> None:
        row_mode = "row_step" in state
        if row_mode:
            state["row_step"].add_(1)
        else:
            state["step"] += 1
        acc = torch.promote_types(p.dtype, torch.float32)
        # Work on [rows, ...] views; a 0-d parameter is one row.
        pv, gv = p.view(-1) if p.dim() == 0 else p, grad.view(-1) if grad.dim() == 0 else grad
        mv, vv = (
            state[k].view(-1) if p.dim() == 0 else state[k] for k in ("exp_avg", "exp_avg_sq")
        )
        ndim = pv.dim()
        row_elems = pv[0].numel() if ndim > 1 else 1
        for sl in _chunks(pv.shape[0], row_elems, group["chunk_rows"]):
            t = state["row_step"][sl] if row_mode else None
            bc1, bc2_sqrt = self._bias_terms(group, state, t, ndim)
            m, v = mv[sl].to(acc), vv[sl].to(acc)  # copies unless already acc (then views)
            upd = self._math(gv[sl].to(acc), m, v, bc1, bc2_sqrt, group)
            if m.data_ptr() != mv[sl].data_ptr():
                mv[sl].copy_(m)
                vv[sl].copy_(v)
            if pv.dtype == acc:
                pv[sl].sub_(upd)
            else:
                pv[sl].copy_(pv[sl].to(acc).sub_(upd))


class SparseRowSGD(Optimizer):
    """Plain SGD on touched rows: p[r] -= lr * g[r]. No momentum, no weight decay.

    Momentum would need a buffer as big as the table and, like Adam's moments, goes stale
    on rarely-touched rows; sparse memory finetuning reports plain SGD for values.
    Rows not in the gradient stay bit-identical; dense gradients update every row.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        momentum: float = 0.0,
        *,
        chunk_rows: int | None = None,
        weight_decay: float = 0.0,
    ):
        _refuse_weight_decay(weight_decay, "SparseRowSGD")
        if momentum:
            raise InputError(f"SparseRowSGD supports momentum=0 only (got momentum={momentum})")
        if not lr >= 0.0:
            raise InputError(f"SparseRowSGD: lr={lr} must be >= 0")
        super().__init__(params, {"lr": lr, "momentum": 0.0, "chunk_rows": chunk_rows})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    p.add_(p.grad.to(p.dtype), alpha=-lr)
                    continue
                acc = torch.promote_types(p.dtype, torch.float32)
                # fp32/fp64: index_add_ sums repeated rows itself, no coalesce needed;
                # bf16 goes through index_copy_, which needs unique rows.
                rows, values = _sparse_rows(p, p.grad, unique=p.dtype != acc)
                row_elems = values[0].numel() if values.dim() > 1 else 1
                for sl in _chunks(rows.numel(), row_elems, group["chunk_rows"]):
                    r = rows[sl]
                    if p.dtype == acc:
                        p.index_add_(0, r, values[sl], alpha=-lr)
                    else:  # bf16: subtract in fp32, round once
                        new = p.index_select(0, r).to(acc).sub_(values[sl].to(acc), alpha=lr)
                        p.index_copy_(0, r, new.to(p.dtype))
        return loss
