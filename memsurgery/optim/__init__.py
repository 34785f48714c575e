"""Optimizers for memory value tables: row-sparse lazy Adam and plain SGD."""

from memsurgery.optim.sparse import SparseRowAdam, SparseRowSGD

__all__ = ["SparseRowAdam", "SparseRowSGD"]
