"""``MyEmbed``: the token-embedding layer, and ``embed_forward``, the seed contract."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from embed import dispatch, ids
from kernels.reference import check_dtype


class MyEmbed(nnx.Module):
    """A learned ``(vocab_size, d_model)`` table indexed by token ids.

    The forward is ``embedding[token_ids]``, through the backend you choose; every
    backend gives bit-identical outputs and matching gradients.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from embed import MyEmbed
    >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
    >>> layer(jnp.array([[1, 2, 3]])).shape
    (1, 3, 4)

    Args:
      vocab_size: number of rows of the table.
      d_model: width of each row.
      rngs: the ``nnx.Rngs`` whose ``params`` stream draws the table.
      backend: ``"auto"``, ``"xla"``, ``"pallas"``, ``"triton"`` or ``"mosaic"``; see
        ``embed.dispatch.backend_for`` for what ``"auto"`` picks.
      mode: out-of-range policy, ``"clip"``, ``"fill"`` or ``"error"`` (``embed.ids``).
      fill_value: the row value for ``mode="fill"``.
      dtype: dtype of the output (default: ``param_dtype``), and of ``attend``'s
        computation.
      param_dtype: dtype of the table: float32, bfloat16 or float16.
      scale_by_sqrt_d: multiply the looked-up rows by ``sqrt(d_model)`` (T5/Gemma
        style). Off by default, so the output is the table's rows bit for bit;
        ``attend`` is never scaled.
      deterministic: make the kernel backends' table gradient bit-reproducible
        (sort-based, no float atomics; slower when ids repeat). The ``"xla"`` backend
        ignores it: XLA's determinism is set by XLA flags (``embed.dispatch.gather``).
      sharding: logical axes of the table, mapped onto a mesh by
        ``nnx.logical_axis_rules`` (``embed.sharding``); ``None`` for no annotation.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        rngs: nnx.Rngs,
        *,
        backend: str = "auto",
        mode: str = "clip",
        fill_value: float = float("nan"),
        dtype=None,
        param_dtype=jnp.float32,
        scale_by_sqrt_d: bool = False,
        deterministic: bool = False,
        sharding: tuple[str | None, str | None] | None = ("vocab", "embed"),
    ):
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.d_model = _positive_int("d_model", d_model)
        _check_table(self.vocab_size, self.d_model, param_dtype)
        self.backend = dispatch.check_backend_usable(backend)
        self.mode = ids.check_mode(mode)
        self.fill_value = fill_value
        if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"dtype={jnp.dtype(dtype)!r} must be a floating dtype")
        self.dtype = dtype
        self.scale_by_sqrt_d = scale_by_sqrt_d
        self.deterministic = deterministic
        key = rngs.params()
        # eager_sharding=False: the axes are metadata until a mesh places the table, so
        # the layer can be built outside any mesh.
        self.embedding = nnx.Param(
            jax.random.normal(key, (self.vocab_size, self.d_model), param_dtype),
            out_sharding=sharding,
            eager_sharding=False,
        )

    def __call__(self, token_ids) -> jax.Array:
        rows = dispatch.lookup(
            self.embedding[...],
            token_ids,
            backend=self.backend,
            mode=self.mode,
            fill_value=self.fill_value,
            deterministic=self.deterministic,
        )
        return self._finish(rows)

    def _finish(self, rows: jax.Array) -> jax.Array:
        """Looked-up rows in the output ``dtype``, scaled if ``scale_by_sqrt_d``.

        Shared with ``embed.sharding.apply_sharded``, the same call on a mesh.
        """
        rows = rows if self.dtype is None else rows.astype(self.dtype)
        return rows * jnp.sqrt(self.d_model).astype(rows.dtype) if self.scale_by_sqrt_d else rows

    def attend(self, query: jax.Array, *, precision=None) -> jax.Array:
        """The tied output projection ``query @ embedding.T``, as ``nnx.Embed.attend``.

        As in ``nnx.Embed``, ``query`` and the table are both cast to ``dtype`` (default:
        the table's dtype), the dtype of the logits. A 16-bit product is accumulated in
        float32 (``preferred_element_type``) and rounded once, so 16-bit logits keep the
        low bits of long dot products on every platform; set ``dtype=jnp.float32`` for
        float32 logits from a 16-bit table.

        >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
        >>> layer.attend(jnp.ones((2, 4))).shape
        (2, 10)

        Args:
          query: ``[..., d_model]``.
          precision: ``jnp.matmul``'s; e.g. ``"highest"`` keeps GPUs from computing a
            float32 product in TF32.

        Returns:
          ``[..., vocab_size]`` logits in ``dtype``.
        """
        table = self.embedding[...]
        dtype = jnp.dtype(self.dtype or table.dtype)
        accumulate = jnp.float32 if dtype.itemsize < 4 else dtype
        logits = jnp.matmul(
            query.astype(dtype),
            table.astype(dtype).T,
            precision=precision,
            preferred_element_type=accumulate,
        )
        return logits.astype(dtype)


_MAX_VOCAB = 2**31 - 1  # Ids are int32 once validated.


def _positive_int(name: str, value) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
        or value <= 0
    ):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _check_table(vocab_size: int, d_model: int, param_dtype) -> None:
    if vocab_size > _MAX_VOCAB:
        raise ValueError(f"{vocab_size=} must be at most {_MAX_VOCAB}: token ids are int32")
    param_dtype = check_dtype("param_dtype", param_dtype)
    num_bytes = vocab_size * d_model * param_dtype.itemsize
    if num_bytes >= 2**63:
        raise ValueError(
            f"{vocab_size=} x {d_model=} of {param_dtype} is {num_bytes} bytes, over 2**63"
        )


def embed_forward(seed, token_ids, vocab_size, d_model, *, backend: str = "auto") -> jax.Array:
    """The seed contract: every argument arrives as a JAX float array.

    Builds ``MyEmbed`` from ``nnx.Rngs(int(seed))`` and returns the flattened
    ``(T * d_model,)`` lookup. Unlike ``MyEmbed``, which refuses non-integral float ids,
    this keeps the seed's plain ``astype(jnp.int32)`` cast: that is its contract.
    """
    model = MyEmbed(int(vocab_size), int(d_model), nnx.Rngs(int(seed)), backend=backend)
    ids = token_ids.astype(jnp.int32)
    return model(ids).reshape(-1)
