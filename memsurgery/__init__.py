"""memsurgery: graft shared product-key memory layers into dense transformer checkpoints."""

__version__ = "0.1.0"
