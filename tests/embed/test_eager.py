"""An eager lookup is one compiled dispatch, with the bits and errors of op-by-op JAX.

Dispatches are counted, not timed: after ``jax.clear_caches()`` every device op, an
eager primitive as much as a jitted function, must compile before it can run, so the
XLA compilations the first call triggers (a ``jax.monitoring`` event) name every
executable it runs; repeated calls must then compile nothing and add nothing to the
jitted function's cache.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import monitoring
from jax.experimental import checkify

import embed
from embed import Embed, MyEmbed, dispatch
from tests import grid

BACKENDS = grid.CPU_BACKENDS
VOCAB, D_MODEL = 300, 16  # uint8 ids are all in range: mode="error" runs them too.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiles():
    """The names of the XLA executables compiled inside the block."""
    names = []

    def listener(event, duration_secs, **kwargs):
        del duration_secs
        if event == _COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name")))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        monitoring.unregister_event_duration_listener(listener)


def one_dispatch(call):
    """``call()``'s result, asserting that each call runs one executable: the lookup's."""
    # A first call imports what the lookup imports lazily: on JAX 0.11 the modules
    # Pallas imports on first use add to JAX's tracing context, which is part of every
    # jit cache key, so the second call of a process would compile once more.
    jax.block_until_ready(call())
    jax.clear_caches()
    with compiles() as first:
        out = jax.block_until_ready(call())
    assert len(first) == 1 and "_eager_lookup" in first[0], first
    with compiles() as again:
        for _ in range(3):
            grid.assert_bits_equal(call(), out)
    assert again == []
    assert dispatch._eager_lookup._cache_size() == 1
    return out


def op_by_op(
    table,
    token_ids,
    *,
    backend="auto",
    mode="clip",
    fill_value=jnp.nan,
    deterministic=False,
    dtype=None,
    scale_by_sqrt_d=False,
):
    """The lookup as it ran before it was compiled: one eager JAX op at a time."""
    policy = dict(backend=backend, mode=mode, deterministic=deterministic)
    rows = dispatch._lookup_rows(table, token_ids, fill_value, **policy)
    return dispatch.finish(rows, table.shape[1], dtype=dtype, scale_by_sqrt_d=scale_by_sqrt_d)


def numpy_rows(table: np.ndarray, token_ids, mode: str) -> np.ndarray:
    """The lookup in NumPy: ids saturated to int32, wrapped once, clamped; NaN fill."""
    ids = np.clip(np.asarray(token_ids).astype(np.int64), grid.INT32_MIN, grid.INT32_MAX)
    vocab_size = table.shape[0]
    rows = table[np.clip(np.where(ids < 0, ids + vocab_size, ids), 0, vocab_size - 1)]
    if mode == "fill":
        rows[(ids < -vocab_size) | (ids >= vocab_size)] = np.nan
    return rows


def _token_ids(kind: str, shape, mode: str):
    n = int(np.prod(shape))
    if mode == "error" or kind.endswith("uint8"):
        values = np.arange(n) * 37 % min(VOCAB, 256)  # In range for every mode.
    else:
        values = grid.make_ids(VOCAB, n)  # Edges and out-of-range ids first.
    values = values.reshape(shape)
    if kind == "int64 numpy" and mode != "error":
        values = values.astype(np.int64)
        values.flat[:2] = [2**40, -(2**40)]  # Saturated on the host.
    return {
        "int32": lambda: jnp.asarray(values, jnp.int32),
        "uint8 numpy": lambda: values.astype(np.uint8),
        "uint8": lambda: jnp.asarray(values, jnp.uint8),  # Converted inside the dispatch.
        "int64 numpy": lambda: values.astype(np.int64),
        "float32 numpy": lambda: values.astype(np.float32),  # Checked integral on the host.
    }[kind]()


@pytest.mark.parametrize(
    ("backend", "mode", "shape", "kind"),
    grid.pairwise(
        BACKENDS,
        ["clip", "fill", "error"],
        [(8,), (1, 2048)],
        ["int32", "uint8 numpy", "uint8", "int64 numpy"],
    ),
)
def test_an_eager_layer_call_is_one_dispatch(backend, mode, shape, kind):
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend, mode=mode)
    token_ids = _token_ids(kind, shape, mode)
    out = one_dispatch(lambda: layer(token_ids))
    grid.assert_bits_equal(out, numpy_rows(np.asarray(layer.embedding[...]), token_ids, mode))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_an_eager_flax_face_call_is_one_dispatch(backend, param_dtype):
    # nnx.Embed's defaults: NaN rows for out-of-range ids, output in the table's dtype.
    layer = Embed(VOCAB, D_MODEL, param_dtype=param_dtype, rngs=nnx.Rngs(0), backend=backend)
    token_ids = _token_ids("int32", (1, 2048), "fill")
    out = one_dispatch(lambda: layer(token_ids))
    grid.assert_bits_equal(out, numpy_rows(np.asarray(layer.embedding[...]), token_ids, "fill"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_ids_dtype_and_scaling_are_in_the_one_dispatch(backend):
    config = dict(mode="fill", dtype=jnp.bfloat16, scale_by_sqrt_d=True, backend=backend)
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), param_dtype=jnp.float16, **config)
    token_ids = _token_ids("float32 numpy", (2, 5), "fill")
    out = one_dispatch(lambda: layer(token_ids))
    assert out.dtype == jnp.bfloat16
    grid.assert_bits_equal(out, op_by_op(layer.embedding[...], token_ids, **config))


_FILLS = [np.nan, -np.nan, -0.0, 0.1, 1e-40, 65519.0, -np.inf]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    ("dtype", "scale_by_sqrt_d"), [(None, False), (None, True), (jnp.float32, True)]
)
def test_same_bits_as_op_by_op(backend, param_dtype, dtype, scale_by_sqrt_d):
    table = grid.make_table(VOCAB, 129, param_dtype)
    token_ids = jnp.asarray(grid.make_ids(VOCAB, 40).reshape(4, 10))
    finishing = dict(dtype=dtype, scale_by_sqrt_d=scale_by_sqrt_d, backend=backend)
    for mode, fill_value in [("clip", np.nan), ("error", np.nan)] + [
        ("fill", f) for f in [*_FILLS, jnp.float32(0.1), jnp.bfloat16(-np.nan)]
    ]:
        ids = jnp.abs(token_ids) % VOCAB if mode == "error" else token_ids
        policy = dict(mode=mode, fill_value=fill_value, **finishing)
        grid.assert_bits_equal(embed.lookup(table, ids, **policy), op_by_op(table, ids, **policy))


def test_python_int_and_list_ids():
    table = grid.make_table(VOCAB, D_MODEL, jnp.float32)
    for token_ids in [5, -1, 2**40, [[1, -2, 2**40]]]:
        grid.assert_bits_equal(
            embed.lookup(table, token_ids, mode="fill"),
            op_by_op(table, token_ids, mode="fill"),
        )


@pytest.mark.parametrize("fill_value", [None, "one"])
def test_a_fill_value_that_is_no_number_fails_as_before(fill_value):
    table = grid.make_table(VOCAB, D_MODEL, jnp.float32)
    token_ids = jnp.array([1, VOCAB])
    with pytest.raises(Exception) as expected:
        op_by_op(table, token_ids, mode="fill", fill_value=fill_value)
    with pytest.raises(type(expected.value)) as raised:
        embed.lookup(table, token_ids, mode="fill", fill_value=fill_value)
    assert str(raised.value) == str(expected.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_error_raises_on_the_host_before_any_dispatch(backend):
    table = grid.make_table(VOCAB, D_MODEL, jnp.float32)
    for token_ids in [jnp.array([[3, 1], [VOCAB, 2]]), np.array([2**40], np.int64)]:
        policy = dict(backend=backend, mode="error")
        with pytest.raises(IndexError) as expected:
            op_by_op(table, token_ids, **policy)
        jax.clear_caches()
        with compiles() as names, pytest.raises(IndexError) as raised:
            embed.lookup(table, token_ids, **policy)
        assert str(raised.value) == str(expected.value)
        assert names == []


def test_non_integral_float_ids_raise_before_any_dispatch():
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0))
    jax.clear_caches()
    with compiles() as names, pytest.raises(ValueError, match=r"token_ids\[1\]=2.5 must be"):
        layer(np.array([1.0, 2.5]))
    assert names == []


# --- Under tracing nothing changes ------------------------------------------------------


def _jaxpr_text(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def test_the_jaxpr_check_sees_the_eager_lookup():
    # The tests below assert its absence; it is there when everything is concrete.
    table = grid.make_table(VOCAB, D_MODEL, jnp.float32)
    token_ids = jnp.arange(3)
    assert "_eager_lookup" in _jaxpr_text(lambda: embed.lookup(table, token_ids))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["clip", "fill", "error"])
def test_under_transforms_the_lookup_is_traced_as_before(backend, mode):
    layer = MyEmbed(VOCAB, D_MODEL, nnx.Rngs(0), backend=backend, mode=mode)
    table = layer.embedding[...]
    token_ids = jnp.abs(jnp.asarray(grid.make_ids(VOCAB, 12).reshape(3, 4))) % VOCAB
    expected = op_by_op(table, token_ids, backend=backend, mode=mode)
    policy = dict(mode=mode, backend=backend)
    transforms = {
        "jit": (lambda i: layer(i), token_ids),
        "vmap": (jax.vmap(layer), token_ids),
        "table traced": (lambda t: embed.lookup(t, token_ids, **policy), table),
        "fill value traced": (
            lambda f: embed.lookup(table, token_ids, fill_value=f, **policy),
            jnp.float32(np.nan),
        ),
    }
    for name, (fn, arg) in transforms.items():
        # checkify, for mode="error": its check needs it under jit.
        checked = checkify.checkify(jax.jit(fn))
        assert "_eager_lookup" not in _jaxpr_text(checked, arg), name
        err, out = checked(arg)
        err.throw()
        grid.assert_bits_equal(out, expected)
    grad = jax.grad(lambda t: jnp.sum(embed.lookup(t, token_ids, **policy)))
    assert "_eager_lookup" not in _jaxpr_text(checkify.checkify(grad), table)


def test_under_shard_map_the_lookup_is_traced_as_before():
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    table = grid.make_table(VOCAB, D_MODEL, jnp.float32)
    token_ids = jnp.asarray(grid.make_ids(VOCAB, 8))
    spec = jax.sharding.PartitionSpec("x")
    # check_vma=False: pallas_call declares no per-axis variance (as in embed.parallel).
    fn = jax.shard_map(
        lambda i: embed.lookup(table, i, mode="fill"),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
        check_vma=False,
    )
    assert "_eager_lookup" not in _jaxpr_text(fn, token_ids)
    grid.assert_bits_equal(fn(token_ids), op_by_op(table, token_ids, mode="fill", backend="auto"))
