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


# The `numerics` tier: tests whose outcome depends on the CPU's code path, because they
# compare floats computed two ways (a kernel against its reference, 2 processes against 1,
# batched against single runs, a fast path against the plain forward) or claim bit-identity
# across runs. `make test-numerics` runs them again under another code path (.ci/run does,
# after `make test`): a tolerance set from what one machine printed fails there. Listed here,
# by node id prefix, so the tier is one reviewable list; a whole file when every test in it
# compares floats.
NUMERICS = (
    # the embedding bag's torch backend against its reference (the Triton kernels run under
    # the interpreter, in numpy: no CPU code path of torch's to vary)
    "tests/unit/test_embedding_bag.py::test_naive_and_torch_match_F_embedding_bag",
    "tests/unit/test_embedding_bag.py::test_torch_",
    "tests/unit/test_embedding_bag.py::test_duplicates_accumulate",
    "tests/unit/test_embedding_bag.py::test_gradcheck_fp64_torch",
    "tests/unit/test_embedding_bag.py::test_dtype_rule",
    "tests/unit/test_embedding_bag.py::test_half_tables_accumulate_in_fp32",
    "tests/unit/test_embedding_bag.py::test_leading_dims_and_empty",
    "tests/unit/test_embedding_bag.py::test_int64_offsets_torch",
    "tests/unit/test_sparse_optim.py::",
    "tests/unit/test_product_key_topk.py::",
    "tests/unit/test_memory_layer.py::",
    "tests/unit/test_memory_parallel.py::",
    "tests/unit/test_train_ddp.py::",
    "tests/unit/test_train_fastpath.py::",
    "tests/unit/test_train_regularize.py::test_zero_weights_bit_identical_to_no_section",
    "tests/unit/test_train_regularize.py::test_kl_l2_negatives_logged_and_resume_bit_identical",
    "tests/unit/test_train_regularize.py::test_two_processes_match_one",
    "tests/unit/test_distill.py::test_routed_forward_matches_layer",
    "tests/unit/test_distill.py::test_distill_reduces_mse",
    "tests/unit/test_distill.py::test_sparse_and_dense_value_optimizers_agree",
    "tests/unit/test_distill.py::test_deterministic_by_seed",
    "tests/unit/test_distill.py::test_perplexity_matches_hand_computation",
    "tests/unit/test_distill.py::test_dense_start_accounts_for_a_relevance_gate",
    "tests/unit/test_trace.py::test_restoring_everything",
    "tests/unit/test_trace.py::test_batched_cached_trace_matches_reference",
    "tests/unit/test_trace.py::test_window_restores_neighbouring_layers",
    "tests/unit/test_trace.py::test_subject_at_position_zero_without_bos",
    "tests/unit/test_trace.py::test_profile_shape_and_determinism",
    "tests/unit/test_calibration.py::test_capture_matches_reference_hook",
    "tests/unit/test_calibration.py::test_capture_max_tokens_and_early_stop",
    "tests/unit/test_keyinit.py::test_query_halves_match_select",
    "tests/unit/test_keyinit.py::test_init_keys_shape_dtype_and_info",
    "tests/unit/test_keyinit.py::test_centroids_are_kmeans_fixed_points",
    "tests/unit/test_keyinit.py::test_pca_query_is_mean_free_whitened_and_heads_differ",
    "tests/unit/test_keyinit.py::test_query_methods",
    "tests/unit/test_probe_tiny.py::test_generation_is_batch_invariant",
    "tests/unit/test_graft_hf.py::test_zero_values_graft_preserves_function",
    "tests/unit/test_graft_hf.py::test_zero_output_graft_preserves_function",
    "tests/unit/test_graft_hf.py::test_to_and_load_state_dict_keep_memory_bound",
    "tests/unit/test_graft_hf.py::test_generate_with_and_without_cache_agree",
    "tests/unit/test_graft_hf.py::test_fallback_layer_equals_memsurgery",
    "tests/unit/test_graft_hf.py::test_fallback_model_equals_in_process_model",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(NUMERICS):
            item.add_marker(pytest.mark.numerics)
