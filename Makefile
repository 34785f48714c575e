# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both work on a fresh machine with only Python: they create .venv and install
# torch==2.13.0 FIRST when no torch is present, because that pin resolves to the
# CPU wheel while a bare `torch` requirement would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memsurgery-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
# One torch thread: on the 2-vCPU machines this project runs on, torch's 2-thread
# pool measured 2-8x slower than 1 thread (see README, "Limits"). Override freely.
export MEMSURGERY_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

# The `numerics` tests (tests/conftest.py NUMERICS: floats compared across kernels, processes,
# batchings) under another CPU's code path: torch's portable kernels (no SIMD), MKL and
# oneDNN capped at AVX2, faiss without SIMD. Any machine computes the same math with other
# roundings; a tolerance copied from what one machine printed fails here.
NUMERICS_ENV ?= ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 FAISS_SIMD_LEVEL=NONE

.PHONY: setup demo test test-fast test-numerics gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "installing $(TORCH_PIN) (CPU wheel) first"; \
		$(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH_PIN)"; \
	fi
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[cpu,dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/memsurgery demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-numerics: setup
	env $(NUMERICS_ENV) $(BIN)/python -m pytest -m numerics $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) demo-out .pytest_cache
