"""Backend names to implementations, with the platform chosen when lowering.

``jax.lax.platform_dependent`` picks the branch when the computation is lowered for a
platform, not from the host's default backend at trace time, so a model traced or
exported on a CPU host for a GPU carries the real kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from embed import ids as ids_lib
from kernels import pallas_gather, reference

BACKENDS = ("auto", "xla", "pallas", "triton")

# What "auto" lowers to on each platform. On CUDA the Pallas kernel owns the backward
# (a float32 atomic scatter-add), where XLA's scatter-add is reported to fall into a
# compare-and-swap loop (xla#46225, jax#38806). No GPU figure of ours backs a finer rule
# yet: docs/benchmarks.md says which measurements exist.
AUTO = {"cuda": "pallas", "rocm": "pallas", "cpu": "xla", "tpu": "xla"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
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
    # table[ids], with the table gradient accumulated in float32 as the kernels do it.
    return reference.lookup(table, ids)


def _pallas(table, ids, *, deterministic, interpret=False):
    return pallas_gather.lookup(table, ids, interpret, deterministic)


def _triton(table, ids, *, deterministic):
    from kernels import triton_gather  # Imported lazily: it needs jax-triton and CUDA.

    return triton_gather.lookup(table, ids, deterministic)


_KERNELS = {"pallas": _pallas, "triton": _triton}


def gather(
    table: jax.Array, ids: jax.Array, backend: str = "auto", *, deterministic: bool = False
) -> jax.Array:
    """``table[ids]`` for 1-D int32 ``ids`` through ``backend``, chosen per platform.

    Every backend accumulates the table gradient in float32 and rounds it once to the
    table's dtype, ``"xla"`` included (``kernels.reference.lookup``), so backends agree
    at 16 bits too. ``deterministic=True`` makes the kernels' backward sort-based and
    bit-reproducible (``pallas_gather.segment_sum``). The ``"xla"`` path ignores it:
    XLA's own scatter determinism is governed by XLA flags
    (``--xla_gpu_deterministic_ops``).
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
    else:  # Off GPU the same Pallas kernel runs in the interpreter.
        default = functools.partial(_pallas, interpret=True, deterministic=deterministic)
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
