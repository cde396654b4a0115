"""The GPU path compiles as far as it can without a GPU: lowering for ``cuda`` on CPU."""

import jax
import jax.numpy as jnp
import pytest

from kernels import compat, pallas_gather
from tests import grid


def _lower_for(platforms, fn, *shapes):
    return compat.lower(fn, *shapes, platforms=platforms).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("vocab_size", "d_model", "num_tokens"), [(50257, 768, 1000), (7, 129, 3)])
def test_gather_lowers_to_a_triton_call_for_cuda(dtype, vocab_size, d_model, num_tokens):
    text = _lower_for(
        ("cuda",),
        pallas_gather.gather,
        jax.ShapeDtypeStruct((vocab_size, d_model), dtype),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    )
    assert text.count(grid.TRITON_CALL) == 1
    assert 'name = "embedding_gather_block_t_' in text


def test_backward_lowers_to_a_triton_call_for_cuda():
    def grad(table, ids):
        return jax.grad(lambda t: pallas_gather.lookup(t, ids).astype(jnp.float32).sum())(table)

    text = _lower_for(
        ("cuda",),
        grad,
        jax.ShapeDtypeStruct((50, 129), jnp.bfloat16),
        jax.ShapeDtypeStruct((77,), jnp.int32),
    )
    assert text.count(grid.TRITON_CALL) == 1
    assert 'name = "embedding_scatter_add_block_t_' in text


def test_cpu_lowering_of_interpret_mode_has_no_triton_call():
    text = _lower_for(
        ("cpu",),
        lambda t, i: pallas_gather.gather(t, i, interpret=True),
        jax.ShapeDtypeStruct((7, 5), jnp.float32),
        jax.ShapeDtypeStruct((3,), jnp.int32),
    )
    assert grid.TRITON_CALL not in text
