"""Plain-JAX gather and gather-gradient: the oracle for the kernels' tests and benchmark.

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

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_dtype(name: str, dtype) -> jnp.dtype:
    """``dtype`` if a table may have it (every kernel supports the same ones), else TypeError."""
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}={dtype!r} must be one of {[str(d) for d in SUPPORTED_DTYPES]}")
    return dtype


def wrap_and_clamp(ids: jax.Array, vocab_size: int) -> jax.Array:
    """Rows read for ``ids``: negative ids wrap once, then clamp to ``[0, vocab_size)``.

    Kernels call this inside their bodies, so no program can address outside the table.
    """
    ids = jnp.where(ids < 0, ids + vocab_size, ids)
    return jnp.clip(ids, 0, vocab_size - 1)


def in_vocab(ids: jax.Array, vocab_size: int) -> jax.Array:
    """True where an id is in ``[-vocab_size, vocab_size)``: ids that receive gradient."""
    return (ids >= -vocab_size) & (ids < vocab_size)


def gradient_rows(ids: jax.Array, vocab_size: int) -> jax.Array:
    """The row each id's gradient adds into; ``vocab_size`` (past the table) for none."""
    return jnp.where(in_vocab(ids, vocab_size), wrap_and_clamp(ids, vocab_size), vocab_size)


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

    Equal to ``jax.grad`` of ``table[ids]`` (up to summation order for repeated ids).
    """
    rows = gradient_rows(ids, vocab_size)
    grad = jnp.zeros((vocab_size, grad_out.shape[-1]), jnp.float32)
    return grad.at[rows].add(grad_out.astype(jnp.float32), mode="drop")


@jax.custom_vjp
def lookup(
    table: jax.Array,  # [vocab_size, d_model]
    ids: jax.Array,  # [num_tokens] int32
) -> jax.Array:  # [num_tokens, d_model]
    """The ``"xla"`` backend: ``gather_reference``, with ``gather_grad_reference`` as its VJP.

    The forward is ``table[ids]``, bit for bit. The table gradient is accumulated in
    float32 and rounded once to the table's dtype, as every kernel's is; ``jax.grad``
    of ``table[ids]`` would scatter-add in the table's dtype, which for a 16-bit table
    rounds after every repeated id and makes the backends disagree.
    """
    return gather_reference(table, ids)


def _lookup_fwd(table, ids):
    # A (vocab_size, 0) array carries the table's shape and dtype at no cost.
    return gather_reference(table, ids), (ids, table[:, :0])


def _lookup_bwd(residuals, grad_out):
    ids, table_like = residuals
    grad = gather_grad_reference(grad_out, ids, table_like.shape[0])
    return grad.astype(table_like.dtype), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)
