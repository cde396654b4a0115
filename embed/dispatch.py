"""Backend names to implementations, with the platform chosen when lowering.

``jax.lax.platform_dependent`` picks the branch when the computation is lowered for a
platform, not from the host's default backend at trace time, so a model traced or
exported on a CPU host for a GPU carries the real kernel. ``"mosaic"`` is the exception:
it is chosen when traced (``gather`` says why).

``REGISTRY`` (``kernels.contract.REGISTRY``) names every backend; its module is imported
only when the backend is used. "auto" and the choice of platform live here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from embed import ids as ids_lib
from kernels import compat, contract

# The registry of kernels/contract.py: every backend by name, imported only when used.
REGISTRY = contract.REGISTRY
BACKENDS = ("auto", *REGISTRY)

# What "auto" lowers to on each GPU platform, on every supported JAX (0.10.2 to 0.12.x);
# every other platform (cpu, tpu) gets "xla", where the kernels only run interpreted.
# - cuda/rocm: the Pallas kernel ("pallas"), which owns the backward as a float32 atomic
#   scatter-add. The reason is XLA's GPU scatter-add: in jaxlib 0.10.2 and 0.11.0 it falls
#   into a compare-and-swap loop, 450-2000x slower under contention (openxla/xla#46225,
#   jax-ml/jax#38806); whether 0.11.1+ fixed it is unconfirmed. On JAX 0.11+ this path
#   is deprecated upstream (README: "Supported stacks"); where a JAX has turned that
#   deprecation into an error, or removed it, "auto" lowers to "xla" instead.
#   No GPU figure of ours backs this rule yet: docs/benchmarks.md says which exist.
#   What XLA compiles, read from SASS (docs/benchmarks.md, "Compiled for an H100";
#   compiled, not run): on jaxlib 0.11.2 and 0.12.0.1 the "xla" backend's backward,
#   accumulated in float32, is a native fire-and-forget REDG.E.ADD.F32x4 on an H100 (native
#   RED adds on an A100), no CAS loop; only a 16-bit scatter-add (jax.grad of a
#   bfloat16 table[ids], which "xla" avoids) still is one. "pallas"'s is a returning
#   ATOMG.E.ADD.F32x4. So on those jaxlibs the CAS reason does not hold for "xla": until
#   measured, weigh "xla" as "pallas"'s equal in the backward and the float32 forward,
#   behind it in the bfloat16 forward (XLA's gather moves 64 bits a thread, "pallas" 128;
#   some narrow-row shapes compile scalar).
# - "mosaic" (Pallas on Mosaic GPU, the path JAX recommends now that Pallas on Triton is
#   deprecated) is not "auto" on cuda yet: it lowers for cuda and matches the reference in
#   the GPU interpreter, but no timing of it on a GPU exists, so nothing shows it is not
#   slower than "pallas" there; and JAX 0.10.2, which we support, has no such backend.
#   Switch "cuda" to it when tools/gpu_check's figures put it at or ahead of "pallas".
AUTO = {"cuda": "pallas", "rocm": "pallas"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    return backend


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on the installed JAX stack, or ``None`` when it can.

    >>> backend_problem("xla") is None
    True
    """
    check_backend(backend)
    return None if backend == "auto" else REGISTRY[backend].problem()


def check_backend_usable(backend: str) -> str:
    """``backend`` if the installed stack can run it; else ``RuntimeError`` saying why.

    Layers call this when they are built, so a backend that cannot run fails there with
    the versions and the way out, never deep inside jax at the first call.
    """
    if backend != "auto":
        REGISTRY[check_backend(backend)].load()
    return backend


def _auto(platform: str) -> str:
    """What "auto" runs on ``platform``: ``AUTO``'s kernel if it can run here, else "xla"."""
    kernel = AUTO.get(platform, "xla")
    return kernel if kernel == "xla" or REGISTRY[kernel].problem() is None else "xla"


def backend_for(backend: str, platform: str | None = None) -> str:
    """The implementation ``backend`` runs on ``platform`` (default: JAX's default backend).

    >>> backend_for("auto", "cpu")
    'xla'
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    return _auto("cuda" if platform == "gpu" else platform)


def gather(
    table: jax.Array, ids: jax.Array, backend: str = "auto", *, deterministic: bool = False
) -> jax.Array:
    """``table[ids]`` for 1-D int32 ``ids`` through ``backend``, chosen per platform.

    Every backend accumulates the table gradient in float32 and rounds it once to the
    table's dtype (``kernels.contract.differentiable``), so backends agree at 16 bits
    too. ``deterministic=True`` takes each backend's bit-reproducible ``segment_sum``
    backward (``"xla"``'s is XLA's own scatter, see ``kernels.xla``). The platform is
    chosen when the computation is lowered, except for ``"mosaic"``, chosen when traced
    (``contract.Backend.chosen_when``).
    """
    check_backend(backend)
    if backend == "auto":
        kernels = {p: _auto(p) for p in AUTO}
        branches = {p: _compiled(k, deterministic) for p, k in kernels.items() if k != "xla"}
        default = _compiled("xla", deterministic)
        if not branches:
            return default(table, ids)
        return jax.lax.platform_dependent(table, ids, **branches, default=default)
    spec = REGISTRY[backend]
    compiled = _compiled(backend, deterministic)
    if not spec.compiled_on or not spec.interpreted:
        return compiled(table, ids)  # One path everywhere, or none off its platforms.
    interpreted = functools.partial(spec.load().lookup, interpret=True, deterministic=deterministic)
    if spec.chosen_when == "tracing":
        return compiled(table, ids) if compat.tracing_for_gpu() else interpreted(table, ids)
    branches = dict.fromkeys(spec.compiled_on, compiled)
    return jax.lax.platform_dependent(table, ids, **branches, default=interpreted)


def _compiled(backend: str, deterministic: bool):
    """``backend``'s ``lookup`` as it runs compiled; ``RuntimeError`` if it cannot run."""
    lookup = REGISTRY[backend].load().lookup
    return functools.partial(lookup, interpret=False, deterministic=deterministic)


def lookup(
    table: jax.Array,
    token_ids,
    *,
    backend: str = "auto",
    mode: str = "clip",
    fill_value=jnp.nan,
    deterministic: bool = False,
    dtype=None,
    scale_by_sqrt_d: bool = False,
) -> jax.Array:
    """Embedding rows for ``token_ids`` of any shape: ``token_ids.shape + (d_model,)``.

    ``mode`` and ``fill_value`` are the out-of-range policy (``embed.ids``);
    ``deterministic`` selects a bit-reproducible kernel backward (``gather``);
    ``dtype`` and ``scale_by_sqrt_d`` finish the rows as ``MyEmbed`` does (``finish``).

    Called eagerly (a concrete table, ids and fill value), the host checks run first
    (float ids, ``mode="error"``) and all the device work is then one compiled call,
    cached by ``jax.jit`` per shape, dtype and configuration: run op by op it would be
    a dispatch per primitive, several times the cost of the gather. Under tracing the
    same steps are traced into the caller's computation, as they always were.
    """
    check_backend(backend)
    ids_lib.check_mode(mode)
    if not _is_eager(table, token_ids, fill_value, mode):
        rows = _lookup_rows(
            table,
            token_ids,
            fill_value,
            backend=backend,
            mode=mode,
            deterministic=deterministic,
        )
        return finish(rows, table.shape[-1], dtype=dtype, scale_by_sqrt_d=scale_by_sqrt_d)
    ids = ids_lib.host_ids(token_ids)
    if mode == "error":
        # Before the compiled call, so nothing runs on ids that fail; those that pass
        # are in range, where "error" and "clip" read the same rows.
        ids_lib.check_in_vocab(ids_lib.host_int32(ids), table.shape[0])
        mode = "clip"
    if mode != "fill":
        fill_value = None
    elif not isinstance(fill_value, jax.Array):
        # On the host, as jnp.asarray(fill_value, dtype) converts a non-JAX value, so a
        # NaN fill keeps its bits; a JAX fill value is converted inside, by the same op.
        fill_value = np.asarray(fill_value, dtype=table.dtype)
    return _eager_lookup(
        table,
        ids,
        fill_value,
        backend=backend,
        mode=mode,
        deterministic=deterministic,
        dtype=None if dtype is None else jnp.dtype(dtype),
        scale_by_sqrt_d=bool(scale_by_sqrt_d),
    )


def finish(rows: jax.Array, d_model: int, *, dtype=None, scale_by_sqrt_d: bool = False):
    """Looked-up rows in the output ``dtype`` (default: theirs), scaled if ``scale_by_sqrt_d``.

    ``MyEmbed``'s last step, here so that an eager lookup compiles it with the rest.
    """
    rows = rows if dtype is None else rows.astype(dtype)
    return rows * jnp.sqrt(d_model).astype(rows.dtype) if scale_by_sqrt_d else rows


def _is_eager(table, token_ids, fill_value, mode) -> bool:
    """True when nothing is traced, so the lookup can be one compiled call.

    A fill value in use must be a number or an array: anything else takes the op-by-op
    path, which raises the errors it always did.
    """
    tracer = jax.core.Tracer
    return (
        isinstance(table, jax.Array)
        and not any(isinstance(x, tracer) for x in (table, token_ids, fill_value))
        and (
            mode != "fill"
            or isinstance(fill_value, (int, float, np.generic, np.ndarray, jax.Array))
        )
    )


def _lookup_rows(table, token_ids, fill_value, *, backend, mode, deterministic):
    gather_rows = functools.partial(gather, backend=backend, deterministic=deterministic)
    return ids_lib.lookup_with_policy(
        table, token_ids, gather_rows, mode=mode, fill_value=fill_value
    )


@functools.partial(
    jax.jit, static_argnames=("backend", "mode", "deterministic", "dtype", "scale_by_sqrt_d")
)
def _eager_lookup(
    table,  # [vocab_size, d_model]
    ids,  # [...] integer ids of any width, already checked on the host (ids.host_ids)
    fill_value,  # [] for mode="fill", else None
    *,
    backend: str,
    mode: str,  # "clip" or "fill": "error" was checked on the host
    deterministic: bool,
    dtype,
    scale_by_sqrt_d: bool,
):  # [..., d_model]
    """An eager lookup as one compiled call; ``jax.jit`` caches it per shape and config.

    The fill value is an operand, not static configuration: a NaN is unequal to
    itself, so as a static argument it would miss the cache on every call; and as a
    constant (even one keyed by its bits) XLA folds it at compile time, where a
    subnormal fill scaled by ``scale_by_sqrt_d`` is not flushed to zero as it is at
    run time, so the bits would differ from the op-by-op lookup.
    """
    rows = _lookup_rows(
        table, ids, fill_value, backend=backend, mode=mode, deterministic=deterministic
    )
    return finish(rows, table.shape[-1], dtype=dtype, scale_by_sqrt_d=scale_by_sqrt_d)
