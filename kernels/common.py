"""What the kernel modules share: operand checks, column padding, the segment-sum prep,
and the ``custom_vjp`` that pairs a gather with its two backwards.

One copy, used by ``pallas_gather`` (Pallas on Triton) and ``mosaic_gather`` (Pallas on
Mosaic GPU), so the backends cannot drift apart in what they accept or how the
deterministic backward orders its additions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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


def gather_with_gradient(gather: Callable, scatter_add: Callable, segment_sum: Callable):
    """``lookup(table, ids, interpret=False, deterministic=False)``: ``gather`` with its VJP.

    The table gradient is ``scatter_add`` (float32 atomics, summation order of repeated
    ids not fixed), or ``segment_sum`` when ``deterministic`` (bit-reproducible, slower
    for heavily repeated ids). Either is accumulated in float32 and cast once to the
    table's dtype. Each backward is called as ``f(grad_out, ids, vocab_size=,
    interpret=)``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def lookup(table, ids, interpret=False, deterministic=False):
        return gather(table, ids, interpret=interpret)

    def lookup_fwd(table, ids, interpret, deterministic):
        # A (vocab_size, 0) array carries the table's shape and dtype at no cost.
        return gather(table, ids, interpret=interpret), (ids, table[:, :0])

    def lookup_bwd(interpret, deterministic, residuals, grad_out):
        ids, table_like = residuals
        backward = segment_sum if deterministic else scatter_add
        grad = backward(grad_out, ids, vocab_size=table_like.shape[0], interpret=interpret)
        return grad.astype(table_like.dtype), None

    lookup.defvjp(lookup_fwd, lookup_bwd)
    return lookup
