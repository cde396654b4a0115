"""Benchmarks of the embedding library: a shared harness and one module per benchmark.

    python -m bench.lookup      every backend against XLA and a copy (the main job)
    python -m bench.sharded     embed.parallel's mesh layouts against one device
    python -m bench.eager       eager calls of MyEmbed against flax.nnx.Embed
    python -m bench.tied_loss   the blocked tied loss against the naive one

``bench.options`` holds the names and flags without importing JAX.
"""
