"""The Mosaic GPU gather and both backwards: GPU-interpreter numerics and cuda lowering.

Numerics run in JAX's Mosaic GPU interpreter on CPU (JAX >= 0.11), which simulates
SMEM, TMA copies and barriers program by program; it is slow (seconds per case at 1000
tokens), so the grid here is a subset of ``grid.GATHER_CASES`` that still holds every
value of every axis: all cases of at most 129 tokens, plus the 1000-token case of a
small table at ``d_model`` 64. ``segment_sum`` costs the interpreter about 5 ms per vocabulary row
whatever the tokens (each program walks its rows), so its grid leaves out the GPT-2
vocabulary (minutes); the lowering tests cover that size.

The interpreter has no atomics: ``scatter_add``'s one add step runs as read-add-write
there (``kernels/mosaic_gather.py``), and only a GPU runs the TMA reduction itself
(``tests/embed/test_backends.py``, compiled).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import compat, mosaic_gather, reference
from tests import grid

PROBLEM = compat.mosaic_gpu_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))

MOSAIC_CALL = "@mosaic_gpu_v2"
INTERPRETED_CASES = [c for c in grid.GATHER_CASES if c[3] <= 129 or c[1:3] in ((1, 64), (7, 64))]
SEGMENT_SUM_CASES = [c for c in INTERPRETED_CASES if c[1] <= 7]


def test_interpreted_cases_cover_every_axis_value():
    for axis, values in enumerate([grid.DTYPES, grid.VOCAB_SIZES, grid.D_MODELS, grid.NUM_TOKENS]):
        assert {c[axis] for c in INTERPRETED_CASES} == set(values)


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=grid.case_id)
def test_gather_interpret_matches_reference(case):
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    out = mosaic_gather.gather(table, ids, interpret=True)
    grid.assert_bits_equal(out, reference.gather_reference(table, ids))


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=grid.case_id)
def test_scatter_add_matches_reference(case):
    dtype, vocab_size, d_model, num_tokens = case
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    grad_out = grid.normal((num_tokens, d_model), dtype, seed=1)
    grad = mosaic_gather.scatter_add(grad_out, ids, vocab_size=vocab_size, interpret=True)
    assert grad.dtype == jnp.float32
    # Float32 sums of up to 1000 unit normals in another order differ by far less than 1e-4.
    expected = reference.gather_grad_reference(grad_out, ids, vocab_size)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", SEGMENT_SUM_CASES, ids=grid.case_id)
def test_segment_sum_adds_in_token_order(case):
    dtype, vocab_size, d_model, num_tokens = case
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    grad_out = grid.normal((num_tokens, d_model), dtype, seed=1)
    grad = mosaic_gather.segment_sum(grad_out, ids, vocab_size=vocab_size, interpret=True)
    grid.assert_bits_equal(grad, grid.grad_in_token_order(grad_out, ids, vocab_size))


@pytest.mark.parametrize("kernel", ["gather", "segment_sum"])
def test_interpreter_finds_no_races(kernel, monkeypatch):
    # The interpreter's race detector (vector clocks over SMEM, GMEM, TMA and barriers)
    # checks the synchronisation a GPU needs. scatter_add is left out: its interpreter-only
    # read-add-write of shared rows is a race by design (the GPU path is the TMA reduction).
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    params = plgpu.InterpretGPUParams(detect_races=True)
    monkeypatch.setattr(compat, "mosaic_gpu_interpret_params", lambda: params)
    vocab_size, d_model, num_tokens = 5, 96, 70  # Shapes no other test jits.
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens)).at[10:40].set(3)
    if kernel == "gather":
        table = grid.make_table(vocab_size, d_model, jnp.float32)
        grid.assert_bits_equal(mosaic_gather.gather(table, ids, interpret=True), table[ids])
    else:
        grad_out = grid.normal((num_tokens, d_model), seed=1)
        grad = mosaic_gather.segment_sum(grad_out, ids, vocab_size=vocab_size, interpret=True)
        grid.assert_bits_equal(grad, grid.grad_in_token_order(grad_out, ids, vocab_size))


def test_nan_and_signed_zero_rows_are_copied_bit_for_bit():
    table = jnp.array([[jnp.nan, -0.0], [jnp.inf, 0.0]], jnp.float32)
    ids = jnp.array([1, 0, -2, 5, grid.INT32_MIN, grid.INT32_MAX], jnp.int32)
    grid.assert_bits_equal(mosaic_gather.gather(table, ids, interpret=True), table[ids])


@pytest.mark.parametrize(("block_t", "block_d"), [(32, 32), (96, 64), (64, 256)])
def test_explicit_blocks(block_t, block_d):
    table = grid.make_table(11, 129, jnp.float32)
    ids = jnp.asarray(grid.make_ids(11, 100))
    config = mosaic_gather.Config(block_t=block_t, block_d=block_d)
    out = mosaic_gather.gather(table, ids, config=config, interpret=True)
    grid.assert_bits_equal(out, table[ids])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_t": 16}, "block_t=16 must be a positive multiple of 32"),
        ({"block_d": 48}, "block_d=48 must be a positive multiple of 32 up to 256"),
        ({"block_d": 512}, "block_d=512 must be a positive multiple of 32 up to 256"),
    ],
)
def test_block_sizes_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mosaic_gather.Config(**kwargs)


def test_segment_sum_blocks_are_validated():
    with pytest.raises(ValueError, match="block_v=8 must be a positive multiple of 32"):
        mosaic_gather.Config(block_v=8)
    with pytest.raises(ValueError, match="segment_block_d=64 must be a positive multiple of 128"):
        mosaic_gather.Config(segment_block_d=64)


def test_operands_are_validated():
    with pytest.raises(ValueError, match="must be a 1-D int32 array"):
        mosaic_gather.gather(jnp.zeros((4, 8)), jnp.zeros((4,), jnp.float32))
    with pytest.raises(TypeError, match="table.dtype=dtype\\('int32'\\) must be one of"):
        mosaic_gather.gather(jnp.zeros((4, 8), jnp.int32), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize(
    ("num_tokens", "d_model", "itemsize", "expected"),
    [
        (1000, 768, 4, (64, 256)),
        (1000, 768, 2, (64, 256)),
        (7, 129, 4, (32, 160)),
        (1, 1, 2, (32, 64)),
        (33, 4096, 4, (64, 256)),
    ],
)
def test_default_block_sizes(num_tokens, d_model, itemsize, expected):
    assert mosaic_gather.block_sizes(num_tokens, d_model, itemsize) == expected


def _vjp(table, ids, cotangent, deterministic):
    _, vjp = jax.vjp(lambda t: mosaic_gather.lookup(t, ids, True, deterministic), table)
    return vjp(cotangent)[0]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ids_kind", ["all_equal", "edges"])
def test_gradient_matches_float32_reference(deterministic, dtype, ids_kind):
    vocab_size, d_model, num_tokens = 97, 129, 64
    if ids_kind == "all_equal":
        ids = jnp.full((num_tokens,), 5, jnp.int32)
    else:
        ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    table = grid.make_table(vocab_size, d_model, dtype)
    # The cotangent reaching the backward has the table's dtype (the layer's output).
    cotangent = grid.normal((num_tokens, d_model), dtype, seed=1)
    grad = _vjp(table, ids, cotangent, deterministic)
    assert grad.dtype == dtype
    if deterministic:  # The float32 sum in token order, rounded once to the dtype.
        grid.assert_bits_equal(
            grad, grid.grad_in_token_order(cotangent, ids, vocab_size).astype(dtype)
        )
    # A 16-bit result rounds a float32 sum once, so it may land one ulp from the oracle's.
    expected = reference.gather_grad_reference(cotangent, ids, vocab_size).astype(dtype)
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=1e-4
    )


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_out_of_range_ids_add_nothing_to_the_gradient(deterministic):
    table = jnp.zeros((4, 2))
    ids = jnp.array([3, -1, -4, -5, 4, grid.INT32_MAX, grid.INT32_MIN], jnp.int32)
    grad = _vjp(table, ids, jnp.ones((ids.size, 2)), deterministic)
    np.testing.assert_array_equal(grad[:, 0], [1.0, 0.0, 0.0, 2.0])


# ---------------------------------------------------------------------------------------
# Lowering for cuda on this CPU host: the Mosaic GPU custom call, for each kernel.


def _lower(fn, *args, platforms=("cuda",)):
    return compat.lower(fn, *args, platforms=platforms).as_text()


def _grad(deterministic):
    def grad(table, ids):
        def loss(t):
            return mosaic_gather.lookup(t, ids, False, deterministic).astype(jnp.float32).sum()

        return jax.grad(loss)(table)

    return grad


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(("vocab_size", "d_model", "num_tokens"), [(50257, 768, 1000), (7, 129, 3)])
def test_gather_lowers_to_a_mosaic_gpu_call_for_cuda(dtype, vocab_size, d_model, num_tokens):
    table, ids = S((vocab_size, d_model), dtype), S((num_tokens,), jnp.int32)
    text = _lower(mosaic_gather.gather, table, ids)
    assert text.count(MOSAIC_CALL) == 1
    assert "mosaic_embedding_gather_block_t_" in text


@pytest.mark.parametrize(
    ("deterministic", "kernel"),
    [(False, "mosaic_embedding_scatter_add_"), (True, "mosaic_embedding_segment_sum_")],
)
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_backward_lowers_to_a_mosaic_gpu_call_for_cuda(deterministic, kernel, dtype):
    text = _lower(_grad(deterministic), S((50, 129), dtype), S((77,), jnp.int32))
    assert text.count(MOSAIC_CALL) == 1  # The forward's output is unused, so dropped.
    assert kernel in text


def test_past_two_to_the_31_elements_lowers_without_offsets_of_ours():
    # 2**22 rows of 1024 bfloat16: 2**32 elements. TMA takes row and column coordinates,
    # each below 2**31, from a 64-bit base: nothing here may fail to lower or overflow.
    table = S((1 << 22, 1024), jnp.bfloat16)
    text = _lower(mosaic_gather.gather, table, S((64,), jnp.int32))
    assert text.count(MOSAIC_CALL) == 1
    text = _lower(_grad(False), table, S((64,), jnp.int32))
    assert text.count(MOSAIC_CALL) == 1


def test_cpu_lowering_of_interpret_mode_has_no_mosaic_gpu_call():
    text = _lower(
        functools.partial(mosaic_gather.gather, interpret=True),
        S((7, 5), jnp.float32),
        S((3,), jnp.int32),
        platforms=("cpu",),
    )
    assert MOSAIC_CALL not in text
