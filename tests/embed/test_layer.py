"""The layer contract: the seed's ``embed_forward``, ``MyEmbed`` and NNX/JAX transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed import MyEmbed, embed_forward
from tests import grid

BACKENDS = grid.CPU_BACKENDS


# A verbatim copy of the seed's reference (shared/seed/nnx-implement-embed.txt).
class SeedEmbed(nnx.Module):
    def __init__(self, vocab_size, d_model, rngs):
        key = rngs.params()
        self.embedding = nnx.Param(jax.random.normal(key, (vocab_size, d_model)))

    def __call__(self, token_ids):
        return self.embedding[token_ids]  # gather along axis 0


def seed_embed_forward(seed, token_ids, vocab_size, d_model):
    ids = token_ids.astype(jnp.int32)
    model = SeedEmbed(vocab_size=int(vocab_size), d_model=int(d_model), rngs=nnx.Rngs(int(seed)))
    return model(ids).reshape(-1)


def _seed_inputs(case_seed):
    rng = np.random.default_rng(case_seed)
    vocab_size = int(rng.choice([1, 2, 7, 100, 1000]))
    d_model = int(rng.choice([1, 3, 16, 129]))
    num_tokens = int(rng.integers(0, 40))
    ids = np.concatenate(
        [
            grid.make_ids(vocab_size, num_tokens, case_seed),
            rng.uniform(-3 * vocab_size, 3 * vocab_size, 5),
        ]
    )
    return (
        jnp.float32(rng.integers(0, 2**20)),
        jnp.asarray(ids, jnp.float32),
        jnp.float32(vocab_size),
        jnp.float32(d_model),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_seed", range(12))
def test_embed_forward_is_bit_identical_to_the_seed(backend, case_seed):
    args = _seed_inputs(case_seed)
    out = embed_forward(*args, backend=backend)
    assert out.shape == (args[1].shape[0] * int(args[3]),)
    grid.assert_bits_equal(out, seed_embed_forward(*args))


def test_table_is_the_seed_table():
    layer = MyEmbed(50, 8, nnx.Rngs(3))
    params = nnx.state(layer, nnx.Param)
    assert len(jax.tree.leaves(params)) == 1
    grid.assert_bits_equal(layer.embedding[...], SeedEmbed(50, 8, nnx.Rngs(3)).embedding[...])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4)])
def test_any_ids_shape(backend, shape):
    layer = MyEmbed(7, 3, nnx.Rngs(0), backend=backend)
    ids = jnp.asarray(grid.make_ids(7, int(np.prod(shape))).reshape(shape))
    out = layer(ids)
    assert out.shape == (*shape, 3)
    grid.assert_bits_equal(out, layer.embedding[...][ids])


@pytest.mark.parametrize("param_dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_backends_agree_for_each_param_dtype(param_dtype):
    ids = jnp.asarray(grid.make_ids(7, 40).reshape(4, 10))
    outs = [MyEmbed(7, 129, nnx.Rngs(0), backend=b, param_dtype=param_dtype)(ids) for b in BACKENDS]
    assert outs[0].dtype == param_dtype
    for out in outs[1:]:
        grid.assert_bits_equal(out, outs[0])


def test_output_dtype():
    layer = MyEmbed(7, 4, nnx.Rngs(0), dtype=jnp.bfloat16)
    assert layer(jnp.arange(3)).dtype == jnp.bfloat16
    assert layer.embedding[...].dtype == jnp.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_nnx_jit_and_vmap(backend):
    layer = MyEmbed(11, 5, nnx.Rngs(0), backend=backend)
    ids = jnp.asarray(grid.make_ids(11, 12).reshape(3, 4))
    expected = layer.embedding[...][ids]
    grid.assert_bits_equal(nnx.jit(lambda m, x: m(x))(layer, ids), expected)
    graphdef, state = nnx.split(layer)
    grid.assert_bits_equal(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids), expected)
    grid.assert_bits_equal(jax.vmap(layer)(ids), expected)


@pytest.mark.parametrize("backend", ["pallas"])
def test_table_gradient_matches_xla(backend):
    ids = jnp.array([[1, 1, 2, -1], [9, -12, 0, 10]])
    cotangent = grid.normal((2, 4, 5), seed=0)

    def grad(b):
        layer = MyEmbed(11, 5, nnx.Rngs(0), backend=b)
        return nnx.grad(lambda m: jnp.vdot(m(ids), cotangent))(layer).embedding[...]

    grid.assert_bits_equal(grad(backend), grad("xla"))


@pytest.mark.parametrize(
    ("name", "value"), [("vocab_size", 0), ("d_model", -3), ("vocab_size", 2.5), ("d_model", True)]
)
def test_sizes_must_be_positive_integers(name, value):
    sizes = {"vocab_size": 4, "d_model": 4, name: value}
    with pytest.raises(ValueError, match=f"{name}={value!r} must be a positive integer"):
        MyEmbed(sizes["vocab_size"], sizes["d_model"], nnx.Rngs(0))


def test_unknown_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="backend='gpu' must be one of"):
        MyEmbed(4, 4, nnx.Rngs(0), backend="gpu")
