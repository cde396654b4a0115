"""The one place that knows which JAX it runs on and adapts to the differences.

This branch carries only the Mosaic GPU section; main's ``kernels/compat.py`` (the
abstract GPU device for cuda lowering, jax-triton, the Pallas Triton deprecation) comes
first when the two are merged, and this section goes at its end unchanged.
"""

from __future__ import annotations

import jax

# ----------------------------------------------------------------------------------------
# Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``): the ``mosaic`` backend.
#
# What the kernels in ``kernels/mosaic_gather.py`` need, probed by feature:
# * ``plgpu.kernel`` with ``out_type=``/``scratch_types=``, TMA copies with a
#   ``predicate=`` and ``reduction_op=`` (0.10.2, 0.11.2 and 0.12.0.1 all have these);
# * ``jax.new_ref``, for the zero-initialised gradient the scatter-add kernel adds into;
# * ``plgpu.InterpretGPUParams``: the GPU-semantics interpreter that runs the kernels on
#   CPU. JAX 0.11 exports it; 0.10.2 keeps an unfinished copy under ``jax._src`` that we
#   do not reach for, so 0.10.2 has no ``mosaic`` backend at all (not even on a GPU:
#   one backend, one set of tests, one stack floor).

MOSAIC_GPU_MIN_JAX = "0.11"


def _mosaic_gpu_module():
    try:
        from jax.experimental.pallas import mosaic_gpu
    except ImportError:
        return None
    return mosaic_gpu


def mosaic_gpu_problem() -> str | None:
    """Why the ``mosaic`` backend cannot run here, or ``None`` when it can."""
    plgpu = _mosaic_gpu_module()
    missing = []
    if plgpu is None:
        missing.append("jax.experimental.pallas.mosaic_gpu")
    else:
        missing += [
            f"plgpu.{name}"
            for name in ("kernel", "InterpretGPUParams", "copy_gmem_to_smem", "Barrier")
            if not hasattr(plgpu, name)
        ]
    if not hasattr(jax, "new_ref"):
        missing.append("jax.new_ref")
    if not missing:
        return None
    return (
        f'backend="mosaic" (Pallas on Mosaic GPU) needs JAX >= {MOSAIC_GPU_MIN_JAX}: '
        f"this JAX ({jax.__version__}) lacks {', '.join(missing)}"
    )


def mosaic_gpu_interpret_params():
    """What ``plgpu.kernel(interpret=...)`` takes to run a kernel on CPU.

    The interpreter's defaults: uninitialised memory reads as NaN, races are not
    searched for (``detect_races=True`` is slower still; the kernels' tests may ask).
    """
    problem = mosaic_gpu_problem()
    if problem:
        raise NotImplementedError(problem)
    return _mosaic_gpu_module().InterpretGPUParams()


def tracing_for_gpu() -> bool:
    """Whether the computation being traced now is meant for a GPU.

    True on a GPU host, and inside an abstract GPU device (``abstract_gpu()``, the way
    to lower for cuda from a CPU host). The ``mosaic`` backend decides with this at
    trace time, because ``jax.lax.platform_dependent`` cannot lower for cuda when its
    other branch is the Mosaic GPU interpreter: the interpreter's ordered IO effect
    leaves the cuda branch's ``cond`` without the tokens it expects (JAX 0.11.2 and
    0.12.0.1: "Lowering rule for `cond` returns incorrect set of output tokens").
    """
    if jax.default_backend() == "gpu":
        return True
    get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    device = getattr(get_abstract_mesh(), "abstract_device", None) if get_abstract_mesh else None
    return getattr(device, "platform", None) == "gpu"
