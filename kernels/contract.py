"""What every backend implements, and the ``custom_vjp`` that wires it, once.

A backend is one module of ``kernels/`` (``xla``, ``pallas_gather``, ``mosaic_gather``,
``triton_gather``) with the same five names:

* ``Config``: a frozen dataclass of its tuning parameters (block sizes, warps, ...),
  every field ``None`` or a default, validated when it is made; the wrappers fill
  what is ``None`` from the shapes. Hashable, so it is a static argument of ``jax.jit``.
* ``gather(table, ids, *, config=None, interpret=False)``: ``[num_tokens, d_model]``
  rows of the table's dtype, bit for bit ``table[ids]``.
* ``scatter_add(grad_out, ids, *, vocab_size, config=None, interpret=False)``: the
  table gradient, ``[vocab_size, d_model]`` **float32**, accumulated with atomics (the
  order of additions for repeated ids is not fixed).
* ``segment_sum(...)``: the same gradient, same arguments, bit-reproducible: each row's
  gradient rows added in token order (``segments`` plans it).
* ``lookup = contract.differentiable(gather, scatter_add, segment_sum)``: what the layer
  calls, ``lookup(table, ids, interpret, deterministic)``.

Every backend's functions are wrapped by ``forward`` / ``backward``, which jit them and
check their operands, so bad input raises the same ``ValueError`` / ``TypeError``
whichever backend runs; every backward returns float32, cast once to the table's dtype
by ``differentiable``.

``Backend`` is the record ``REGISTRY`` keeps per name: the module,
where it compiles, whether it has an interpreter elsewhere, when its platform is chosen,
and what it needs from the installed stack (a ``kernels.compat`` probe). The module is
imported only when the backend is used, so a JAX without Pallas on Triton or Mosaic GPU,
or a machine without triton or jax-triton, still imports ``embed``.

What a token id means (``wrap_and_clamp``, ``in_vocab``: which row an id reads, and
which ids receive gradient) is written once, here, below every layer that needs it: the
kernels' bodies (Triton's through ``id_rule``), ``embed.ids``'s host checks and modes,
and the loss's targets. ``tests/kernels/test_contract.py`` runs every form of it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp

from kernels import compat

# Table dtypes every backend supports.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_dtype(name: str, dtype) -> jnp.dtype:
    """``dtype`` if a table may have it (every backend supports the same ones), else TypeError."""
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}={dtype!r} must be one of {[str(d) for d in SUPPORTED_DTYPES]}")
    return dtype


# ----------------------------------------------------------------------------------------
# What a token id means: the row rule, written once. Each rule uses only operators and
# the array namespace ``xp`` (jax.numpy here); ``id_rule`` rebinds the same code to
# NumPy (host checks) or to ``triton.language`` (the Triton kernels), so every layer and
# every kernel runs this one source. ``embed.ids`` applies it: modes, errors, validation.

xp = jnp


def wrap_and_clamp(ids: jax.Array, vocab_size: int) -> jax.Array:
    """Rows read for ``ids``: negative ids wrap once, then clamp to ``[0, vocab_size)``.

    Kernels call this inside their bodies, so no program can address outside the table.
    """
    rows = xp.where(ids < 0, ids + vocab_size, ids)
    return xp.minimum(xp.maximum(rows, 0), vocab_size - 1)


def in_vocab(ids: jax.Array, vocab_size: int) -> jax.Array:
    """True where an id is in ``[-vocab_size, vocab_size)``: ids that receive gradient."""
    return (ids >= -vocab_size) & (ids < vocab_size)


def id_rule(rule: Callable, namespace: ModuleType) -> Callable:
    """``rule`` (``wrap_and_clamp`` or ``in_vocab``) with ``xp`` bound to ``namespace``.

    The same code object, so ``triton.jit(id_rule(wrap_and_clamp, triton.language))``
    compiles (and Triton's interpreter runs) exactly the source above.
    """
    scope = dict(rule.__globals__, xp=namespace)
    return types.FunctionType(rule.__code__, scope, rule.__name__, rule.__defaults__)


def gradient_rows(ids: jax.Array, vocab_size: int) -> jax.Array:
    """The row each id's gradient adds into; ``vocab_size`` (past the table) for none."""
    return jnp.where(in_vocab(ids, vocab_size), wrap_and_clamp(ids, vocab_size), vocab_size)


# ----------------------------------------------------------------------------------------
# Operands, shared by every backend.


def check_operands(table: jax.Array, ids: jax.Array) -> None:
    """ValueError/TypeError unless ``table`` is a 2-D supported table and ``ids`` 1-D int32."""
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be (vocab_size, d_model)")
    check_dtype("table.dtype", table.dtype)
    if ids.ndim != 1 or ids.dtype != jnp.int32:
        raise ValueError(f"{ids.shape=}, {ids.dtype=} must be a 1-D int32 array")


def check_backward_operands(grad_out: jax.Array, ids: jax.Array, vocab_size) -> tuple[int, int]:
    """``(num_tokens, d_model)`` of ``grad_out``, after checking it, ``ids`` and ``vocab_size``."""
    if grad_out.ndim != 2:
        raise ValueError(f"{grad_out.shape=} must be (num_tokens, d_model)")
    check_dtype("grad_out.dtype", grad_out.dtype)
    num_tokens, d_model = grad_out.shape
    if ids.shape != (num_tokens,) or ids.dtype != jnp.int32:
        raise ValueError(f"{ids.shape=}, {ids.dtype=} must be ({num_tokens},) int32")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{vocab_size=} must be a positive int")
    return num_tokens, d_model


# ----------------------------------------------------------------------------------------
# The wrappers every backend's functions share.


def forward(config_type: type) -> Callable:
    """Makes ``fn(table, ids, *, config, interpret)`` a backend's ``gather``.

    What every forward shares, once: ``jax.jit`` with ``config`` and ``interpret``
    static, ``check_operands``, and ``config_type()`` for ``config=None``. So every
    backend is called as ``gather(table, ids, *, config=None, interpret=False)`` and
    raises the same errors; ``fn`` sees checked operands and a config.
    """

    def wrap(fn: Callable) -> Callable:
        def gather(table, ids, *, config=None, interpret=False):
            check_operands(table, ids)
            return fn(table, ids, config=config or config_type(), interpret=interpret)

        return jax.jit(_named_as(gather, fn), static_argnames=("config", "interpret"))

    return wrap


def backward(config_type: type) -> Callable:
    """Makes ``fn(grad_out, ids, *, vocab_size, config, interpret)`` a table gradient.

    As ``forward``, for ``scatter_add`` and ``segment_sum``: ``vocab_size`` static too,
    and ``check_backward_operands``.
    """

    def wrap(fn: Callable) -> Callable:
        def grad(grad_out, ids, *, vocab_size, config=None, interpret=False):
            check_backward_operands(grad_out, ids, vocab_size)
            config = config or config_type()
            return fn(grad_out, ids, vocab_size=vocab_size, config=config, interpret=interpret)

        return jax.jit(_named_as(grad, fn), static_argnames=("vocab_size", "config", "interpret"))

    return wrap


def _named_as(wrapper: Callable, fn: Callable) -> Callable:
    """``wrapper`` under ``fn``'s name, module and docstring (but its own signature)."""
    for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(wrapper, attribute, getattr(fn, attribute))
    return wrapper


def row_warps(block_d: int, *, most: int) -> int:
    """Warps for a program that adds or stores ``block_d``-wide float32 rows: one 16-byte
    vector (4 floats) per thread, so ``block_d / 128`` warps, from 1 to ``most``.

    Compiled for an H100 (tools/sass_report.py), 4 warps on a 256-wide row give each
    thread 2 floats, a 64-bit ``ATOMG.E.ADD.F32x2``, and on a 128-wide row a scalar one;
    one 128-bit ``F32x4`` per thread halves the instructions for the same bytes. Wider
    accumulators per thread cost registers: Triton's deterministic backward at 1024
    float32 columns with 4 warps (8 floats a thread) spills on an A100 (sm_80).
    """
    return max(1, min(most, block_d // 128))


def check_power_of_2(name: str, value: int | None, *, maximum: int = 2**20) -> None:
    """``ValueError`` unless ``value`` is ``None`` or a power of two up to ``maximum``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive power of two")
    if value & (value - 1) or value > maximum:
        raise ValueError(f"{name}={value} must be a positive power of two up to {maximum}")


def pad_columns(x: jax.Array, multiple: int) -> jax.Array:
    """``x`` with zero columns up to a multiple of ``multiple`` (``x`` itself if none)."""
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra))) if extra else x


def segments(ids: jax.Array, vocab_size: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``(order, bounds)``: the deterministic backward's plan, in token order per row.

    Row ``r``'s tokens are ``order[bounds[r]:bounds[r + 1]]``, in increasing token
    position (a stable argsort of each id's gradient row; dropped ids sort last, under
    the sentinel ``vocab_size``, and are never read). ``bounds`` has ``num_rows + 1``
    entries; rows from ``vocab_size`` to ``num_rows`` (a kernel's padding) are empty.
    """
    rows = gradient_rows(ids, vocab_size)
    order = jnp.argsort(rows, stable=True).astype(jnp.int32)
    row_starts = jnp.arange(num_rows + 1, dtype=jnp.int32)
    bounds = jnp.searchsorted(rows[order], row_starts).astype(jnp.int32)
    return order, bounds


# ----------------------------------------------------------------------------------------
# The custom_vjp wiring.


def differentiable(gather: Callable, scatter_add: Callable, segment_sum: Callable):
    """``lookup(table, ids, interpret=False, deterministic=False)``: ``gather`` with its VJP.

    The table gradient is ``scatter_add`` (float32 atomics), or ``segment_sum`` when
    ``deterministic`` (bit-reproducible). Both return float32; it is cast once to the
    table's dtype here.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def lookup(table, ids, interpret=False, deterministic=False):
        return gather(table, ids, interpret=interpret)

    def lookup_fwd(table, ids, interpret, deterministic):
        # A (vocab_size, 0) array carries the table's shape and dtype at no cost.
        return gather(table, ids, interpret=interpret), (ids, table[:, :0])

    def lookup_bwd(interpret, deterministic, residuals, grad_out):
        ids, table_like = residuals
        backward = segment_sum if deterministic else scatter_add
        grad = backward(grad_out, ids, vocab_size=table_like.shape[0], interpret=interpret)
        return grad.astype(table_like.dtype), None

    lookup.defvjp(lookup_fwd, lookup_bwd)
    return lookup


# ----------------------------------------------------------------------------------------
# The record the registry keeps per backend.


def _nothing_needed() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: where its module is, where it runs, and what it needs.

    Attributes:
      name: what users pass as ``backend=``.
      module: the module implementing the contract, imported by ``load`` only.
      compiled_on: the platforms it compiles for; empty: one implementation everywhere.
      interpreted: whether it runs in an interpreter on the other platforms (else it
        has no path there).
      chosen_when: ``"lowering"`` (``jax.lax.platform_dependent`` picks the compiled or
        interpreted branch per platform) or ``"tracing"`` (``compat.tracing_for_gpu``
        picks it, for a kernel whose interpreter cannot sit beside it in one
        ``platform_dependent``).
      needs: a ``kernels.compat`` probe: why the installed stack cannot run it, or None.
    """

    name: str
    module: str
    compiled_on: tuple[str, ...] = ()
    interpreted: bool = False
    chosen_when: str = "lowering"
    needs: Callable[[], str | None] = _nothing_needed

    def problem(self) -> str | None:
        """Why this backend cannot run here, or ``None`` when it can."""
        try:
            return self.needs() or _import_problem(self.module)
        except ImportError as e:  # A probe's own import of something removed.
            return f"{e!r}"

    def load(self) -> ModuleType:
        """The implementing module; ``RuntimeError`` naming the backend when it cannot run."""
        problem = self.problem()
        if problem:
            raise RuntimeError(f"backend={self.name!r} cannot run here: {problem}")
        return importlib.import_module(self.module)


@functools.cache
def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"importing {module} failed: {e!r}"
    return None


# The registry: every backend by name, its module imported only when it is used, so that
# a JAX without Pallas on Triton or Mosaic GPU, or a machine without triton and
# jax-triton, still imports ``kernels`` and ``embed`` (the backend then says what it
# lacks). ``embed.dispatch`` adds "auto" and chooses the platform.
REGISTRY = {
    backend.name: backend
    for backend in (
        Backend("xla", "kernels.xla"),
        Backend(
            "pallas",
            "kernels.pallas_gather",
            compiled_on=("cuda", "rocm"),
            interpreted=True,
            needs=compat.pallas_triton_problem,
        ),
        Backend(
            "triton",
            "kernels.triton_gather",
            compiled_on=("cuda",),
            needs=compat.triton_call_problem,
        ),
        # Chosen when traced: platform_dependent cannot lower the kernel for cuda beside
        # the interpreter (compat.tracing_for_gpu says why). To lower it for cuda on a CPU
        # host, trace under embed.abstract_gpu() (compat.tracing_for_gpu).
        Backend(
            "mosaic",
            "kernels.mosaic_gather",
            compiled_on=("cuda",),
            interpreted=True,
            chosen_when="tracing",
            needs=compat.mosaic_gpu_problem,
        ),
    )
}
