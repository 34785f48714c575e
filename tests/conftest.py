"""Shared fixtures: tiny checkpoints built once per session, the demo checkpoint on demand."""

from __future__ import annotations

import os

import pytest

from tests.tiny import FAMILIES, make_tiny_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict:
    """{model_type: Path} of tiny random checkpoints, one per supported family."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(mt, root / mt) for mt in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_ckpts):
    return tiny_ckpts["llama"]


def pytest_configure(config):
    # One torch thread unless the environment says otherwise: on the 2-vCPU CI
    # machines a 2-thread pool is several times slower for the small ops tests use.
    import torch

    torch.set_num_threads(int(os.environ.get("MEMSURGERY_THREADS", "1")))
