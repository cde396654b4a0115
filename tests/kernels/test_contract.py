"""Every backend against the one contract (``kernels/contract.py``) and the oracle.

One body per check, run on whatever this machine is: interpreted where JAX's default
backend is not a GPU (the CPU CI machine), compiled on a CUDA machine. A backend that
cannot run here (missing from this JAX, or with no interpreter off its GPU) is skipped
with the reason; its errors and gradient dtype, read from tracing alone, are still
checked wherever its module imports.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import contract, reference
from tests import grid

pytestmark = pytest.mark.backends

NAMES = tuple(contract.REGISTRY)
CASES = grid.COVER_CASES


def _module(name: str):
    """``name``'s module if it imports here, else skip saying why."""
    module = contract.REGISTRY[name].module
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} does not import here: {e!r}")


def _runnable(name: str):
    """``(module, interpret)`` to run ``name`` on this machine, or skip saying why."""
    if problem := grid.backend_problem(name):
        pytest.skip(problem)
    return importlib.import_module(contract.REGISTRY[name].module), grid.interpreted(name)


@pytest.mark.parametrize("case", CASES, ids=grid.case_id)
@pytest.mark.parametrize("name", NAMES)
def test_forward_is_the_reference_bit_for_bit(name, case):
    module, interpret = _runnable(name)
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    out = module.gather(table, ids, interpret=interpret)
    grid.assert_bits_equal(out, reference.gather_reference(table, ids))


@pytest.mark.parametrize("case", CASES, ids=grid.case_id)
@pytest.mark.parametrize("name", NAMES)
def test_backwards_are_the_float32_gradient(name, case):
    module, interpret = _runnable(name)
    dtype, vocab_size, d_model, num_tokens = case
    grad_out = grid.make_table(num_tokens, d_model, dtype, seed=1)
    ids = jnp.asarray(grid.make_ids(vocab_size, num_tokens))
    in_token_order = grid.grad_in_token_order(grad_out, ids, vocab_size)
    kwargs = dict(vocab_size=vocab_size, interpret=interpret)
    atomic = module.scatter_add(grad_out, ids, **kwargs)
    np.testing.assert_allclose(atomic, in_token_order, rtol=1e-6, atol=1e-6)
    # The deterministic backward adds each row's gradient rows in token order, as NumPy.
    deterministic = module.segment_sum(grad_out, ids, **kwargs)
    if name == "xla":  # XLA's own scatter (kernels/xla.py): its order, not ours.
        np.testing.assert_allclose(deterministic, in_token_order, rtol=1e-6, atol=1e-6)
    else:
        grid.assert_bits_equal(deterministic, in_token_order)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_lookup_gradient_matches_jax_grad_of_the_oracle(name, deterministic):
    module, interpret = _runnable(name)
    table = grid.make_table(7, 129, jnp.float32)
    ids = jnp.asarray(grid.make_ids(7, 129))
    cotangent = grid.make_table(129, 129, jnp.float32, seed=2)

    def loss(lookup, t):
        return (lookup(t) * cotangent).sum()

    grad = jax.grad(lambda t: loss(lambda t: module.lookup(t, ids, interpret, deterministic), t))
    expected = jax.grad(lambda t: loss(lambda t: reference.gather_reference(t, ids), t))(table)
    np.testing.assert_allclose(grad(table), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_every_backward_is_float32_and_the_gradient_the_tables_dtype(name, dtype):
    if problem := contract.REGISTRY[name].problem():  # Tracing reaches the kernel's call.
        pytest.skip(problem)
    module = _module(name)
    grad_out = jax.ShapeDtypeStruct((9, 64), dtype)
    ids = jax.ShapeDtypeStruct((9,), jnp.int32)
    for backward in (module.scatter_add, module.segment_sum):
        shape = jax.eval_shape(lambda g, i, b=backward: b(g, i, vocab_size=5), grad_out, ids)
        assert (shape.shape, shape.dtype) == ((5, 64), jnp.float32), backward
    table = jax.ShapeDtypeStruct((5, 64), dtype)
    for deterministic in (False, True):
        grad = jax.eval_shape(
            jax.grad(lambda t, i, d=deterministic: module.lookup(t, i, False, d).sum()),
            table,
            ids,
        )
        assert (grad.shape, grad.dtype) == ((5, 64), jnp.dtype(dtype))


BAD_OPERANDS = {
    "float ids": (
        lambda m: m.gather(jnp.zeros((4, 8)), jnp.zeros((3,), jnp.float32)),
        ValueError,
        r"ids.shape=\(3,\), ids.dtype=dtype\('float32'\) must be a 1-D int32 array",
    ),
    "2-D ids": (
        lambda m: m.gather(jnp.zeros((4, 8)), jnp.zeros((1, 3), jnp.int32)),
        ValueError,
        "must be a 1-D int32 array",
    ),
    "int table": (
        lambda m: m.gather(jnp.zeros((4, 8), jnp.int32), jnp.zeros((3,), jnp.int32)),
        TypeError,
        r"table.dtype=dtype\('int32'\) must be one of",
    ),
    "1-D table": (
        lambda m: m.gather(jnp.zeros((4,)), jnp.zeros((3,), jnp.int32)),
        ValueError,
        r"table.shape=\(4,\) must be \(vocab_size, d_model\)",
    ),
    "ids of another length": (
        lambda m: m.scatter_add(jnp.zeros((2, 8)), jnp.zeros((3,), jnp.int32), vocab_size=4),
        ValueError,
        r"ids.shape=\(3,\), ids.dtype=dtype\('int32'\) must be \(2,\) int32",
    ),
    "int gradient": (
        lambda m: m.segment_sum(
            jnp.zeros((3, 8), jnp.int32), jnp.zeros((3,), jnp.int32), vocab_size=4
        ),
        TypeError,
        r"grad_out.dtype=dtype\('int32'\) must be one of",
    ),
    "no vocabulary": (
        lambda m: m.scatter_add(jnp.zeros((3, 8)), jnp.zeros((3,), jnp.int32), vocab_size=0),
        ValueError,
        "vocab_size=0 must be a positive int",
    ),
}


@pytest.mark.parametrize("bad", BAD_OPERANDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_backend_rejects_bad_operands_with_the_same_error(name, bad):
    module = _module(name)
    call, error, message = BAD_OPERANDS[bad]
    with pytest.raises(error, match=message):
        call(module)


@pytest.mark.parametrize("name", NAMES)
def test_tuning_is_one_frozen_hashable_config(name):
    config = _module(name).Config()
    assert dataclasses.is_dataclass(config)
    hash(config)  # A static argument of jax.jit.
    for field in dataclasses.fields(config):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field.name, None)


def test_the_id_rule_is_jax_indexing_in_every_form():
    """What an id means (``contract``'s rule) is JAX's own indexing: the row ``table[ids]``
    reads and the ids ``jax.grad`` of it gives gradient to; its NumPy form is the same
    code (the Triton form runs in test_triton_gather; ``embed.ids``'s modes apply it,
    tests/embed/test_ids.py)."""
    as_numpy = contract.id_rule(contract.wrap_and_clamp, np)
    for vocab_size in grid.VOCAB_SIZES:
        ids = jnp.asarray(grid.edge_ids_as(vocab_size, np.int32))
        table = jnp.arange(vocab_size, dtype=jnp.float32)[:, None]
        rows = table[ids][:, 0].astype(np.int32)
        np.testing.assert_array_equal(contract.wrap_and_clamp(ids, vocab_size), rows)
        np.testing.assert_array_equal(as_numpy(np.asarray(ids), vocab_size), rows)
        graded = jax.vmap(lambda i, t=table: jax.grad(lambda t: t[i[None]].sum())(t).sum())(ids)
        np.testing.assert_array_equal(contract.in_vocab(ids, vocab_size), graded != 0)
        np.testing.assert_array_equal(contract.in_vocab(np.asarray(ids), vocab_size), graded != 0)
        live = np.asarray(contract.gradient_rows(ids, vocab_size)) < vocab_size
        np.testing.assert_array_equal(live, graded != 0)
