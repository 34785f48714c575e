"""Register grafted architectures with transformers' Auto classes, lazily.

`import memsurgery` must make `AutoModelForCausalLM.from_pretrained(grafted_dir)`
work in-process without remote code, but registering imports every supported
family's modeling module (seconds), which commands like `inspect` never need,
and doing it while transformers is still importing itself fails. So we only
wrap `AutoConfig.from_pretrained` and `AutoModelForCausalLM.from_pretrained /
from_config`: the first call of any of them registers, then proceeds. The
wrapping happens when transformers' auto-model module is loaded (an import
hook), or at once if it already is.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.models.auto.modeling_auto"
_state = {"registered": False, "wrapped": False}


def _register() -> None:
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        from memsurgery.export.hf import register_all

        register_all()
    except Exception as err:  # never break the user's model loading
        import warnings

        warnings.warn(f"memsurgery: could not register grafted architectures: {err}", stacklevel=3)


def _wrap(cls, name: str) -> None:
    original = cls.__dict__[name].__func__

    @functools.wraps(original)
    def first_use(klass, *args, **kwargs):
        _register()
        return original(klass, *args, **kwargs)

    setattr(cls, name, classmethod(first_use))


def _wrap_auto_classes() -> None:
    if _state["wrapped"]:
        return
    _state["wrapped"] = True
    from transformers.models.auto.configuration_auto import AutoConfig
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    _wrap(AutoConfig, "from_pretrained")
    _wrap(AutoModelForCausalLM, "from_pretrained")
    _wrap(AutoModelForCausalLM, "from_config")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the Auto classes right after `_TARGET` finishes executing, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _wrap_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _wrap_auto_classes()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
