"""A small causal language model: ``MyEmbed`` → transformer blocks → tied ``attend``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from embed import MyEmbed


class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then a two-layer MLP."""

    def __init__(self, d_model: int, rngs: nnx.Rngs, *, num_heads: int = 2):
        self.attention_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads, d_model, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
    """Next-token logits ``[batch, seq, vocab_size]`` for ids ``[batch, seq]``.

    The same ``MyEmbed`` table embeds the input and, through ``attend``, projects the
    last hidden state back to the vocabulary (tied weights).

    Example:

    >>> model = TinyLM(64, 32, nnx.Rngs(0), max_len=16)
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 64)
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        rngs: nnx.Rngs,
        *,
        max_len: int = 64,
        num_layers: int = 1,
        num_heads: int = 2,
        backend: str = "auto",
        deterministic: bool = False,
    ):
        self.embed = MyEmbed(
            vocab_size, d_model, rngs, backend=backend, deterministic=deterministic
        )
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        self.blocks = nnx.List(
            [Block(d_model, rngs, num_heads=num_heads) for _ in range(num_layers)]
        )
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)

    def hidden(self, ids: jax.Array) -> jax.Array:
        """The final hidden states ``[batch, seq, d_model]``, ready for the tied head."""
        x = self.embed(ids) + self.position[: ids.shape[-1]]
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        # As in T5's tied head: rescale by d_model**-0.5, since the table is unit normal.
        return self.final_norm(x) * self.embed.d_model**-0.5

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.embed.attend(self.hidden(ids))


def loss_fn(
    model: TinyLM, inputs: jax.Array, targets: jax.Array, *, fused: bool = False
) -> jax.Array:
    """Mean next-token cross-entropy.

    ``fused=True`` takes it from ``MyEmbed.attend_cross_entropy``, which never builds
    the ``[batch, seq, vocab]`` logits; otherwise from the logits and optax.
    """
    if fused:
        return model.embed.attend_cross_entropy(model.hidden(inputs), targets)
    logits = model(inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
