"""Every backend through ``embed.lookup`` against "xla", bit for bit, and its gradient.

One body per check, run on every machine: compiled on a CUDA machine (``triton``
included), interpreted on a CPU where the backend has an interpreter (``pallas``,
``mosaic``), skipped with the reason where it cannot run (``tests/grid.py``'s
``BACKENDS``). The collected ids are the same everywhere, so the GPU run checks exactly
what the CPU run checks. Sizes are kept small enough for the interpreters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import embed
from kernels import contract, reference
from tests import grid

pytestmark = pytest.mark.backends

# Sizes from the grid, small enough for the Mosaic GPU interpreter on a CPU: an odd
# d_model and token count (partial blocks), and the GPT-2 vocabulary for the layer, at
# that odd width too: the interpreter copies every operand into its simulated memory,
# and a 768-wide GPT-2 table made the layer's test five times slower.
D_MODEL, NUM_TOKENS = grid.D_MODELS[3], grid.NUM_TOKENS[3]
BIG_VOCAB = grid.VOCAB_SIZES[-1]


def _case_params():
    """Each backend with the grid's cover: the same cases on every machine, so a CUDA
    machine checks compiled exactly what the CPU CI machine checks interpreted (each
    kernel's own tests run the whole grid in its interpreter)."""
    return [
        pytest.param(name, case, marks=backend.marks, id=f"{name}-{grid.case_id(case)}")
        for backend in grid.BACKENDS
        for name in backend.values
        for case in grid.COVER_CASES
    ]


@pytest.mark.parametrize(("backend", "case"), _case_params())
def test_forward_is_bit_identical_to_xla(backend, case):
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    out = jax.jit(lambda t, i: embed.lookup(t, i, backend=backend))(table, ids)
    grid.assert_bits_equal(out, embed.lookup(table, ids, backend="xla"))


@pytest.mark.parametrize(("backend", "case"), _case_params())
def test_gradient_matches_float32_reference(backend, case):
    """The table gradient over the forward's cases, against NumPy's float32 sum in
    token order, rounded once to the table's dtype."""
    dtype, vocab_size, d_model, num_tokens = case
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = grid.make_table(num_tokens, d_model, dtype, seed=1)
    lookup = jax.jit(jax.grad(lambda t: jnp.vdot(embed.lookup(t, ids, backend=backend), cotangent)))
    expected = grid.grad_in_token_order(cotangent, ids, vocab_size).astype(dtype)
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(lookup(table), np.float32),
        np.asarray(expected, np.float32),
        rtol=rtol,
        atol=1e-4,
    )


@pytest.mark.parametrize("backend", grid.BACKENDS)
def test_layer_under_nnx_jit(backend):
    layer = embed.MyEmbed(BIG_VOCAB, D_MODEL, nnx.Rngs(0), backend=backend)
    ids = jnp.asarray(grid.make_ids(BIG_VOCAB, 2 * NUM_TOKENS).reshape(2, NUM_TOKENS))
    out = nnx.jit(lambda m, x: m(x))(layer, ids)
    grid.assert_bits_equal(out, layer.embedding[...][ids])


# --- Out-of-range ids: each mode, every kernel, against numpy ----------------------------
# tools/gpu_check also runs these (``-k out_of_range``) under compute-sanitizer's memcheck:
# the kernels must neither read nor write outside the table, whatever the ids.


def _expected_rows(table, ids, mode):
    """The documented policy in numpy: wrap ``[-V, 0)``, clamp or fill the rest."""
    vocab_size = table.shape[0]
    inside = (ids >= -vocab_size) & (ids < vocab_size)
    rows = np.clip(np.where(ids < 0, ids + vocab_size, ids), 0, vocab_size - 1)
    expected = np.asarray(table)[rows]
    if mode == "fill":
        expected[~inside] = np.nan
    return expected


@pytest.mark.parametrize("mode", ["clip", "fill"])
@pytest.mark.parametrize("backend", grid.BACKENDS)
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_out_of_range_modes_are_bit_identical_to_xla(backend, mode, dtype):
    vocab_size, d_model = 1000, D_MODEL
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = grid.make_ids(vocab_size, NUM_TOKENS)  # The edges, then half of them out of range.
    out = jax.jit(lambda t, i: embed.lookup(t, i, backend=backend, mode=mode))(table, ids)
    grid.assert_bits_equal(out, embed.lookup(table, ids, backend="xla", mode=mode))
    grid.assert_bits_equal(out, _expected_rows(table, ids, mode))


@pytest.mark.parametrize("mode", ["clip", "fill"])
@pytest.mark.parametrize("backend", grid.BACKENDS)
def test_out_of_range_ids_get_no_gradient(backend, mode):
    vocab_size, d_model, num_tokens = 97, 64, NUM_TOKENS
    table = grid.make_table(vocab_size, d_model, jnp.float32)
    ids = grid.make_ids(vocab_size, num_tokens)
    cotangent = np.asarray(grid.normal((num_tokens, d_model), seed=2))

    inside = (ids >= -vocab_size) & (ids < vocab_size)
    expected = np.zeros((vocab_size, d_model), np.float32)
    np.add.at(expected, ids[inside] % vocab_size, cotangent[inside])
    actual = jax.jit(
        jax.grad(lambda t: jnp.vdot(embed.lookup(t, ids, backend=backend, mode=mode), cotangent))
    )(table)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", grid.BACKENDS)
def test_out_of_range_error_mode_raises_eagerly_and_under_jit(backend):
    vocab_size = 1000
    table = grid.make_table(vocab_size, 64, jnp.float32)
    good = np.array([0, vocab_size - 1, -1, -vocab_size], np.int32)
    bad = np.array([0, 5, vocab_size + 3, -1], np.int32)
    grid.assert_bits_equal(
        embed.lookup(table, good, backend=backend, mode="error"),
        _expected_rows(table, good, "clip"),
    )
    with pytest.raises(IndexError, match=rf"token id {vocab_size + 3} at position \(2,\)"):
        embed.lookup(table, bad, backend=backend, mode="error")
    checked = jax.jit(
        checkify.checkify(lambda t, i: embed.lookup(t, i, backend=backend, mode="error"))
    )
    err, out = checked(table, good)
    assert err.get() is None
    grid.assert_bits_equal(out, _expected_rows(table, good, "clip"))
    err, _ = checked(table, bad)
    assert f"token id {vocab_size + 3} at flat position 2" in err.get()


@pytest.mark.skipif(
    grid.backend_problem("mosaic") is not None, reason=str(grid.backend_problem("mosaic"))
)
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_mosaic_deterministic_gradient_is_reproducible(dtype):
    vocab_size, d_model, num_tokens = 97, D_MODEL, 33  # The interpreter runs it twice.
    # Half the tokens on one row (many additions per row), half over the edge ids.
    half = num_tokens // 2
    ids = np.concatenate([np.full(half, 5), grid.make_ids(vocab_size, num_tokens - half)])
    ids = jnp.asarray(ids, jnp.int32)
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = grid.normal((num_tokens, d_model), dtype, seed=1)

    @jax.jit
    def grad(t):
        lookup = lambda t: embed.lookup(t, ids, backend="mosaic", deterministic=True)  # noqa: E731
        return jax.vjp(lookup, t)[1](cotangent)[0]

    first, second = grad(table), grad(table)
    grid.assert_bits_equal(first, second)
    expected = reference.gather_grad_reference(cotangent, ids, vocab_size).astype(dtype)
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(first, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=1e-4
    )


# --- Each backend's table gradient through the layer, in every mode ---------------------
# (A kernel's backward meets the modes here: on every stack, as the kernels' tests.)

_VOCAB, _D_MODEL = 11, 5


def _table(dtype=jnp.float32):
    return grid.make_table(_VOCAB, _D_MODEL, dtype)


def _plain_jax(mode, fill_value=jnp.nan):
    """The plain-JAX formulation of each mode, on int32 ids."""

    def rows(table, token_ids):
        out = table[token_ids]
        if mode == "fill":
            mask = contract.in_vocab(token_ids, table.shape[0])[..., None]
            out = jnp.where(mask, out, jnp.asarray(fill_value, table.dtype))
        return out

    return rows


def _table_grad(rows, table, cotangent):
    _, vjp = jax.vjp(rows, table)
    return vjp(cotangent)[0]


@pytest.mark.parametrize("backend", grid.CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["clip", "fill", "error"])
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gradient_matches_plain_jax_in_every_mode(backend, mode, dtype):
    token_ids = grid.make_ids(_VOCAB, 60).reshape(3, 20)
    if mode == "error":
        token_ids = np.where(contract.in_vocab(token_ids, _VOCAB), token_ids, 3)
    token_ids = jnp.asarray(token_ids, jnp.int32)
    table = _table(dtype)
    cotangent = grid.normal((3, 20, _D_MODEL), dtype, seed=1)
    plain = functools.partial(_plain_jax(mode), token_ids=token_ids)
    layer = functools.partial(embed.lookup, token_ids=token_ids, backend=backend, mode=mode)
    actual = _table_grad(layer, table, cotangent)
    assert actual.dtype == dtype
    assert np.isfinite(np.asarray(actual, np.float32)).all()
    # Every backend sums repeated ids in float32 and rounds once to the table's dtype
    # (plain JAX's 16-bit scatter-add would round after each id): the plain formulation
    # on a float32 table, rounded once.
    f32 = jnp.float32
    expected = _table_grad(plain, table.astype(f32), cotangent.astype(f32)).astype(dtype)
    if embed.backend_for(backend, "cpu") == "xla":
        # XLA's float32 scatter-add, in the same order: the same bits.
        grid.assert_bits_equal(actual, expected)
        return
    # The kernel adds in another order.
    tol = 1e-6 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(actual, f32), np.asarray(expected, f32), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("backend", grid.CPU_BACKENDS)
def test_gradient_under_error_mode_reports_bad_ids_through_checkify(backend):
    def loss(table, token_ids):
        return embed.lookup(table, token_ids, backend=backend, mode="error").sum()

    checked = jax.jit(checkify.checkify(jax.grad(loss)))
    err, grad = checked(_table(), jnp.array([1, 1, -1]))
    assert err.get() is None
    np.testing.assert_array_equal(grad[:, 0], [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    err, _ = checked(_table(), jnp.array([1, _VOCAB]))
    assert f"token id {_VOCAB} at flat position 1" in err.get()
