"""What training needs from the layer: ``attend``, ``scale_by_sqrt_d``, ``deterministic``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed import MyEmbed
from kernels import compat
from tests import grid


def _layer_and_nnx_embed(vocab_size, d_model, **kwargs):
    layer = MyEmbed(vocab_size, d_model, nnx.Rngs(0), **kwargs)
    kwargs.pop("backend", None)
    flax_embed = nnx.Embed(vocab_size, d_model, rngs=nnx.Rngs(0), **kwargs)
    flax_embed.embedding[...] = layer.embedding[...]
    return layer, flax_embed


@pytest.mark.parametrize(("vocab_size", "d_model"), [(1, 1), (7, 3), (97, 129)])
def test_attend_is_query_times_the_table_transposed(vocab_size, d_model):
    layer = MyEmbed(vocab_size, d_model, nnx.Rngs(0))
    query = grid.normal((2, 5, d_model), seed=1)
    logits = layer.attend(query)
    assert logits.shape == (2, 5, vocab_size)
    assert logits.dtype == jnp.float32
    expected = query @ layer.embedding[...].T
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param_dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("query_dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16], ids=str)
def test_attend_promotes_as_nnx_embed(param_dtype, query_dtype, dtype):
    layer, flax_embed = _layer_and_nnx_embed(97, 129, dtype=dtype, param_dtype=param_dtype)
    query = grid.normal((5, 129), query_dtype, seed=1)
    logits, flax_logits = layer.attend(query), flax_embed.attend(query)
    assert logits.dtype == flax_logits.dtype
    # Both round a float32-exact product sum once; the sums' orders may differ.
    rtol = 1e-5 if logits.dtype == jnp.float32 else float(jnp.finfo(logits.dtype).eps)
    np.testing.assert_allclose(
        np.asarray(logits, np.float32), np.asarray(flax_logits, np.float32), rtol=rtol, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_attend_accumulates_16_bit_in_float32(dtype):
    # One 2**8 and 4095 terms of 1/4 per logit: a 16-bit running sum stalls at 256
    # (bfloat16) or 512 (float16); the float32 sum, 1279.75, rounds once to 1280.
    # XLA on CPU accumulates in float32 anyway, so the jaxpr is checked as well.
    d_model = 4096
    layer = MyEmbed(2, d_model, nnx.Rngs(0), param_dtype=dtype)
    layer.embedding[...] = jnp.ones((2, d_model), dtype)
    query = jnp.full((1, d_model), 0.25, dtype).at[0, 0].set(256.0)
    logits = layer.attend(query)
    assert logits.dtype == dtype
    np.testing.assert_array_equal(np.asarray(logits, np.float32), [[1280.0, 1280.0]])
    assert "preferred_element_type=float32" in str(jax.make_jaxpr(layer.attend)(query))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_scale_by_sqrt_d(backend, dtype):
    ids = jnp.asarray(grid.make_ids(7, 20))
    plain = MyEmbed(7, 129, nnx.Rngs(0), backend=backend, param_dtype=dtype)
    scaled = MyEmbed(7, 129, nnx.Rngs(0), backend=backend, param_dtype=dtype, scale_by_sqrt_d=True)
    rows = plain(ids)
    grid.assert_bits_equal(rows, plain.embedding[...][ids])  # Off by default.
    out = scaled(ids)
    grid.assert_bits_equal(out, rows * jnp.asarray(math.sqrt(129), dtype))
    query = grid.normal((3, 129), dtype, seed=1)
    grid.assert_bits_equal(scaled.attend(query), plain.attend(query))  # attend is not scaled.


def _table_grad(layer, ids, cotangent):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(ids)
        return jnp.vdot(out.astype(jnp.float32), cotangent)

    return jax.grad(loss)(params)["embedding"][...]


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ids_kind", ["all_equal", "edges"])
def test_deterministic_gradient_through_the_layer(dtype, ids_kind):
    vocab_size, d_model, num_tokens = 97, 33, 300
    ids = grid.make_ids(vocab_size, num_tokens)
    ids = jnp.asarray(np.full_like(ids, 5) if ids_kind == "all_equal" else ids).reshape(3, 100)
    cotangent = grid.normal((*ids.shape, d_model), seed=1)
    grads = {
        (backend, deterministic): _table_grad(
            MyEmbed(
                vocab_size,
                d_model,
                nnx.Rngs(0),
                backend=backend,
                param_dtype=dtype,
                deterministic=deterministic,
            ),
            ids,
            cotangent,
        )
        for backend in ("xla", "pallas")
        for deterministic in (False, True)
    }
    # "xla" ignores the flag.
    grid.assert_bits_equal(grads["xla", True], grads["xla", False])
    # Same tolerance as the kernels' tests: float32 sums of up to 300 unit normals in
    # another order; 16-bit results one ulp apart (and XLA's own 16-bit accumulation).
    rtol = 1e-5 if dtype == jnp.float32 else 4 * float(jnp.finfo(dtype).eps)
    for key in [("pallas", False), ("pallas", True)]:
        np.testing.assert_allclose(
            np.asarray(grads[key], np.float32),
            np.asarray(grads["pallas", not key[1]], np.float32),
            rtol=rtol,
            atol=1e-4,
        )
    if dtype == jnp.float32:
        np.testing.assert_allclose(grads["pallas", True], grads["xla", False], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("deterministic", "kernel"),
    [(False, "embedding_scatter_add"), (True, "embedding_segment_sum")],
)
@pytest.mark.parametrize("backend", ["pallas", "auto"])
def test_deterministic_flag_reaches_the_cuda_backward(backend, deterministic, kernel):
    layer = MyEmbed(50, 129, nnx.Rngs(0), backend=backend, deterministic=deterministic)
    ids = jnp.asarray(grid.make_ids(50, 77)).reshape(7, 11)
    cotangent = jnp.ones((7, 11, 129))
    text = compat.lower(lambda i, c: _table_grad(layer, i, c), ids, cotangent).as_text()
    assert kernel in text
    assert text.count(grid.TRITON_CALL) == 1


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_tied_gradient_sums_the_lookup_and_the_projection(backend):
    vocab_size, d_model = 11, 8
    layer = MyEmbed(vocab_size, d_model, nnx.Rngs(0), backend=backend)
    ids = jnp.asarray(grid.make_ids(vocab_size, 20))
    target = grid.normal((20, vocab_size), seed=1)

    def loss(model):
        return jnp.sum((model.attend(model(ids)) - target) ** 2)

    grad = nnx.grad(loss)(layer).embedding[...]

    def reference_loss(table):
        return jnp.sum(((table[ids] @ table.T) - target) ** 2)

    expected = jax.grad(reference_loss)(layer.embedding[...])
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
