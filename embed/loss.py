"""The tied output projection and its cross-entropy, without the ``[tokens, vocab]`` logits.

``attend_cross_entropy(table, hidden, targets)`` is
``softmax_cross_entropy(hidden @ table.T, targets)`` (optax's integer-label form, the
oracle being ``kernels.reference.attend_cross_entropy_reference``), computed block by
block: the tokens in chunks of ``chunk_size`` (``lax.scan``), the vocabulary in blocks of
``vocab_chunk_size`` with an online log-sum-exp in float32. No array larger than one
``[chunk_size, vocab_chunk_size]`` block of logits exists, in the forward or the
backward; the gradients of ``hidden`` and of the table accumulate in float32 across
blocks (a ``[vocab_size, d_model]`` float32 accumulator, the gradient's own size) and
are cast once.

The gradient is a ``jax.custom_vjp``:

* ``reduction="mean"`` / ``"sum"``: the cotangent is one scalar, so the forward pass of
  ``jax.grad`` computes the gradients for a cotangent of 1 while each block of logits is
  live, and the backward only scales them (Liger-Kernel's fused linear cross-entropy
  does the same). With one vocabulary block (the default up to 65536 rows) that is three
  matmuls per block, as many as the naive form; with several, the log-sum-exp must be
  complete before any softmax, so each block's logits are computed twice (four).
* ``reduction="none"``: the cotangent differs per token, so the forward keeps only each
  token's log-sum-exp and the backward recomputes every block's logits.

A plain forward (no ``jax.grad``) runs only the log-sum-exp pass.

Default block sizes (``_block_sizes``): a block of logits holds at most
``2**23`` float32 values (32 MiB). The vocabulary is one block up to 65536 rows, else
blocks of 65536; ``chunk_size`` is ``2**23 // vocab_chunk_size`` rounded down to a
multiple of 8 (at least 8), and at most the number of tokens. E.g. 160 tokens for
GPT-2's 50257, 256 for 32000, 128 for 256000 (in four vocabulary blocks, the last overlapping).
Tokens that do not fill the last chunk are padded and masked; a vocabulary that does not
divide into blocks ends with a block that overlaps its predecessor, whose repeated
columns are masked (no copy of the table).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from embed import ids
from kernels.contract import check_dtype
from kernels.reference import REDUCTIONS

BLOCK_ELEMENTS = 2**23  # Float32 logits in one [chunk, vocab chunk] block: 32 MiB.
MAX_VOCAB_CHUNK = 2**16


def _block_sizes(num_tokens: int, vocab_size: int, chunk_size, vocab_chunk_size):
    """``(chunk_size, vocab_chunk_size)``: the given ones, or the defaults above."""
    if vocab_chunk_size is None:
        vocab_chunk_size = min(vocab_size, MAX_VOCAB_CHUNK)
    vocab_chunk_size = min(vocab_chunk_size, vocab_size)
    if chunk_size is None:
        chunk_size = max(8, BLOCK_ELEMENTS // vocab_chunk_size // 8 * 8)
    chunk_size = max(1, min(chunk_size, num_tokens))
    return chunk_size, vocab_chunk_size


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static part of one call."""

    vocab_size: int  # Of the whole table: targets index it.
    chunk_size: int
    vocab_chunk_size: int
    logit_soft_cap: float | None
    z_loss: float
    dtype: jnp.dtype  # Of the matmuls' inputs; they accumulate in float32.
    reduction: str
    table_dtype: jnp.dtype  # Of the gradients, cast once.
    hidden_dtype: jnp.dtype
    # Vocab parallel: the table rows this call holds, a 1/n block split over axis_name.
    rows: int
    axis_name: str | None = None

    def row_offset(self):
        """The global id of this call's first table row."""
        if self.axis_name is None:
            return 0
        return lax.axis_index(self.axis_name) * self.rows

    @property
    def num_vocab_chunks(self) -> int:
        return -(-self.rows // self.vocab_chunk_size)

    def matmul(self, a, b):
        return jnp.matmul(
            a.astype(self.dtype), b.astype(self.dtype), preferred_element_type=jnp.float32
        )

    def block(self, table, hidden, j):
        """One block of capped float32 logits and what the block needs besides.

        Block ``j`` nominally covers rows ``[j * Vc, (j + 1) * Vc)``; the last one starts
        at ``V - Vc`` instead, and its columns before ``j * Vc`` (counted by block
        ``j - 1`` already) are masked.
        """
        vc = self.vocab_chunk_size
        if self.num_vocab_chunks == 1:
            rows, start, first = table, 0, 0
        else:
            first = j * vc
            start = jnp.minimum(first, self.rows - vc)
            rows = lax.dynamic_slice_in_dim(table, start, vc, axis=0)  # [Vc, D]
        logits = self.matmul(hidden, rows.T)  # [C, Vc] float32
        slope = None  # d capped / d logits, as jax.grad of tanh computes it
        if self.logit_soft_cap is not None:
            squashed = jnp.tanh(logits / self.logit_soft_cap)
            logits, slope = self.logit_soft_cap * squashed, 1.0 - squashed * squashed
        columns = start + lax.broadcasted_iota(jnp.int32, (1, vc), 1)  # [1, Vc], local
        valid = columns >= first  # [1, Vc]
        columns = columns + self.row_offset()  # Global ids, compared with the targets.
        return logits, slope, rows, start, columns, valid

    def over_vocab(self, body, carry):
        """``carry = body(j, carry)`` for each vocabulary block ``j``."""
        if self.num_vocab_chunks == 1:
            return body(0, carry)
        return lax.fori_loop(0, self.num_vocab_chunks, body, carry)

    def checked_label(self, label, targets):
        """The target logits, NaN for a target outside the vocabulary (as optax)."""
        return jnp.where((targets >= 0) & (targets < self.vocab_size), label, jnp.nan)

    def token_loss(self, lse, label, keep):
        """Each token's ``lse - logit[target] + z_loss * lse**2``; 0 where not ``keep``."""
        return jnp.where(keep, lse - label + self.z_loss * lse**2, 0.0)

    def logits_grad(self, probs, hit, lse, coef, slope):
        """The float32 gradient of ``coef * token_loss`` with respect to the raw logits.

        ``softmax * (1 + 2 z lse) - onehot(target)``, times ``1 - tanh**2`` under a
        cap. ``probs - hit`` comes first: exact where a probability rounds to 1.
        """
        grad = probs - hit
        if self.z_loss:
            grad = grad + (2.0 * self.z_loss * lse)[:, None] * probs
        grad = coef[:, None] * grad
        return grad if slope is None else grad * slope


def _zeros(shape, *like, fill=0.0):
    """Float32 ``fill`` of ``shape``, varying over the mesh axes that ``like`` vary over.

    Inside ``shard_map`` (the data-parallel layout), a loop carry must keep its type,
    and a carry fed by a shard's tokens varies over the token axis; a plain constant
    would not. ``where(True, ...)`` takes the type of every operand and the value of
    the constant, whatever ``like`` holds (no ``0 * x``: ``x`` may be infinite).
    """
    out = jnp.full(shape, fill, jnp.float32)
    for x in like:
        out = jnp.where(True, out, lax.stop_gradient(x).sum().astype(jnp.float32))
    return out


def _vary_like(x, *like):
    """``x``, varying over the mesh axes that ``like`` vary over (a no-op elsewhere).

    A replicated table used by a shard's tokens: made varying outside the
    ``custom_vjp``, JAX's own transpose of that step sums the shards' table gradients
    (a ``psum``), and the ``custom_vjp`` sees inputs and cotangents of one type. XLA
    folds the ``where(True, ...)`` away. ``like`` gets no gradient from it: through the
    transposed 16-bit sum, XLA on CPU folded it into a NaN constant and the jitted
    float16 hidden gradient came out all NaN.
    """
    for y in like:
        x = jnp.where(True, x, lax.stop_gradient(y).sum().astype(x.dtype))
    return x


def _lse_and_label(table, hidden, targets, cfg: _Config):
    """Per-token float32 ``(logsumexp, target logit)`` of one chunk, online over blocks.

    ``hidden``: [C, D]; ``targets``: [C] int32, wrapped once (optax's negative index).
    """
    c = hidden.shape[0]

    def body(j, carry):
        running_max, total, label = carry  # [C] each
        logits, _, _, _, columns, valid = cfg.block(table, hidden, j)
        logits = jnp.where(valid, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        # A block has at least one valid column, so new_max is finite for finite logits.
        total = total * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(
            axis=1
        )
        hit = valid & (columns == targets[:, None])
        label = label + jnp.where(hit, logits, 0.0).sum(axis=1)
        return new_max, total, label

    init = (
        _zeros((c,), table, hidden, fill=-jnp.inf),
        _zeros((c,), table, hidden),
        _zeros((c,), table, hidden),
    )
    running_max, total, label = cfg.over_vocab(body, init)
    if cfg.axis_name is not None:
        # Vocab parallel: combine the shards' partial log-sum-exps and target logits.
        peak = lax.pmax(running_max, cfg.axis_name)
        total = lax.psum(total * jnp.exp(running_max - peak), cfg.axis_name)
        running_max, label = peak, lax.psum(label, cfg.axis_name)
    return running_max + jnp.log(total), cfg.checked_label(label, targets)


def _chunk_grads(table, hidden, targets, lse, coef, grad_table, cfg: _Config):
    """Adds one chunk's table gradient into ``grad_table``; returns its hidden gradient.

    ``coef``: [C] float32, each token's cotangent (0 for masked tokens).
    """

    def body(j, carry):
        grad_hidden, grad_table = carry  # [C, D], [V, D] float32
        logits, slope, rows, start, columns, valid = cfg.block(table, hidden, j)
        probs = jnp.exp(logits - lse[:, None])  # [C, Vc]
        grad = cfg.logits_grad(probs, columns == targets[:, None], lse, coef, slope)
        grad = jnp.where(valid, grad, 0.0)  # [C, Vc] float32: gradient of raw logits
        grad_hidden = grad_hidden + cfg.matmul(grad, rows)
        block = cfg.matmul(grad.T, hidden)  # [Vc, D]
        if cfg.num_vocab_chunks == 1:
            return grad_hidden, grad_table + block
        old = lax.dynamic_slice_in_dim(grad_table, start, cfg.vocab_chunk_size, axis=0)
        return grad_hidden, lax.dynamic_update_slice_in_dim(grad_table, old + block, start, 0)

    init = (_zeros(hidden.shape, table, hidden, coef), grad_table)
    return cfg.over_vocab(body, init)


def _per_token(table, hidden, targets, keep, cfg: _Config):
    """Per-token losses ``[n, C]`` (0 where not kept) and log-sum-exps, chunk by chunk."""

    def step(_, chunk):
        h, t, k = chunk
        lse, label = _lse_and_label(table, h, t, cfg)
        return None, (cfg.token_loss(lse, label, k), lse)

    _, (loss, lse) = lax.scan(step, None, (hidden, targets, keep))
    return loss, lse


def _grads(table, hidden, targets, lse, coef, cfg: _Config):
    """Float32 gradients ``([n, C, D], [V, D])`` for per-token cotangents ``coef``."""

    def step(grad_table, chunk):
        h, t, lse_c, c = chunk
        grad_hidden, grad_table = _chunk_grads(table, h, t, lse_c, c, grad_table, cfg)
        return grad_table, grad_hidden

    init = _zeros(table.shape, table, hidden, coef)
    grad_table, grad_hidden = lax.scan(step, init, (hidden, targets, lse, coef))
    return _sum_shards(grad_hidden, cfg), grad_table


def _sum_shards(grad_hidden, cfg: _Config):
    """Vocab parallel: each shard's hidden gradient covers its rows only; add them."""
    return grad_hidden if cfg.axis_name is None else lax.psum(grad_hidden, cfg.axis_name)


def _one_block_loss_and_grads(table, hidden, targets, weights, grad_table, cfg: _Config):
    """``_lse_and_label`` and ``_chunk_grads`` fused, when the vocabulary is one block.

    The logits are computed once, and exponentiated once: the softmax reuses the
    log-sum-exp's ``exp(logits - max)``. Vocab parallel, the block is this shard's rows,
    and the shards' statistics are combined while it is live.
    """
    logits, slope, _, _, columns, _ = cfg.block(table, hidden, 0)  # [C, rows]
    peak = logits.max(axis=1, keepdims=True)  # [C, 1]
    shifted = jnp.exp(logits - peak)
    total = shifted.sum(axis=1, keepdims=True)
    local = targets - cfg.row_offset()
    owned = (local >= 0) & (local < cfg.rows)
    label = jnp.take_along_axis(logits, jnp.where(owned, local, 0)[:, None], axis=1)[:, 0]
    label = jnp.where(owned, label, 0.0)
    if cfg.axis_name is not None:
        shard_peak, peak = peak, lax.pmax(peak, cfg.axis_name)
        total = lax.psum(total * jnp.exp(shard_peak - peak), cfg.axis_name)
        shifted = shifted * jnp.exp(shard_peak - peak)
        label = lax.psum(label, cfg.axis_name)
    lse = (peak + jnp.log(total))[:, 0]
    label = cfg.checked_label(label, targets)
    loss = cfg.token_loss(lse, label, weights != 0)
    grad = cfg.logits_grad(shifted / total, columns == targets[:, None], lse, weights, slope)
    grad_hidden = cfg.matmul(grad, table)
    return loss, grad_hidden, grad_table + cfg.matmul(grad.T, hidden)


def _loss_and_grads(table, hidden, targets, weights, cfg: _Config):
    """Per-token losses and the gradients of ``sum(weights * loss)``, in one pass.

    With one vocabulary block, each chunk's logits are computed once and serve both the
    log-sum-exp and the gradient; with several, ``_chunk_grads`` recomputes them.
    """

    def step(grad_table, chunk):
        h, t, w = chunk
        if cfg.num_vocab_chunks == 1:
            loss, grad_hidden, grad_table = _one_block_loss_and_grads(
                table, h, t, w, grad_table, cfg
            )
            return grad_table, (loss, grad_hidden)
        lse, label = _lse_and_label(table, h, t, cfg)
        loss = cfg.token_loss(lse, label, w != 0)
        grad_hidden, grad_table = _chunk_grads(table, h, t, lse, w, grad_table, cfg)
        return grad_table, (loss, grad_hidden)

    init = _zeros(table.shape, table, hidden, weights)
    grad_table, (loss, grad_hidden) = lax.scan(step, init, (hidden, targets, weights))
    return loss, _sum_shards(grad_hidden, cfg), grad_table


def _reduce(loss, weights, cfg: _Config):
    if cfg.reduction == "none":
        return loss
    return (weights * loss).sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(table, hidden, targets, weights, cfg: _Config):
    """``hidden``: [n, C, D]; ``targets``: [n, C] int32; ``weights``: [n, C] float32.

    Returns ``sum(weights * loss)`` (``"mean"``/``"sum"``) or the ``[n, C]`` losses,
    masked where ``weights == 0`` (``"none"``).
    """
    loss, _ = _per_token(table, hidden, targets, weights != 0, cfg)
    return _reduce(loss, weights, cfg)


def _fused_fwd(table, hidden, targets, weights, cfg: _Config):
    if cfg.reduction == "none":
        loss, lse = _per_token(table, hidden, targets, weights != 0, cfg)
        return loss, (table, hidden, targets, weights, lse)
    loss, grad_hidden, grad_table = _loss_and_grads(table, hidden, targets, weights, cfg)
    return _reduce(loss, weights, cfg), (grad_hidden, grad_table, weights)


def _fused_bwd(cfg: _Config, residuals, cotangent):
    if cfg.reduction == "none":
        table, hidden, targets, weights, lse = residuals
        coef = jnp.where(weights != 0, cotangent.astype(jnp.float32), 0.0)
        grad_hidden, grad_table = _grads(table, hidden, targets, lse, coef, cfg)
    else:
        grad_hidden, grad_table, weights = residuals
        cotangent = cotangent.astype(jnp.float32)
        grad_hidden, grad_table = cotangent * grad_hidden, cotangent * grad_table
    return (
        grad_table.astype(cfg.table_dtype),
        grad_hidden.astype(cfg.hidden_dtype),
        None,
        jnp.zeros_like(weights),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def attend_cross_entropy(
    table: jax.Array,  # [vocab_size, d_model]
    hidden: jax.Array,  # [..., d_model]
    targets: jax.Array,  # [...] integer
    *,
    where: jax.Array | None = None,  # [...] bool
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    logit_soft_cap: float | None = None,
    z_loss: float = 0.0,
    dtype=None,
    axis_name: str | None = None,
) -> jax.Array:  # [] float32, or [...] float32 for reduction="none"
    """Cross-entropy of the tied logits ``hidden @ table.T``, never built whole.

    Equal, up to float32 summation order, to
    ``kernels.reference.attend_cross_entropy_reference`` with the same arguments:
    optax's integer-label softmax cross-entropy, PaLM's ``z_loss * logsumexp**2``,
    Gemma 2's ``logit_soft_cap``, reduced over the tokens ``where`` keeps. Differentiable
    in ``table`` and ``hidden`` (``jax.grad``; see the module docstring); not in
    forward mode.

    >>> table = jnp.eye(4)
    >>> float(attend_cross_entropy(table, 100.0 * jnp.eye(4), jnp.arange(4)))
    0.0

    Args:
      table: the tied embedding table.
      hidden: the final hidden states.
      targets: the next-token ids; a negative id counts from the end once, and an id
        outside ``[-vocab_size, vocab_size)`` gives a NaN loss (as optax), unless
        ``where`` drops it.
      where: the tokens that count; default all.
      reduction: ``"mean"`` over the kept tokens (0 when none is), ``"sum"``, or
        ``"none"`` for each token's loss (0 where not kept).
      chunk_size: tokens per block; default from the shapes (module docstring).
      vocab_chunk_size: vocabulary rows per block; default the whole vocabulary up to
        65536 rows.
      logit_soft_cap: if given, logits become ``cap * tanh(logits / cap)``.
      z_loss: weight of the ``logsumexp**2`` term.
      dtype: the matmuls' input dtype (default: the table's); they accumulate in
        float32 and the logits stay float32.
      axis_name: inside ``shard_map``, the mesh axis the table's rows are split over
        (Megatron's vocab parallelism, ``embed.parallel``): ``table`` is this shard's
        block of rows, ``hidden`` and ``targets`` are whole, and the shards combine
        their statistics over ``axis_name``.

    Returns:
      The float32 loss.
    """
    table, hidden, targets, weights, cfg, finish = _prepare(
        table,
        hidden,
        targets,
        where=where,
        reduction=reduction,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        logit_soft_cap=logit_soft_cap,
        z_loss=z_loss,
        dtype=dtype,
        axis_name=axis_name,
    )
    return finish(_fused(_vary_like(table, hidden, weights), hidden, targets, weights, cfg))


def _prepare(
    table,
    hidden,
    targets,
    *,
    where,
    reduction,
    chunk_size,
    vocab_chunk_size,
    logit_soft_cap,
    z_loss,
    dtype,
    axis_name,
):
    """Checks the arguments; returns ``_fused``'s arguments and the output's reshape.

    ``axis_name``: vocab parallel, ``table`` is one of the row blocks split over that
    axis; the blocks are sized for one shard's rows.
    """
    table, hidden = jnp.asarray(table), jnp.asarray(hidden)
    targets = jnp.asarray(targets)
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be [vocab_size, d_model]")
    rows, d_model = table.shape
    vocab_size = rows * (1 if axis_name is None else lax.axis_size(axis_name))
    check_dtype("table.dtype", table.dtype)
    if hidden.ndim < 1 or hidden.shape[-1] != d_model:
        raise ValueError(f"{hidden.shape=} must be [..., d_model] with {d_model=}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"{hidden.dtype=} must be a floating dtype")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{targets.shape=} must be hidden.shape[:-1] = {hidden.shape[:-1]}")
    if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.dtype == bool:
        raise TypeError(f"{targets.dtype=} must be an integer dtype")
    if where is not None:
        where = jnp.asarray(where)
        if where.shape != targets.shape or where.dtype != bool:
            raise ValueError(f"{where.shape=} of {where.dtype} must be bool {targets.shape}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction=} must be one of {REDUCTIONS}")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0
        ):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")
    if logit_soft_cap is not None and not (
        isinstance(logit_soft_cap, numbers.Real)
        and math.isfinite(logit_soft_cap)
        and logit_soft_cap > 0
    ):
        raise ValueError(f"{logit_soft_cap=} must be a positive finite number or None")
    if not (isinstance(z_loss, numbers.Real) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{z_loss=} must be a finite number >= 0")
    dtype = check_dtype("dtype", dtype or table.dtype)

    batch_shape = targets.shape
    num_tokens = math.prod(batch_shape)
    chunk, vocab_chunk = _block_sizes(num_tokens, rows, chunk_size, vocab_chunk_size)
    cfg = _Config(
        vocab_size=vocab_size,
        chunk_size=chunk,
        vocab_chunk_size=vocab_chunk,
        logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
        z_loss=float(z_loss),
        dtype=dtype,
        reduction=reduction,
        table_dtype=table.dtype,
        hidden_dtype=hidden.dtype,
        rows=rows,
        axis_name=axis_name,
    )
    keep = jnp.ones(batch_shape, bool) if where is None else where
    keep = keep.reshape(num_tokens)
    if reduction == "mean":
        scale = 1.0 / jnp.maximum(keep.sum(), 1).astype(jnp.float32)
    else:
        scale = jnp.float32(1.0)
    weights = jnp.where(keep, scale, 0.0)
    targets = ids.loss_targets(targets.reshape(num_tokens), vocab_size)
    hidden = hidden.reshape(num_tokens, d_model)

    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    if pad:  # Padded tokens have weight 0: no loss, no gradient.
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    hidden = hidden.reshape(num_chunks, chunk, d_model)
    targets, weights = targets.reshape(num_chunks, chunk), weights.reshape(num_chunks, chunk)

    def finish(out):
        if reduction == "none":
            return out.reshape(-1)[:num_tokens].reshape(batch_shape)
        return out

    return table, hidden, targets, weights, cfg, finish
