"""Probing: what a (grafted) model knows, where it hallucinates, how its memory is used.

`api.run_probe` runs fact sets (memsurgery.facts) through batched greedy decoding
(`generate`), scores them (`metrics`), reads the memory's own signals (`signals`)
and writes the reports (`report`). Definitions: docs/probe.md.
"""

from __future__ import annotations


def run_probe(*args, **kwargs):
    from memsurgery.probe.api import run_probe as _run

    return _run(*args, **kwargs)


def quick_eval(*args, **kwargs):
    from memsurgery.probe.api import quick_eval as _quick

    return _quick(*args, **kwargs)
