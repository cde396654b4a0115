"""Bad input: id validation, the out-of-range modes, and constructor validation.

Every bad input has a test that asserts the exact exception type and a message naming
the value; every mode is checked on every backend that runs on this platform, forward
and gradient, against a plain-JAX formulation of the same mode.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import embed
from embed import MyEmbed, ids
from tests import grid

BACKENDS = grid.CPU_BACKENDS
VOCAB, D_MODEL = 11, 5


def _table(dtype=jnp.float32):
    return grid.make_table(VOCAB, D_MODEL, dtype)


def _clip_rows(table, token_ids):
    """Plain JAX, "clip": ``table[ids]`` with exact ids (saturated to int32)."""
    saturated = [min(max(int(i), grid.INT32_MIN), grid.INT32_MAX) for i in token_ids]
    return table[jnp.array(saturated, jnp.int32)]


# --- Float ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.float16, jnp.bfloat16, np.float32, np.float64], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize(
    ("bad", "shown"), [(1.5, "1.5"), (-0.25, "-0.25"), (np.nan, "nan"), (np.inf, "inf")]
)
def test_non_integral_or_non_finite_float_ids_name_the_first_bad_value(dtype, bad, shown):
    token_ids = np.array([[0.0, 3.0, -2.0], [4.0, bad, 7.5]]).astype(dtype)
    message = rf"token_ids\[1, 1\]={shown} must be a finite integral value; cast explicitly"
    with pytest.raises(ValueError, match=message):
        MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))(token_ids)
    with pytest.raises(ValueError, match=r"token_ids.astype\(jnp.int32\)"):
        ids.to_int32(jnp.asarray(token_ids))


def test_scalar_float_id_is_named_without_a_position():
    with pytest.raises(ValueError, match=r"^token_ids=-inf must be a finite integral value"):
        ids.to_int32(np.float32(-np.inf))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [np.float16, jnp.bfloat16, np.float32, np.float64], ids=lambda d: np.dtype(d).name
)
def test_integral_float_ids_are_accepted(backend, dtype):
    values = [0.0, -1.0, 10.0, -11.0, 11.0, -12.0, 2048.0, -0.0]
    token_ids = np.asarray(values).astype(dtype)
    out = embed.lookup(_table(), token_ids, backend=backend)
    grid.assert_bits_equal(out, _clip_rows(_table(), values))


def test_huge_integral_floats_saturate_and_keep_their_sign():
    # float32(2**31 - 1) rounds to 2**31: a cast without saturation would give INT32_MIN.
    token_ids = np.array([3e9, -3e9, 2.0**31, 1e30, -1e30], np.float32)
    np.testing.assert_array_equal(
        ids.to_int32(token_ids),
        [grid.INT32_MAX, grid.INT32_MIN] + [grid.INT32_MAX] * 2 + [-(2**31)],
    )


def test_float_ids_under_jit_must_be_cast_explicitly():
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"token_ids.dtype=float32 under tracing cannot be"):
        nnx.jit(lambda m, x: m(x))(layer, jnp.zeros((3,), jnp.float32))


# --- Non-numeric ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_ids", "dtype"),
    [
        (np.array([True, False]), "bool"),
        (jnp.array([[True]]), "bool"),
        (np.array([1 + 0j, 2]), "complex128"),
        (jnp.array([1.0], jnp.complex64), "complex64"),
        (np.array(["1", "2"]), "<U1"),
        (["10"], "<U2"),
        ("3", "<U1"),
        (np.array([1, "a"], object), "object"),
    ],
)
def test_booleans_complex_and_strings_are_rejected(token_ids, dtype):
    message = rf"token_ids.dtype={dtype} must be an integer type .*booleans, complex numbers"
    with pytest.raises(TypeError, match=message):
        MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))(token_ids)


def test_booleans_are_rejected_under_jit():
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))
    with pytest.raises(TypeError, match="token_ids.dtype=bool must be an integer type"):
        nnx.jit(lambda m, x: m(x))(layer, jnp.array([True]))


# --- Integer widths --------------------------------------------------------------------

INTEGER_DTYPES = [np.int8, np.int16, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_integer_ids_of_every_width_work(backend, dtype):
    info = np.iinfo(dtype)
    values = [v for v in [0, 3, VOCAB - 1, VOCAB, -1, -VOCAB, -VOCAB - 1] if info.min <= v]
    values += [int(info.max), int(info.min)]
    out = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend)(np.array(values, dtype))
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))
    grid.assert_bits_equal(out, _clip_rows(layer.embedding[...], values))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.uint16, jnp.uint32])
def test_jax_integer_ids_work_eagerly_and_under_jit(backend, dtype):
    info = jnp.iinfo(dtype)
    values = [v for v in [0, 7, VOCAB, -1, -VOCAB] if info.min <= v] + [info.max, info.min]
    token_ids = jnp.array(values, dtype)
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend)
    expected = _clip_rows(layer.embedding[...], values)
    grid.assert_bits_equal(layer(token_ids), expected)
    grid.assert_bits_equal(nnx.jit(lambda m, x: m(x))(layer, token_ids), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jax_int64_ids_with_x64_enabled(backend):
    values = [0, 2**40, -(2**40), 2**32 + 1, -(2**32) + 2, -1, VOCAB]
    with jax.enable_x64(True):
        token_ids = jnp.array(values, jnp.int64)
        assert token_ids.dtype == jnp.int64
        table = _table()
        expected = _clip_rows(table, values)
        lookup = jax.jit(lambda t, i: embed.lookup(t, i, backend=backend))
        grid.assert_bits_equal(embed.lookup(table, token_ids, backend=backend), expected)
        grid.assert_bits_equal(lookup(table, token_ids), expected)


# Ids that a plain astype(int32) would wrap into the vocabulary: 2**32 + 1 -> 1, etc.
WRAPPING_IDS = [
    ("int64", np.array([2**32 + 1], np.int64), grid.INT32_MAX),
    ("int64_negative", np.array([-(2**32) + 2], np.int64), grid.INT32_MIN),
    ("uint32", np.array([2**31 + 1], np.uint32), grid.INT32_MAX),
    ("uint64", np.array([2**64 - 1], np.uint64), grid.INT32_MAX),
    ("python_int", 2**70 + 3, grid.INT32_MAX),
]


@pytest.mark.parametrize(
    ("token_ids", "saturated"), [c[1:] for c in WRAPPING_IDS], ids=[c[0] for c in WRAPPING_IDS]
)
def test_ids_past_int32_saturate_instead_of_wrapping(token_ids, saturated):
    assert int(np.asarray(ids.to_int32(token_ids)).reshape(-1)[0]) == saturated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("token_ids", "saturated"), [c[1:] for c in WRAPPING_IDS], ids=[c[0] for c in WRAPPING_IDS]
)
def test_ids_past_int32_are_out_of_range_in_every_mode(backend, token_ids, saturated):
    table = _table()
    row = VOCAB - 1 if saturated > 0 else 0  # "clip": where JAX's indexing clamps them.
    clip = embed.lookup(table, token_ids, backend=backend, mode="clip")
    grid.assert_bits_equal(clip.reshape(-1, D_MODEL), table[row][None])
    fill = embed.lookup(table, token_ids, backend=backend, mode="fill")
    assert np.isnan(np.asarray(fill)).all()
    with pytest.raises(IndexError, match=f"token id {saturated} at position"):
        embed.lookup(table, token_ids, backend=backend, mode="error")


# --- mode="error" ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [VOCAB, -VOCAB - 1, grid.INT32_MIN, grid.INT32_MAX])
def test_error_mode_names_id_position_and_range(backend, bad):
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend, mode="error")
    token_ids = jnp.array([[0, -VOCAB, VOCAB - 1], [bad, 0, VOCAB + 5]])
    message = (
        rf"^token id {bad} at position \(1, 0\) is outside the valid range "
        rf"\[-{VOCAB}, {VOCAB}\) for vocab_size={VOCAB}"
    )
    with pytest.raises(IndexError, match=message):
        layer(token_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_mode_accepts_every_id_in_range(backend):
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend, mode="error")
    token_ids = jnp.arange(-VOCAB, VOCAB).reshape(2, VOCAB)
    grid.assert_bits_equal(layer(token_ids), layer.embedding[...][token_ids])


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_mode_under_jit_reports_through_checkify(backend):
    def lookup(table, token_ids):
        return embed.lookup(table, token_ids, backend=backend, mode="error")

    checked = jax.jit(checkify.checkify(lookup))
    table = _table()
    err, out = checked(table, jnp.array([[0, 1], [-VOCAB, VOCAB - 1]]))
    assert err.get() is None
    err.throw()  # No error: a no-op.
    grid.assert_bits_equal(out, table[jnp.array([[0, 1], [-VOCAB, VOCAB - 1]])])

    err, _ = checked(table, jnp.array([[0, 1], [VOCAB + 3, -VOCAB - 1]]))
    message = (
        f"token id {VOCAB + 3} at flat position 2 is outside the valid range "
        f"[-{VOCAB}, {VOCAB}) for vocab_size={VOCAB}"
    )
    assert message in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match=re.escape(message)):
        err.throw()


def test_error_mode_under_nnx_jit_with_checkify():
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), mode="error")
    err, _ = nnx.jit(checkify.checkify(lambda m, x: m(x)))(layer, jnp.array([3, 40]))
    assert "token id 40 at flat position 1 is outside the valid range" in err.get()


def test_error_mode_under_jit_without_checkify_says_to_functionalize():
    lookup = jax.jit(lambda t, i: embed.lookup(t, i, mode="error"))
    with pytest.raises(ValueError, match="checkify.check which was not functionalized"):
        lookup(_table(), jnp.array([0]))


# --- mode="fill" -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_fill_mode_gives_nan_rows_and_still_wraps_negatives(backend, dtype):
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend, mode="fill", param_dtype=dtype)
    table = layer.embedding[...]
    token_ids = jnp.array(grid.edge_ids(VOCAB))  # [0, V-1, -1, -V, V, -V-1, min, max]
    out = layer(token_ids)
    assert out.dtype == dtype
    grid.assert_bits_equal(out[:4], table[jnp.array([0, VOCAB - 1, VOCAB - 1, 0])])
    assert np.isnan(np.asarray(out[4:], np.float32)).all()
    grid.assert_bits_equal(nnx.jit(lambda m, x: m(x))(layer, token_ids), out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_value_and_output_dtype(backend):
    layer = MyEmbed(
        VOCAB,
        D_MODEL,
        nnx.Rngs(0),
        backend=backend,
        mode="fill",
        fill_value=-7.0,
        dtype=jnp.float16,
    )
    out = layer(jnp.array([[VOCAB, 2]]))
    assert out.dtype == jnp.float16
    np.testing.assert_array_equal(out[0, 0], np.full(D_MODEL, -7.0, np.float16))
    grid.assert_bits_equal(out[0, 1], layer.embedding[...][2].astype(jnp.float16))


# --- Gradients under each mode ---------------------------------------------------------


# --- Constructor validation ------------------------------------------------------------


@pytest.mark.parametrize("name", ["vocab_size", "d_model"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "7", None, 1 + 0j])
def test_sizes_must_be_positive_integers(name, value):
    sizes = {"vocab_size": VOCAB, "d_model": D_MODEL, name: value}
    with pytest.raises(ValueError, match="^" + re.escape(f"{name}={value!r} must be a positive")):
        MyEmbed(sizes["vocab_size"], sizes["d_model"], nnx.Rngs(0))


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_sizes_are_a_value_error(value):
    with pytest.raises(ValueError, match=f"vocab_size={value!r} must be a positive integer"):
        MyEmbed(value, D_MODEL, nnx.Rngs(0))


def test_integral_float_and_numpy_sizes_are_accepted():
    layer = MyEmbed(7.0, np.int64(3), nnx.Rngs(0))
    assert (layer.vocab_size, layer.d_model) == (7, 3)
    assert layer.embedding[...].shape == (7, 3)


def test_vocab_past_int32_is_rejected():
    with pytest.raises(ValueError, match=r"vocab_size=2147483648 must be at most 2147483647"):
        MyEmbed(2**31, 1, nnx.Rngs(0))


def test_table_whose_size_overflows_is_rejected_before_allocation():
    with pytest.raises(
        ValueError, match=r"vocab_size=2147483647 x d_model=1099511627776 .*2\*\*63"
    ):
        MyEmbed(2**31 - 1, 2**40, nnx.Rngs(0))


@pytest.mark.parametrize("param_dtype", [jnp.int32, jnp.float64, jnp.complex64, jnp.bool_])
def test_unsupported_param_dtype_is_a_type_error(param_dtype):
    name = jnp.dtype(param_dtype).name
    with pytest.raises(TypeError, match=rf"param_dtype=dtype\('{name}'\) must be one of"):
        MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), param_dtype=param_dtype)


def test_unsupported_output_dtype_is_a_type_error_at_construction():
    with pytest.raises(TypeError, match="dtype=dtype\\('int32'\\) must be"):
        MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), dtype=jnp.int32)


@pytest.mark.parametrize("mode", ["wrap", "Clip", None])
def test_unknown_mode_is_rejected_at_construction(mode):
    with pytest.raises(
        ValueError, match=rf"mode={mode!r} must be one of \('clip', 'fill', 'error'\)"
    ):
        MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), mode=mode)
