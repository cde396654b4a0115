"""What the kernel modules share: operand checks, column padding, the segment-sum prep.

One copy, used by ``pallas_gather`` (Pallas on Triton) and ``mosaic_gather`` (Pallas on
Mosaic GPU), so the backends cannot drift apart in what they accept or how the
deterministic backward orders its additions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.reference import check_dtype, gradient_rows


def check_operands(table: jax.Array, ids: jax.Array) -> None:
    """ValueError/TypeError unless ``table`` is a 2-D supported table and ``ids`` 1-D int32."""
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be (vocab_size, d_model)")
    check_dtype("table.dtype", table.dtype)
    if ids.ndim != 1 or ids.dtype != jnp.int32:
        raise ValueError(f"{ids.shape=}, {ids.dtype=} must be a 1-D int32 array")


def check_backward_operands(grad_out: jax.Array, ids: jax.Array) -> tuple[int, int]:
    """``(num_tokens, d_model)`` of ``grad_out``, after checking ``ids`` matches it."""
    num_tokens, d_model = grad_out.shape
    if ids.shape != (num_tokens,) or ids.dtype != jnp.int32:
        raise ValueError(f"{ids.shape=}, {ids.dtype=} must be ({num_tokens},) int32")
    return num_tokens, d_model


def pad_columns(x: jax.Array, multiple: int) -> jax.Array:
    """``x`` with zero columns up to a multiple of ``multiple`` (``x`` itself if none)."""
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra))) if extra else x


def segments(ids: jax.Array, vocab_size: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``(order, bounds)``: the deterministic backward's plan, in token order per row.

    Row ``r``'s tokens are ``order[bounds[r]:bounds[r + 1]]``, in increasing token
    position (a stable argsort of each id's gradient row; dropped ids sort last, under
    the sentinel ``vocab_size``, and are never read). ``bounds`` has ``num_rows + 1``
    entries; rows from ``vocab_size`` to ``num_rows`` (a kernel's padding) are empty.
    """
    rows = gradient_rows(ids, vocab_size)
    order = jnp.argsort(rows, stable=True).astype(jnp.int32)
    row_starts = jnp.arange(num_rows + 1, dtype=jnp.int32)
    bounds = jnp.searchsorted(rows[order], row_starts).astype(jnp.int32)
    return order, bounds
