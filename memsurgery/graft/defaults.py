"""The graft plan's defaults, as plain data: `GraftPlan` (plan.py) uses them, and the CLI
prints them in `graft --help` without importing pydantic or torch."""

from memsurgery._vocab import DEFAULT_HEADS, DEFAULT_K_DIM, DEFAULT_KNN, DEFAULT_SLOTS

DEFAULTS = {
    "layers": "default",
    "slots": DEFAULT_SLOTS,
    "heads": DEFAULT_HEADS,
    "knn": DEFAULT_KNN,
    "k_dim": DEFAULT_K_DIM,
    "mode": "parallel",
    "keys": "faiss",
    "query_init": "pca",
    "value_dtype": "float32",
    "calib_tokens": 32768,
    "heldout_tokens": 16384,
    "seq_len": 256,
    "kmeans_iters": 20,
    "distill_steps": 150,
    "seed": 0,
}
