"""The surgery itself: a grafted model built around a loaded dense model's own tensors.

    model = graft_model(base, MemoryConfig.build(slots="64K"), layers=[4, 12, 20], mode="parallel")

The grafted model is memsurgery's `*ForCausalLM` subclass for the base family
(memsurgery/export/modeling_memsurgery.py), built on the meta device and handed the
base's parameters and buffers, so no base weight is copied. What comes next (keys,
values, checks) is `graft.api`'s business.
"""

from __future__ import annotations

import copy

import torch

from memsurgery.errors import InputError
from memsurgery.export.configuration_memsurgery import AUTO_MAP, FORMAT_VERSION, MODES
from memsurgery.export.hf import is_grafted_model, register
from memsurgery.export.modeling_memsurgery import new_memory_bank
from memsurgery.memory import MemoryConfig

__all__ = ["graft_model"]


def graft_model(base_model, memory_config: MemoryConfig, layers: list[int], mode: str):
    """A grafted model built from a loaded base `*ForCausalLM`, sharing its weight tensors.

    The new model is built on the meta device and handed the base's parameters and
    buffers (`load_state_dict(assign=True)`), so no base weight is copied: the two
    models share storage (training one changes the other) but not modules, and the
    base model still works unchanged. A fresh memory bank (reference init) is created on
    the base's device, fp32 layers, value table in `memory_config.value_dtype`.
    Returns the grafted model in eval mode. Zero `model.memory_bank.values` or call
    `layer.zero_output_()` for a function-preserving start.
    """
    from memsurgery.arch import spec_for_config

    if mode not in MODES:
        raise InputError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if is_grafted_model(base_model):
        raise InputError("the model is already grafted; graft a base model")
    spec = spec_for_config(base_model.config)
    block = _memory_block(base_model, spec, memory_config, layers, mode)
    model = _meta_model(base_model, block)
    _hand_over_weights(base_model, model, block, spec.mlp_module)
    _hand_over_buffers(base_model, model)
    model.tie_weights()  # the assigned lm_head and embedding are separate Parameters until re-tied
    model.set_memory_bank(new_memory_bank(block, device=_model_device(base_model)))

    leftover = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
    ]
    if leftover:
        raise InputError(f"cannot graft {type(base_model).__name__}: still on meta: {leftover[:5]}")
    if getattr(base_model, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(base_model.generation_config)
    return model.eval()


def _memory_block(base_model, spec, memory_config: MemoryConfig, layers, mode: str) -> dict:
    """The config's `memory` block: memory config, layers, mode and where MLPs sit."""
    live_layers = spec.get_layers(base_model)
    layers = _check_layers(layers, len(live_layers))
    hidden = spec.hidden_size(base_model.config)
    if memory_config.input_dim is not None and memory_config.input_dim != hidden:
        raise InputError(
            f"memory input_dim={memory_config.input_dim} does not match the model's hidden size {hidden}"
        )
    mcfg = memory_config.for_model(hidden)
    layers_path = next(n for n, m in base_model.named_modules() if m is live_layers)
    return {
        "format_version": FORMAT_VERSION,
        "config": mcfg.model_dump(mode="json"),
        "layers": layers,
        "mode": mode,
        "layers_path": layers_path,
        "mlp_module": spec.mlp_module,
    }


def _meta_model(base_model, block: dict):
    """The grafted model class for the base's family, instantiated on the meta device."""
    base_cfg = base_model.config
    config_cls, model_cls = register(base_cfg.model_type)
    data = base_cfg.to_dict()
    data.pop("model_type", None)  # an instance attribute would shadow the class's memsurgery_<type>
    data.pop("architectures", None)
    data.pop("quantization_config", None)
    data.pop("auto_map", None)
    data.update(memory=block, auto_map=dict(AUTO_MAP), architectures=[model_cls.__name__])
    config = config_cls.from_dict(data)
    config._attn_implementation = base_cfg._attn_implementation
    with torch.device("meta"):
        return model_cls(config)


def _hand_over_weights(base_model, model, block: dict, mlp_module: str) -> None:
    """Give `model` the base's parameters (same storage); replace mode leaves the MLPs out."""
    # assign=True makes the new model's parameters wrap the same storage instead of copying
    # into meta tensors (which would fail anyway).
    base_state = base_model.state_dict()
    own = model.state_dict()
    mlp_prefixes = (
        tuple(f"{block['layers_path']}.{i}.{mlp_module}." for i in block["layers"])
        if block["mode"] == "replace"
        else ()
    )
    state = {k: v for k, v in base_state.items() if k in own}
    dropped = [k for k in base_state if k not in own and not k.startswith(mlp_prefixes)]
    if dropped:
        raise InputError(
            f"cannot graft {type(base_model).__name__}: unexpected weights {dropped[:5]}"
        )
    result = model.load_state_dict(state, strict=False, assign=True)
    base_params = dict(base_model.named_parameters())
    for name, p in model.named_parameters():  # assign=True takes requires_grad from the meta model
        if name in base_params:
            p.requires_grad_(base_params[name].requires_grad)
    unfilled = [k for k in result.missing_keys if not k.startswith("memory_bank.")]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    unfilled = [k for k in unfilled if k not in tied]
    if unfilled:
        raise InputError(
            f"cannot graft {type(base_model).__name__}: no base weights for {unfilled[:5]}"
        )


def _hand_over_buffers(base_model, model) -> None:
    """Tensors outside the state dict: non-persistent buffers and plain tensor attributes."""
    # Non-persistent buffers (rotary inv_freq, Gemma's embed scale ...) are not in the state dict.
    base_buffers = dict(base_model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if name not in base_buffers:
                raise InputError(
                    f"cannot graft {type(base_model).__name__}: no base buffer {name!r}"
                )
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = base_buffers[name]
    # Other plain tensor attributes some families keep (e.g. rotary original_inv_freq).
    base_modules = dict(base_model.named_modules())
    for name, sub in model.named_modules():
        for attr, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_meta and name in base_modules:
                setattr(sub, attr, getattr(base_modules[name], attr))


def _check_layers(layers, n_layers: int) -> list[int]:
    try:
        out = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise InputError(f"layers={layers!r}: expected a list of layer indices") from None
    if not out:
        raise InputError("layers is empty; name at least one decoder layer to graft")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise InputError(
            f"layers {bad} out of range; the model has {n_layers} layers (0..{n_layers - 1})"
        )
    if len(set(out)) != len(out):
        raise InputError(f"layers={out} lists a layer twice")
    return sorted(out)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
