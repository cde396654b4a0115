"""Backend names to implementations, with the platform chosen when lowering.

``jax.lax.platform_dependent`` picks the branch when the computation is lowered for a
platform, not from the host's default backend at trace time, so a model traced or
exported on a CPU host for a GPU carries the real kernel. ``"mosaic"`` is the exception:
it is chosen when traced (``gather`` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from embed import ids as ids_lib
from kernels import compat, pallas_gather

BACKENDS = ("auto", "xla", "pallas", "triton", "mosaic")

# What "auto" lowers to on each platform. On CUDA the Pallas kernel owns the backward
# (a float32 atomic scatter-add), where XLA's scatter-add is reported to fall into a
# compare-and-swap loop (xla#46225, jax#38806). No GPU figure of ours backs a finer rule
# yet: docs/benchmarks.md says which measurements exist.
# "mosaic" (Pallas on Mosaic GPU, the path JAX recommends now that Pallas on Triton is
# deprecated) is not "auto" on cuda yet: it lowers for cuda and matches the reference in
# the GPU interpreter, but no timing of it on a GPU exists, so nothing shows it is not
# slower than "pallas" there; and JAX 0.10.2, which we support, has no such backend.
# Switch "cuda" to it when tools/gpu_check's figures put it at or ahead of "pallas".
AUTO = {"cuda": "pallas", "rocm": "pallas", "cpu": "xla", "tpu": "xla"}


def check_backend(backend: str) -> str:
    """``backend`` if it names a backend this JAX can run, else ValueError saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if backend == "mosaic" and (problem := compat.mosaic_gpu_problem()):
        raise ValueError(f"{backend=} is not available: {problem}")
    return backend


def backend_for(backend: str, platform: str | None = None) -> str:
    """The implementation ``backend`` runs on ``platform`` (default: JAX's default backend).

    >>> backend_for("auto", "cpu")
    'xla'
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    return AUTO.get("cuda" if platform == "gpu" else platform, "xla")


def _xla(table, ids):
    return table[ids]


def _pallas(table, ids, *, deterministic, interpret=False):
    return pallas_gather.lookup(table, ids, interpret, deterministic)


def _mosaic(table, ids, *, deterministic, interpret=False):
    from kernels import mosaic_gather  # Imported lazily, like triton: one stack lacks it.

    return mosaic_gather.lookup(table, ids, interpret, deterministic)


def _triton(table, ids, *, deterministic):
    from kernels import triton_gather  # Imported lazily: it needs jax-triton and CUDA.

    return triton_gather.lookup(table, ids, deterministic)


_KERNELS = {"pallas": _pallas, "triton": _triton, "mosaic": _mosaic}


def gather(
    table: jax.Array, ids: jax.Array, backend: str = "auto", *, deterministic: bool = False
) -> jax.Array:
    """``table[ids]`` for 1-D int32 ``ids`` through ``backend``, chosen per platform.

    ``deterministic=True`` makes the kernels' backward sort-based and bit-reproducible
    (``pallas_gather.segment_sum``, ``mosaic_gather.segment_sum``). ``"mosaic"`` runs its
    kernel when traced for a GPU (Mosaic GPU is NVIDIA's; a CPU host traces for one
    inside ``compat.abstract_gpu()``) and the Mosaic GPU interpreter otherwise. The
    ``"xla"`` path ignores ``deterministic``: XLA's own scatter determinism is governed
    by XLA flags (``--xla_gpu_deterministic_ops``).
    """
    check_backend(backend)
    if backend == "xla":
        return _xla(table, ids)
    kernel = AUTO["cuda"] if backend == "auto" else backend
    gpu = functools.partial(_KERNELS[kernel], deterministic=deterministic)
    if backend == "triton":
        return gpu(table, ids)  # jax-triton has no CPU path: no default branch.
    if backend == "auto":
        default = _xla
    else:  # Off GPU the same Pallas kernel runs in its interpreter.
        default = functools.partial(_KERNELS[kernel], interpret=True, deterministic=deterministic)
    if kernel == "mosaic":
        # Chosen when traced, not lowered: platform_dependent cannot lower the kernel for
        # cuda beside the interpreter (compat.tracing_for_gpu says why). To lower for
        # cuda on a CPU host, trace under compat.abstract_gpu().
        return gpu(table, ids) if compat.tracing_for_gpu() else default(table, ids)
    return jax.lax.platform_dependent(table, ids, cuda=gpu, rocm=gpu, default=default)


def lookup(
    table: jax.Array,
    token_ids,
    *,
    backend: str = "auto",
    mode: str = "clip",
    fill_value=jnp.nan,
    deterministic: bool = False,
) -> jax.Array:
    """Embedding rows for ``token_ids`` of any shape: ``token_ids.shape + (d_model,)``.

    ``mode`` and ``fill_value`` are the out-of-range policy (``embed.ids``);
    ``deterministic`` selects a bit-reproducible kernel backward (``gather``).
    """
    gather_rows = functools.partial(gather, backend=backend, deterministic=deterministic)
    return ids_lib.lookup_with_policy(
        table, token_ids, gather_rows, mode=mode, fill_value=fill_value
    )
