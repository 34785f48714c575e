"""A linear probe on the residual stream: the public baseline for "does the model know this entity".

`ResidualCapture` keeps, during the probe's prompt pass, the output of one decoder layer
averaged over each item's entity tokens. `grouped_cv_auroc` fits an L2-regularized
logistic regression (injected = 1, unknown = 0) on those vectors with k-fold cross-validation
grouped by entity (no entity is in both the fitting and the scored fold, so the probe must
recognize *unseen* names), and reports the out-of-fold AUROC. Plain torch (LBFGS), no
scikit-learn dependency.
"""

from __future__ import annotations

import random

import torch

from memsurgery.probe import metrics as M


class ResidualCapture:
    """Forward hook on decoder layer `layer`: per item, its output averaged over the entity's tokens."""

    def __init__(self, model, layer: int):
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"residual layer {layer} is out of range (the model has {len(layers)} layers)")
        self.layer = layer
        self._module = layers[layer]
        self._hidden: torch.Tensor | None = None
        self._handle = None
        self.active = False

    def __enter__(self):
        def hook(module, args, output):
            if self.active:
                h = output[0] if isinstance(output, tuple) else output
                self._hidden = h.detach()
        self._handle = self._module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.active = False

    def set_active(self, on: bool) -> None:
        self.active = on

    def collect(self, attention_mask: torch.Tensor, entity_mask: torch.Tensor | None) -> list[dict]:
        """[{"residual": [d] float32 tensor or None}] per item (None without entity tokens)."""
        h = self._hidden
        out = []
        for b in range(attention_mask.shape[0]):
            m = None if entity_mask is None else entity_mask[b].to(h.device)
            out.append({"residual": h[b][m].float().mean(0).cpu() if m is not None and m.any() else None})
        self._hidden = None
        return out


def decoder_layers(model):
    """The decoder-layer ModuleList of a dense, grafted or PEFT-wrapped causal LM."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    block = getattr(core.config, "memory", None)
    if isinstance(block, dict) and block.get("layers_path"):
        obj = core
        for part in block["layers_path"].split("."):
            obj = getattr(obj, part)
        return obj
    from memsurgery.arch import spec_for_config

    return spec_for_config(core.config).get_layers(core)


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def grouped_cv_auroc(x: torch.Tensor, y: list[int], groups: list[str], *, folds: int = 5, l2: float = 1e-2,
                     seed: int = 0) -> dict:
    """Out-of-fold AUROC of a logistic regression on `x` [n, d], folds split by `groups`."""
    names = sorted(set(groups))
    if len(names) < folds or len(set(y)) < 2:
        return {"auroc": None, "n": len(y), "note": "needs both classes and at least `folds` entities"}
    random.Random(seed).shuffle(names)
    fold_of = {g: i % folds for i, g in enumerate(names)}
    x = x.to(torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    scores = torch.empty(len(y), dtype=torch.float64)
    for k in range(folds):
        test = torch.tensor([fold_of[g] == k for g in groups])
        mu, sd = x[~test].mean(0), x[~test].std(0).clamp_min(1e-6)
        w, b = _fit((x[~test] - mu) / sd, yt[~test], l2)
        scores[test] = ((x[test] - mu) / sd) @ w + b
    return {"auroc": M.auroc(scores.tolist(), y), "n": len(y), "folds": folds, "l2": l2,
            "scores": scores.tolist()}
