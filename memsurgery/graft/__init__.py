"""Grafting: put a shared product-key memory into a dense checkpoint.

`api.graft` runs the whole graft (docs/graft.md): `plan` validates what to graft,
`calibration` reads calibration text and captures what each MLP sees, `surgery`
builds the grafted model around the dense model's tensors, `keyinit` initializes
queries and keys from those activations (faiss k-means). The grafted model classes
live in memsurgery/export/; causal tracing (`--layers auto`) in memsurgery/inspection/;
replace-mode distillation of the values in memsurgery/train/distill.py.
"""


def graft(*args, **kwargs):
    """Graft a memory into a checkpoint: see `memsurgery.graft.api.graft`."""
    from memsurgery.graft.api import graft as _graft

    return _graft(*args, **kwargs)


class _CallableModule(__import__("types").ModuleType):
    """Lets `memsurgery.graft(...)` be called although it is also this subpackage's name."""

    def __call__(self, *args, **kwargs):
        return graft(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
