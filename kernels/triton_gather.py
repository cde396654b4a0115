"""Embedding gather and its table gradient as raw Triton kernels, called through jax-triton.

Layout, as in Liger-Kernel and the Triton tutorials: ``@triton.jit`` kernels first (the
gather, the atomic ``scatter_add`` and the deterministic ``segment_sum``), then the plain
launchers under the backend contract (``kernels/contract.py``), a GPU-free compile helper
(``compile_kernel``) that builds PTX with exactly the specialisation
``jax_triton.triton_call`` (0.3.1) uses, so tests can inspect the code the GPU would run,
and the ``custom_vjp`` wiring. jax-triton runs the kernels on CUDA only; the tests run
their logic in Triton's CPU interpreter.

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

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import compat, contract

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


# What an id means, as Triton code: the rules of kernels/contract.py, the same source.
_wrap_and_clamp = triton.jit(contract.id_rule(contract.wrap_and_clamp, tl))
_in_vocab = triton.jit(contract.id_rule(contract.in_vocab, tl))


@triton.jit
def _tokens(ids_ptr, n_tokens, BLOCK_T: tl.constexpr):
    """This program's token positions (axis 0 of the grid), which exist, and their ids."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < n_tokens
    return toks, tok_mask, tl.load(ids_ptr + toks, mask=tok_mask, other=0)


@triton.jit
def _columns(BLOCK_D: tl.constexpr):
    """This program's columns (axis 1 of the grid), marked aligned for vector accesses."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)


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
    # A multiple of VEC by construction: row starts and the column mask are VEC-aligned.
    d_model = d_model_over_vec * VEC
    toks, tok_mask, ids = _tokens(ids_ptr, n_tokens, BLOCK_T)
    rows = _wrap_and_clamp(ids, vocab_size)
    cols = _columns(BLOCK_D)
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
    d_model = d_model_over_vec * VEC
    toks, tok_mask, ids = _tokens(ids_ptr, n_tokens, BLOCK_T)
    # Ids in [-V, V) add into row id mod V; the rest contribute nothing (jax.grad of
    # table[ids]). The clamp is defensive: rows of dropped ids are masked off anyway.
    in_vocab = tok_mask & _in_vocab(ids, vocab_size)
    rows = _wrap_and_clamp(ids, vocab_size)
    cols = _columns(BLOCK_D)
    mask = in_vocab[:, None] & (cols < d_model)[None, :]

    src = grad_ptr + toks.to(tl.int64)[:, None] * d_model + cols[None, :]
    dst = acc_ptr + rows.to(tl.int64)[:, None] * d_model + cols[None, :]
    grad = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(dst, grad, mask=mask, sem="relaxed")


@triton.jit
def _segment_sum_kernel(
    grad_ptr,  # *T [n_tokens, d_model]
    order_ptr,  # *i32 [n_tokens]: token positions, by gradient row, in token order per row
    bounds_ptr,  # *i32 [n_rows + 1]: row r's tokens are order[bounds[r]:bounds[r + 1]]
    vocab_size,  # i32
    d_model_over_vec,  # i32: d_model // VEC
    out_ptr,  # *fp32 [vocab_size, d_model]
    VEC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    d_model = d_model_over_vec * VEC
    cols = _columns(BLOCK_D)
    col_mask = cols < d_model
    # Each program owns BLOCK_V whole rows and writes every element of them once; a
    # row's gradient rows are added left to right in token order, in float32: one
    # fixed order, whatever the tiling or the GPU.
    for i in tl.static_range(BLOCK_V):
        row = pid_v * BLOCK_V + i
        start = tl.load(bounds_ptr + row)
        end = tl.load(bounds_ptr + row + 1)
        acc = tl.full((BLOCK_D,), 0.0, tl.float32)
        k = start
        while k < end:  # A while loop: Triton's CPU interpreter cannot range over tensors.
            token = tl.load(order_ptr + k).to(tl.int64)
            acc += tl.load(grad_ptr + token * d_model + cols, mask=col_mask, other=0.0).to(
                tl.float32
            )
            k += 1
        dst = out_ptr + row.to(tl.int64) * d_model + cols
        tl.store(dst, acc, mask=col_mask & (row < vocab_size))


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


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning of the kernels; a field left ``None`` is chosen from the shapes.

    Attributes:
      block_t: tokens per program (``gather``, ``scatter_add``); a power of two.
      block_d: columns per program; a power of two.
      block_v: table rows per program of ``segment_sum``; a power of two.
      num_warps: warps per program; when ``None``, 4 (jax-triton's default), and for
        ``segment_sum`` one float32 vector a thread (``contract.row_warps``, up to 8).
      num_stages: Triton's software-pipelining depth; jax-triton's default, 3.
    """

    block_t: int | None = None
    block_d: int | None = None
    block_v: int = 8
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_t", "block_d", "block_v"):
            contract.check_power_of_2(name, getattr(self, name), maximum=_MAX_TILE_ELEMENTS)
        contract.check_power_of_2("num_warps", self.num_warps, maximum=32)
        if self.num_stages is not None and (
            not isinstance(self.num_stages, int) or self.num_stages < 1
        ):
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    def launch(self, d_model: int, itemsize: int) -> dict:
        """The metaparameters and launch options for rows of ``d_model`` x ``itemsize``."""
        default_t, default_d = _block_sizes(d_model, itemsize)
        block_t, block_d = self.block_t or default_t, self.block_d or default_d
        if block_t * block_d > _MAX_TILE_ELEMENTS:
            raise ValueError(f"{block_t=} * {block_d=} must be at most {_MAX_TILE_ELEMENTS}")
        return dict(
            VEC=_vector_width(d_model, itemsize),
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=self.num_warps or _DEFAULT_NUM_WARPS,
            num_stages=self.num_stages or _DEFAULT_NUM_STAGES,
        )


def _segment_sum_launch(config: Config, d_model: int) -> dict:
    """``segment_sum``'s launch: tiles sized for the float32 rows it sums and writes, and
    by default one 16-byte accumulator vector a thread (``contract.row_warps``)."""
    cfg = config.launch(d_model, 4)
    cfg["num_warps"] = config.num_warps or contract.row_warps(cfg["BLOCK_D"], most=8)
    return cfg


def _check_sizes(num_tokens: int, vocab_size: int, d_model: int, block_t: int) -> None:
    if vocab_size < 1:
        raise ValueError(f"{vocab_size=} must be at least 1")
    if vocab_size > _INT32_MAX or d_model > _INT32_MAX:
        raise ValueError(f"{vocab_size=} and {d_model=} must fit in int32")
    if num_tokens + block_t > _INT32_MAX:
        raise ValueError(f"{num_tokens=} must be below 2**31 - {block_t} (block_t)")


def _no_interpreter(interpret: bool) -> None:
    if interpret:
        raise ValueError(
            f"{interpret=} must be False: jax-triton runs the kernels on CUDA only "
            "(Triton's own CPU interpreter runs them on torch tensors, in the tests)"
        )


# ----------------------------------------------------------------------------------------
# Launchers.


@contract.forward(Config)
def gather(table, ids, *, config, interpret) -> jax.Array:  # [num_tokens, d_model]
    """``table[ids]`` (wrap once, then clamp) with ``_gather_kernel``, via jax-triton."""
    _no_interpreter(interpret)
    vocab_size, d_model = table.shape
    (num_tokens,) = ids.shape
    cfg = config.launch(d_model, table.dtype.itemsize)
    _check_sizes(num_tokens, vocab_size, d_model, cfg["BLOCK_T"])
    out_shape = jax.ShapeDtypeStruct((num_tokens, d_model), table.dtype)
    if num_tokens == 0 or d_model == 0:
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    return compat.triton_call(
        ids,
        table,
        num_tokens,
        vocab_size,
        d_model // cfg["VEC"],
        kernel=_gather_kernel,
        out_shape=out_shape,
        grid=(triton.cdiv(num_tokens, cfg["BLOCK_T"]), triton.cdiv(d_model, cfg["BLOCK_D"])),
        name="triton_embedding_gather",
        **cfg,
    )


@contract.backward(Config)
def scatter_add(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Table gradient of ``gather``: rows of ``grad_out`` added into rows ``ids mod V``.

    Ids outside ``[-vocab_size, vocab_size)`` contribute nothing. Accumulates with float32
    atomics (summation order of repeated ids is not deterministic).
    """
    num_tokens, d_model = grad_out.shape
    _no_interpreter(interpret)
    cfg = config.launch(d_model, grad_out.dtype.itemsize)
    _check_sizes(num_tokens, vocab_size, d_model, cfg["BLOCK_T"])
    if num_tokens == 0 or d_model == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    return compat.triton_call(
        grad_out,
        ids,
        num_tokens,
        vocab_size,
        d_model // cfg["VEC"],
        kernel=_scatter_add_kernel,
        out_shape=jax.ShapeDtypeStruct((vocab_size, d_model), jnp.float32),
        grid=(triton.cdiv(num_tokens, cfg["BLOCK_T"]), triton.cdiv(d_model, cfg["BLOCK_D"])),
        zeroed=True,
        name="triton_embedding_scatter_add",
        **cfg,
    )


@contract.backward(Config)
def segment_sum(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Deterministic table gradient of ``gather``: sort-based, no float atomics.

    Same semantics as ``scatter_add``, bit-reproducible: XLA sorts the ids by gradient
    row (``contract.segments``), then each program of ``_segment_sum_kernel`` sums its
    ``block_v`` rows' gradient rows in token order. A row's work is serial: use it for
    reproducibility, not speed.
    """
    num_tokens, d_model = grad_out.shape
    _no_interpreter(interpret)
    cfg = _segment_sum_launch(config, d_model)
    _check_sizes(num_tokens, vocab_size, d_model, cfg.pop("BLOCK_T"))
    if num_tokens == 0 or d_model == 0:
        return jnp.zeros((vocab_size, d_model), jnp.float32)
    num_row_blocks = triton.cdiv(vocab_size, config.block_v)
    order, bounds = contract.segments(ids, vocab_size, num_row_blocks * config.block_v)
    return compat.triton_call(
        grad_out,
        order,
        bounds,
        vocab_size,
        d_model // cfg["VEC"],
        kernel=_segment_sum_kernel,
        out_shape=jax.ShapeDtypeStruct((vocab_size, d_model), jnp.float32),
        grid=(num_row_blocks, triton.cdiv(d_model, cfg["BLOCK_D"])),
        name="triton_embedding_segment_sum",
        BLOCK_V=config.block_v,
        **cfg,
    )


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


# Each kernel's runtime arguments, in order, as its launcher passes them: a dtype for an
# array (None: the table's dtype), a name for a scalar (filled from the sizes).
_ARGUMENTS = {
    _gather_kernel: (
        ("ids_ptr", jnp.int32),
        ("table_ptr", None),
        ("n_tokens", "num_tokens"),
        ("vocab_size", "vocab_size"),
        ("d_model_over_vec", "d_model_over_vec"),
        ("out_ptr", None),
    ),
    _scatter_add_kernel: (
        ("grad_ptr", None),
        ("ids_ptr", jnp.int32),
        ("n_tokens", "num_tokens"),
        ("vocab_size", "vocab_size"),
        ("d_model_over_vec", "d_model_over_vec"),
        ("acc_ptr", jnp.float32),
    ),
    _segment_sum_kernel: (
        ("grad_ptr", None),
        ("order_ptr", jnp.int32),
        ("bounds_ptr", jnp.int32),
        ("vocab_size", "vocab_size"),
        ("d_model_over_vec", "d_model_over_vec"),
        ("out_ptr", jnp.float32),
    ),
}
_KERNELS = {
    "gather": _gather_kernel,
    "scatter_add": _scatter_add_kernel,
    "segment_sum": _segment_sum_kernel,
}


def compile_kernel(
    kernel: str,
    *,
    arch: int,
    dtype,
    d_model: int,
    num_tokens: int = 4096,
    vocab_size: int = 32000,
    config: Config | None = None,
    fn=None,
    vec: int | None = None,
):
    """Compile ``kernel`` (``"gather"``, ``"scatter_add"``, ``"segment_sum"``) for
    ``sm_{arch}`` without a GPU; returns the compiled kernel.

    Same arguments, metaparameters and specialisation as the launcher hands jax-triton;
    ``num_tokens`` and ``vocab_size`` only matter when 1 (then they become constexprs).
    ``dtype`` is the table's (the gradient's for the backwards; they accumulate in
    float32). Read the code from ``kernel.asm["ptx"]`` (also ``"ttir"``, ``"llir"``).
    ``fn`` (a stand-in ``@triton.jit`` kernel with the same arguments) and ``vec`` (in
    place of the launcher's ``VEC``) are for negative controls.
    """
    from triton.backends.compiler import GPUTarget

    dtype = contract.check_dtype("dtype", dtype)
    if d_model < 1:
        raise ValueError(f"{d_model=} must be at least 1")
    config = config or Config()
    if kernel == "segment_sum":
        cfg = _segment_sum_launch(config, d_model)
    else:
        cfg = config.launch(d_model, dtype.itemsize)
    cfg["VEC"] = vec or cfg["VEC"]
    sizes = {
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "d_model_over_vec": d_model // cfg["VEC"],
    }
    args = [
        (name, sizes[value] if isinstance(value, str) else (dtype if value is None else value))
        for name, value in _ARGUMENTS[_KERNELS[kernel]]
    ]
    blocks = {"BLOCK_V": config.block_v} if kernel == "segment_sum" else {"BLOCK_T": cfg["BLOCK_T"]}
    meta = {"VEC": cfg["VEC"], "BLOCK_D": cfg["BLOCK_D"], **blocks}
    options = {
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "num_ctas": 1,
        "enable_fp_fusion": True,
        "debug": False,
    }
    src = _jax_triton_source(fn or _KERNELS[kernel], args, meta)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ----------------------------------------------------------------------------------------
# custom_vjp wiring: the layer's "triton" backend.

lookup = contract.differentiable(gather, scatter_add, segment_sum)
