"""Embedding gather as a Pallas kernel on Mosaic GPU (Hopper), interpreted on CPU.

Layout, as in JAX's own Mosaic GPU ops: forward kernel, its jitted wrapper, backward
kernels (atomic ``scatter_add``, deterministic ``segment_sum``) with their wrappers,
then the ``custom_vjp`` wiring (``kernels/contract.py``, the contract every backend
implements). The plain-JAX oracle is in ``kernels/reference.py``.

Every operand stays in GMEM and the kernels move data themselves, with TMA:

* **Forward.** Each program owns ``block_t`` tokens by ``block_d`` columns. It copies its
  ids into SMEM, then issues one row copy GMEM -> SMEM per token, all ``block_t`` in
  flight on one barrier, waits once, and writes the ``[block_t, block_d]`` tile back with
  one async store. Rows wider than ``block_d`` are tiled over the grid's second axis.
* **Backward, atomic.** Each program loads its gradient tile (one copy) and adds row
  ``k`` into table row ``ids[k] mod V`` with a TMA reduction (``cp.reduce.async.bulk``,
  float32 ``add``, atomic per element), predicated off for dropped ids.
* **Backward, deterministic.** Ids are sorted once (``kernels.contract.segments``); each
  program owns ``block_v`` whole rows and sums each row's gradient rows in token order.

Ids are wrapped and clamped inside the kernels, so no copy can address outside the
table. TMA takes a 64-bit base address and one 32-bit coordinate per dimension (row
``< V``, column ``< d_model``), so tables past 2**31 elements are addressed correctly
with no offset arithmetic of ours.

Alignment: the Pallas Mosaic GPU lowering spreads each copy's byte count over the 128
threads of a warpgroup, so every copy must move a multiple of 128 bytes (and TMA needs
16-byte row strides). Rows are therefore tiled in multiples of ``128 // itemsize``
columns (32 float32, 64 bfloat16/float16) and token blocks are multiples of 32 ids.
Where ``d_model`` is not such a multiple (1, 3, 129, ...), the wrapper pads the
*table's* columns with zeros: one extra copy of the table per call, which a
``d_model`` that is a multiple of 64 avoids. Ids and gradients are padded likewise (cheap)
and the result is sliced back to ``[num_tokens, d_model]``.

The GPU interpreter (``compat.mosaic_gpu_interpret_params``) runs the same kernels on
CPU, program after program. It has no atomics (neither ``plgpu.atomic_add`` nor TMA
reductions) and no predicated stores, in JAX 0.11.2 and 0.12.0.1, so under
``interpret=True`` the one step that adds a row into the table gradient is a read, add
and write of that row; the ids, the masking, the tiling and every other copy are the
kernel's own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import compat, contract
from kernels.contract import in_vocab, pad_columns, segments, wrap_and_clamp

# Bytes every copy must move a multiple of: one per thread of a 128-thread warpgroup.
COPY_BYTES = 128
# Ids per token block: COPY_BYTES of int32.
ID_BLOCK = COPY_BYTES // 4
# Widest column tile: TMA boxes are at most 256 elements along a dimension.
MAX_BLOCK_D = 256
# The deterministic backward sums rows in registers: a warpgroup's 128 lanes, one
# float32 column each, so its column tiles are multiples of 128.
SEGMENT_BLOCK_D = 128
# An id no table has (ids are int32 and vocab_size <= 2**31 - 1): padding that adds nothing.
_DROPPED_ID = jnp.iinfo(jnp.int32).max


def column_multiple(itemsize: int) -> int:
    """Columns per ``COPY_BYTES``: every ``block_d`` is a multiple of this."""
    return COPY_BYTES // itemsize


def block_sizes(num_tokens: int, d_model: int, itemsize: int) -> tuple[int, int]:
    """Default ``(block_t, block_d)`` of the forward and the atomic backward.

    ``block_d`` is the widest multiple of ``column_multiple(itemsize)``, up to
    ``MAX_BLOCK_D``, that divides ``d_model`` rounded up to that multiple; ``block_t``
    is 64 ids (64 row copies in flight per program), or 32 for short inputs.
    """
    multiple = column_multiple(itemsize)
    padded_d = _round_up(max(d_model, 1), multiple)
    block_d = max(
        m for m in range(multiple, max(MAX_BLOCK_D, multiple) + 1, multiple) if padded_d % m == 0
    )
    return (ID_BLOCK if num_tokens <= ID_BLOCK else 2 * ID_BLOCK), block_d


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning of the kernels; a field left ``None`` is chosen from the shapes.

    Attributes:
      block_t: ids per program of ``gather`` and ``scatter_add`` (row copies in
        flight), a multiple of 32.
      block_d: columns per copy, a multiple of ``column_multiple(itemsize)`` up to 256.
      block_v: table rows per program of ``segment_sum``, a multiple of 32.
      segment_block_d: columns per program of ``segment_sum``, a multiple of 128 up to 256.
    """

    block_t: int | None = None
    block_d: int | None = None
    block_v: int = ID_BLOCK
    segment_block_d: int = SEGMENT_BLOCK_D

    def __post_init__(self):
        for name in ("block_t", "block_v"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value % ID_BLOCK):
                raise ValueError(f"{name}={value} must be a positive multiple of {ID_BLOCK}")
        if self.block_d is not None:
            _check_multiple("block_d", self.block_d, column_multiple(4))
        _check_multiple("segment_block_d", self.segment_block_d, SEGMENT_BLOCK_D)

    def blocks(self, num_tokens: int, d_model: int, itemsize: int) -> tuple[int, int]:
        """``(block_t, block_d)``: these, or ``block_sizes``'s where ``None``."""
        default_t, default_d = block_sizes(num_tokens, d_model, itemsize)
        block_d = self.block_d or default_d
        _check_multiple("block_d", block_d, column_multiple(itemsize))
        return self.block_t or default_t, block_d


def _check_multiple(name: str, value: int, multiple: int) -> None:
    if value < 1 or value % multiple or value > max(MAX_BLOCK_D, multiple):
        raise ValueError(
            f"{name}={value} must be a positive multiple of {multiple} up to {MAX_BLOCK_D}"
        )


def _pad_tokens(x: jax.Array, multiple: int, value) -> jax.Array:
    extra = -x.shape[0] % multiple
    if not extra:
        return x
    return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _interpret_params(interpret: bool):
    return compat.mosaic_gpu_interpret_params() if interpret else None


def _gather_kernel(
    ids_gmem,  # [padded_tokens] int32
    table_gmem,  # [vocab_size, padded_d]
    out_gmem,  # [padded_tokens, padded_d]
    ids_smem,  # [block_t] int32
    rows_smem,  # [block_t, block_d]
    ids_barrier,  # one copy
    rows_barrier,  # block_t copies
    *,
    vocab_size: int,
):
    block_t, block_d = rows_smem.shape
    tokens = pl.ds(jax.lax.axis_index("t") * block_t, block_t)
    cols = pl.ds(jax.lax.axis_index("d") * block_d, block_d)
    plgpu.copy_gmem_to_smem(ids_gmem.at[tokens], ids_smem, ids_barrier)
    plgpu.barrier_wait(ids_barrier)

    def fetch_row(k, carry):
        row = wrap_and_clamp(ids_smem[k], vocab_size)
        plgpu.copy_gmem_to_smem(
            table_gmem.at[pl.ds(row, 1), cols], rows_smem.at[pl.ds(k, 1)], rows_barrier
        )
        return carry

    jax.lax.fori_loop(0, block_t, fetch_row, None)  # block_t copies in flight...
    plgpu.barrier_wait(rows_barrier)  # ...and one wait for all of them.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(rows_smem, out_gmem.at[tokens, cols])
    plgpu.wait_smem_to_gmem(0)


@contract.forward(Config)
def gather(table, ids, *, config, interpret) -> jax.Array:  # [num_tokens, d_model]
    """Rows of ``table`` for ``ids`` with the semantics of ``table[ids]``, as one kernel.

    ``config.block_t`` ids per program, each a row copy in flight; ``config.block_d``
    columns per copy.
    """
    vocab_size, d_model = table.shape
    (num_tokens,) = ids.shape
    if num_tokens == 0:
        return jnp.zeros((0, d_model), table.dtype)
    block_t, block_d = config.blocks(num_tokens, d_model, table.dtype.itemsize)
    padded = pad_columns(table, block_d)  # A table copy only for unaligned d_model.
    padded_ids = _pad_tokens(ids, block_t, 0)
    (padded_tokens,), padded_d = padded_ids.shape, padded.shape[1]
    out = plgpu.kernel(
        functools.partial(_gather_kernel, vocab_size=vocab_size),
        out_type=jax.ShapeDtypeStruct((padded_tokens, padded_d), table.dtype),
        scratch_types=[
            plgpu.SMEM((block_t,), jnp.int32),
            plgpu.SMEM((block_t, block_d), table.dtype),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=block_t),
        ],
        grid=(padded_tokens // block_t, padded_d // block_d),
        grid_names=("t", "d"),
        kernel_name=f"mosaic_embedding_gather_{block_t=}_{block_d=}",
        interpret=_interpret_params(interpret),
    )(padded_ids, padded)
    return out[:num_tokens, :d_model]


def _scatter_add_kernel(
    ids_gmem,  # [padded_tokens] int32
    grad_out_gmem,  # [padded_tokens, padded_d] float32
    grad_gmem,  # [vocab_size, padded_d] float32, zeros on entry; added into
    ids_smem,  # [block_t] int32
    grad_out_smem,  # [block_t, block_d] float32
    row_smem,  # [1, block_d] float32; used only by the interpreter's add
    tile_barrier,  # two copies: ids and gradient tile
    row_barrier,  # one copy
    *,
    vocab_size: int,
    atomic: bool,
):
    block_t, block_d = grad_out_smem.shape
    tokens = pl.ds(jax.lax.axis_index("t") * block_t, block_t)
    cols = pl.ds(jax.lax.axis_index("d") * block_d, block_d)
    plgpu.copy_gmem_to_smem(ids_gmem.at[tokens], ids_smem, tile_barrier)
    plgpu.copy_gmem_to_smem(grad_out_gmem.at[tokens, cols], grad_out_smem, tile_barrier)
    plgpu.barrier_wait(tile_barrier)

    def add_row(k, carry):
        token_id = ids_smem[k]
        live = in_vocab(token_id, vocab_size)
        dst = grad_gmem.at[pl.ds(wrap_and_clamp(token_id, vocab_size), 1), cols]
        if atomic:  # One TMA reduction per token: float32 adds, atomic per element.
            plgpu.copy_smem_to_gmem(
                grad_out_smem.at[pl.ds(k, 1)], dst, predicate=live, reduction_op="add"
            )
        else:  # The interpreter runs programs one at a time: read, add, write.
            plgpu.copy_gmem_to_smem(dst, row_smem, row_barrier)
            plgpu.barrier_wait(row_barrier)
            added = row_smem[...] + grad_out_smem[pl.ds(k, 1), :]
            row_smem[...] = jnp.where(live, added, row_smem[...])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(row_smem, dst)
            plgpu.wait_smem_to_gmem(0)
        return carry

    jax.lax.fori_loop(0, block_t, add_row, None)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # SMEM outlives the reductions' reads.


@contract.backward(Config)
def scatter_add(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Table gradient of ``gather``: float32 atomic adds into rows ``i mod V``.

    Ids outside ``[-V, V)`` add nothing, as in ``jax.grad`` of ``table[ids]``. The
    order of float additions for repeated ids is not fixed. ``grad_out`` is cast to
    float32 first (TMA reductions add values of the destination's dtype).
    """
    num_tokens, d_model = grad_out.shape
    if num_tokens == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    block_t, block_d = config.blocks(num_tokens, d_model, 4)
    grad_out = _pad_tokens(pad_columns(grad_out.astype(jnp.float32), block_d), block_t, 0)
    padded_ids = _pad_tokens(ids, block_t, _DROPPED_ID)
    padded_tokens, padded_d = grad_out.shape
    grad = jax.new_ref(jnp.zeros((vocab_size, padded_d), jnp.float32))
    plgpu.kernel(
        functools.partial(_scatter_add_kernel, vocab_size=vocab_size, atomic=not interpret),
        out_type=(),
        scratch_types=[
            plgpu.SMEM((block_t,), jnp.int32),
            plgpu.SMEM((block_t, block_d), jnp.float32),
            plgpu.SMEM((1, block_d), jnp.float32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=1),
        ],
        grid=(padded_tokens // block_t, padded_d // block_d),
        grid_names=("t", "d"),
        kernel_name=f"mosaic_embedding_scatter_add_{block_t=}_{block_d=}",
        interpret=_interpret_params(interpret),
    )(padded_ids, grad_out, grad)
    return grad[...][:, :d_model]


def _segment_sum_kernel(
    starts_gmem,  # [padded_vocab] int32: first sorted position of each row
    ends_gmem,  # [padded_vocab] int32: one past its last
    sorted_gmem,  # [num_tokens, padded_d] float32: gradient rows in (row, token) order
    grad_gmem,  # [padded_vocab, padded_d] float32
    starts_smem,  # [block_v] int32
    ends_smem,  # [block_v] int32
    token_smem,  # [2, 1, block_d] float32: two slots, one filling while one is added
    grad_smem,  # [block_v, block_d] float32
    bounds_barrier,  # two copies: starts and ends
    token_barriers,  # [2]: one copy each, one per slot
):
    block_v, block_d = grad_smem.shape
    rows = pl.ds(jax.lax.axis_index("v") * block_v, block_v)
    cols = pl.ds(jax.lax.axis_index("d") * block_d, block_d)
    plgpu.copy_gmem_to_smem(starts_gmem.at[rows], starts_smem, bounds_barrier)
    plgpu.copy_gmem_to_smem(ends_gmem.at[rows], ends_smem, bounds_barrier)
    plgpu.barrier_wait(bounds_barrier)

    def fetch(k, slot):
        # The slot was last read by this warpgroup's loads (the generic proxy); a proxy
        # fence orders those reads before the TMA overwrites it (the interpreter's race
        # detector flags the copy without it).
        plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(
            sorted_gmem.at[pl.ds(k, 1), cols], token_smem.at[slot], token_barriers.at[slot]
        )

    # Each row's gradient rows are added left to right in token order (a stable sort),
    # one float32 accumulator per column: one fixed order, whatever the tiling. The
    # next row's copy is in flight while the current one is added.
    def sum_row(r, carry):
        start, end = starts_smem[r], ends_smem[r]

        @pl.when(start < end)
        def _():
            fetch(start, 0)

        def add_token(k, acc):
            slot = (k - start) % 2

            @pl.when(k + 1 < end)
            def _():
                fetch(k + 1, 1 - slot)

            plgpu.barrier_wait(token_barriers.at[slot])
            return acc + token_smem[slot, 0, :]

        zeros = jnp.zeros((block_d,), jnp.float32)
        grad_smem[r, :] = jax.lax.fori_loop(start, end, add_token, zeros)
        return carry

    jax.lax.fori_loop(0, block_v, sum_row, None)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(grad_smem, grad_gmem.at[rows, cols])
    plgpu.wait_smem_to_gmem(0)


@contract.backward(Config)
def segment_sum(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Deterministic table gradient of ``gather``: sort-based, no float atomics.

    Same semantics as ``scatter_add``, bit-reproducible: each row's gradient rows are
    summed in token order in float32, as ``pallas_gather.segment_sum`` does. The
    gradient rows are first put in sorted order by XLA (a gather of ``grad_out``), so
    each row's rows are contiguous; each program owns ``block_v`` (a multiple of 32)
    whole rows by ``block_d`` (a multiple of 128) columns. A row's work is serial: use
    it for reproducibility, not speed.
    """
    num_tokens, d_model = grad_out.shape
    if num_tokens == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    block_v, block_d = config.block_v, config.segment_block_d
    padded_vocab = _round_up(vocab_size, block_v)
    order, bounds = segments(ids, vocab_size, padded_vocab)
    sorted_grad = pad_columns(grad_out.astype(jnp.float32)[order], block_d)
    padded_d = sorted_grad.shape[1]
    grad = plgpu.kernel(
        _segment_sum_kernel,
        out_type=jax.ShapeDtypeStruct((padded_vocab, padded_d), jnp.float32),
        scratch_types=[
            plgpu.SMEM((block_v,), jnp.int32),
            plgpu.SMEM((block_v,), jnp.int32),
            plgpu.SMEM((2, 1, block_d), jnp.float32),
            plgpu.SMEM((block_v, block_d), jnp.float32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
        ],
        grid=(padded_vocab // block_v, padded_d // block_d),
        grid_names=("v", "d"),
        kernel_name=f"mosaic_embedding_segment_sum_{block_v=}_{block_d=}",
        interpret=_interpret_params(interpret),
    )(bounds[:-1], bounds[1:], sorted_grad)
    return grad[:vocab_size, :d_model]


# What the layer calls: ``gather`` with ``scatter_add`` (float32 TMA reductions), or with
# ``deterministic`` the bit-reproducible ``segment_sum``, as its table gradient.
lookup = contract.differentiable(gather, scatter_add, segment_sum)
