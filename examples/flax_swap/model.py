"""A small decoder-only transformer, written the way Flax NNX model code is written.

It knows nothing of this library: its token and position embeddings are
``nnx.Embed``, built by keyword, and the output head is tied through
``Embed.attend``. Changing the one import below to ``from embed import Embed`` runs
both embeddings through this library's backends, with the same parameters from the
same seed and the same numbers (``test_swap.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import Embed


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 97
    max_len: int = 16
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 64
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32


class MLP(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        linear = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(config.d_model, config.mlp_dim, **linear)
        self.fc2 = nnx.Linear(config.mlp_dim, config.d_model, **linear)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.ln1 = nnx.RMSNorm(config.d_model, **dtypes, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=config.d_model,
            decode=False,
            **dtypes,
            rngs=rngs,
        )
        self.ln2 = nnx.RMSNorm(config.d_model, **dtypes, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nnx.Module):
    """Logits ``[batch, seq, vocab_size]`` for token ids ``[batch, seq]``."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = Embed(
            num_embeddings=config.vocab_size,
            features=config.d_model,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(stddev=0.02),
            rngs=rngs,
        )
        self.wpe = Embed(
            num_embeddings=config.max_len,
            features=config.d_model,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(stddev=0.01),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.ln_f = nnx.RMSNorm(
            config.d_model, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )

    def __call__(self, tokens):
        positions = jnp.arange(tokens.shape[-1])[None, :]
        x = self.wte(tokens) + self.wpe(positions)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))  # Tied output head.


def loss_fn(model: Transformer, batch: jax.Array) -> jax.Array:
    logits = model(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss
