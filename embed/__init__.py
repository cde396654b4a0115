"""Token embeddings for JAX/Flax NNX with XLA, Pallas and Triton gather backends."""

from embed.dispatch import BACKENDS, backend_for, backend_problem, lookup
from embed.ids import MODES
from embed.layer import MyEmbed, embed_forward
from kernels.compat import abstract_gpu

__all__ = [
    "BACKENDS",
    "MODES",
    "MyEmbed",
    "abstract_gpu",
    "backend_for",
    "backend_problem",
    "embed_forward",
    "lookup",
]
