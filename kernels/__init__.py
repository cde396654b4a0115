"""Gather kernels for token embeddings, each beside a plain-JAX reference.

Pure functions on arrays: nothing here knows about Flax modules or imports ``embed``.
"""
