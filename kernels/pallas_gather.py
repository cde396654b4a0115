"""Embedding gather as a Pallas kernel (Triton lowering on GPU, ``interpret=True`` on CPU).

Layout, as in JAX's own Pallas GPU ops: forward kernel, its jitted wrapper, backward
kernels (atomic ``scatter_add``, deterministic sort-based ``segment_sum``) with their
wrappers, then the ``custom_vjp`` wiring. The plain-JAX oracle is in
``kernels/reference.py``.

The table stays in HBM (``memory_space=pl.ANY``) and is read with gathered loads; each
program owns a ``[block_t, block_d]`` tile of the output. Ids are wrapped and clamped
inside the kernel, so no program reads outside the table whatever ids it is handed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import compat, contract
from kernels.contract import in_vocab, pad_columns, segments, wrap_and_clamp

# From JAX 0.11 every lowering of this module's kernels warns that Pallas on Triton is
# deprecated; the warning is ours to handle, not our users' (README: "Supported stacks").
compat.quiet_pallas_triton_deprecation()

# Bytes of table data one program moves: enough to hide latency, small enough to keep
# many programs in flight for short sequences.
_TILE_BYTES = 16 * 1024
_MAX_BLOCK_D_BYTES = 2048


def block_sizes(num_tokens: int, d_model: int, itemsize: int) -> tuple[int, int]:
    """Default ``(block_t, block_d)``: powers of two, as Triton requires.

    ``block_d`` is the widest power of two up to 2 KiB of row that divides ``d_model``
    (no masked lanes), or ``d_model`` rounded up when rows are narrow or odd.
    """
    cap = _MAX_BLOCK_D_BYTES // itemsize
    block_d = min(pl.next_power_of_2(d_model), cap)
    while block_d > 16 and d_model % block_d:
        block_d //= 2
    if d_model % block_d and d_model < cap:
        block_d = pl.next_power_of_2(d_model)
    rows_per_tile = max(1, _TILE_BYTES // (block_d * itemsize))
    block_t = 1 << (rows_per_tile.bit_length() - 1)  # Largest power of two that fits.
    return min(block_t, 64, pl.next_power_of_2(max(num_tokens, 1))), block_d


def row_warps(block_d: int) -> int:
    """Default warps of the backward kernels (``contract.row_warps``, at most 4)."""
    return contract.row_warps(block_d, most=4)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning of the kernels; a field left ``None`` is chosen from the shapes.

    Attributes:
      block_t: tokens per program (``gather``, ``scatter_add``); a power of two.
      block_d: columns per program; a power of two.
      block_v: table rows per program of ``segment_sum``; a power of two.
      num_warps: warps per program (Triton's); ``gather``: 4, or 8 for big tiles; the
        backwards: ``row_warps(block_d)``.
      num_stages: Triton's software-pipelining depth.
    """

    block_t: int | None = None
    block_d: int | None = None
    block_v: int = 8
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_t", "block_d", "block_v", "num_warps"):
            contract.check_power_of_2(name, getattr(self, name))
        if self.num_stages is not None and (
            not isinstance(self.num_stages, int) or self.num_stages < 1
        ):
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    def blocks(self, num_tokens: int, d_model: int, itemsize: int) -> tuple[int, int]:
        """``(block_t, block_d)``: these, or ``block_sizes``'s where ``None``."""
        default_t, default_d = block_sizes(num_tokens, d_model, itemsize)
        return self.block_t or default_t, self.block_d or default_d


def _gather_kernel(
    ids_ref,  # [block_t] int32
    table_ref,  # [vocab_size, d_model], in HBM
    out_ref,  # [block_t, block_d]
    *,
    vocab_size: int,
    d_model: int,
):
    block_t, block_d = out_ref.shape
    rows = wrap_and_clamp(ids_ref[...], vocab_size)
    cols = pl.program_id(1) * block_d + jnp.arange(block_d, dtype=jnp.int32)
    if d_model % block_d:
        mask = jnp.broadcast_to(cols[None, :] < d_model, (block_t, block_d))
        out_ref[...] = plgpu.load(table_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0)
    else:
        out_ref[...] = table_ref[rows[:, None], cols[None, :]]


@contract.forward(Config)
def gather(table, ids, *, config, interpret) -> jax.Array:  # [num_tokens, d_model]
    """Rows of ``table`` for ``ids`` with the semantics of ``table[ids]``, as one kernel."""
    vocab_size, d_model = table.shape
    (num_tokens,) = ids.shape
    if num_tokens == 0:
        return jnp.zeros((0, d_model), table.dtype)
    block_t, block_d = config.blocks(num_tokens, d_model, table.dtype.itemsize)
    num_warps = config.num_warps or (8 if block_t * block_d >= 8192 else 4)
    kernel = functools.partial(_gather_kernel, vocab_size=vocab_size, d_model=d_model)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), pl.cdiv(d_model, block_d)),
        in_specs=[
            pl.BlockSpec((block_t,), lambda i, j: (i,)),  # ids
            pl.BlockSpec(memory_space=pl.ANY),  # table
        ],
        out_specs=pl.BlockSpec((block_t, block_d), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, d_model), table.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"embedding_gather_{block_t=}_{block_d=}",
    )(ids, table)


def _scatter_add_kernel(
    ids_ref,  # [block_t] int32
    grad_out_ref,  # [block_t, block_d]
    _,  # [vocab_size, padded_d] float32, in HBM; aliased with grad_ref
    grad_ref,  # [vocab_size, padded_d] float32, in HBM
    *,
    num_tokens: int,
    vocab_size: int,
):
    block_t, block_d = grad_out_ref.shape
    first_token = pl.program_id(0) * block_t
    cols = pl.ds(pl.program_id(1) * block_d, block_d)

    # One row-vector atomic per token: a scalar row and a contiguous column slice is
    # the form both the Triton lowering and the interpreter add correctly for repeated
    # rows (the interpreter's gather-indexed atomic_add keeps only one duplicate).
    # It compiles to a returning ATOMG, not a fire-and-forget REDG (the raw Triton
    # kernel's): Pallas lowers atomic_add with acquire-release semantics and offers no
    # relaxed one (JAX 0.10.2 to 0.12.0.1), and ptxas keeps an acq_rel atomic as ATOMG
    # even when its result is unused. Triton's own tl.atomic_add(sem="relaxed") is a REDG.
    def add_row(k, carry):
        token_id = ids_ref[k]
        live = (first_token + k < num_tokens) & in_vocab(token_id, vocab_size)
        values = grad_out_ref[k, :].astype(jnp.float32)
        values = jnp.where(live, values, 0.0)
        plgpu.atomic_add(grad_ref, (wrap_and_clamp(token_id, vocab_size), cols), values)
        return carry

    jax.lax.fori_loop(0, block_t, add_row, None)


@contract.backward(Config)
def scatter_add(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Table gradient of ``gather``: float32 atomic adds into rows ``i mod V``.

    Ids outside ``[-V, V)`` add nothing, as in ``jax.grad`` of ``table[ids]``. The
    order of float additions for repeated ids is not fixed.
    """
    num_tokens, d_model = grad_out.shape
    if num_tokens == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    block_t, block_d = config.blocks(num_tokens, d_model, grad_out.dtype.itemsize)
    grad_out = pad_columns(grad_out, block_d)  # Every atomic: an unmasked row slice.
    padded_d = grad_out.shape[1]
    kernel = functools.partial(_scatter_add_kernel, num_tokens=num_tokens, vocab_size=vocab_size)
    grad = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), padded_d // block_d),
        in_specs=[
            pl.BlockSpec((block_t,), lambda i, j: (i,)),  # ids
            pl.BlockSpec((block_t, block_d), lambda i, j: (i, j)),  # grad_out
            pl.BlockSpec(memory_space=pl.ANY),  # zeros
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        out_shape=jax.ShapeDtypeStruct((vocab_size, padded_d), jnp.float32),
        input_output_aliases={2: 0},
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps or row_warps(block_d), num_stages=config.num_stages
        ),
        interpret=interpret,
        name=f"embedding_scatter_add_{block_t=}_{block_d=}",
    )(ids, grad_out, jnp.zeros((vocab_size, padded_d), jnp.float32))
    return grad[:, :d_model]


def _segment_sum_kernel(
    bounds_ref,  # [num_row_blocks * block_v + 1] int32, in HBM
    order_ref,  # [num_tokens] int32, in HBM
    grad_out_ref,  # [num_tokens, padded_d], in HBM
    grad_ref,  # [block_v, block_d] float32
):
    block_v, block_d = grad_ref.shape
    first_row = pl.program_id(0) * block_v
    cols = pl.ds(pl.program_id(1) * block_d, block_d)

    # Row r's tokens are order[bounds[r]:bounds[r + 1]], in increasing token position
    # (a stable sort), so each row is summed left to right in one fixed order.
    def sum_row(r, carry):
        def add_token(k, acc):
            return acc + grad_out_ref[order_ref[k], cols].astype(jnp.float32)

        start, end = bounds_ref[first_row + r], bounds_ref[first_row + r + 1]
        acc = jax.lax.fori_loop(start, end, add_token, jnp.zeros((block_d,), jnp.float32))
        grad_ref[r, :] = acc
        return carry

    jax.lax.fori_loop(0, block_v, sum_row, None)


@contract.backward(Config)
def segment_sum(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Deterministic table gradient of ``gather``: sort-based, no float atomics.

    Same semantics as ``scatter_add`` (rows ``i mod V``; ids outside ``[-V, V)`` add
    nothing), but bit-reproducible: ids are mapped to their row (dropped ids to the
    sentinel ``V``) and stably argsorted, and each program owns ``block_v`` whole output
    rows and sums each row's gradient rows in token order in a float32 accumulator.

    Cost: an XLA sort of ``num_tokens`` ids, a ``searchsorted`` of ``V + 1`` row
    boundaries, then one kernel that writes every ``[V, d_model]`` float32 element once
    and reads each live gradient row once. The work of a row is serial: a batch whose
    ids are all equal is one program summing ``num_tokens`` rows one after another, where
    ``scatter_add`` spreads them over many programs. Use it for reproducibility, not speed.
    """
    num_tokens, d_model = grad_out.shape
    if num_tokens == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    _, block_d = config.blocks(num_tokens, d_model, grad_out.dtype.itemsize)
    block_v = config.block_v
    num_row_blocks = pl.cdiv(vocab_size, block_v)
    order, bounds = segments(ids, vocab_size, num_row_blocks * block_v)
    grad_out = pad_columns(grad_out, block_d)  # Every load: an unmasked row slice.
    padded_d = grad_out.shape[1]
    grad = pl.pallas_call(
        _segment_sum_kernel,
        grid=(num_row_blocks, padded_d // block_d),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),  # bounds
            pl.BlockSpec(memory_space=pl.ANY),  # order
            pl.BlockSpec(memory_space=pl.ANY),  # grad_out
        ],
        out_specs=pl.BlockSpec((block_v, block_d), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((vocab_size, padded_d), jnp.float32),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps or row_warps(block_d), num_stages=config.num_stages
        ),
        interpret=interpret,
        name=f"embedding_segment_sum_{block_v=}_{block_d=}",
    )(bounds, order, grad_out)
    return grad[:, :d_model]


# What the layer calls: ``gather`` with ``scatter_add`` (float32 atomics), or with
# ``deterministic`` the bit-reproducible ``segment_sum``, as its table gradient.
lookup = contract.differentiable(gather, scatter_add, segment_sum)
