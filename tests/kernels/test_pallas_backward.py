"""The deterministic Pallas backward (``segment_sum``) against the reference, in interpret mode.

``segment_sum`` promises more than a tolerance: each row's gradient rows are summed in
float32 in token order. That order is checked bit for bit against ``np.add.at``, which
adds in index order, and so is its consequence: the result does not depend on the
tiling, on the run, or on how tokens of different rows interleave.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import compat, contract, pallas_gather, reference
from tests import grid


def _duplicated_ids(kind, vocab_size, num_tokens):
    rng = np.random.default_rng(0)
    if kind == "all_equal":
        return np.full(num_tokens, 5, np.int32)
    if kind == "zipf":
        return ((rng.zipf(1.3, num_tokens) - 1) % vocab_size).astype(np.int32)
    return grid.make_ids(vocab_size, num_tokens)  # "edges": the edge ids, then uniform.


@pytest.mark.parametrize("case", grid.GATHER_CASES, ids=grid.case_id)
def test_segment_sum_matches_reference(case):
    dtype, vocab_size, d_model, num_tokens = case
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    grad_out = grid.normal((num_tokens, d_model), dtype, seed=1)
    grad = pallas_gather.segment_sum(grad_out, ids, vocab_size=vocab_size, interpret=True)
    assert grad.dtype == jnp.float32
    grid.assert_bits_equal(grad, grid.grad_in_token_order(grad_out, ids, vocab_size))
    # The oracle sums in some order of its own; float32 sums of up to 1000 unit normals
    # in two orders differ by far less than 1e-4.
    expected = reference.gather_grad_reference(grad_out, ids, vocab_size)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ids_kind", ["all_equal", "zipf", "edges"])
def test_deterministic_gradient_matches_float32_reference(dtype, ids_kind):
    vocab_size, d_model, num_tokens = 97, 129, 1000
    ids = jnp.asarray(_duplicated_ids(ids_kind, vocab_size, num_tokens))
    table = grid.make_table(vocab_size, d_model, dtype)
    # The layer's output, and so the cotangent reaching the backward, has the table's
    # dtype. It is passed in as such: a float32 cotangent cast inside the jitted graph
    # may skip the rounding on CPU (XLA's excess-precision simplification).
    cotangent = grid.normal((num_tokens, d_model), dtype, seed=1)
    _, vjp = jax.vjp(lambda t: pallas_gather.lookup(t, ids, True, True), table)
    (kernel,) = vjp(cotangent)
    # The float32 sum in token order, rounded once to the table's dtype.
    grid.assert_bits_equal(
        kernel, grid.grad_in_token_order(cotangent, ids, vocab_size).astype(dtype)
    )
    # Against the float32 reference (jax.grad of "xla" for float32; for 16-bit tables
    # XLA accumulates in 16 bits, which is what the kernels avoid): float32 sums of up
    # to 1000 unit normals in another order differ by far less than 1e-4, and a 16-bit
    # result rounds that float32 sum once, so it may land one ulp apart.
    expected = reference.gather_grad_reference(cotangent, ids, vocab_size).astype(dtype)
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(kernel, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=1e-4
    )


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(("vocab_size", "d_model"), [(1, 1), (7, 3), (1000, 64)])
def test_deterministic_gradient_with_unique_ids_is_bit_identical_to_xla(dtype, vocab_size, d_model):
    ids = np.random.default_rng(0).permutation(vocab_size)[: min(vocab_size, 40)]
    ids = jnp.asarray(np.where(np.arange(ids.size) % 2, ids - vocab_size, ids), jnp.int32)
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = grid.normal((ids.size, d_model), dtype, seed=1)

    def grad(fn):
        return jax.vjp(fn, table)[1](cotangent)[0]

    kernel = grad(lambda t: pallas_gather.lookup(t, ids, interpret=True, deterministic=True))
    grid.assert_bits_equal(kernel, grad(lambda t: t[ids]))


@pytest.mark.parametrize("ids_kind", ["all_equal", "zipf", "edges"])
def test_bits_do_not_depend_on_run_tiling_or_interleaving(ids_kind):
    vocab_size, d_model, num_tokens = 97, 129, 1000
    ids = _duplicated_ids(ids_kind, vocab_size, num_tokens)
    # Large values of mixed magnitude, so that a different summation order would show.
    rng = np.random.default_rng(2)
    grad_out = rng.standard_normal((num_tokens, d_model)) * 10.0 ** rng.integers(
        0, 6, (num_tokens, 1)
    )
    grad_out = jnp.asarray(grad_out, jnp.float32)

    def run(g, i, **blocks):
        config = pallas_gather.Config(**blocks)
        return pallas_gather.segment_sum(
            g, jnp.asarray(i), vocab_size=vocab_size, config=config, interpret=True
        )

    first = run(grad_out, ids)
    grid.assert_bits_equal(run(grad_out, ids), first)
    for blocks in ({"block_v": 1, "block_d": 16}, {"block_v": 128, "block_d": 256}):
        grid.assert_bits_equal(run(grad_out, ids, **blocks), first)
    # Reordering tokens while keeping each row's tokens in their order changes nothing.
    rows = np.asarray(contract.wrap_and_clamp(ids, vocab_size))
    by_row = np.argsort(rows, kind="stable")
    grid.assert_bits_equal(run(grad_out[by_row], ids[by_row]), first)


def test_out_of_range_ids_add_nothing_to_the_gradient():
    table = jnp.zeros((4, 2))
    ids = jnp.array([3, -1, -4, -5, 4, grid.INT32_MAX, grid.INT32_MIN], jnp.int32)
    grad = jax.grad(lambda t: pallas_gather.lookup(t, ids, True, True).sum())(table)
    np.testing.assert_array_equal(grad[:, 0], [1.0, 0.0, 0.0, 2.0])


def test_block_v_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_v=3 must be a positive power of two"):
        pallas_gather.Config(block_v=3)


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(("vocab_size", "d_model", "num_tokens"), [(50257, 768, 1000), (7, 129, 3)])
def test_deterministic_backward_lowers_to_one_triton_call_for_cuda(
    dtype, vocab_size, d_model, num_tokens
):
    def grad(table, ids):
        return jax.grad(lambda t: pallas_gather.lookup(t, ids, False, True).sum())(table)

    text = compat.lower(
        grad,
        jax.ShapeDtypeStruct((vocab_size, d_model), dtype),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    ).as_text()
    assert text.count(grid.TRITON_CALL) == 1  # The segment sum; the forward is not needed.
    assert 'name = "embedding_segment_sum_block_v_' in text
    assert "embedding_scatter_add" not in text
    assert "stablehlo.scatter" not in text  # No XLA scatter-add either: the sort is XLA's.
