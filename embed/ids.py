"""The one place that defines what a token id means.

Every backend sees the same int32 ids produced here, and the out-of-range policy
(``mode``) is applied here around whichever kernel ran, so backends cannot drift apart.

Modes:
  * ``"clip"``: JAX's own indexing semantics (the seed's): a negative id wraps once
    (``i + V``), then the row is clamped to ``[0, V - 1]``. In the gradient, ids outside
    ``[-V, V)`` contribute nothing, exactly as ``jax.grad`` of ``table[ids]``.
  * ``"fill"``: ids outside ``[-V, V)`` give a row of ``fill_value`` (NaN by default, as
    ``flax.nnx.Embed``); negative ids in range still wrap.
  * ``"error"``: ids outside ``[-V, V)`` are an error: ``IndexError`` on concrete ids;
    under ``jax.jit`` a ``checkify`` check (wrap the function in
    ``jax.experimental.checkify.checkify`` and call ``err.throw()``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from kernels.reference import in_vocab

MODES = ("clip", "fill", "error")

_INT32 = np.iinfo(np.int32)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{mode=} must be one of {MODES}")
    return mode


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def to_int32(token_ids) -> jax.Array:
    """Validated int32 ids with the meaning of ``token_ids``; never a silent truncation.

    Integer ids of any width saturate to the int32 range: every id that does not fit
    is outside any vocabulary, so saturating keeps its meaning under every mode.
    Float ids are accepted only when concrete, finite and integral.
    """
    dtype = np.dtype(getattr(token_ids, "dtype", None) or np.asarray(token_ids).dtype)
    if dtype == np.bool_ or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise TypeError(
            f"token_ids.dtype={dtype} must be an integer type (or integral floats); "
            "booleans, complex numbers and strings are not token ids"
        )
    if np.issubdtype(dtype, np.floating):
        if not _is_concrete(token_ids):
            raise TypeError(
                f"token_ids.dtype={dtype} under tracing cannot be checked for integral "
                "values; cast explicitly with token_ids.astype(jnp.int32)"
            )
        values = np.asarray(token_ids)
        bad = ~np.isfinite(values) | (values != np.trunc(values))
        if bad.any():
            position = np.unravel_index(np.argmax(bad), values.shape)
            raise ValueError(
                f"token_ids[{', '.join(map(str, position))}]={values[position]!r} must be a "
                "finite integral value; cast explicitly (token_ids.astype(jnp.int32)) if "
                "truncation is what you want"
            )
        values = np.clip(values, _INT32.min, _INT32.max)
        return jnp.asarray(values.astype(np.int32))
    if dtype == np.int32:
        return jnp.asarray(token_ids)
    if _is_concrete(token_ids) and not isinstance(token_ids, jax.Array):
        # NumPy int64/uint64 would be truncated by jnp.asarray when x64 is off.
        return jnp.asarray(np.clip(np.asarray(token_ids), _INT32.min, _INT32.max).astype(np.int32))
    ids = jnp.asarray(token_ids)
    if jnp.iinfo(ids.dtype).bits > 32 or jnp.iinfo(ids.dtype).max > _INT32.max:
        ids = jnp.clip(ids, _INT32.min, _INT32.max)
    return ids.astype(jnp.int32)


def check_in_vocab(ids: jax.Array, vocab_size: int) -> None:
    """``mode="error"``: raise on concrete ids, ``checkify.check`` on traced ones."""
    valid_range = f"[{-vocab_size}, {vocab_size})"
    if _is_concrete(ids):
        values = np.asarray(ids)
        bad = (values < -vocab_size) | (values >= vocab_size)
        if bad.any():
            position = np.unravel_index(np.argmax(bad), values.shape)
            raise IndexError(
                f"token id {int(values[position])} at position {tuple(map(int, position))} is "
                f"outside the valid range {valid_range} for vocab_size={vocab_size}"
            )
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
