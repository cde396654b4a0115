"""On a CUDA GPU: every compiled backend against "xla", bit for bit, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import embed
from kernels import reference
from tests import grid

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = ["pallas", "triton", "auto"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", grid.GATHER_CASES, ids=grid.case_id)
def test_forward_is_bit_identical_to_xla(backend, case):
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    out = jax.jit(lambda t, i: embed.lookup(t, i, backend=backend))(table, ids)
    grid.assert_bits_equal(out, embed.lookup(table, ids, backend="xla"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gradient_matches_float32_reference(backend, dtype):
    vocab_size, d_model, num_tokens = 97, 129, 1000
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    table = grid.make_table(vocab_size, d_model, dtype)
    cotangent = jax.random.normal(jax.random.key(1), (num_tokens, d_model), dtype)
    grad = jax.grad(lambda t: jnp.vdot(embed.lookup(t, ids, backend=backend), cotangent))(table)
    expected = reference.gather_grad_reference(cotangent, ids, vocab_size).astype(dtype)
    rtol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=1e-4
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_layer_under_nnx_jit(backend):
    layer = embed.MyEmbed(50257, 768, nnx.Rngs(0), backend=backend)
    ids = jnp.asarray(grid.make_ids(50257, 2048).reshape(2, 1024))
    out = nnx.jit(lambda m, x: m(x))(layer, ids)
    grid.assert_bits_equal(out, layer.embedding[...][ids])
