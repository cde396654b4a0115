"""Plain-JAX oracles for the tests and the benchmark: the gather, its gradient, the loss.

Nothing here runs in the library: the ``"xla"`` backend is ``kernels/xla.py``.

Id semantics ("clip", JAX's own ``table[ids]``): a negative id wraps once (``i + V``),
then the result is clamped to ``[0, V - 1]``. The gradient adds each output row into
row ``i mod V`` for ids in ``[-V, V)``; ids outside that range contribute nothing,
although the forward read a clamped row. That asymmetry is what ``jax.grad`` of JAX's
indexing does (gather clamps, its transpose scatter drops out-of-bounds updates), and
every backend here reproduces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_reference(
    table: jax.Array,  # [vocab_size, d_model]
    ids: jax.Array,  # [num_tokens] int32
) -> jax.Array:  # [num_tokens, d_model]
    """``table[ids]``: what every backend must match bit for bit."""
    return table[ids]


def gather_grad_reference(
    grad_out: jax.Array,  # [num_tokens, d_model]
    ids: jax.Array,  # [num_tokens] int32
    vocab_size: int,
) -> jax.Array:  # [vocab_size, d_model], float32
    """The table gradient of ``gather_reference``, accumulated in float32.

    ``jax.vjp`` of ``table[ids]`` on a float32 table: JAX's own transpose of its
    gather, which drops the ids outside ``[-V, V)``.
    """
    table = jnp.zeros((vocab_size, grad_out.shape[-1]), jnp.float32)
    _, vjp = jax.vjp(lambda t: gather_reference(t, ids), table)
    return vjp(grad_out.astype(jnp.float32))[0]


# The tied output projection and its loss -------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def attend_cross_entropy_reference(
    table: jax.Array,  # [vocab_size, d_model]
    hidden: jax.Array,  # [..., d_model]
    targets: jax.Array,  # [...] integer
    *,
    where: jax.Array | None = None,  # [...] bool: the tokens that count
    reduction: str = "mean",
    logit_soft_cap: float | None = None,
    z_loss: float = 0.0,
    dtype=None,
) -> jax.Array:  # [] float32, or [...] float32 for reduction="none"
    """Softmax cross-entropy of the tied logits ``hidden @ table.T``, written naively.

    The oracle of ``embed.loss.attend_cross_entropy``; it builds the whole
    ``[tokens, vocab_size]`` array of logits.

    * Logits: ``hidden`` and ``table`` cast to ``dtype`` (default: the table's), their
      product accumulated in float32 and kept in float32 (``MyEmbed.attend`` with
      ``dtype=float32`` for a 16-bit table gives the same numbers).
    * ``logit_soft_cap``: Gemma 2's ``cap * tanh(logits / cap)``, applied first.
    * Per token: optax's ``softmax_cross_entropy_with_integer_labels``,
      ``logsumexp(logits) - logits[target]`` (a negative target indexes from the end
      once, and a target outside ``[-V, V)`` gives NaN, as ``take_along_axis`` does),
      plus PaLM's auxiliary ``z_loss * logsumexp(logits) ** 2``.
    * Tokens where ``where`` is False count 0 (never NaN). ``"mean"`` divides the sum
      by the number of kept tokens (by 1 when none is kept, so an all-padding batch
      gives 0 rather than NaN); ``"sum"`` does not divide; ``"none"`` returns each
      token's loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction=} must be one of {REDUCTIONS}")
    dtype = jnp.dtype(dtype or table.dtype)
    accumulate = jnp.float32 if dtype.itemsize < 4 else dtype
    logits = jnp.matmul(
        hidden.astype(dtype), table.astype(dtype).T, preferred_element_type=accumulate
    ).astype(jnp.float32)
    if logit_soft_cap is not None:
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = lse - label + z_loss * lse**2
    keep = jnp.ones(loss.shape, bool) if where is None else where
    loss = jnp.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / jnp.maximum(keep.sum(), 1).astype(jnp.float32)
