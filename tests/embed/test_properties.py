"""Property tests: every backend against a plain-NumPy model of each mode.

Hypothesis draws the vocabulary, row width, number of tokens, dtypes and ids; ids are
drawn so that every edge (negatives, ``-V``, ``V - 1``, ``V``, the int32 extremes and
past them) is common. The settings keep the suite fast and the same on every run:
``derandomize=True`` fixes the examples, so a CI failure reproduces locally.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embed
from tests import grid

BACKENDS = grid.CPU_BACKENDS
# Examples per (backend, mode): 3 x 3 x 10 forward and 3 x 2 x 4 gradient lookups.
PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
GRADIENT_SETTINGS = settings(max_examples=4, deadline=None, derandomize=True)


@st.composite
def lookups(draw):
    """``(table, ids)``: ids as a NumPy array of int32, int64, uint32 or float32."""
    vocab_size = draw(st.integers(1, 300))
    d_model = draw(st.integers(1, 20))
    num_tokens = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(grid.DTYPES))
    edges = [*grid.edge_ids(vocab_size), grid.INT32_MAX + 1, -(2**40), 2**40]
    in_vocab = st.integers(-vocab_size, vocab_size - 1)
    any_id = st.one_of(
        st.sampled_from(edges), st.integers(-2 * vocab_size, 2 * vocab_size), in_vocab
    )
    # Half the lookups are all in the vocabulary, so "error" is seen passing too.
    one_id = draw(st.sampled_from([any_id, in_vocab]))
    values = draw(st.lists(one_id, min_size=num_tokens, max_size=num_tokens))
    ids_dtype = draw(st.sampled_from([np.int32, np.int64, np.int32, np.uint32, np.float32]))
    if ids_dtype is np.uint32:
        values = [v for v in values if v >= 0]
    info = np.iinfo(np.int32) if ids_dtype is np.float32 else np.iinfo(ids_dtype)
    # A value that ids_dtype cannot hold is drawn as its saturated value.
    values = [min(max(v, int(info.min)), int(info.max)) for v in values]
    # float32 holds every id up to 2**24 exactly, and the int32 extremes round outward.
    token_ids = np.asarray(values, ids_dtype)
    seed = draw(st.integers(0, 2**16))
    # NumPy, not jax.random: no compilation per drawn shape.
    table = np.random.default_rng(seed).standard_normal((vocab_size, d_model))
    table = jnp.asarray(table.astype(jnp.dtype(dtype)))
    return table, token_ids


def numpy_model(table, token_ids, mode, fill_value=np.nan):
    """Each mode in plain NumPy on exact (unbounded) integer ids.

    Returns the rows, or the ``IndexError`` message prefix for ``mode="error"``.
    """
    table = np.asarray(table)
    vocab_size = table.shape[0]
    exact = np.asarray([int(i) for i in np.asarray(token_ids).reshape(-1)], object)
    ok = np.asarray([-vocab_size <= i < vocab_size for i in exact], bool)
    if mode == "error" and not ok.all():
        first = int(np.argmax(~ok))
        return f"token id {min(max(exact[first], grid.INT32_MIN), grid.INT32_MAX)} at position "
    rows = np.asarray([min(max(i + vocab_size if i < 0 else i, 0), vocab_size - 1) for i in exact])
    out = table[rows.astype(np.int64)] if exact.size else np.zeros((0, table.shape[1]), table.dtype)
    if mode == "fill":
        out[~ok] = np.asarray(fill_value).astype(table.dtype)
    return out.reshape(*np.shape(token_ids), table.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", embed.MODES)
@PROPERTY_SETTINGS
@given(case=lookups())
def test_every_backend_matches_the_numpy_model(backend, mode, case):
    table, token_ids = case
    expected = numpy_model(table, token_ids, mode)
    if isinstance(expected, str):
        with pytest.raises(IndexError, match=f"^{expected}"):
            embed.lookup(table, token_ids, backend=backend, mode=mode)
        return
    out = embed.lookup(table, token_ids, backend=backend, mode=mode)
    grid.assert_bits_equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["clip", "fill"])  # "error" has the gradient of "clip".
@GRADIENT_SETTINGS
@given(case=lookups())
def test_every_backend_table_gradient_matches_the_numpy_model(backend, mode, case):
    table, token_ids = case
    vocab_size, d_model = table.shape
    table = table.astype(jnp.float32)
    cotangent = grid.normal((*np.shape(token_ids), d_model))

    def rows(t):
        return embed.lookup(t, token_ids, backend=backend, mode=mode)

    _, vjp = jax.vjp(rows, table)
    (grad,) = vjp(cotangent)
    # NumPy model: each in-vocabulary id adds its cotangent to row i mod V, in float64.
    expected = np.zeros((vocab_size, d_model))
    flat_cotangent = np.asarray(cotangent, np.float64).reshape(-1, d_model)
    for k, i in enumerate(int(i) for i in np.asarray(token_ids).reshape(-1)):
        if -vocab_size <= i < vocab_size:
            expected[i % vocab_size] += flat_cotangent[k]
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)
