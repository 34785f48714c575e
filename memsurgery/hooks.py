"""Forward hooks that record what modules see, and stop the forward once that is all we need.

    with capture_io({i: mlp_i for i in layers}, stop_after=max(layers)) as seen:
        run_until_stopped(model, input_ids=ids)
    seen[i]                          # the input of mlp_i in that forward

Calibration capture (graft), the training prefix cache and the regularizers all read
a few modules' inputs or outputs and need nothing the rest of the network computes:
the hook after the last module they read raises `StopForward`, and `run_until_stopped`
turns that into a normal return.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from contextlib import contextmanager

from torch import nn


class StopForward(Exception):
    """Raised by a capture hook: the rest of the forward computes nothing the caller keeps."""


def module_input(args: tuple, kwargs: dict):
    """A module call's first input: positional, else `hidden_states`, else the first keyword."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


@contextmanager
def capture_io(modules: Mapping[Hashable, nn.Module], *, outputs: bool = False, stop_after=None,
               on_input: Callable | None = None, on_output: Callable | None = None):
    """Inside, each forward fills the yielded dict: {key: input}, or {key: (input, output)}.

    Inputs are taken by a pre-hook (before the module runs), outputs (the module's return
    value) by a forward hook. `on_input(key, x)` / `on_output(key, out)` replace storing in
    the dict, to copy a value away the moment it is seen. With `stop_after` = a key, the
    forward stops right after that module's last recorded value: its input, or its output
    when `outputs`. Hooks are removed on exit, however the block ends.
    """
    seen: dict = {}
    keep_input = on_input or seen.__setitem__
    keep_output = on_output or (lambda key, out: seen.__setitem__(key, (seen[key], out)))

    def input_hook(key):
        def hook(module, args, kwargs):
            keep_input(key, module_input(args, kwargs))
            if not outputs and key == stop_after:
                raise StopForward

        return hook

    def output_hook(key):
        def hook(module, args, kwargs, out):
            keep_output(key, out)
            if key == stop_after:
                raise StopForward

        return hook

    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(input_hook(key), with_kwargs=True))
            if outputs:
                handles.append(module.register_forward_hook(output_hook(key), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_until_stopped(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None when a capture hook stopped it."""
    try:
        return fn(*args, **kwargs)
    except StopForward:
        return None
