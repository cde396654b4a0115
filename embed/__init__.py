"""Token embeddings for JAX/Flax NNX with XLA, Pallas and Triton gather backends."""

from embed.dispatch import BACKENDS, backend_for, backend_problem, lookup
from embed.ids import MODES
from embed.layer import Embed, MyEmbed, embed_forward
from embed.loss import attend_cross_entropy
from kernels.compat import abstract_gpu

__all__ = [
    "BACKENDS",
    "MODES",
    "Embed",
    "MyEmbed",
    "abstract_gpu",
    "attend_cross_entropy",
    "backend_for",
    "backend_problem",
    "embed_forward",
    "lookup",
]
