"""Token embeddings for JAX/Flax NNX with XLA, Pallas and Triton gather backends."""

from embed.dispatch import BACKENDS, backend_for, lookup
from embed.ids import MODES
from embed.layer import MyEmbed, embed_forward
from embed.loss import attend_cross_entropy

__all__ = [
    "BACKENDS",
    "MODES",
    "MyEmbed",
    "attend_cross_entropy",
    "backend_for",
    "embed_forward",
    "lookup",
]
