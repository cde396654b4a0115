"""kernels/compat.py: the version-aware seams, each checked on the stack it runs on.

Every stack runs this file; a test that does not apply to the installed stack skips with
the reason compat itself gives.
"""

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import embed
from kernels import compat, pallas_gather, triton_gather
from tests import grid

SHAPES = (jax.ShapeDtypeStruct((7, 129), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.int32))

deprecated = pytest.mark.skipif(
    not compat.pallas_triton_deprecated(),
    reason=f"jax {jax.__version__} does not deprecate the Pallas Triton backend",
)
jax_triton_imports = pytest.mark.skipif(
    compat.triton_call_problem() is not None
    and "importing jax_triton failed" in compat.triton_call_problem(),
    reason=f"jax_triton does not import here: {compat.triton_call_problem()}",
)


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that turns every DeprecationWarning into an error."""
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_lower_for_cuda_needs_no_gpu():
    text = compat.lower(lambda t, i: embed.lookup(t, i, backend="pallas"), *SHAPES).as_text()
    assert text.count(grid.TRITON_CALL) == 1


def test_pallas_triton_still_lowers():
    # Fails the day JAX removes Pallas on Triton or makes its deprecation an error.
    assert compat.pallas_triton_problem() is None
    assert embed.backend_for("auto", "cuda") == "pallas"


@deprecated
def test_users_do_not_see_the_pallas_triton_deprecation():
    lower = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from kernels import compat
        shapes = (jax.ShapeDtypeStruct((7, 129), jnp.float32),
                  jax.ShapeDtypeStruct((3,), jnp.int32))
        """)
    ours = _run(
        lower + "from kernels import pallas_gather\ncompat.lower(pallas_gather.gather, *shapes)\n"
    )
    assert ours.returncode == 0, ours.stderr
    # The control: the same lowering without our filter raises JAX's warning as an error.
    theirs = _run(
        lower + "from kernels import pallas_gather\n"
        "import warnings; warnings.resetwarnings()\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "compat.lower(pallas_gather.gather, *shapes)\n"
    )
    assert theirs.returncode != 0
    assert "The Pallas Triton backend is deprecated" in theirs.stderr


@deprecated
def test_when_the_deprecation_becomes_an_error_pallas_fails_clearly_at_build():
    with compat.pallas_triton_deprecation_accelerated():
        # JAX's own lowering now raises: the simulation is what that release will do. (A
        # lowering cached by an earlier test in this process would not run the rule.)
        jax.clear_caches()
        with pytest.raises(ValueError, match="Pallas Triton backend is deprecated"):
            compat.lower(pallas_gather.gather, *SHAPES)
        assert 'backend="mosaic"' in compat.pallas_triton_problem()
        # The library says so first, naming the way out, wherever "pallas" is asked for.
        with pytest.raises(RuntimeError, match=r"backend='pallas' cannot run here: .*mosaic"):
            compat.lower(lambda t, i: embed.lookup(t, i, backend="pallas"), *SHAPES)
        with pytest.raises(RuntimeError, match=r"backend='pallas' cannot run here: .*error"):
            embed.MyEmbed(7, 129, nnx.Rngs(0), backend="pallas")
        # "auto" steps off the dead path instead of failing every model that uses it.
        assert embed.backend_for("auto", "cuda") == "xla"
        text = compat.lower(lambda t, i: embed.lookup(t, i, backend="auto"), *SHAPES).as_text()
        assert grid.TRITON_CALL not in text
    assert compat.pallas_triton_problem() is None


def test_triton_backend_problem_is_raised_when_the_layer_is_built():
    problem = compat.triton_call_problem()
    if problem is None:
        embed.MyEmbed(7, 16, nnx.Rngs(0), backend="triton")  # Builds: the stack can run it.
        return
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here") as info:
        embed.MyEmbed(7, 16, nnx.Rngs(0), backend="triton")
    assert problem in str(info.value)


@jax_triton_imports
def test_known_broken_triton_call_is_named_with_versions_and_a_way_out():
    problem = compat.triton_call_problem()
    if problem is None:
        pytest.skip(f"triton_call jits with jax {jax.__version__} and this jax-triton")
    assert jax.__version__ in problem
    assert "jax 0.11.2 with jax-triton 0.3.1" in problem


@jax_triton_imports
def test_triton_call_speaks_the_installed_jax_triton():
    import jax_triton

    params = compat._triton_call_parameters()
    table = jax.ShapeDtypeStruct((7, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((5,), jnp.int32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        forward = jax.make_jaxpr(triton_gather.gather)(table, ids)
        backward = jax.make_jaxpr(lambda g, i: triton_gather.scatter_add(g, i, vocab_size=7))(
            jax.ShapeDtypeStruct((5, 16), jnp.float32), ids
        )
    # No deprecated argument (out_shape, zeroed_outputs) on the installed jax-triton.
    assert [str(w.message) for w in record] == [], jax_triton.__version__
    assert "triton_kernel_call" in str(forward)
    if "out_type" in params and hasattr(jax, "new_ref"):
        # jax-triton 0.4: the accumulator is a zeroed Ref argument, not zeroed_outputs.
        assert "new_ref" in str(backward)
        assert "zeroed_outputs=()" in str(backward)
    else:
        assert "zeroed_outputs=(0,)" in str(backward)


# ---------------------------------------------------------------------------------------
# Mosaic GPU (the "mosaic" backend).


def test_mosaic_gpu_problem_follows_the_interpreter():
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    problem = compat.mosaic_gpu_problem()
    if hasattr(plgpu, "InterpretGPUParams") and hasattr(jax, "new_ref"):
        assert problem is None
        assert isinstance(compat.mosaic_gpu_interpret_params(), plgpu.InterpretGPUParams)
    else:
        assert "needs JAX >= 0.11" in problem and jax.__version__ in problem
        with pytest.raises(NotImplementedError, match="needs JAX >= 0.11"):
            compat.mosaic_gpu_interpret_params()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks a CPU host")
def test_tracing_for_gpu_inside_the_abstract_gpu_only():
    assert not compat.tracing_for_gpu()
    with compat.abstract_gpu():
        # 0.10.2 has no abstract devices (abstract_gpu is a no-op there).
        assert compat.tracing_for_gpu() == hasattr(jax.sharding, "AbstractDevice")
    assert not compat.tracing_for_gpu()
