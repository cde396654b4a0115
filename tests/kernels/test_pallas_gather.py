"""The Pallas gather and its backward against ``kernels/reference.py``, in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import pallas_gather, reference
from tests import grid


@pytest.mark.parametrize("case", grid.GATHER_CASES, ids=grid.case_id)
def test_gather_interpret_matches_reference(case):
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    out = pallas_gather.gather(table, ids, interpret=True)
    grid.assert_bits_equal(out, reference.gather_reference(table, ids))


@pytest.mark.parametrize(("block_t", "block_d"), [(1, 1), (4, 16), (64, 512)])
def test_explicit_blocks_that_do_not_divide_the_shape(block_t, block_d):
    table = grid.make_table(11, 129, jnp.float32)
    ids = jnp.asarray(grid.make_ids(11, 37))
    config = pallas_gather.Config(block_t=block_t, block_d=block_d)
    out = pallas_gather.gather(table, ids, config=config, interpret=True)
    grid.assert_bits_equal(out, table[ids])


def test_nan_and_signed_zero_rows_are_copied_bit_for_bit():
    table = jnp.array([[jnp.nan, -0.0], [jnp.inf, 0.0]], jnp.float32)
    ids = jnp.array([1, 0, -2, 5], jnp.int32)
    grid.assert_bits_equal(pallas_gather.gather(table, ids, interpret=True), table[ids])


@pytest.mark.parametrize(("name", "value"), [("block_t", 3), ("block_d", 0), ("block_d", 48)])
def test_block_sizes_must_be_powers_of_two(name, value):
    with pytest.raises(ValueError, match=f"{name}={value} must be a positive power of two"):
        pallas_gather.Config(**{name: value})


def test_operands_are_validated():
    with pytest.raises(ValueError, match="must be a 1-D int32 array"):
        pallas_gather.gather(jnp.zeros((4, 8)), jnp.zeros((4,), jnp.float32))
    with pytest.raises(TypeError, match="table.dtype=dtype\\('int32'\\) must be one of"):
        pallas_gather.gather(jnp.zeros((4, 8), jnp.int32), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize(
    ("num_tokens", "d_model", "itemsize", "expected"),
    [
        (1000, 768, 4, (16, 256)),
        (1000, 4096, 2, (8, 1024)),
        (3, 129, 4, (4, 256)),
        (0, 1, 4, (1, 1)),
    ],
)
def test_default_block_sizes(num_tokens, d_model, itemsize, expected):
    assert pallas_gather.block_sizes(num_tokens, d_model, itemsize) == expected


def _grads(table, ids, cotangent):
    def loss(fn):
        return lambda t: jnp.vdot(fn(t).astype(jnp.float32), cotangent)

    kernel = jax.grad(loss(lambda t: pallas_gather.lookup(t, ids, True)))(table)
    xla = jax.grad(loss(lambda t: t[ids]))(table)
    return kernel, xla


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(("vocab_size", "d_model"), [(1, 1), (7, 3), (50, 129), (1000, 64)])
def test_gradient_with_unique_ids_is_bit_identical_to_xla(dtype, vocab_size, d_model):
    ids = np.random.default_rng(0).permutation(vocab_size)[: min(vocab_size, 40)]
    ids = jnp.asarray(np.where(np.arange(ids.size) % 2, ids - vocab_size, ids), jnp.int32)
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = grid.normal((ids.size, d_model), seed=1)
    kernel, xla = _grads(table, ids, cotangent)
    grid.assert_bits_equal(kernel, xla)


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ids_kind", ["all_equal", "zipf", "edges"])
def test_gradient_with_duplicates_matches_float32_reference(dtype, ids_kind):
    vocab_size, d_model, num_tokens = 97, 129, 1000
    rng = np.random.default_rng(0)
    if ids_kind == "all_equal":
        ids = np.full(num_tokens, 5)
    elif ids_kind == "zipf":
        ids = (rng.zipf(1.3, num_tokens) - 1) % vocab_size
    else:
        ids = grid.make_ids(vocab_size, num_tokens)
    ids = jnp.asarray(ids, jnp.int32)
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = grid.normal((num_tokens, d_model), seed=1)
    kernel, _ = _grads(table, ids, cotangent)
    # The layer's output, and so the cotangent reaching the backward, has the table's dtype.
    expected = reference.gather_grad_reference(cotangent.astype(dtype), ids, vocab_size)
    # Float32 sums of up to 1000 unit normals in another order differ by far less than
    # 1e-4. A 16-bit table rounds that float32 sum once, so it may land one ulp apart.
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(kernel, np.float32),
        np.asarray(expected.astype(dtype), np.float32),
        rtol=rtol,
        atol=1e-4,
    )


def test_out_of_range_ids_add_nothing_to_the_gradient():
    table = jnp.zeros((4, 2))
    ids = jnp.array([3, -1, -4, -5, 4, grid.INT32_MAX, grid.INT32_MIN], jnp.int32)
    grad = jax.grad(lambda t: pallas_gather.lookup(t, ids, True).sum())(table)
    np.testing.assert_array_equal(grad[:, 0], [1.0, 0.0, 0.0, 2.0])
