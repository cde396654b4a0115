"""The one place that knows which JAX, jax-triton and Triton it runs on.

Supported: jax/jaxlib 0.10.2 to 0.12.x, with Triton 3.6 to 3.9 and jax-triton 0.3.1 or
0.4.x (README's "Supported stacks"). Every difference between those releases that the
code depends on is settled here, once, by probing for the feature rather than comparing
version numbers; callers ask for behaviour ("lower this for cuda", "call this Triton
kernel with a zeroed output", "can the triton backend run here?"), never for a version.

What differs, and where it is handled:

* Lowering a Pallas kernel for ``cuda`` on a host without a GPU. From JAX 0.11 the Pallas
  Triton lowering asks for the GPU's compute capability and, with no GPU, raises "No
  supported GPU devices found, please specify an abstract GPU device". 0.10.2 assumed
  sm_90. ``abstract_gpu()`` declares an abstract H100 while tracing, which every stack
  accepts; ``lower()`` uses it.
* The Pallas Triton backend is deprecated from JAX 0.11 (deprecation id
  ``jax-pallas-triton``): every lowering warns. ``quiet_pallas_triton_deprecation()``
  filters that one message for the library's users; ``pallas_triton_problem()`` says
  when the path is gone (the deprecation turned into an error, or the module removed).
* jax-triton 0.4 renamed ``out_shape`` to ``out_type`` and deprecated ``zeroed_outputs``
  in favour of a zeroed buffer passed as a ``jax.new_ref``; ``triton_call()`` speaks
  both. jax-triton 0.4.1's ``triton_call`` cannot be jitted on JAX 0.12 (its dead-code
  elimination rule has the old signature); ``triton_call_problem()`` detects that.
* Triton's CPU interpreter runs kernels on torch tensors; ``triton_interpreter_problem()``
  says when torch is missing (no CPU torch wheel for Python 3.12 here).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import warnings

import jax
import jax.numpy as jnp

# The device that cuda lowering on a GPU-less host is done for: the GPU we tune for.
DEFAULT_DEVICE_KIND = "NVIDIA H100"


# ----------------------------------------------------------------------------------------
# Lowering for a GPU from a host that has none.


def abstract_gpu(device_kind: str = DEFAULT_DEVICE_KIND):
    """A context in which tracing and lowering for ``cuda`` need no GPU.

    Enter it around the *tracing* (``jax.jit(f).trace(...)``, ``jax.export.export``), not
    only the lowering: Pallas records the device it was traced for. On stacks without
    abstract devices it is a no-op, and such stacks lower for sm_90 with no GPU anyway.

    >>> with abstract_gpu():
    ...     lowered = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))  # doctest: +SKIP
    """
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None or not hasattr(jax.sharding, "use_abstract_mesh"):
        return contextlib.nullcontext()
    device = abstract_device(device_kind=device_kind, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lower(fn, *args, platforms=("cuda",), device_kind: str = DEFAULT_DEVICE_KIND):
    """``jax.jit(fn).trace(*args).lower(lowering_platforms=platforms)``, from any host.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. With ``"cuda"`` among
    ``platforms`` the tracing happens under ``abstract_gpu(device_kind)``.
    """
    platforms = tuple(platforms)
    context = abstract_gpu(device_kind) if "cuda" in platforms else contextlib.nullcontext()
    with context:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms)


# ----------------------------------------------------------------------------------------
# The Pallas Triton backend (deprecated from JAX 0.11).

PALLAS_TRITON_DEPRECATION = "jax-pallas-triton"
# The start of the message JAX 0.11 and 0.12 warn with on every Pallas Triton lowering.
_PALLAS_TRITON_MESSAGE = "The Pallas Triton backend is deprecated"


def _deprecations():
    try:
        return importlib.import_module("jax._src.deprecations")
    except ImportError:
        return None


def pallas_triton_deprecated() -> bool:
    """Whether this JAX registers the Pallas Triton deprecation (0.11 and later)."""
    deprecations = _deprecations()
    registered = getattr(deprecations, "_registered_deprecations", {})
    return PALLAS_TRITON_DEPRECATION in registered


def pallas_triton_problem() -> str | None:
    """Why Pallas on Triton cannot lower here, or ``None`` when it can.

    It cannot once JAX has removed the module or turned the deprecation into an error
    (``jax._src.deprecations.accelerate("jax-pallas-triton")``, which JAX does before it
    removes a path).
    """
    way_out = 'use backend="mosaic" (Pallas on Mosaic GPU), "triton" or "xla"'
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError as e:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend ({e}); {way_out}"
    deprecations = _deprecations()
    if pallas_triton_deprecated() and deprecations.is_accelerated(PALLAS_TRITON_DEPRECATION):
        return (
            f"this JAX ({jax.__version__}) has turned the Pallas Triton deprecation "
            f"({PALLAS_TRITON_DEPRECATION!r}) into an error; {way_out}"
        )
    return None


def quiet_pallas_triton_deprecation() -> None:
    """Keep JAX's Pallas Triton deprecation warning away from the library's users.

    Called where the library uses that API (``kernels/pallas_gather.py``). The warning
    is raised while the *user's* program is lowered, out of reach of a
    ``warnings.catch_warnings`` around our own calls, so this adds one filter for that
    exact message; nothing else is hidden. README says what replaces the path.
    """
    if pallas_triton_deprecated():
        warnings.filterwarnings(
            "ignore", message=_PALLAS_TRITON_MESSAGE, category=DeprecationWarning
        )


@contextlib.contextmanager
def pallas_triton_deprecation_accelerated():
    """Simulate the JAX release that turns the deprecation into an error (for tests)."""
    deprecations = _deprecations()
    state = deprecations._registered_deprecations[PALLAS_TRITON_DEPRECATION]
    before = state.accelerated
    state.accelerated = True
    try:
        yield
    finally:
        state.accelerated = before


# ----------------------------------------------------------------------------------------
# jax-triton.


def import_jax_triton():
    """``jax_triton``, or a ``RuntimeError`` that says what is missing.

    jax_triton sets ``TRITON_CACHE_DIR=""`` while importing (before it checks for a CUDA
    jaxlib): whether the import fails or not, Triton's cache is put back as it was.
    """
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    except ImportError as e:
        raise RuntimeError(
            'The "triton" backend needs a CUDA GPU with jax-triton and a CUDA jaxlib; '
            f"importing jax_triton failed: {e!r}"
        ) from e
    finally:
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    return jax_triton


def _version(module) -> str:
    return getattr(module, "__version__", None) or getattr(
        getattr(module, "version", None), "__version__", "unknown"
    )


@functools.cache
def _triton_call_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(import_jax_triton().triton_call).parameters)


def _refs_for_outputs() -> bool:
    """jax-triton 0.4 and later: a zeroed output is a zeroed ``jax.new_ref`` argument."""
    return "out_type" in _triton_call_parameters() and hasattr(jax, "new_ref")


def triton_call(*args, kernel, out_shape: jax.ShapeDtypeStruct, zeroed: bool = False, **kwargs):
    """``jax_triton.triton_call`` with one output, on jax-triton 0.3 and 0.4 alike.

    ``zeroed=True`` asks for an output that is zero when the kernel starts (an
    accumulator): jax-triton 0.3's ``zeroed_outputs``, or from 0.4 on a zeroed buffer
    passed as a ``jax.new_ref`` in the output's place, which 0.4 asks for instead.
    """
    jt = import_jax_triton()
    if zeroed and _refs_for_outputs():
        out = jax.new_ref(jnp.zeros(out_shape.shape, out_shape.dtype))
        jt.triton_call(*args, out, kernel=kernel, out_type=(), **kwargs)
        return out[...]
    key = "out_type" if "out_type" in _triton_call_parameters() else "out_shape"
    if zeroed:
        kwargs["zeroed_outputs"] = (0,)
    return jt.triton_call(*args, kernel=kernel, **{key: out_shape}, **kwargs)


@functools.cache
def triton_call_problem() -> str | None:
    """Why the raw Triton backend cannot run here, or ``None`` when it can.

    Checked when a layer with ``backend="triton"`` is built, so the user gets this
    message instead of an error from deep inside jax. Probes, once per process:
    that jax_triton imports, and that a jitted ``triton_call`` survives JAX's dead-code
    elimination (jax-triton 0.4.1's rule takes two arguments; JAX 0.12 passes three).
    """
    try:
        jt = import_jax_triton()
    except RuntimeError as e:
        return str(e)
    from kernels import _compat_probe  # A @triton.jit kernel must live in a file.

    shape = jax.ShapeDtypeStruct((16,), jnp.float32)
    jaxpr = jax.make_jaxpr(
        lambda x: triton_call(x, kernel=_compat_probe.copy_kernel, out_shape=shape, grid=(1,), N=16)
    )(shape)
    try:
        pe = importlib.import_module("jax._src.interpreters.partial_eval")
        pe.dce_jaxpr(jaxpr.jaxpr, [True])
    except TypeError as e:
        return (
            f"jax_triton.triton_call cannot be jitted with jax {jax.__version__} and "
            f"jax-triton {_version(jt)} (jax-triton's dead-code-elimination rule does not "
            f"match this JAX: {e}). Use a jax-triton release that supports this JAX, or "
            "a JAX before 0.12 (jax 0.11.2 with jax-triton 0.3.1 is tested)"
        )
    except ImportError:
        pass  # JAX moved its internals: nothing known to be broken.
    return None


# ----------------------------------------------------------------------------------------
# Triton's CPU interpreter.


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run, or ``None``."""
    try:
        importlib.import_module("torch")
    except ImportError:
        return (
            "Triton's CPU interpreter runs kernels on torch tensors and torch is not "
            "installed (no CPU torch wheel for this Python here; the 3.11 stack has one)"
        )
    return None


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


# ----------------------------------------------------------------------------------------
# XLA's CUDA compiler without a GPU: a compile-only device.
#
# The ``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` wheels (the gpu_image and newest
# locks carry them) hold XLA's CUDA compiler. With a GPU target config (a
# ``GpuTargetConfigProto`` in text form: ``kernels/gpu_specs/*.txtpb``), the CUDA
# client builds a topology whose device JAX can compile for, ahead of time, with no
# driver: ``jax.jit(f).trace(<ShapeDtypeStructs on that device>).lower().compile()``.

# Compile-only GPUs by name: their spec file in kernels/gpu_specs/.
GPU_SPECS = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}


def cuda_compiler_version() -> str | None:
    """The installed CUDA PJRT plugin's version, or None when there is none."""
    from importlib import metadata

    for name in ("jax-cuda13-pjrt", "jax-cuda12-pjrt"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def cuda_compiler_problem() -> str | None:
    """Why kernels cannot be compiled for a GPU here, or None when they can.

    Needs the CUDA plugin wheels and ``jax.experimental.topologies``; on a CPU machine
    without them (the min stack) this says which to install.
    """
    if cuda_compiler_version() is None:
        return (
            "XLA's CUDA compiler is not installed: pip install jax-cuda13-plugin "
            f"jax-cuda13-pjrt at this jaxlib's version ({jax.__version__}); the gpu_image "
            "and newest locks carry them"
        )
    try:
        importlib.import_module("jax.experimental.topologies")
    except ImportError as e:
        return f"this JAX ({jax.__version__}) has no jax.experimental.topologies ({e})"
    return None


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library (``libcuda.so.1``) loads: a CUDA machine."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cpu_unless_cuda_driver() -> bool:
    """Run JAX on the CPU where a CUDA plugin is installed but no driver is; True if so.

    With the plugin wheels (gpu_image and newest locks) on a CPU machine, JAX tries to
    start its CUDA backend first and logs a long traceback ("Unable to load cuDNN")
    before falling back to the CPU. The tests and the benchmark call this before JAX
    picks its backends; it does nothing when ``JAX_PLATFORMS`` (``jax_platforms``) is
    set, when no CUDA plugin is installed, or on a CUDA machine, whose GPU JAX must see.
    Compiling for a compile-only GPU (``compile_only_gpu``) works either way.
    """
    if jax.config.jax_platforms or cuda_compiler_version() is None or cuda_driver_present():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def gpu_spec(gpu: str) -> str:
    """The text ``GpuTargetConfigProto`` of a compile-only ``gpu`` (a ``GPU_SPECS`` key)."""
    if gpu not in GPU_SPECS:
        raise ValueError(f"{gpu=} must be one of {sorted(GPU_SPECS)}")
    path = os.path.join(os.path.dirname(__file__), "gpu_specs", GPU_SPECS[gpu])
    with open(path) as f:
        return f.read()


def compile_only_gpu(gpu: str = "h100"):
    """A JAX device for ``gpu`` that XLA compiles for but nothing runs on.

    Put arguments on it (``jax.ShapeDtypeStruct(..., sharding=SingleDeviceSharding(d))``)
    and ``.lower().compile()`` runs XLA's CUDA pipeline down to cubins. Raises
    ``RuntimeError`` saying why when ``cuda_compiler_problem()`` is not None.
    """
    problem = cuda_compiler_problem()
    if problem:
        raise RuntimeError(problem)
    topologies = importlib.import_module("jax.experimental.topologies")
    topology = topologies.get_topology_desc(
        platform="cuda", topology_name="", target_config=gpu_spec(gpu), topology="1x1x1"
    )
    return topology.devices[0]
