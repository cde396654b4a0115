"""The layer on a JAX mesh: sharded lookups (the same kernels, one call per shard, inside
``shard_map``) and the vocab-parallel tied loss.

Three layouts, the ones Megatron-style training uses:

  * ``"vocab"``: the table is split by rows over ``axis_name``; each shard gathers the
    rows it owns with the backend kernel and writes ``-0.0`` for the others, and a
    ``psum`` (or, with ``reduce_scatter=True``, a ``psum_scatter`` over the tokens)
    combines them. ``-0.0 + x == x`` for every ``x``, signed zeros and NaNs included, so
    the sum is exact whatever order the all-reduce adds in.
  * ``"model"``: the table is split by columns (``d_model``); each shard gathers its
    columns for every token; the output stays split on its last dimension, or is
    all-gathered (``gather_output=True``, the default).
  * ``"data"``: the table is replicated and the tokens are split over ``axis_name``;
    the table gradient is summed over the shards by ``shard_map``'s transpose.

``batch_axis`` additionally splits the tokens over a second mesh axis for ``"vocab"``
and ``"model"``, which is data-plus-tensor parallelism on a 2-D mesh.

Id semantics are those of ``embed.lookup`` for every layout, because they are settled
once, on the global ids, before anything is split: ``embed.ids`` validates the ids and
raises for ``mode="error"``; ``kernels.contract.wrap_and_clamp`` wraps negative ids
once and clamps, so the row read for an out-of-range id (row 0 or ``V - 1``) is owned by
exactly one shard; ``in_vocab`` marks the ids that receive gradient; and
``embed.ids.lookup_with_policy`` applies the mode around the sharded gather, as it
does around every unsharded backend. The table gradient is written out
(a ``custom_vjp`` around the ``shard_map``): each shard runs its kernel's own backward
on its block of the cotangent, so ``"vocab"`` and ``"model"`` gradients are the
unsharded ones bit for bit.

With ``Explicit`` mesh axes (``jax.make_mesh``'s default), call under
``jax.set_mesh(mesh)``, as JAX requires for differentiating on such meshes.

Tokens are handled flat, in the row-major order of ``token_ids`` (the kernels take 1-D
ids): a split of the tokens over a mesh axis is a split of the leading ids dimension
when it divides evenly (the sequence dimension for Megatron's ``[seq, batch]`` ids).
Sizes that do not divide the mesh axis are padded inside the call (table rows for
``"vocab"``, columns for ``"model"``, tokens for the token split) and the padding is
sliced off; padding the table copies it every call, so give real jobs a vocabulary and
width that divide the axis (GPT-2's 50257 is commonly padded to 50304).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from embed import dispatch, loss
from embed import ids as ids_lib
from kernels.contract import in_vocab, wrap_and_clamp

LAYOUTS = ("vocab", "model", "data")

# The logical axes MyEmbed puts on its table (embed/layer.py); logical_axis_rules maps
# them onto mesh axes for each layout.
LOGICAL_AXES = ("vocab", "embed")

# Local id for a token a shard does not own (forward) or that gets no gradient
# (backward): outside every table, so a kernel's backward drops it, and the row its
# forward reads (a clamped one) is overwritten by the -0.0 fill.
_NOT_OWNED = int(np.iinfo(np.int32).max)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{layout=} must be one of {LAYOUTS}")
    return layout


def _check_axes(mesh, layout, axis_name, batch_axis, reduce_scatter):
    check_layout(layout)
    for name, axis in (("axis_name", axis_name), ("batch_axis", batch_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(f"{name}={axis!r} must be an axis of the mesh {mesh.axis_names}")
    if batch_axis is not None and (layout == "data" or batch_axis == axis_name):
        raise ValueError(
            f"{batch_axis=} must be None for layout='data' and differ from {axis_name=}"
        )
    if reduce_scatter and layout != "vocab":
        raise ValueError(f"{reduce_scatter=} needs layout='vocab', not {layout=}")


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one sharded lookup: mesh, specs and what each shard does."""

    mesh: jax.sharding.Mesh
    layout: str
    axis_name: str
    token_axes: tuple[str, ...]  # Mesh axes the tokens are split over on input.
    backend: str
    deterministic: bool
    reduce_scatter: bool
    gather_output: bool

    @property
    def table_spec(self):
        return {"vocab": P(self.axis_name, None), "model": P(None, self.axis_name)}.get(
            self.layout, P(None, None)
        )

    @property
    def token_spec(self):
        return P(self.token_axes or None)

    @property
    def out_token_axes(self):
        return self.token_axes + ((self.axis_name,) if self.reduce_scatter else ())

    @property
    def out_spec(self):
        split_columns = self.layout == "model" and not self.gather_output
        return P(self.out_token_axes or None, self.axis_name if split_columns else None)

    def shard_map(self, body, in_specs, out_specs):
        # check_vma=False: pallas_call declares no per-axis variance for its outputs.
        # Nothing is lost: _combine's backward is written out below, not transposed.
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def local_ids(self, local_table, rows, mask):
        """Ids into this shard's table: ``_NOT_OWNED`` where ``mask`` is False."""
        if self.layout == "vocab":
            shard_rows = local_table.shape[0]
            local = rows - lax.axis_index(self.axis_name) * shard_rows
            mask = mask & (local >= 0) & (local < shard_rows)
            return jnp.where(mask, local, _NOT_OWNED), mask
        return jnp.where(mask, rows, _NOT_OWNED), mask

    def gather(self, local_table, ids):
        return dispatch.gather(local_table, ids, self.backend, deterministic=self.deterministic)


def _forward_shard(
    local_table,  # [vocab_size (/ n), d_model (/ n)]: this shard's block of the table
    rows,  # [tokens] int32: this shard's tokens' global rows, in [0, vocab_size)
    *,
    plan: _Plan,
):  # [tokens (/ n), d_model (/ n)]
    ids, owned = plan.local_ids(local_table, rows, jnp.ones(rows.shape, bool))
    got = plan.gather(local_table, ids)
    if plan.layout == "vocab":
        # Exactly one shard owns each row; -0.0 + x == x bit for bit, in any order.
        part = jnp.where(owned[:, None], got, jnp.asarray(-0.0, got.dtype))
        if plan.reduce_scatter:
            return lax.psum_scatter(part, plan.axis_name, scatter_dimension=0, tiled=True)
        return lax.psum(part, plan.axis_name)
    if plan.layout == "model" and plan.gather_output:
        return lax.all_gather(got, plan.axis_name, axis=1, tiled=True)
    return got


def _backward_shard(
    local_table,  # [vocab_size (/ n), d_model (/ n)]
    rows,  # [tokens] int32, in [0, vocab_size)
    live,  # [tokens] bool: ids in [-V, V), the ones that receive gradient
    grad_out,  # [tokens (/ n), d_model (/ n)]: this shard's block of the cotangent
    *,
    plan: _Plan,
):  # [vocab_size (/ n), d_model (/ n)]
    if plan.reduce_scatter:
        grad_out = lax.all_gather(grad_out, plan.axis_name, axis=0, tiled=True)
    ids, mask = plan.local_ids(local_table, rows, live)
    grad_out = jnp.where(mask[:, None], grad_out, jnp.zeros((), grad_out.dtype))
    _, vjp = jax.vjp(lambda t: plan.gather(t, ids), local_table)
    (grad,) = vjp(grad_out)
    if plan.token_axes:
        # Partial sums from the token shards, added in float32.
        grad = lax.psum(grad.astype(jnp.float32), plan.token_axes).astype(grad.dtype)
    return grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(table, rows, live, plan: _Plan):
    """The shard_map'd lookup; its table gradient is each shard's own kernel backward.

    shard_map's automatic transpose under ``check_vma=False`` divides the cotangent of a
    replicated output by the axis size and sums it back, which is off by an ulp; here
    every shard receives its exact block of the cotangent instead.
    """
    del live
    body = functools.partial(_forward_shard, plan=plan)
    return plan.shard_map(body, (plan.table_spec, plan.token_spec), plan.out_spec)(table, rows)


def _combine_fwd(table, rows, live, plan):
    return _combine(table, rows, live, plan), (table, rows, live)


def _combine_bwd(plan, residuals, grad_out):
    table, rows, live = residuals
    # The cotangent enters split as the output was (columns split for "model" either way).
    grad_spec = (
        plan.out_spec if plan.layout != "model" else P(plan.token_axes or None, plan.axis_name)
    )
    body = functools.partial(_backward_shard, plan=plan)
    in_specs = (plan.table_spec, plan.token_spec, plan.token_spec, grad_spec)
    args = (table, rows, live, grad_out)
    args = [
        jax.device_put(x, NamedSharding(plan.mesh, s)) for x, s in zip(args, in_specs, strict=True)
    ]
    grad = plan.shard_map(body, in_specs, plan.table_spec)(*args)
    return grad, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.jit, static_argnames=["plan"])
def _sharded_rows(
    table,  # [vocab_size, d_model]
    ids,  # [num_tokens] int32
    *,
    plan: _Plan,
):  # [num_tokens, d_model]
    vocab_size, d_model = table.shape
    (num_tokens,) = ids.shape
    n = plan.mesh.shape[plan.axis_name]
    rows = wrap_and_clamp(ids, vocab_size)
    live = in_vocab(ids, vocab_size)
    token_shards = math.prod(plan.mesh.shape[a] for a in plan.out_token_axes)
    if AxisType.Explicit in plan.mesh.axis_types:
        # Explicit sharding types cannot slice padding off a sharded dimension.
        sizes = {"tokens": (num_tokens, token_shards)}
        sizes |= {"vocab": {"vocab_size": (vocab_size, n)}, "model": {"d_model": (d_model, n)}}.get(
            plan.layout, {}
        )
        for name, (size, shards) in sizes.items():
            if size % shards:
                raise ValueError(
                    f"{name}={size} must be a multiple of {shards} on a mesh with Explicit "
                    "axes (pad it, e.g. a vocabulary of 50257 to 50304), or use Auto axes"
                )
    rows = _pad_to(rows, 0, token_shards)
    live = _pad_to(live, 0, token_shards, value=False)
    if plan.layout == "vocab":
        table = _pad_to(table, 0, n)
    elif plan.layout == "model":
        table = _pad_to(table, 1, n)
    # device_put under jit reshards to the layout on Auto and Explicit meshes alike.
    table, rows, live = (
        jax.device_put(x, NamedSharding(plan.mesh, spec))
        for x, spec in ((table, plan.table_spec), (rows, plan.token_spec), (live, plan.token_spec))
    )
    return _combine(table, rows, live, plan)[:num_tokens, :d_model]


def sharded_lookup(
    table: jax.Array,
    token_ids,
    *,
    mesh: jax.sharding.Mesh,
    layout: str,
    axis_name: str,
    batch_axis: str | None = None,
    reduce_scatter: bool = False,
    gather_output: bool = True,
    backend: str = "auto",
    mode: str = "clip",
    fill_value=jnp.nan,
    deterministic: bool = False,
) -> jax.Array:
    """``embed.lookup(table, token_ids)`` with the table or the tokens split over ``mesh``.

    Bit-identical to the unsharded lookup in every layout, backend and mode; the table
    gradient matches it too (exactly for ``"vocab"`` and ``"model"``, up to float
    summation order over the data shards for ``"data"``).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from embed.parallel import sharded_lookup
    >>> mesh = jax.make_mesh((1,), ("tp",))
    >>> table = jnp.arange(12.0).reshape(6, 2)
    >>> sharded_lookup(table, jnp.array([[0, 5, -1]]), mesh=mesh, layout="vocab",
    ...                axis_name="tp").shape
    (1, 3, 2)

    Args:
      table: ``(vocab_size, d_model)``, sharded or not; it is resharded to the layout.
      token_ids: ids of any shape, as ``embed.lookup`` accepts them.
      mesh: the device mesh.
      layout: ``"vocab"`` (rows split over ``axis_name``), ``"model"`` (columns split)
        or ``"data"`` (table replicated, tokens split over ``axis_name``).
      axis_name: the mesh axis the layout splits over.
      batch_axis: for ``"vocab"`` and ``"model"``, a second mesh axis the tokens are
        split over (data parallelism beside the tensor-parallel ``axis_name``).
      reduce_scatter: ``"vocab"`` only: combine the shards with ``psum_scatter`` and
        leave the output's tokens split over ``axis_name`` (sequence parallelism).
      gather_output: ``"model"`` only: all-gather the columns (``True``), or leave the
        output split on its last dimension over ``axis_name``.
      backend: the kernel each shard runs (``embed.dispatch``).
      mode: ``"clip"``, ``"fill"`` or ``"error"``, as in ``embed.ids``.
      fill_value: the row value for ``mode="fill"``.
      deterministic: a bit-reproducible kernel backward (``embed.dispatch.gather``).

    Returns:
      ``token_ids.shape + (d_model,)`` in the table's dtype.
    """
    _check_axes(mesh, layout, axis_name, batch_axis, reduce_scatter)
    dispatch.check_backend(backend)
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be (vocab_size, d_model)")
    plan = _Plan(
        mesh=mesh,
        layout=layout,
        axis_name=axis_name,
        token_axes=(axis_name,) if layout == "data" else ((batch_axis,) if batch_axis else ()),
        backend=backend,
        deterministic=deterministic,
        reduce_scatter=reduce_scatter,
        gather_output=gather_output,
    )
    gather_rows = functools.partial(_sharded_rows, plan=plan)
    return ids_lib.lookup_with_policy(
        table, token_ids, gather_rows, mode=mode, fill_value=fill_value
    )


# --- MyEmbed on a mesh -----------------------------------------------------------------


def logical_axis_rules(
    layout: str, axis_name: str
) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
    """Rules mapping ``MyEmbed``'s logical axes ``("vocab", "embed")`` onto the mesh.

    >>> logical_axis_rules("vocab", "tp")
    (('vocab', 'tp'), ('embed', None))
    """
    check_layout(layout)
    vocab, embed = LOGICAL_AXES
    return (
        (vocab, axis_name if layout == "vocab" else None),
        (embed, axis_name if layout == "model" else None),
    )


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
    """Places every variable of ``module`` as its sharding metadata says, under ``rules``.

    The eager counterpart of Flax's ``nnx.jit`` + ``nnx.get_partition_spec`` recipe;
    variables without metadata are replicated. Returns ``module``, updated in place.
    """
    state = nnx.state(module)
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(state, mesh)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def apply_sharded(
    module: nnx.Module,
    token_ids,
    *,
    mesh: jax.sharding.Mesh,
    layout: str,
    axis_name: str,
    batch_axis: str | None = None,
    reduce_scatter: bool = False,
    gather_output: bool = True,
) -> jax.Array:
    """``module(token_ids)`` for a ``MyEmbed``, with its table split as ``layout`` says.

    Uses the module's own ``backend``, ``mode``, ``fill_value``, ``deterministic``,
    ``dtype`` and ``scale_by_sqrt_d``, as ``MyEmbed.__call__`` does. Works
    inside ``nnx.jit`` / ``nnx.grad`` like a call of the module.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from embed import MyEmbed
    >>> from embed.parallel import apply_sharded
    >>> mesh = jax.make_mesh((1,), ("tp",))
    >>> layer = MyEmbed(10, 4, nnx.Rngs(0))
    >>> apply_sharded(layer, jnp.array([[1, 2]]), mesh=mesh, layout="model",
    ...               axis_name="tp").shape
    (1, 2, 4)
    """
    rows = sharded_lookup(
        module.lookup_table(),
        token_ids,
        mesh=mesh,
        layout=layout,
        axis_name=axis_name,
        batch_axis=batch_axis,
        reduce_scatter=reduce_scatter,
        gather_output=gather_output,
        backend=module.backend,
        mode=module.mode,
        fill_value=module.fill_value,
        deterministic=module.deterministic,
    )
    return module.finish(rows)  # The layer's own output dtype and scaling.


# --- The tied loss on a mesh -----------------------------------------------------------


def vocab_parallel_attend_cross_entropy(
    table: jax.Array,  # [vocab_size, d_model], its rows split over axis_name
    hidden: jax.Array,  # [..., d_model], replicated over axis_name
    targets: jax.Array,  # [...] integer, replicated over axis_name
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str,
    where: jax.Array | None = None,
    **kwargs,
) -> jax.Array:
    """``embed.attend_cross_entropy`` with the table's rows split over ``axis_name``.

    Megatron's vocab-parallel cross-entropy, the partner of the ``"vocab"`` layout. Each
    shard runs ``embed.loss.attend_cross_entropy`` on its own rows (its ``axis_name``
    argument); per token chunk, a ``pmax`` and two ``psum`` of ``[chunk]`` combine the
    shards' log-sum-exps and target logits, so no shard sees another's logits. The table
    gradient stays on its shard; the hidden gradient is one ``psum`` of
    ``[tokens, d_model]``. docs/scaling.md works out the communication.

    Args:
      table: the whole table, placed or not; ``shard_map`` splits its rows.
      hidden, targets, where: as ``attend_cross_entropy``'s, replicated.
      mesh: the mesh.
      axis_name: the mesh axis the rows are split over; ``vocab_size`` must be a
        multiple of its size.
      **kwargs: ``attend_cross_entropy``'s other keywords (``reduction``, block sizes,
        which apply per shard, ``logit_soft_cap``, ``z_loss``, ``dtype``).

    Returns:
      The float32 loss, replicated.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{axis_name=} must be an axis of the mesh {mesh.axis_names}")
    table = jnp.asarray(table)
    num_shards = mesh.shape[axis_name]
    if table.ndim != 2:
        raise ValueError(f"{table.shape=} must be [vocab_size, d_model]")
    if table.shape[0] % num_shards:
        raise ValueError(
            f"vocab_size={table.shape[0]} must be a multiple of the {num_shards} shards of "
            f"{axis_name=}: pad the vocabulary (e.g. GPT-2's 50257 to 50304)"
        )
    operands = (table, hidden, targets) + (() if where is None else (where,))

    def shard(table, hidden, targets, where=None):
        return loss.attend_cross_entropy(
            table, hidden, targets, where=where, axis_name=axis_name, **kwargs
        )

    in_specs = (P(axis_name, None),) + (P(),) * (len(operands) - 1)
    return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=P())(*operands)
