"""What the layer does with token ids: validation, int32 ids, and the out-of-range modes.

Every backend sees the same int32 ids produced here, and the out-of-range policy
(``mode``) is applied here around whichever kernel ran, so backends cannot drift apart.
Which row an id reads and which ids are in the vocabulary is the rule of
``kernels.contract`` (``wrap_and_clamp``, ``in_vocab``), written once below every layer
that applies it; this module calls it, on the host and on device.

Modes:
  * ``"clip"``: JAX's own indexing semantics (the seed's): a negative id wraps once
    (``i + V``), then the row is clamped to ``[0, V - 1]``. In the gradient, ids outside
    ``[-V, V)`` contribute nothing, exactly as ``jax.grad`` of ``table[ids]``.
  * ``"fill"``: ids outside ``[-V, V)`` give a row of ``fill_value`` (NaN by default, as
    ``flax.nnx.Embed``); negative ids in range still wrap.
  * ``"error"``: ids outside ``[-V, V)`` are an error: ``IndexError`` on concrete ids;
    under ``jax.jit`` a ``checkify`` check (wrap the function in
    ``jax.experimental.checkify.checkify`` and call ``err.throw()``).

Concrete ids split across processes (``jax.make_array_from_process_local_data``)
cannot be fetched by any one process: their checks (``"error"``, integral floats) run
on the devices, and every process raises the same error.

Ids of any integer width are saturated to int32, never wrapped: a vocabulary has at
most ``2**31 - 1`` rows, so an id that does not fit in int32 is outside every
vocabulary, and its saturated value is too, with the same sign. Every mode therefore
treats it as it would the original id.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from kernels.contract import gradient_rows, in_vocab

MODES = ("clip", "fill", "error")

_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{mode=} must be one of {MODES}")
    return mode


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _spans_processes(x) -> bool:
    """True for a concrete JAX array that this process cannot fetch whole.

    Ids split across processes (``jax.make_array_from_process_local_data``) are such
    arrays: ``np.asarray`` on them raises. Their checks run on device instead
    (``_first_bad``), as one small compiled reduction whose result every process gets.
    """
    return isinstance(x, jax.Array) and _is_concrete(x) and not x.is_fully_addressable


def _replicated(x: jax.Array):
    """A sharding that puts a result on every device ``x`` is on, whole."""
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    devices = np.asarray(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(devices, ("devices",)), jax.sharding.PartitionSpec()
    )


def _first_bad(values: jax.Array, bad: Callable[[jax.Array, int], jax.Array], limit: int = 0):
    """The first ``bad(values, limit)`` element's position and value, or None; for ids
    spanning processes.

    One compiled call of elementwise ops and whole-array reductions (no reshape or
    indexing of the split array, which Explicit mesh axes could refuse), whose scalars
    are replicated: every process fetches the same answer and raises (or not) alike,
    and none is left waiting in a collective. ``bad`` is a module-level function, so the
    program is compiled once per rule, layout and shape, not once per call.
    """
    if not values.size:
        return None
    first, value = _first_bad_program(bad, _replicated(values))(values, limit)
    if int(first) == values.size:
        return None
    return tuple(map(int, np.unravel_index(int(first), values.shape))), value.item()


@functools.cache
def _first_bad_program(bad, out):
    return jax.jit(
        functools.partial(_reduce_first_bad, bad=bad), static_argnums=1, out_shardings=(out, out)
    )


def _reduce_first_bad(x, limit, *, bad):
    flat = sum(
        lax.broadcasted_iota(jnp.int32, x.shape, d) * math.prod(x.shape[d + 1 :])
        for d in range(x.ndim)
    )
    first = jnp.min(jnp.where(bad(x, limit), flat, x.size))
    # The one element at ``first``, by a sum with zeros (exact, NaN and inf too).
    return first, jnp.sum(jnp.where(flat == first, x, jnp.zeros((), x.dtype)))


def _not_integral_on_device(x, _):
    return _not_integral(x, jnp)


def _outside_vocab(x, vocab_size):
    return ~in_vocab(x, vocab_size)


def _at(position: tuple[int, ...]) -> str:
    return f"token_ids[{', '.join(map(str, position))}]" if position else "token_ids"


def _saturate(ids, xp):
    """``ids`` of any integer dtype as int32, saturating (not wrapping) what does not fit."""
    info = jnp.iinfo(ids.dtype)
    if info.max > _INT32_MAX:
        ids = xp.minimum(ids, xp.asarray(_INT32_MAX, ids.dtype))
    if info.min < _INT32_MIN:
        ids = xp.maximum(ids, xp.asarray(_INT32_MIN, ids.dtype))
    return ids.astype(xp.int32, copy=False)


def _not_integral(values, xp):
    return ~xp.isfinite(values) | (values != xp.trunc(values))


def _not_integral_error(position, value) -> ValueError:
    return ValueError(
        f"{_at(position)}={float(value)!r} must be a finite integral value; cast "
        "explicitly (token_ids.astype(jnp.int32)) if truncation is what you want"
    )


@jax.jit
def _integral_floats_to_int32(values):
    # Integral floats below 2**31 in magnitude convert exactly; the rest saturate (the
    # int32 bounds are not all exact in float32, so compare instead of clipping).
    limit = 2.0**31
    return jnp.where(
        values >= limit,
        _INT32_MAX,
        jnp.where(values < -limit, _INT32_MIN, values.astype(jnp.int32)),
    )


def _integral_floats(token_ids, dtype):
    if not _is_concrete(token_ids):
        raise TypeError(
            f"token_ids.dtype={dtype} under tracing cannot be checked for integral "
            "values; cast explicitly with token_ids.astype(jnp.int32)"
        )
    if _spans_processes(token_ids):
        first = _first_bad(token_ids, _not_integral_on_device)
        if first is not None:
            raise _not_integral_error(*first)
        return _integral_floats_to_int32(token_ids)  # On device, split as the ids are.
    # Every float dtype JAX has (float16, bfloat16, float32, float64) is exact in float64.
    values = np.asarray(token_ids).astype(np.float64)
    bad = _not_integral(values, np)
    if bad.any():
        position = tuple(map(int, np.unravel_index(np.argmax(bad), values.shape)))
        raise _not_integral_error(position, values[position])
    # Clipped in float64, where both int32 bounds are exact, then cast.
    return np.clip(values, _INT32_MIN, _INT32_MAX).astype(np.int32)


def to_int32(token_ids) -> jax.Array:
    """Validated int32 ids with the meaning of ``token_ids``; never a silent truncation.

    Integer ids of any width, signed or unsigned, saturate to the int32 range: every id
    that does not fit is outside any vocabulary, so saturating keeps its meaning under
    every mode. Float ids are accepted only when concrete, finite and integral.

    Raises:
      TypeError: for booleans, complex numbers, strings and other non-numeric ids, and
        for float ids under tracing (their values cannot be checked).
      ValueError: for float ids with a non-integral or non-finite value, naming the
        first one.
    """
    return saturate(jnp.asarray(host_ids(token_ids)))


def host_ids(token_ids):
    """``to_int32`` without its device work: what the host must check, checked.

    An eager lookup calls this before its one compiled call (``embed.dispatch``), and
    ``saturate`` finishes the conversion inside that call.

    Returns:
      NumPy int32 ids for Python and NumPy ids (saturated, or checked integral floats);
      ``token_ids`` itself for a JAX integer array or tracer, of any width; for JAX
      float ids that span processes, checked and converted to int32 on device.

    Raises:
      TypeError, ValueError: as ``to_int32``.
    """
    if isinstance(token_ids, jax.Array) and token_ids.dtype == np.int32:
        return token_ids  # The common case, first: nothing to check.
    if isinstance(token_ids, int) and not isinstance(token_ids, bool):
        # A Python int may not fit any NumPy integer type.
        return np.int32(min(max(token_ids, _INT32_MIN), _INT32_MAX))
    dtype = getattr(token_ids, "dtype", None)
    dtype = np.asarray(token_ids).dtype if dtype is None else np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return _integral_floats(token_ids, dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"token_ids.dtype={dtype} must be an integer type (or integral floats); "
            "booleans, complex numbers and strings are not token ids"
        )
    if isinstance(token_ids, jax.Array) or not _is_concrete(token_ids):
        return token_ids
    # NumPy int64/uint64 would be wrapped by jnp.asarray when x64 is off.
    return _saturate(np.asarray(token_ids), np)


def saturate(ids: jax.Array) -> jax.Array:
    """JAX integer ids of any width as int32, saturating (device work; traceable)."""
    return ids if ids.dtype == np.int32 else _saturate(ids, jnp)


def loss_targets(targets: jax.Array, vocab_size: int) -> jax.Array:
    """Next-token targets of the tied loss as int32 rows of the table (traceable).

    Saturated to int32 as token ids are, then the row an id's gradient goes to: a
    negative target indexes from the end once, as optax's ``take_along_axis`` does, and
    a target outside ``[-V, V)`` becomes ``V``, past the table, where the loss gives NaN
    (``embed.loss``).
    """
    return gradient_rows(saturate(targets), vocab_size)


def host_int32(ids):
    """The values of ``host_ids(...)`` as NumPy int32 (a device-to-host copy for JAX ids).

    Ids spanning processes cannot be fetched: they stay on device, saturated to int32
    there, for ``check_in_vocab``'s on-device check.
    """
    if _spans_processes(ids):
        return saturate(ids)
    values = np.asarray(ids)
    return values if values.dtype == np.int32 else _saturate(values, np)


def check_in_vocab(ids: jax.Array, vocab_size: int) -> None:
    """``mode="error"``: raise on concrete ids, ``checkify.check`` on traced ones.

    Raises:
      IndexError: on concrete ids, naming the first id outside ``[-V, V)``, its position
        and the valid range. Under tracing, the same message is a ``checkify`` error.
    """
    valid_range = f"[{-vocab_size}, {vocab_size})"

    def error(value, position):
        return IndexError(
            f"token id {int(value)} at position {position} is "
            f"outside the valid range {valid_range} for vocab_size={vocab_size}"
        )

    if _spans_processes(ids):
        first = _first_bad(saturate(ids), _outside_vocab, vocab_size)
        if first is not None:
            raise error(first[1], first[0])
        return
    if _is_concrete(ids):
        values = np.asarray(ids)
        bad = ~in_vocab(values, vocab_size)  # The kernels' rule, run by NumPy.
        if bad.any():
            position = tuple(map(int, np.unravel_index(np.argmax(bad), values.shape)))
            raise error(values[position], position)
        return
    ok = in_vocab(ids, vocab_size)
    first_bad = jnp.argmin(ok.reshape(-1))
    checkify.check(
        jnp.all(ok),
        f"token id {{id}} at flat position {{pos}} is outside the valid range {valid_range} "
        f"for vocab_size={vocab_size}",
        id=ids.reshape(-1)[first_bad],
        pos=first_bad,
    )


def apply_fill(rows: jax.Array, ids: jax.Array, vocab_size: int, fill_value) -> jax.Array:
    """``mode="fill"``: rows for ids outside ``[-V, V)`` become ``fill_value``."""
    return jnp.where(
        in_vocab(ids, vocab_size)[..., None], rows, jnp.asarray(fill_value, rows.dtype)
    )


def lookup_with_policy(
    table: jax.Array,
    token_ids,
    gather_rows: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    mode: str,
    fill_value,
) -> jax.Array:
    """Rows for ``token_ids`` of any shape, with ``mode`` applied around ``gather_rows``.

    ``gather_rows(table, ids)`` maps 1-D int32 ids to ``[len(ids), d_model]`` rows with
    the ``"clip"`` semantics (a backend kernel, or a sharded lookup). Validation, the
    ``"error"`` check and the ``"fill"`` rows happen here, once, for every caller, so
    no backend or layout can drift from the others.
    """
    check_mode(mode)
    vocab_size, d_model = table.shape
    ids = to_int32(token_ids)
    if mode == "error":
        check_in_vocab(ids, vocab_size)
    rows = gather_rows(table, ids.reshape(-1)).reshape(*ids.shape, d_model)
    if mode == "fill":
        rows = apply_fill(rows, ids, vocab_size, fill_value)
    return rows
