"""Register grafted architectures with transformers' Auto classes, lazily.

`import memsurgery` must make `AutoModelForCausalLM.from_pretrained(grafted_dir)`
work in-process without remote code, but registering imports every supported
family's modeling module (seconds), which commands like `inspect` never need.
So: if transformers' auto-model module is already imported, register now;
otherwise a one-shot import hook registers right after it first loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.models.auto.modeling_auto"
_done = False


def _register() -> None:
    global _done
    if _done:
        return
    _done = True
    try:
        from memsurgery.graft.hf import register_all

        register_all()
    except Exception as err:  # never break the user's transformers import
        import warnings

        warnings.warn(f"memsurgery: could not register grafted architectures: {err}", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `_register` right after `_TARGET` finishes executing, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
