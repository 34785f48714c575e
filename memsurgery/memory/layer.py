"""ProductKeyMemory: one Memory+ layer reading a shared value table.

Per token x [d] (N tokens, H heads, K = k_dim, K2 = K/2, knn picks, V = v_dim):

    q          = W_q x                      [N, H, 2, K2]   (W_q: d -> H*K, no bias)
    q1, q2     = halves (RMS-normalized if qk_norm, as are the sub-keys)
    s, idx     = product_key_topk(q1, q2, keys1, keys2, knn)    [N, H, knn] each
    w          = softmax(score_scale * s) over each head's knn  [N, H, knn]
    bag        = sum_{h, j} w[n, h, j] * values[idx[n, h, j]]   [N, V]   (one bag of H*knn rows)
    out        = W_o(bag * silu(W_g x))   if swilu else W_o(bag)         [N, d]
    out       *= sigmoid(w_r . x + b_r)   if gate == "relevance"

The value table is NOT a submodule of the layer (see values.py and bank.py): the
layer keeps a plain reference, so a model with one table and several layers stores
and optimizes the table once. Math, init and design notes: docs/memory-layer.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memsurgery.errors import InputError
from memsurgery.memory.config import MemoryConfig
from memsurgery.memory.topk import product_key_topk
from memsurgery.memory.values import SharedValueTable

_QK_EPS = 1e-6


class ProductKeyMemory(nn.Module):
    """A Memory+ product-key memory layer: x [..., d] -> [..., d].

    Parameters (all dense, all owned by the layer):
      query.weight      [H*K, d]      W_q
      keys              [H, 2, n_sub, K2]  sub-keys of both halves per head
      gate_proj.weight  [V, d]        W_g (only when swilu)
      out_proj.weight   [d, V]        W_o
      gate_weight [d], gate_bias []   relevance gate (only when gate == "relevance")
    The value table ([slots, V]) is referenced, not owned: `self.value_table`.

    Switches: `sparse_grad` (default True: the table gets a row-sparse COO gradient;
    False: dense), `backend` (memsurgery.ops.embedding_bag backend, default "auto").

    Telemetry: set `layer.record = True` and each forward stores (detached)
      last_indices [..., H, knn] int64  slots picked per token and head
      last_scores  [..., H, knn]        their softmax weights (what multiplies each row)
      last_gate    [...]                relevance gate per token (None without a gate)
    Off by default; when off nothing is stored and nothing extra is computed.
    """

    def __init__(self, config: MemoryConfig, values: SharedValueTable):
        super().__init__()
        d, v_dim = config.require_dims()
        self.config = config
        self.heads = config.heads
        self.knn = config.knn
        self.k_dim = config.k_dim
        self.n_sub = config.n_sub
        self.input_dim = d
        self.v_dim = v_dim
        self.score_scale = config.effective_score_scale

        self.query = nn.Linear(d, config.heads * config.k_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(config.heads, 2, config.n_sub, config.k_dim // 2))
        self.gate_proj = nn.Linear(d, v_dim, bias=False) if config.swilu else None
        self.out_proj = nn.Linear(v_dim, d, bias=False)
        if config.gate == "relevance":
            self.gate_weight = nn.Parameter(torch.zeros(d))
            self.gate_bias = nn.Parameter(torch.tensor(float(config.gate_bias_init)))
        else:
            self.gate_weight = None
            self.gate_bias = None

        # Gradient layout of the shared table: row-sparse COO (for SparseRowAdam/SGD) or
        # dense (for dense optimizers, gradcheck, or wrappers that reject sparse grads).
        self.sparse_grad = True
        self.backend = "auto"  # memsurgery.ops.embedding_bag backend
        self.record = False
        # Training only (data.memory_positions: entity): a [...] mask of the tokens at which
        # the layer may act; its output is zero elsewhere. None = every token.
        self.token_mask: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None

        self.bind_values(values)
        self.reset_parameters()

    # ---- the shared table ---------------------------------------------------------

    def bind_values(self, values: SharedValueTable) -> None:
        """Point this layer at `values` without registering it as a submodule.

        object.__setattr__ puts the module in self.__dict__, bypassing nn.Module's
        registration: the table is then absent from this layer's parameters(),
        state_dict() and children(), and reached through whatever module owns it
        (MemoryBank). A strong reference (not a weakref) so that copy.deepcopy of the
        owner maps it, through deepcopy's memo, to the owner's copied table.
        """
        if not isinstance(values, SharedValueTable):
            raise TypeError(f"values must be a SharedValueTable, got {type(values).__name__}")
        # The logical shape (slots, v_dim), not weight.shape: a sharded table
        # (memsurgery.parallel) stores only a column slice of the rows.
        expected = (self.config.slots, self.v_dim)
        got = (values.slots, values.v_dim)
        if got != expected:
            raise InputError(
                f"value table is {got} but this memory layer needs "
                f"[slots, v_dim] = {list(expected)}"
            )
        object.__setattr__(self, "_value_table", values)

    @property
    def value_table(self) -> SharedValueTable:
        return self.__dict__["_value_table"]

    # ---- init -------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: keys U(+-1/sqrt(k_dim)); projections N(0, fan_in**-0.5).

        The reference writes N(0, d**-0.5) for every projection with v_dim = d; fan-in
        is the same rule for v_dim != d. The relevance gate starts at w = 0,
        b = gate_bias_init. The shared table is initialized by its owner.
        """
        bound = self.k_dim**-0.5
        self.keys.uniform_(-bound, bound)
        for lin in (self.query, self.gate_proj, self.out_proj):
            if lin is not None:
                lin.weight.normal_(0.0, lin.in_features**-0.5)
        if self.gate_weight is not None:
            self.gate_weight.zero_()
            self.gate_bias.fill_(float(self.config.gate_bias_init))

    @torch.no_grad()
    def zero_output_(self) -> ProductKeyMemory:
        """Zero W_o: the layer then outputs exactly 0 (function-preserving graft), while
        W_o still gets a gradient. Zeroing the table instead: `layer.value_table.zero_()`."""
        self.out_proj.weight.zero_()
        return self

    # ---- forward ----------------------------------------------------------------

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and their raw scores for tokens x [N, d] -> (scores, indices) [N, H, knn]."""
        n = x.shape[0]
        q = self.query(x).view(n, self.heads, 2, self.k_dim // 2)
        q1, q2 = q[:, :, 0], q[:, :, 1]  # [N, H, K2]
        k1, k2 = self.keys[:, 0], self.keys[:, 1]  # [H, n_sub, K2]
        if self.config.qk_norm:
            # Unit RMS per element (no learned weight): scores are then bounded by K and
            # comparable across heads and layers; score_scale brings them to O(1).
            k2_shape = (self.k_dim // 2,)
            q1, q2 = F.rms_norm(q1, k2_shape, eps=_QK_EPS), F.rms_norm(q2, k2_shape, eps=_QK_EPS)
            k1, k2 = F.rms_norm(k1, k2_shape, eps=_QK_EPS), F.rms_norm(k2, k2_shape, eps=_QK_EPS)
        return product_key_topk(q1, q2, k1, k2, self.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d]."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.input_dim)  # [N, d]
        n = x2.shape[0]

        scores, indices = self.select(x2)  # [N, H, knn]
        # Softmax in fp32 at least (fp64 stays fp64 for gradcheck). The bag accumulates in
        # fp32 whatever the table's dtype and returns the weights' dtype (ops contract).
        acc = torch.promote_types(scores.dtype, torch.float32)
        weights = torch.softmax(scores.to(acc) * self.score_scale, dim=-1)  # [N, H, knn]

        # All heads' picks form one bag of H*knn rows per token: a single gather-sum,
        # through the table's own bag() so that a sharded table can read its slice.
        bag = self.value_table.bag(
            indices.reshape(n, self.heads * self.knn),
            weights.reshape(n, self.heads * self.knn),
            backend=self.backend,
            sparse_grad=self.sparse_grad,
        ).to(x2.dtype)  # [N, V]

        if self.gate_proj is not None:
            bag = bag * F.silu(self.gate_proj(x2))
        out = self.out_proj(bag)  # [N, d]

        gate = None
        if self.gate_weight is not None:
            gate = torch.sigmoid(
                x2 @ self.gate_weight.to(x2.dtype) + self.gate_bias.to(x2.dtype)
            )  # [N]
            out = out * gate.unsqueeze(-1)
        if self.token_mask is not None:
            out = out * self.token_mask.reshape(n, 1).to(out.dtype)

        if self.record:
            self.last_indices = indices.detach().reshape(*lead, self.heads, self.knn)
            self.last_scores = weights.detach().reshape(*lead, self.heads, self.knn)
            self.last_gate = None if gate is None else gate.detach().reshape(lead)
        return out.reshape(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"slots={c.slots}, heads={c.heads}, knn={c.knn}, k_dim={c.k_dim}, d={self.input_dim}, "
            f"v_dim={self.v_dim}, qk_norm={c.qk_norm}, swilu={c.swilu}, gate={c.gate!r}, "
            f"score_scale={self.score_scale:.4g}, values=shared (not owned)"
        )
