"""Tests for kernels/triton_gather.py.

Three layers, the first two without a GPU:
  * the kernels compiled to PTX for sm_80 / sm_90 with jax-triton's specialisation:
    128-bit row accesses where the row allows them, scalar ones where it does not, and
    64-bit row-offset arithmetic;
  * the kernels' logic run by Triton's CPU interpreter on torch CPU tensors, bit for bit
    against numpy (gather) and against np.add.at (scatter-add);
  * on a GPU (``-m gpu``), the jax-triton launchers against ``table[ids]`` and its grad.
"""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels import compat, contract
from kernels import triton_gather as tg
from tests import grid

try:  # Triton's CPU interpreter runs on torch tensors; the PTX tests need no torch.
    import torch
except ImportError:
    torch = None

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ARCHS = (80, 90)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Skipped per test, not per module, so the PTX and validation tests run on every stack.
needs_interpreter = pytest.mark.skipif(
    compat.triton_interpreter_problem() is not None,
    reason=str(compat.triton_interpreter_problem()),
)


def _torch_dtype(dtype):
    return getattr(torch, jnp.dtype(dtype).name)


def _bits(tensor):
    """``tensor``'s bits as a same-width integer tensor, for bit-exact comparison."""
    return tensor.view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _id(value) -> str:
    return str(value) if isinstance(value, int) else jnp.dtype(value).name


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU JAX backend")


def _edge_ids(vocab_size: int) -> list[int]:
    v = vocab_size
    return [0, v - 1, -1, -v, v, -v - 1, INT32_MIN, INT32_MAX]


def _make_ids(vocab_size: int, num_tokens: int, seed: int) -> np.ndarray:
    """Every edge id (as room allows), then random ids in [-2V, 2V], with repeats."""
    rng = np.random.default_rng(seed)
    edges = _edge_ids(vocab_size)
    rest = rng.integers(-2 * vocab_size, 2 * vocab_size + 1, size=max(num_tokens, 0))
    pool = np.concatenate([np.array(edges, np.int64), rest])
    ids = rng.permutation(pool[: max(num_tokens, len(edges))])[:num_tokens]
    return ids.astype(np.int32)


def _rows_read(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The rows the kernels' one helper reads (``contract.wrap_and_clamp``): the Triton
    twin ``_wrap_and_clamp`` is checked against it."""
    return np.asarray(contract.wrap_and_clamp(jnp.asarray(ids), vocab_size))


def _torch_table(shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(_torch_dtype(dtype))


def _launch_params(d_model, itemsize, block_t=None, block_d=None):
    cfg = tg.Config(block_t=block_t, block_d=block_d).launch(d_model, itemsize)
    return {k: cfg[k] for k in ("VEC", "BLOCK_T", "BLOCK_D")}


class _Interpreted:
    """``kernel`` in Triton's CPU interpreter, in-process, without TRITON_INTERPRET.

    The ``@triton.jit`` helpers the kernel calls are interpreted too, for the launch only,
    so other tests in the same process still see compiled kernels.
    """

    _HELPERS = ("_wrap_and_clamp", "_in_vocab", "_tokens", "_columns")

    def __init__(self, kernel):
        self._launch = InterpretedFunction(kernel.fn)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for name in self._HELPERS:
                    helper = InterpretedFunction(getattr(tg, name).fn)
                    stack.enter_context(mock.patch.object(tg, name, helper))
                return self._launch[grid](*args, **kwargs)

        return run


def _interpret_gather(table: torch.Tensor, ids: np.ndarray, **blocks) -> torch.Tensor:
    vocab_size, d_model = table.shape
    num_tokens = len(ids)
    meta = _launch_params(d_model, table.element_size(), **blocks)
    out = torch.full((num_tokens, d_model), float("nan"), dtype=table.dtype)
    grid = (
        triton.cdiv(num_tokens, meta["BLOCK_T"]),
        triton.cdiv(d_model, meta["BLOCK_D"]),
    )
    _Interpreted(tg._gather_kernel)[grid](
        torch.from_numpy(ids),
        table,
        num_tokens,
        vocab_size,
        d_model // meta["VEC"],
        out,
        **meta,
    )
    return out


def _interpret_scatter_add(grad: torch.Tensor, ids: np.ndarray, vocab_size, **blocks):
    num_tokens, d_model = grad.shape
    meta = _launch_params(d_model, grad.element_size(), **blocks)
    acc = torch.zeros((vocab_size, d_model), dtype=torch.float32)
    grid = (
        triton.cdiv(num_tokens, meta["BLOCK_T"]),
        triton.cdiv(d_model, meta["BLOCK_D"]),
    )
    _Interpreted(tg._scatter_add_kernel)[grid](
        grad,
        torch.from_numpy(ids),
        num_tokens,
        vocab_size,
        d_model // meta["VEC"],
        acc,
        **meta,
    )
    return acc


def _interpret_segment_sum(
    grad: torch.Tensor, ids: np.ndarray, vocab_size, block_v=8, block_d=None
):
    num_tokens, d_model = grad.shape
    config = tg.Config(block_v=block_v, block_d=block_d)
    meta = config.launch(d_model, 4)
    num_rows = triton.cdiv(vocab_size, block_v) * block_v
    order, bounds = contract.segments(jnp.asarray(ids), vocab_size, num_rows)
    out = torch.full((vocab_size, d_model), float("nan"), dtype=torch.float32)
    grid = (num_rows // block_v, triton.cdiv(d_model, meta["BLOCK_D"]))
    _Interpreted(tg._segment_sum_kernel)[grid](
        grad,
        torch.from_numpy(np.array(order)),
        torch.from_numpy(np.array(bounds)),
        vocab_size,
        d_model // meta["VEC"],
        out,
        VEC=meta["VEC"],
        BLOCK_V=block_v,
        BLOCK_D=meta["BLOCK_D"],
    )
    return out


# ---------------------------------------------------------------------------------------
# Triton interpreter (CPU): the kernels' logic, bit for bit.


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 129])
@pytest.mark.parametrize("d_model", [1, 3, 64, 129, 768])
@pytest.mark.parametrize("vocab_size", [1, 7, 1000])
def test_interpreted_gather_matches_numpy(vocab_size, d_model, num_tokens, dtype):
    table = _torch_table((vocab_size, d_model), dtype, seed=vocab_size + d_model)
    ids = _make_ids(vocab_size, num_tokens, seed=num_tokens)
    out = _interpret_gather(table, ids)
    expected = _bits(table).numpy()[_rows_read(ids, vocab_size)]
    np.testing.assert_array_equal(_bits(out).numpy(), expected)


@needs_interpreter
@pytest.mark.parametrize(
    ("d_model", "block_t", "block_d"),
    [(3, 1, 1), (3, 2, 4), (129, 8, 2), (129, 2, 4), (768, 4, 128), (768, 64, 512)],
)
def test_interpreted_gather_any_blocks(d_model, block_t, block_d):
    """Tiles smaller or larger than the defaults: masks on both axes, many programs."""
    vocab_size, num_tokens = 7, 33
    table = _torch_table((vocab_size, d_model), jnp.float32, seed=d_model)
    ids = _make_ids(vocab_size, num_tokens, seed=1)
    out = _interpret_gather(table, ids, block_t=block_t, block_d=block_d)
    expected = table.view(torch.int32).numpy()[_rows_read(ids, vocab_size)]
    np.testing.assert_array_equal(out.view(torch.int32).numpy(), expected)


@needs_interpreter
def test_interpreted_gather_edge_ids_read_expected_rows():
    """Rows spelled out by hand, not through the numpy helper."""
    vocab_size = 7
    table = torch.arange(vocab_size, dtype=torch.float32)[:, None].repeat(1, 5)
    ids = np.array(_edge_ids(vocab_size), np.int32)
    out = _interpret_gather(table, ids)
    # 0, V-1, -1, -V, V, -V-1, int32 min, int32 max
    np.testing.assert_array_equal(out[:, 0].numpy(), [0, 6, 6, 0, 6, 0, 0, 6])


@needs_interpreter
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=_id)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 129])
@pytest.mark.parametrize("d_model", [1, 3, 64, 129])
@pytest.mark.parametrize("vocab_size", [1, 7, 1000])
def test_interpreted_scatter_add_matches_numpy(vocab_size, d_model, num_tokens, dtype):
    grad = _torch_table((num_tokens, d_model), dtype, seed=d_model)
    # Few distinct ids, so most rows receive several updates.
    rng = np.random.default_rng(vocab_size)
    pool = np.array(_edge_ids(vocab_size) + [2, 3, -2], np.int32)
    ids = rng.choice(pool, size=num_tokens)
    acc = _interpret_scatter_add(grad, ids, vocab_size)
    expected = grid.grad_in_token_order(grad.float().numpy(), ids, vocab_size)
    np.testing.assert_allclose(acc.numpy(), expected, rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_interpreted_scatter_add_duplicates_small_blocks():
    """Duplicates spread across programs and column blocks all land in the same row."""
    vocab_size, d_model, num_tokens = 5, 6, 64
    grad = torch.ones((num_tokens, d_model), dtype=torch.float32)
    ids = np.array([3, -2, 5, -6] * (num_tokens // 4), np.int32)  # 3, 3, dropped, dropped
    acc = _interpret_scatter_add(grad, ids, vocab_size, block_t=4, block_d=2)
    expected = np.zeros((vocab_size, d_model), np.float32)
    expected[3] = num_tokens // 2
    np.testing.assert_array_equal(acc.numpy(), expected)


@needs_interpreter
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=_id)
@pytest.mark.parametrize(
    ("vocab_size", "d_model", "num_tokens", "block_v", "block_d"),
    [(1, 1, 7, 8, None), (7, 3, 129, 8, None), (7, 129, 129, 2, 32), (1000, 64, 129, 16, None)],
)
def test_interpreted_segment_sum_adds_in_token_order(
    vocab_size, d_model, num_tokens, block_v, block_d, dtype
):
    """Bit for bit the float32 sum in token order (np.add.at adds in index order)."""
    grad = _torch_table((num_tokens, d_model), dtype, seed=d_model)
    rng = np.random.default_rng(vocab_size)
    pool = np.array(_edge_ids(vocab_size) + [2, 3, -2], np.int32)
    ids = rng.choice(pool, size=num_tokens)
    out = _interpret_segment_sum(grad, ids, vocab_size, block_v=block_v, block_d=block_d)
    expected = grid.grad_in_token_order(grad.float().numpy(), ids, vocab_size)
    np.testing.assert_array_equal(out.view(torch.int32).numpy(), expected.view(np.int32))


@triton.jit
def _gather_kernel_32_bit_offsets(
    ids_ptr, table_ptr, n_tokens, vocab_size, d_model_over_vec, out_ptr, VEC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Negative control for the 64-bit check: ``_gather_kernel`` without the int64 casts."""
    d_model = d_model_over_vec * VEC
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < n_tokens
    ids = tl.load(ids_ptr + toks, mask=tok_mask, other=0)
    rows = tl.minimum(tl.maximum(tl.where(ids < 0, ids + vocab_size, ids), 0), vocab_size - 1)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = tok_mask[:, None] & (cols < d_model)[None, :]
    vals = tl.load(table_ptr + rows[:, None] * d_model + cols[None, :], mask=mask)
    tl.store(out_ptr + toks[:, None] * d_model + cols[None, :], vals, mask=mask)


# ---------------------------------------------------------------------------------------
# PTX, compiled for sm_80 / sm_90 with no GPU present.

_GLOBAL_ACCESS = re.compile(r"\b((?:ld|st|atom|red)\.global[.\w]*)")


def _accesses(ptx: str, kind: str) -> list[str]:
    return [m for m in _GLOBAL_ACCESS.findall(ptx) if m.startswith(kind + ".")]


def _assert_row_offsets_are_64_bit(ptx: str) -> None:
    """Every multiply by the row stride (``d_model``) produces a 64-bit result.

    ``d_model`` is the register loaded from the 5th parameter (``d_model // VEC``), shifted
    left by log2(VEC) when VEC > 1. Its products with row and token indices must be
    ``mul.wide.s32`` / ``mad.wide.s32`` (32 x 32 -> 64 bits) or 64-bit multiplies, never
    a 32-bit ``mul.lo.s32`` that would wrap for tables of 2**31 elements or more.
    """
    param = re.search(r"ld\.param\.b32\s+(%r\d+),\s*\[\w+_param_4\]", ptx)
    assert param, "d_model // VEC parameter not found"
    stride = param.group(1)
    shifted = re.search(rf"shl\.b32\s+(%r\d+),\s*{re.escape(stride)},\s*\d+;", ptx)
    if shifted:
        stride = shifted.group(1)
    regs = {stride}
    for m in re.finditer(rf"cvt\.[su]64\.[su]32\s+(%rd\d+),\s*{re.escape(stride)};", ptx):
        regs.add(m.group(1))
    products = []
    for line in ptx.splitlines():
        m = re.match(r"\s*((?:mul|mad)\.[\w.]+)\s+%\w+,\s*(.*);", line)
        if m and set(re.findall(r"%\w+", m.group(2))) & regs:
            products.append(m.group(1))
    assert products, "no multiply by d_model found"
    bad = [op for op in products if not (".wide.s32" in op or op.endswith(".s64"))]
    assert not bad, f"32-bit row-offset arithmetic: {bad}"


VECTOR_CASES = [
    (jnp.float32, 64),
    (jnp.float32, 768),
    (jnp.float32, 4096),
    (jnp.bfloat16, 64),
    (jnp.bfloat16, 768),
    (jnp.bfloat16, 4096),
    (jnp.float16, 768),
    (jnp.float16, 2056),
]


@pytest.mark.parametrize(("dtype", "d_model"), VECTOR_CASES, ids=_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_gather_ptx_uses_128_bit_row_accesses(arch, dtype, d_model):
    ptx = tg.compile_kernel("gather", arch=arch, dtype=dtype, d_model=d_model).asm["ptx"]
    assert f".target sm_{arch}" in ptx
    stores = _accesses(ptx, "st")
    assert stores and all(s == "st.global.v4.b32" for s in stores), sorted(set(stores))
    assert "ld.global.v4.b32" in _accesses(ptx, "ld")
    _assert_row_offsets_are_64_bit(ptx)


ODD_CASES = [
    (jnp.float32, 7),
    (jnp.float32, 129),
    (jnp.bfloat16, 771),
    (jnp.float16, 3),
]


@pytest.mark.parametrize(("dtype", "d_model"), ODD_CASES, ids=_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_gather_ptx_odd_rows_are_not_vectorised(arch, dtype, d_model):
    """Negative control: the vector check can fail."""
    ptx = tg.compile_kernel("gather", arch=arch, dtype=dtype, d_model=d_model).asm["ptx"]
    bits = 8 * jnp.dtype(dtype).itemsize
    stores = _accesses(ptx, "st")
    assert stores and all(s == f"st.global.b{bits}" for s in stores), sorted(set(stores))
    assert not [a for a in _accesses(ptx, "ld") if ".v" in a]
    _assert_row_offsets_are_64_bit(ptx)


@pytest.mark.parametrize("arch", ARCHS)
def test_gather_ptx_16_bit_rows_of_4_get_64_bit_vectors(arch):
    ptx = tg.compile_kernel("gather", arch=arch, dtype=jnp.bfloat16, d_model=4 * 193).asm["ptx"]
    stores = _accesses(ptx, "st")
    assert stores and all(s == "st.global.v2.b32" for s in stores), sorted(set(stores))


@pytest.mark.parametrize("arch", ARCHS)
def test_gather_ptx_without_vec_fact_is_scalar(arch):
    """Why VEC exists: d_model=768 passed as a plain jax-triton scalar (no divisibility
    fact, VEC=1) compiles to scalar accesses."""
    ptx = tg.compile_kernel("gather", arch=arch, dtype=jnp.float32, d_model=768, vec=1).asm["ptx"]
    assert set(_accesses(ptx, "st")) == {"st.global.b32"}


@pytest.mark.parametrize("arch", ARCHS)
def test_64_bit_check_catches_32_bit_offsets(arch):
    """Negative control: the same kernel with 32-bit offsets fails the 64-bit check."""
    kernel = tg.compile_kernel(
        "gather", arch=arch, dtype=jnp.float32, d_model=768, fn=_gather_kernel_32_bit_offsets
    )
    ptx = kernel.asm["ptx"]
    with pytest.raises(AssertionError, match="32-bit row-offset arithmetic"):
        _assert_row_offsets_are_64_bit(ptx)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_gather_ptx_with_unit_scalars(arch, dtype):
    """Scalars equal to 1 become constexprs under jax-triton: still compiles and vectorises."""
    kernel = tg.compile_kernel(
        "gather", arch=arch, dtype=dtype, d_model=64, num_tokens=1, vocab_size=1
    )
    assert "st.global.v4.b32" in kernel.asm["ptx"]


SCATTER_CASES = [
    (jnp.float32, 768),
    (jnp.bfloat16, 768),
    (jnp.float16, 64),
    (jnp.float32, 7),
]


@pytest.mark.parametrize(("dtype", "d_model"), SCATTER_CASES, ids=_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_scatter_add_ptx(arch, dtype, d_model):
    ptx = tg.compile_kernel("scatter_add", arch=arch, dtype=dtype, d_model=d_model).asm["ptx"]
    assert f".target sm_{arch}" in ptx
    atomics = _accesses(ptx, "atom") + _accesses(ptx, "red")
    assert atomics and all(a.endswith(".f32") and ".add" in a for a in atomics), atomics
    if d_model % (16 // jnp.dtype(dtype).itemsize) == 0:
        assert "ld.global.v4.b32" in _accesses(ptx, "ld")  # grad rows
    _assert_row_offsets_are_64_bit(ptx)


@pytest.mark.parametrize(("dtype", "d_model"), SCATTER_CASES, ids=_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_segment_sum_ptx_has_no_atomics(arch, dtype, d_model):
    ptx = tg.compile_kernel("segment_sum", arch=arch, dtype=dtype, d_model=d_model).asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert not _accesses(ptx, "atom") and not _accesses(ptx, "red")
    stores = _accesses(ptx, "st")
    if d_model >= 256:  # A float32 tile of 256 or more: vector stores (2+ lanes a thread).
        assert stores and all(s in ("st.global.v2.b32", "st.global.v4.b32") for s in stores)
    _assert_row_offsets_are_64_bit(ptx)


# ---------------------------------------------------------------------------------------
# Block sizes and launcher validation (CPU).


@pytest.mark.parametrize("itemsize", [4, 2])
@pytest.mark.parametrize("d_model", [1, 3, 7, 64, 129, 768, 1000, 4096, 5120, 50257])
def test_block_sizes(d_model, itemsize):
    block_t, block_d = tg._block_sizes(d_model, itemsize)
    for b in (block_t, block_d):
        assert b >= 1 and b & (b - 1) == 0
    assert block_d * itemsize <= 4096
    assert block_t * block_d * itemsize <= 16 * 1024 or block_d == 1
    assert block_d >= min(d_model, 512 // itemsize)
    vec = tg._vector_width(d_model, itemsize)
    assert d_model % vec == 0 and vec * itemsize <= 16


def test_gather_validates_inputs():
    table = jnp.zeros((4, 8), jnp.float32)
    ids = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="table.shape"):
        tg.gather(jnp.zeros((4,), jnp.float32), ids)
    with pytest.raises(TypeError, match="table.dtype"):
        tg.gather(table.astype(jnp.int32), ids)
    with pytest.raises(ValueError, match="ids.shape"):
        tg.gather(table, ids[None])
    with pytest.raises(ValueError, match="ids.dtype"):
        tg.gather(table, ids.astype(jnp.uint32))
    with pytest.raises(ValueError, match="block_d"):
        tg.Config(block_d=3)
    with pytest.raises(ValueError, match="vocab_size"):
        tg.gather(jnp.zeros((0, 8), jnp.float32), ids)
    with pytest.raises(ValueError, match="ids.shape"):
        tg.scatter_add(jnp.zeros((2, 8), jnp.float32), ids, vocab_size=4)
    with pytest.raises(TypeError, match="grad_out.dtype"):
        tg.scatter_add(jnp.zeros((3, 8), jnp.int32), ids, vocab_size=4)
    with pytest.raises(ValueError, match="interpret=True must be False"):
        tg.gather(table, ids, interpret=True)


def test_empty_inputs_do_not_launch():
    table = jnp.ones((5, 8), jnp.bfloat16)
    ids = jnp.zeros((0,), jnp.int32)
    out = tg.gather(table, ids)
    assert out.shape == (0, 8) and out.dtype == jnp.bfloat16
    for backward in (tg.scatter_add, tg.segment_sum):
        grad = backward(jnp.zeros((0, 8), jnp.bfloat16), ids, vocab_size=5)
        assert grad.shape == (5, 8) and grad.dtype == jnp.float32 and not grad.any()


def test_without_jax_triton_says_what_is_needed():
    try:
        compat.import_jax_triton()
    except RuntimeError:
        pass
    else:
        pytest.skip("jax_triton imports here")
    with pytest.raises(RuntimeError, match='"triton" backend needs a CUDA GPU'):
        tg.gather(jnp.ones((5, 8), jnp.float32), jnp.zeros((3,), jnp.int32))


# ---------------------------------------------------------------------------------------
# GPU: the launchers through jax-triton.


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    ("vocab_size", "d_model", "num_tokens"),
    [
        (1, 1, 7),
        (7, 3, 129),
        (1000, 64, 129),
        (1000, 129, 1),
        (1000, 768, 129),
        (50, 4096, 33),
    ],
)
def test_gpu_gather_matches_indexing(vocab_size, d_model, num_tokens, dtype):
    key = jax.random.key(vocab_size * d_model)
    table = jax.random.normal(key, (vocab_size, d_model), jnp.float32).astype(dtype)
    ids = jnp.asarray(_make_ids(vocab_size, num_tokens, seed=num_tokens))
    out = jax.jit(tg.gather)(table, ids)
    expected = table[ids]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_array_equal(
        np.asarray(out).view(np.uint8), np.asarray(expected).view(np.uint8)
    )


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    ("vocab_size", "d_model", "num_tokens"),
    [(1, 1, 7), (7, 3, 129), (1000, 768, 129), (50, 4096, 513)],
)
def test_gpu_scatter_add_matches_grad_of_indexing(vocab_size, d_model, num_tokens, dtype):
    rng = np.random.default_rng(0)
    pool = np.array(_edge_ids(vocab_size) + [2 % vocab_size, -2 % vocab_size], np.int32)
    ids = jnp.asarray(rng.choice(pool, size=num_tokens))  # Many duplicates.
    key = jax.random.key(1)
    grad_out = jax.random.normal(key, (num_tokens, d_model), jnp.float32).astype(dtype)
    table = jnp.zeros((vocab_size, d_model), dtype)
    _, vjp = jax.vjp(lambda t: t[ids], table)
    (expected,) = vjp(grad_out)
    out = jax.jit(tg.scatter_add, static_argnums=2)(grad_out, ids, vocab_size)
    assert out.dtype == dtype and out.shape == (vocab_size, d_model)
    grad_f32 = np.asarray(grad_out.astype(jnp.float32))
    reference = grid.grad_in_token_order(grad_f32, np.asarray(ids), vocab_size)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(expected, np.float32),
        rtol=tol,
        atol=tol,
    )


@pytest.mark.gpu
@pytest.mark.large
@on_gpu
def test_gpu_gather_large_table_64_bit_offsets():
    """vocab_size * d_model > 2**31 elements (bfloat16, 4.3 GB): the last rows are read
    from the right place."""
    vocab_size, d_model = (2**31 // 4096) + 8, 4096
    table = jnp.zeros((vocab_size, d_model), jnp.bfloat16)
    table = table.at[-8:].set(jnp.arange(8, dtype=jnp.bfloat16)[:, None] + 1)
    ids = jnp.array([vocab_size - 1, vocab_size - 8, 0, -1, INT32_MAX], jnp.int32)
    out = tg.gather(table, ids)
    np.testing.assert_array_equal(np.asarray(out[:, 0], np.float32), [8, 1, 0, 8, 8])
    np.testing.assert_array_equal(np.asarray(out[:, -1], np.float32), [8, 1, 0, 8, 8])
