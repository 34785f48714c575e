"""`memsurgery bench ...` implementations: kernel and layer benchmarks.

Each module exposes a `run_*` function returning a JSON-able dict (the CLI calls it)
and a `__main__` for `python -m memsurgery.bench.<name>`:

- `kernels`: the embedding bag, ours vs `torch.nn.functional.embedding_bag`.
- `layer`: one memory layer's step, small vs large table.
"""
