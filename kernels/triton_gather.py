"""Embedding gather and its table gradient as raw Triton kernels, called through jax-triton.

Layout, as in Liger-Kernel and the Triton tutorials: ``@triton.jit`` kernels first, then
the plain launchers (``gather``, ``scatter_add``) and a GPU-free compile helper
(``compile_gather``, ``compile_scatter_add``) that builds PTX with exactly the
specialisation ``jax_triton.triton_call`` (0.3.1) uses, so tests can inspect the code
the GPU would run.

Each program owns a ``[BLOCK_T, BLOCK_D]`` tile: ``BLOCK_T`` tokens by ``BLOCK_D``
columns, on a 2-D grid (token blocks x column blocks), so rows from 1 to many thousand
elements wide all work. Ids are wrapped and clamped inside the kernel body, so no
program reads outside the table whatever ids it is handed. Row offsets are computed in
64 bits, so tables with ``vocab_size * d_model >= 2**31`` elements are addressed
correctly.

Vector width. jax-triton 0.3.1 specialises array arguments as 16-byte aligned
(``tt.divisibility = 16``) but passes integer scalars with no divisibility fact at all
(only a scalar equal to 1 becomes a constexpr). A runtime ``d_model`` would therefore
look arbitrary to Triton's axis analysis and every row access would be scalar. Instead
the launcher passes ``d_model // VEC`` at runtime and the constexpr ``VEC``: the largest
power of two dividing ``d_model`` with ``VEC * itemsize <= 16`` bytes. The kernel
rebuilds ``d_model = (d_model // VEC) * VEC``, which the compiler knows is a multiple of
``VEC``: row starts and the column mask are then ``VEC``-aligned and loads and stores
become 128-bit vectors. This costs at most four compiled variants per dtype (``VEC`` in
1, 2, 4, 8), not one per ``d_model`` as a constexpr ``d_model`` would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from kernels import compat, pallas_gather
from kernels.reference import check_dtype

# Bytes of one vector access: the widest global load/store (ld.global.v4.b32).
_VECTOR_BYTES = 16
# Widest column block, in bytes of row: a 4-warp program then issues a few vectors per
# thread per row.
_MAX_BLOCK_D_BYTES = 4096
# Bytes of table one program moves: enough to hide latency, small enough to keep many
# programs in flight for short sequences.
_TILE_BYTES = 16 * 1024
_MAX_BLOCK_T = 512
# Triton's limit on the elements of one block.
_MAX_TILE_ELEMENTS = 1 << 20
_INT32_MAX = 2**31 - 1

# jax-triton's defaults when num_warps / num_stages are None.
_DEFAULT_NUM_WARPS = 4
_DEFAULT_NUM_STAGES = 3

_TRITON_DTYPE_NAMES = {
    jnp.dtype(jnp.float32): "fp32",
    jnp.dtype(jnp.bfloat16): "bf16",
    jnp.dtype(jnp.float16): "fp16",
    jnp.dtype(jnp.int32): "i32",
}


@triton.jit
def _wrap_and_clamp(ids, vocab_size):
    """Rows read for ``ids`` ("clip"): wrap a negative id once, then clamp into the table.

    The Triton twin of ``kernels.reference.wrap_and_clamp``: no program addresses
    outside the table, whatever ids it is handed.
    """
    rows = tl.where(ids < 0, ids + vocab_size, ids)
    return tl.minimum(tl.maximum(rows, 0), vocab_size - 1)


@triton.jit
def _gather_kernel(
    ids_ptr,  # *i32 [n_tokens]
    table_ptr,  # *T [vocab_size, d_model]
    n_tokens,  # i32
    vocab_size,  # i32
    d_model_over_vec,  # i32: d_model // VEC
    out_ptr,  # *T [n_tokens, d_model]
    VEC: tl.constexpr,  # power of two dividing d_model
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    # A multiple of VEC by construction: row starts and the column mask are VEC-aligned.
    d_model = d_model_over_vec * VEC

    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < n_tokens
    ids = tl.load(ids_ptr + toks, mask=tok_mask, other=0)
    rows = _wrap_and_clamp(ids, vocab_size)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)
    mask = tok_mask[:, None] & (cols < d_model)[None, :]

    # 64-bit offsets: vocab_size * d_model (and n_tokens * d_model) may exceed 2**31.
    src = table_ptr + rows.to(tl.int64)[:, None] * d_model + cols[None, :]
    dst = out_ptr + toks.to(tl.int64)[:, None] * d_model + cols[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _scatter_add_kernel(
    grad_ptr,  # *T [n_tokens, d_model]
    ids_ptr,  # *i32 [n_tokens]
    n_tokens,  # i32
    vocab_size,  # i32
    d_model_over_vec,  # i32: d_model // VEC
    acc_ptr,  # *fp32 [vocab_size, d_model], zero-initialised
    VEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    d_model = d_model_over_vec * VEC

    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < n_tokens
    ids = tl.load(ids_ptr + toks, mask=tok_mask, other=0)
    # Ids in [-V, V) add into row id mod V; the rest contribute nothing (jax.grad of
    # table[ids]). The clamp is defensive: rows of dropped ids are masked off anyway.
    in_vocab = tok_mask & (ids >= -vocab_size) & (ids < vocab_size)
    rows = _wrap_and_clamp(ids, vocab_size)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)
    mask = in_vocab[:, None] & (cols < d_model)[None, :]

    src = grad_ptr + toks.to(tl.int64)[:, None] * d_model + cols[None, :]
    dst = acc_ptr + rows.to(tl.int64)[:, None] * d_model + cols[None, :]
    grad = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(dst, grad, mask=mask, sem="relaxed")


# ----------------------------------------------------------------------------------------
# Launch configuration.


def _vector_width(d_model: int, itemsize: int) -> int:
    """Largest power of two dividing ``d_model`` with ``vec * itemsize <= 16`` bytes."""
    vec = _VECTOR_BYTES // itemsize
    while vec > 1 and d_model % vec:
        vec //= 2
    return vec


def _block_sizes(d_model: int, itemsize: int) -> tuple[int, int]:
    """Default ``(block_t, block_d)``, powers of two as Triton requires.

    ``block_d``: the widest power of two up to 4 KiB of row that divides ``d_model``
    (no masked lanes; e.g. 768 float32 -> 256, 4096 bfloat16 -> 2048), provided it
    spans at least 512 bytes; otherwise ``d_model`` rounded up to a power of two, capped
    at 4 KiB (narrow or odd rows: the last column block is partly masked). ``block_t``:
    as many tokens as fill a 16 KiB tile, at most 512.
    """
    cap = _MAX_BLOCK_D_BYTES // itemsize
    block_d = min(triton.next_power_of_2(max(d_model, 1)), cap)
    divisor = block_d
    while divisor > 1 and d_model % divisor:
        divisor //= 2
    if divisor * itemsize >= 512 or divisor == d_model:
        block_d = divisor
    block_t = max(1, min(_MAX_BLOCK_T, _TILE_BYTES // (block_d * itemsize)))
    return block_t, block_d


def _check_power_of_2(name: str, value: int | None, *, maximum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < 1 or value & (value - 1) or value > maximum:
        raise ValueError(f"{name}={value} must be a power of two in [1, {maximum}]")


def _config(
    d_model: int,
    itemsize: int,
    *,
    block_t: int | None,
    block_d: int | None,
    num_warps: int | None,
    num_stages: int | None,
) -> dict:
    """Resolved launch parameters shared by the launchers and the compile helpers."""
    _check_power_of_2("block_t", block_t, maximum=_MAX_TILE_ELEMENTS)
    _check_power_of_2("block_d", block_d, maximum=_MAX_TILE_ELEMENTS)
    _check_power_of_2("num_warps", num_warps, maximum=32)
    if num_stages is not None and (not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"{num_stages=} must be a positive int")
    default_t, default_d = _block_sizes(d_model, itemsize)
    block_t = default_t if block_t is None else block_t
    block_d = default_d if block_d is None else block_d
    if block_t * block_d > _MAX_TILE_ELEMENTS:
        raise ValueError(f"{block_t=} * {block_d=} must be at most {_MAX_TILE_ELEMENTS}")
    return dict(
        VEC=_vector_width(d_model, itemsize),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=_DEFAULT_NUM_WARPS if num_warps is None else num_warps,
        num_stages=_DEFAULT_NUM_STAGES if num_stages is None else num_stages,
    )


def _check_sizes(num_tokens: int, vocab_size: int, d_model: int, block_t: int) -> None:
    if vocab_size < 1:
        raise ValueError(f"{vocab_size=} must be at least 1")
    if vocab_size > _INT32_MAX or d_model > _INT32_MAX:
        raise ValueError(f"{vocab_size=} and {d_model=} must fit in int32")
    if num_tokens + block_t > _INT32_MAX:
        raise ValueError(f"{num_tokens=} must be below 2**31 - {block_t} (block_t)")


# ----------------------------------------------------------------------------------------
# Launchers.


def gather(
    table: jax.Array,  # [vocab_size, d_model] float32 / bfloat16 / float16
    ids: jax.Array,  # [num_tokens] int32
    *,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [num_tokens, d_model], table.dtype
    """``table[ids]`` (wrap once, then clamp) with ``_gather_kernel``, via jax-triton."""
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be (vocab_size, d_model)")
    check_dtype("table.dtype", table.dtype)
    if ids.ndim != 1:
        raise ValueError(f"{ids.shape=} must be (num_tokens,)")
    if jnp.dtype(ids.dtype) != jnp.int32:
        raise TypeError(f"{ids.dtype=} must be int32")
    vocab_size, d_model = table.shape
    (num_tokens,) = ids.shape
    itemsize = jnp.dtype(table.dtype).itemsize
    cfg = _config(
        d_model,
        itemsize,
        block_t=block_t,
        block_d=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _check_sizes(num_tokens, vocab_size, d_model, cfg["BLOCK_T"])
    out_shape = jax.ShapeDtypeStruct((num_tokens, d_model), table.dtype)
    if num_tokens == 0 or d_model == 0:
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    grid = (
        triton.cdiv(num_tokens, cfg["BLOCK_T"]),
        triton.cdiv(d_model, cfg["BLOCK_D"]),
    )
    return compat.triton_call(
        ids,
        table,
        num_tokens,
        vocab_size,
        d_model // cfg["VEC"],
        kernel=_gather_kernel,
        out_shape=out_shape,
        grid=grid,
        name="triton_embedding_gather",
        **cfg,
    )


def scatter_add(
    grad_out: jax.Array,  # [num_tokens, d_model] float32 / bfloat16 / float16
    ids: jax.Array,  # [num_tokens] int32
    vocab_size: int,
    *,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> jax.Array:  # [vocab_size, d_model], grad_out.dtype
    """Table gradient of ``gather``: rows of ``grad_out`` added into rows ``ids mod V``.

    Ids outside ``[-vocab_size, vocab_size)`` contribute nothing. Accumulates with float32
    atomics (summation order of repeated ids is not deterministic) and casts once.
    """
    if grad_out.ndim != 2:
        raise ValueError(f"{grad_out.shape=} must be (num_tokens, d_model)")
    check_dtype("grad_out.dtype", grad_out.dtype)
    if jnp.dtype(ids.dtype) != jnp.int32:
        raise TypeError(f"{ids.dtype=} must be int32")
    if ids.shape != grad_out.shape[:1]:
        raise ValueError(f"{ids.shape=} must be ({grad_out.shape[0]},), one id per row")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"{vocab_size=} must be an int")
    vocab_size = int(vocab_size)
    num_tokens, d_model = grad_out.shape
    cfg = _config(
        d_model,
        jnp.dtype(grad_out.dtype).itemsize,
        block_t=block_t,
        block_d=block_d,
        num_warps=num_warps,
        num_stages=None,
    )
    _check_sizes(num_tokens, vocab_size, d_model, cfg["BLOCK_T"])
    if num_tokens == 0 or d_model == 0:
        return jnp.zeros((vocab_size, d_model), grad_out.dtype)
    grid = (
        triton.cdiv(num_tokens, cfg["BLOCK_T"]),
        triton.cdiv(d_model, cfg["BLOCK_D"]),
    )
    acc = compat.triton_call(
        grad_out,
        ids,
        num_tokens,
        vocab_size,
        d_model // cfg["VEC"],
        kernel=_scatter_add_kernel,
        out_shape=jax.ShapeDtypeStruct((vocab_size, d_model), jnp.float32),
        grid=grid,
        zeroed=True,
        name="triton_embedding_scatter_add",
        **cfg,
    )
    return acc.astype(grad_out.dtype)


# ----------------------------------------------------------------------------------------
# GPU-free compilation, with jax-triton's specialisation.


def _jax_triton_source(fn, args: list[tuple[str, object]], constexprs: dict):
    """``ASTSource`` for ``fn`` specialised as ``jax_triton.triton_call`` 0.3.1 would.

    ``args`` lists the runtime arguments in kernel order as ``(name, value)``: a dtype
    for an array (pointer, assumed 16-byte aligned: ``tt.divisibility = 16``) or a Python
    int for a scalar (typed by value, no divisibility fact; a scalar equal to 1 becomes a
    constexpr). ``constexprs`` are the metaparameters.
    """
    signature, attrs, constants = {}, {}, dict(constexprs)
    div16 = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(args):
        if isinstance(value, int):
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"{name}={value} must fit in int32")
            signature[name] = "i32"
            attrs[(i,)] = []
            if value == 1:
                constants[name] = 1
        else:
            signature[name] = "*" + _TRITON_DTYPE_NAMES[jnp.dtype(value)]
            attrs[(i,)] = div16
    for name in constants:
        signature[name] = "constexpr"
    return triton.compiler.ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)


def _compile(fn, args, cfg, arch: int):
    from triton.backends.compiler import GPUTarget

    meta = {k: cfg[k] for k in ("VEC", "BLOCK_T", "BLOCK_D")}
    options = {
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "num_ctas": 1,
        "enable_fp_fusion": True,
        "debug": False,
    }
    src = _jax_triton_source(fn, args, meta)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _compile_config(dtype, d_model, block_t, block_d, num_warps, num_stages):
    dtype = check_dtype("dtype", dtype)
    if d_model < 1:
        raise ValueError(f"{d_model=} must be at least 1")
    cfg = _config(
        d_model,
        dtype.itemsize,
        block_t=block_t,
        block_d=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return dtype, cfg


def _gather_args(dtype, num_tokens: int, vocab_size: int, d_model_over_vec: int) -> list:
    """``_gather_kernel``'s runtime arguments as ``gather`` passes them, for ``_compile``."""
    return [
        ("ids_ptr", jnp.int32),
        ("table_ptr", dtype),
        ("n_tokens", num_tokens),
        ("vocab_size", vocab_size),
        ("d_model_over_vec", d_model_over_vec),
        ("out_ptr", dtype),
    ]


def compile_gather(
    *,
    arch: int,
    dtype,
    d_model: int,
    num_tokens: int = 4096,
    vocab_size: int = 32000,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Compile ``_gather_kernel`` for ``sm_{arch}`` without a GPU; returns the kernel.

    Same arguments, metaparameters and specialisation as ``gather`` hands jax-triton;
    ``num_tokens`` and ``vocab_size`` only matter when 1 (then they become constexprs).
    Read the code from ``kernel.asm["ptx"]`` (also ``"ttir"``, ``"ttgir"``, ``"llir"``).
    """
    dtype, cfg = _compile_config(dtype, d_model, block_t, block_d, num_warps, num_stages)
    args = _gather_args(dtype, num_tokens, vocab_size, d_model // cfg["VEC"])
    return _compile(_gather_kernel, args, cfg, arch)


def compile_scatter_add(
    *,
    arch: int,
    dtype,
    d_model: int,
    num_tokens: int = 4096,
    vocab_size: int = 32000,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
):
    """Compile ``_scatter_add_kernel`` for ``sm_{arch}`` without a GPU (see compile_gather).

    ``dtype`` is the output gradient's; the accumulator is float32.
    """
    dtype, cfg = _compile_config(dtype, d_model, block_t, block_d, num_warps, None)
    args = [
        ("grad_ptr", dtype),
        ("ids_ptr", jnp.int32),
        ("n_tokens", num_tokens),
        ("vocab_size", vocab_size),
        ("d_model_over_vec", d_model // cfg["VEC"]),
        ("acc_ptr", jnp.float32),
    ]
    return _compile(_scatter_add_kernel, args, cfg, arch)


# ----------------------------------------------------------------------------------------
# custom_vjp wiring: the layer's "triton" backend.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lookup(table: jax.Array, ids: jax.Array, deterministic: bool = False) -> jax.Array:
    """``gather`` with ``scatter_add`` as its table gradient; what the layer calls.

    ``deterministic=True`` takes the sort-based Pallas backward
    (``pallas_gather.segment_sum``) instead of float atomics.
    """
    return gather(table, ids)


def _lookup_fwd(table, ids, deterministic):
    # A (vocab_size, 0) array carries the table's shape and dtype at no cost.
    return gather(table, ids), (ids, table[:, :0])


def _lookup_bwd(deterministic, residuals, grad_out):
    ids, table_like = residuals
    vocab_size = table_like.shape[0]
    if deterministic:
        grad = pallas_gather.segment_sum(grad_out, ids, vocab_size=vocab_size)
    else:
        grad = scatter_add(grad_out, ids, vocab_size)
    return grad.astype(table_like.dtype), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


__all__ = [
    "compile_gather",
    "compile_scatter_add",
    "gather",
    "lookup",
    "scatter_add",
]
