"""Backend names, ``auto``, and the platform chosen at lowering time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import embed
from embed import dispatch
from kernels import compat
from tests import grid

SHAPES = (jax.ShapeDtypeStruct((50, 64), jnp.float32), jax.ShapeDtypeStruct((2, 9), jnp.int32))


def _lowered(backend, platforms):
    fn = functools.partial(embed.lookup, backend=backend)
    return compat.lower(fn, *SHAPES, platforms=platforms).as_text()


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"backend='cuda' must be one of \('auto', 'xla'"):
        embed.lookup(jnp.zeros((3, 2)), jnp.zeros((1,), jnp.int32), backend="cuda")


@pytest.mark.parametrize(
    ("backend", "platform", "expected"),
    [
        ("auto", "cpu", "xla"),
        ("auto", "gpu", "pallas"),
        ("auto", "cuda", "pallas"),
        ("xla", "gpu", "xla"),
    ],
)
def test_backend_for(backend, platform, expected):
    assert embed.backend_for(backend, platform) == expected


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_cuda_lowering_carries_the_kernel_even_when_traced_on_cpu(backend):
    assert grid.TRITON_CALL in _lowered(backend, ("cuda",))
    assert grid.TRITON_CALL not in _lowered(backend, ("cpu",))


def test_default_layer_matches_xla_and_runs_the_kernel_auto_picks():
    """ "auto" (the default), once: forward and gradient equal to "xla", and the kernel
    ``backend_for`` names in the compiled call (the Pallas kernel on a CUDA machine)."""
    ids = jnp.asarray(grid.make_ids(97, 2 * 129).reshape(2, 129))
    cotangent = grid.normal((2, 129, 64), seed=1)

    def forward_and_grad(layer):
        grad = nnx.grad(lambda m: jnp.vdot(m(ids), cotangent))(layer).embedding[...]
        return layer(ids), grad

    default = embed.MyEmbed(97, 64, nnx.Rngs(0))
    assert default.backend == "auto"
    out, grad = forward_and_grad(default)
    expected_out, expected_grad = forward_and_grad(
        embed.MyEmbed(97, 64, nnx.Rngs(0), backend="xla")
    )
    grid.assert_bits_equal(out, expected_out)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(default)
    text = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).as_text()
    picked = embed.backend_for("auto")
    assert (grid.TRITON_CALL in text) == (picked == "pallas"), picked


def test_export_for_cuda_from_a_cpu_host_carries_the_kernel():
    # One export per platform: JAX 0.10.2 lowers every kept branch of a multi-platform
    # export for every platform, and pallas_call's CPU rule refuses a compiled kernel.
    fn = jax.jit(lambda t, i: embed.lookup(t, i, backend="auto"))
    # Triton calls carry no serialization-compatibility guarantee; exporting one is opt-in.
    allow = [export.DisabledSafetyCheck.custom_call(grid.TRITON_CALL)]
    with embed.abstract_gpu():  # What a user exporting from a CPU host does on JAX >= 0.11.
        for_gpu = export.export(fn, platforms=("cuda",), disabled_checks=allow)(*SHAPES)
    assert grid.TRITON_CALL in for_gpu.mlir_module()
    for_cpu = export.export(fn, platforms=("cpu",))(*SHAPES)
    assert grid.TRITON_CALL not in for_cpu.mlir_module()
    table = grid.make_table(50, 64, jnp.float32)
    ids = jnp.asarray(grid.make_ids(50, 18).reshape(2, 9))
    grid.assert_bits_equal(for_cpu.call(table, ids), table[ids])


def test_xla_backend_never_lowers_a_kernel():
    assert grid.TRITON_CALL not in _lowered("xla", ("cuda",))


def test_pallas_runs_interpreted_on_cpu():
    table = grid.make_table(50, 64, jnp.float32)
    ids = jnp.asarray(grid.make_ids(50, 18))
    grid.assert_bits_equal(dispatch.gather(table, ids, "pallas"), table[ids])
    assert np.asarray(dispatch.gather(table, ids[:0], "pallas")).shape == (0, 64)


@pytest.mark.skipif(embed.backend_problem("triton") is None, reason="triton can run here")
def test_triton_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: ") as info:
        embed.lookup(jnp.zeros((3, 4)), jnp.array([1]), backend="triton")
    assert embed.backend_problem("triton") in str(info.value)


# ---------------------------------------------------------------------------------------
# "mosaic": Pallas on Mosaic GPU, where this JAX has it (kernels.compat decides).

MOSAIC_PROBLEM = compat.mosaic_gpu_problem()
needs_mosaic = pytest.mark.skipif(MOSAIC_PROBLEM is not None, reason=str(MOSAIC_PROBLEM))


@pytest.mark.skipif(MOSAIC_PROBLEM is None, reason="this JAX has the mosaic backend")
def test_mosaic_without_support_fails_when_the_layer_is_built():
    with pytest.raises(RuntimeError, match=r"backend='mosaic' cannot run here: .*JAX >= 0\.11"):
        embed.MyEmbed(50, 64, nnx.Rngs(0), backend="mosaic")


@needs_mosaic
def test_mosaic_runs_interpreted_on_cpu_with_its_gradient():
    table = grid.make_table(50, 64, jnp.float32)
    ids = jnp.asarray(grid.make_ids(50, 18).reshape(2, 9))
    layer = embed.MyEmbed(50, 64, nnx.Rngs(0), backend="mosaic")
    grid.assert_bits_equal(layer(ids), layer.embedding[...][ids])
    for deterministic in (False, True):
        grad = jax.grad(
            lambda t, d=deterministic: embed.lookup(t, ids, backend="mosaic", deterministic=d).sum()
        )(table)
        np.testing.assert_array_equal(grad, jax.grad(lambda t: t[ids].sum())(table))


@needs_mosaic
def test_mosaic_cuda_lowering_carries_the_mosaic_gpu_kernel():
    # Traced inside compat's abstract GPU: "mosaic" is chosen at trace time.
    assert "@mosaic_gpu_v2" in _lowered("mosaic", ("cuda",))
    assert "@mosaic_gpu_v2" not in _lowered("mosaic", ("cpu",))
