"""The token-embedding layer, one core with two faces, and ``embed_forward``.

* ``Embed`` has ``flax.nnx.Embed``'s constructor, attributes and defaults: a model
  switches to it by changing one import (README, "Replacing ``nnx.Embed``").
* ``MyEmbed`` keeps the seed's names and defaults: ``MyEmbed(vocab_size, d_model, rngs)``,
  a unit-normal table, ``mode="clip"`` and the logical axes ``("vocab", "embed")``.

Both are ``_Embedding``, a subclass of ``nnx.Embed``: the same table, lookup, ``attend``
and gradient; they differ only in the defaults their constructors document. Being
``nnx.Embed`` instances, both are found by code that dispatches on that type (a
re-initialisation loop over ``nnx.iter_modules(model)``, a weight-decay mask), and a
subclass written for ``nnx.Embed`` (a ``__call__`` that scales ``super().__call__``)
can derive from either and keep its backend.

Their graph definitions hold what ``nnx.Embed``'s do, plus this library's options:
``num_embeddings``, ``features``, ``dtype``, ``param_dtype``, ``promote_dtype``, then
``backend``, ``mode``, ``fill_value``, ``scale_by_sqrt_d`` and ``deterministic``. The
initializer is used once and not kept, as in ``nnx.Embed``: layers equal in
configuration have equal graph definitions, and ``nnx.jit`` traces them once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.nnx.nn.linear import default_embed_init

from embed import dispatch, ids, loss
from kernels.contract import SUPPORTED_DTYPES, check_dtype

# Metadata keys under which Flax records a variable's partitioning (``out_sharding``
# since Flax 0.11; the older names are still read by ``nnx.get_partition_spec``).
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


class _Embedding(nnx.Embed):
    """The implementation behind ``Embed`` and ``MyEmbed``; see their docstrings.

    It sets its attributes itself (``_setup``) rather than through
    ``nnx.Embed.__init__``, and overrides ``__call__`` and ``attend``: no code of
    ``nnx.Embed`` runs, only its type is shared.
    """

    def _setup(
        self,
        num_embeddings,
        features,
        rngs: nnx.Rngs,
        *,
        embedding_init: Callable,
        dtype,
        param_dtype,
        promote_dtype: Callable,
        embedding_metadata: Mapping,
        sharding,
        backend: str,
        mode: str,
        fill_value,
        scale_by_sqrt_d: bool,
        deterministic: bool,
    ) -> None:
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.features = _positive_int("features", features)
        _check_table(self.num_embeddings, self.features, param_dtype)
        self.backend = dispatch.check_backend_usable(backend)
        self.mode = ids.check_mode(mode)
        if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"dtype={jnp.dtype(dtype)!r} must be a floating dtype")
        self.fill_value = _canonical_fill(fill_value)
        self.scale_by_sqrt_d = scale_by_sqrt_d
        self.deterministic = deterministic
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype
        # One draw from the params stream, as nnx.Embed makes it: the same rngs give the
        # same table. An initializer wrapped by nnx.with_partitioning returns its value
        # with metadata, which nnx.Param unpacks.
        value = embedding_init(rngs.params(), (self.num_embeddings, self.features), param_dtype)
        metadata = dict(embedding_metadata)
        given = metadata.keys() | getattr(value, "metadata", {}).keys()
        if sharding is not None and not given & set(_SHARDING_KEYS):
            # eager_sharding=False: our logical axes stay metadata until a mesh and rules
            # place the table, so the layer can be built outside any mesh.
            metadata |= {"out_sharding": tuple(sharding), "eager_sharding": False}
        self.embedding = nnx.Param(value, **metadata)
        check_dtype("embedding.dtype", self.embedding.dtype)
        # As nnx.Embed: the output and attend dtype, by default the table's.
        self.dtype = self.embedding.dtype if dtype is None else dtype

    @property
    def vocab_size(self) -> int:
        """``num_embeddings``, under the seed's name."""
        return self.num_embeddings

    @property
    def d_model(self) -> int:
        """``features``, under the seed's name."""
        return self.features

    def __call__(self, token_ids, out_sharding=None) -> jax.Array:
        """Rows of the table for ``token_ids`` of any shape: ``token_ids.shape + (features,)``.

        Args:
          token_ids: integer ids of any shape and width (``embed.ids``).
          out_sharding: as ``nnx.Embed``'s: the output's sharding under an explicit mesh.
        """
        if out_sharding is not None:
            lookup = jax.sharding.auto_axes(self._lookup, out_sharding=out_sharding)
            return lookup(self.embedding[...], token_ids)
        return self._lookup(self.embedding[...], token_ids)

    def _lookup(self, table: jax.Array, token_ids) -> jax.Array:
        # Called eagerly, the lookup, the out-of-range policy, the output cast and the
        # scaling are one compiled call (dispatch.lookup).
        return dispatch.lookup(
            self._promoted(table),
            token_ids,
            backend=self.backend,
            mode=self.mode,
            fill_value=self.fill_value,
            deterministic=self.deterministic,
            dtype=self._output_dtype,
            scale_by_sqrt_d=self.scale_by_sqrt_d,
        )

    def _promoted(self, table: jax.Array) -> jax.Array:
        """The table the lookup gathers from: ``promote_dtype``'s, as in ``nnx.Embed``.

        Flax's default promotion is a cast to ``dtype``. To a narrower ``dtype`` it is
        applied to the gathered rows instead (``finish``): the same values without
        casting the whole table, and a gradient accumulated in float32 where
        ``nnx.Embed`` scatters in 16 bits. To a wider one (a 16-bit table, float32
        ``dtype``) the table is cast first, as ``nnx.Embed`` does, so the float32
        cotangents are summed unrounded and the sum is rounded once, by the cast.
        """
        if self.promote_dtype is flax_dtypes.promote_dtype:
            dtype = jnp.dtype(self.dtype)
            wider = dtype.itemsize > table.dtype.itemsize and dtype in SUPPORTED_DTYPES
            return table.astype(dtype) if wider else table
        (table,) = self.promote_dtype((table,), dtype=self.dtype, inexact=False)
        return table

    @property
    def _output_dtype(self):
        """The cast after the lookup: to ``dtype``, unless a custom ``promote_dtype`` has
        set the dtype already (``_promoted``), as in ``nnx.Embed``."""
        return self.dtype if self.promote_dtype is flax_dtypes.promote_dtype else None

    def lookup_table(self) -> jax.Array:
        """The table a lookup reads: the embedding after ``promote_dtype``, as ``__call__``.

        With ``finish``, what a lookup done outside ``__call__`` needs, such as
        ``embed.parallel.apply_sharded``'s on a mesh.
        """
        return self._promoted(self.embedding[...])

    def finish(self, rows: jax.Array) -> jax.Array:
        """Rows read from ``lookup_table()`` in the output ``dtype``, scaled if
        ``scale_by_sqrt_d``: the rest of ``__call__``."""
        return dispatch.finish(
            rows, self.features, dtype=self._output_dtype, scale_by_sqrt_d=self.scale_by_sqrt_d
        )

    def attend(self, query: jax.Array, out_sharding=None, *, precision=None) -> jax.Array:
        """The tied output projection ``query @ embedding.T``, as ``nnx.Embed.attend``.

        As in ``nnx.Embed``, ``promote_dtype`` casts ``query`` and the table to ``dtype``
        (default: the table's dtype), the dtype of the logits. A 16-bit product is
        accumulated in float32 (``preferred_element_type``) and rounded once on every
        platform (XLA does so for ``nnx.Embed`` on CPU and GPU too); set
        ``dtype=jnp.float32`` for float32 logits from a 16-bit table.

        >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
        >>> layer.attend(jnp.ones((2, 4))).shape
        (2, 10)

        Args:
          query: ``[..., features]``.
          out_sharding: as ``nnx.Embed.attend``'s (``jnp.dot``'s).
          precision: ``jnp.dot``'s; e.g. ``"highest"`` keeps GPUs from computing a
            float32 product in TF32.

        Returns:
          ``[..., num_embeddings]`` logits in ``dtype``.
        """
        query, table = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        dtype = jnp.result_type(query, table)
        accumulate = jnp.float32 if dtype.itemsize < 4 else dtype
        logits = jnp.dot(
            query,
            table.T,
            precision=precision,
            preferred_element_type=accumulate,
            out_sharding=out_sharding,
        )
        return logits.astype(dtype)

    def attend_cross_entropy(
        self,
        hidden: jax.Array,
        targets: jax.Array,
        *,
        where: jax.Array | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        logit_soft_cap: float | None = None,
        z_loss: float = 0.0,
    ) -> jax.Array:
        """``softmax_cross_entropy(attend(hidden), targets)``, without the logits array.

        The tied output projection and its loss in blocks of tokens and vocabulary
        (``embed.loss.attend_cross_entropy``): no ``[tokens, vocab_size]`` array exists
        in the forward or the backward. The matmuls take ``dtype`` (default: the
        table's) like ``attend``, but the logits stay float32. The table gradient adds
        to the lookup's, as in any tied model.

        >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
        >>> layer.attend_cross_entropy(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), int)).shape
        ()

        Args:
          hidden: ``[..., features]`` final hidden states.
          targets: ``[...]`` integer next-token ids (optax's integer-label semantics).
          where: ``[...]`` bool, the tokens that count; default all.
          reduction: ``"mean"`` over the kept tokens, ``"sum"``, or ``"none"``.
          chunk_size: tokens per block; default from the shapes.
          logit_soft_cap: Gemma 2's ``cap * tanh(logits / cap)``.
          z_loss: weight of PaLM's ``logsumexp(logits) ** 2`` term.

        Returns:
          The float32 loss: a scalar, or ``[...]`` for ``reduction="none"``.
        """
        table = self.embedding[...]
        return loss.attend_cross_entropy(
            table,
            hidden,
            targets,
            where=where,
            reduction=reduction,
            chunk_size=chunk_size,
            logit_soft_cap=logit_soft_cap,
            z_loss=z_loss,
            dtype=self.dtype,
        )


class Embed(_Embedding):
    """``flax.nnx.Embed``'s constructor and behaviour, through this library's backends.

    Change ``from flax.nnx import Embed`` to ``from embed import Embed`` (or
    ``nnx.Embed(...)`` to ``embed.Embed(...)``): the same ``rngs`` give the same table,
    and outputs, ``attend`` and attributes are those of ``nnx.Embed``. README's
    "Replacing ``nnx.Embed``" lists what differs (16-bit gradients are accumulated in
    float32, more accurately than XLA's 16-bit scatter).

    It is an ``nnx.Embed``: ``isinstance(layer, nnx.Embed)`` holds, and a subclass
    written as for ``nnx.Embed`` keeps this layer's backends:

    >>> class ScaledEmbed(Embed):
    ...     def __call__(self, inputs):
    ...         return super().__call__(inputs) * jnp.sqrt(self.features).astype(self.dtype)
    >>> isinstance(ScaledEmbed(5, 4, rngs=nnx.Rngs(0), backend="xla"), nnx.Embed)
    True

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from embed import Embed
    >>> layer = Embed(num_embeddings=5, features=3, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[0, 1, 2], [-1, -2, 5]])).shape
    (2, 3, 3)

    Args:
      num_embeddings: number of rows of the table (the vocabulary size).
      features: width of each row.
      dtype: dtype of the output and of ``attend`` (default: the table's).
      param_dtype: dtype of the table: float32, bfloat16 or float16 (the dtypes every
        backend supports; ``nnx.Embed`` takes any).
      embedding_init: the table's initializer, ``nnx.Embed``'s by default (variance
        scaling, fan-in, normal), called once and not kept, as by ``nnx.Embed``.
        ``nnx.with_partitioning(init, axes)`` partitions the table, as for
        ``nnx.Embed``.
      promote_dtype: as ``nnx.Embed``'s; a custom one is applied to the table before
        the lookup, and must return a dtype the backends support.
      rngs: the ``nnx.Rngs`` whose ``params`` stream draws the table, once.
      embedding_metadata: metadata for the table's ``nnx.Param``, as ``nnx.Embed``'s.
      backend: ``"auto"``, ``"xla"``, ``"pallas"`` or ``"triton"`` (``embed.dispatch``).
      mode: out-of-range policy (``embed.ids``). The default is ``nnx.Embed``'s
        behaviour: ``"fill"`` (a row of ``fill_value``, NaN, as ``jnp.take``), and for
        ``num_embeddings=1``, where ``nnx.Embed`` broadcasts its one row to every id,
        ``"clip"``, which reads that row for every id.
      fill_value: the row value for ``mode="fill"``.
      scale_by_sqrt_d: multiply looked-up rows by ``sqrt(features)``; off, as in flax.
      deterministic: a bit-reproducible table gradient on the kernel backends.
      sharding: logical axes for the table when neither ``embedding_init`` nor
        ``embedding_metadata`` partitions it. ``None`` by default, as ``nnx.Embed``:
        names that a mesh does not know would break Flax's sharding recipe. Pass
        ``("vocab", "embed")`` to use ``embed.parallel.logical_axis_rules``.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        embedding_init: Callable = default_embed_init,
        promote_dtype: Callable = flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        embedding_metadata: Mapping = MappingProxyType({}),
        backend: str = "auto",
        mode: str | None = None,
        fill_value: float = float("nan"),
        scale_by_sqrt_d: bool = False,
        deterministic: bool = False,
        sharding: tuple[str | None, str | None] | None = None,
    ):
        if mode is None:
            mode = "clip" if num_embeddings == 1 else "fill"
        self._setup(
            num_embeddings,
            features,
            rngs,
            embedding_init=embedding_init,
            dtype=dtype,
            param_dtype=param_dtype,
            promote_dtype=promote_dtype,
            embedding_metadata=embedding_metadata,
            sharding=sharding,
            backend=backend,
            mode=mode,
            fill_value=fill_value,
            scale_by_sqrt_d=scale_by_sqrt_d,
            deterministic=deterministic,
        )

    def __call__(self, inputs, out_sharding=None) -> jax.Array:
        """``nnx.Embed.__call__``: rows for integer ``inputs``, ``inputs.shape + (features,)``."""
        return super().__call__(inputs, out_sharding)


class MyEmbed(_Embedding):
    """A learned ``(vocab_size, d_model)`` table indexed by token ids.

    The forward is ``embedding[token_ids]``, through the backend you choose; every
    backend gives bit-identical outputs, and table gradients accumulated in float32.
    The seed's face of ``Embed``: it takes the same keywords, with the seed's defaults.

    It is an ``nnx.Embed`` too. NNX code asks that type which modules hold a token
    table: re-initialisation loops, weight-decay masks, counts of non-embedding
    parameters. ``MyEmbed`` holds that table under the same name, with ``nnx.Embed``'s
    attributes, ``attend`` and call (positionally; the ids' keyword is the seed's
    ``token_ids``), so such code must find it rather than skip it silently. Only its
    constructor's defaults differ (unit-normal table, ``mode="clip"``, logical axes),
    and a constructor is no part of what such code relies on.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from embed import MyEmbed
    >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
    >>> layer(jnp.array([[1, 2, 3]])).shape
    (1, 3, 4)

    Args:
      vocab_size: number of rows of the table (``num_embeddings``, also an attribute).
      d_model: width of each row (``features``, also an attribute).
      rngs: the ``nnx.Rngs`` whose ``params`` stream draws the table.
      backend: ``"auto"``, ``"xla"``, ``"pallas"``, ``"triton"`` or ``"mosaic"``; see
        ``embed.dispatch.backend_for`` for what ``"auto"`` picks.
      mode: out-of-range policy, ``"clip"``, ``"fill"`` or ``"error"`` (``embed.ids``).
      fill_value: the row value for ``mode="fill"``.
      dtype: dtype of the output (default: the table's), and of ``attend``'s
        computation.
      param_dtype: dtype of the table: float32, bfloat16 or float16.
      embedding_init: the table's initializer; the seed's ``jax.random.normal`` by
        default. ``nnx.with_partitioning(init, axes)`` partitions the table.
      promote_dtype: as ``Embed``'s.
      embedding_metadata: metadata for the table's ``nnx.Param``.
      scale_by_sqrt_d: multiply the looked-up rows by ``sqrt(d_model)`` (T5/Gemma
        style). Off by default, so the output is the table's rows bit for bit;
        ``attend`` is never scaled.
      deterministic: make the kernel backends' table gradient bit-reproducible
        (sort-based, no float atomics; slower when ids repeat). The ``"xla"`` backend
        ignores it: XLA's determinism is set by XLA flags (``embed.dispatch.gather``).
      sharding: logical axes of the table, mapped onto a mesh by
        ``nnx.logical_axis_rules`` (``embed.parallel``), used when neither
        ``embedding_init`` nor ``embedding_metadata`` partitions the table; ``None``
        for no annotation.
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
        embedding_init: Callable = jax.random.normal,
        promote_dtype: Callable = flax_dtypes.promote_dtype,
        embedding_metadata: Mapping = MappingProxyType({}),
        scale_by_sqrt_d: bool = False,
        deterministic: bool = False,
        sharding: tuple[str | None, str | None] | None = ("vocab", "embed"),
    ):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
            _positive_int(name, value)  # Errors under the seed's names.
        self._setup(
            vocab_size,
            d_model,
            rngs,
            embedding_init=embedding_init,
            dtype=dtype,
            param_dtype=param_dtype,
            promote_dtype=promote_dtype,
            embedding_metadata=embedding_metadata,
            sharding=sharding,
            backend=backend,
            mode=mode,
            fill_value=fill_value,
            scale_by_sqrt_d=scale_by_sqrt_d,
            deterministic=deterministic,
        )


_MAX_VOCAB = 2**31 - 1  # Ids are int32 once validated.

# The one NaN a layer stores: NaN != NaN, and Python hashes each NaN object apart, so
# two layers holding distinct NaN objects would have graph definitions that differ.
_NAN = float("nan")


def _canonical_fill(fill_value):
    """``fill_value``, with every NaN replaced by ``_NAN`` (a static graph attribute)."""
    if isinstance(fill_value, numbers.Real) and math.isnan(fill_value):
        return _NAN
    return fill_value


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
