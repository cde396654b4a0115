"""Token embeddings for JAX/Flax NNX with XLA, Pallas and Triton gather backends."""

from embed.dispatch import BACKENDS, backend_for, lookup
from embed.ids import MODES
from embed.layer import Embed, MyEmbed, embed_forward

__all__ = ["BACKENDS", "MODES", "Embed", "MyEmbed", "backend_for", "embed_forward", "lookup"]
