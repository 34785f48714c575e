"""Grafting: put a shared product-key memory into a dense checkpoint.

`hf` holds the transformers model classes of a grafted checkpoint (the files
copied next to its weights), `calibration` the calibration text and activation
capture, `keyinit` the faiss key initialization.
"""
