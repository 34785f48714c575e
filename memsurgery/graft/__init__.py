"""Grafting: put a shared product-key memory into a dense checkpoint.

`hf` holds the transformers model classes of a grafted checkpoint (the files
copied next to its weights), `calibration` the calibration text and activation
capture, `keyinit` the faiss key initialization.
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
