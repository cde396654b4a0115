"""Sharded lookups on 8 host CPU devices against the unsharded ``embed.lookup``.

The devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which
must be set before JAX starts its CPU backend. The Bazel target sets it. Under plain
pytest, JAX may already run with one device because another test file started it, and
flags cannot change then; ``test_eight_device_suite_in_a_subprocess`` then runs this
file again in a fresh interpreter with the flag, so its checks run under plain
``pytest tests/`` too, and never leak 8 devices into the other test files.
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from embed import Embed, MyEmbed, lookup, parallel
from embed.loss import attend_cross_entropy
from embed.parallel import vocab_parallel_attend_cross_entropy
from kernels.reference import attend_cross_entropy_reference, gather_grad_reference
from tests import grid

NUM_DEVICES = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
_IN_SUBPROCESS = "EMBED_SHARDING_SUBPROCESS"

HAVE_DEVICES = jax.default_backend() == "cpu" and jax.device_count() >= NUM_DEVICES
needs_devices = pytest.mark.skipif(
    not HAVE_DEVICES,
    reason=f"needs {NUM_DEVICES} CPU devices ({DEVICE_FLAG} before JAX starts); "
    "test_eight_device_suite_in_a_subprocess runs these checks instead",
)

LAYOUTS = parallel.LAYOUTS
BACKENDS = grid.CPU_BACKENDS
# Grid cases at its odd token count (x 8 rows of ids): V = 1 and 7, the narrowest and an
# odd row, each dtype, and the GPT-2 vocabulary (50257 rows, not a multiple of 8, so
# the table is padded). The kernels' own tests cover the rest of the grid; here each
# case compiles 8-way programs on a 2-core CPU.
CASES = [
    c
    for c in grid.GATHER_CASES
    if (c[3] == 7 and c[1:3] in ((1, 1), (7, 129)))
    or (c[3] == 7 and c[1:3] == (1, 129) and c[0] != jnp.float32)
    or c[1:3] == (50257, 3)
]


def _mesh(shape=(NUM_DEVICES,), names=("x",), axis_type=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _ids(vocab_size, num_tokens, seed=0):
    # (8, T): the batch splits evenly over 8 data shards; the edge ids lead row 0.
    flat = grid.make_ids(vocab_size, NUM_DEVICES * num_tokens, seed)
    return jnp.asarray(flat.reshape(NUM_DEVICES, num_tokens))


def _grad_out(ids, d_model, dtype, seed):
    # Drawn in its shape by NumPy: no reshape compiled per shape on the device.
    return grid.normal((*ids.shape, d_model), dtype, seed)


def _vjp(fn, table, grad_out):
    out, vjp = jax.vjp(fn, table)
    return out, vjp(grad_out)[0]


def _lookup_vjp(table, ids, grad_out, **kwargs):
    """The unsharded lookup's rows and table gradient from one compiled program, not its
    id handling, forward and backward compiled op by op."""
    return jax.jit(lambda t, g: _vjp(lambda t: lookup(t, ids, **kwargs), t, g))(table, grad_out)


@functools.cache
def _unsharded_vjp(backend, case):
    """The unsharded lookup's rows and table gradient for a grid case, once per module:
    the layouts that meet a case all compare with the same result."""
    dtype, vocab_size, d_model, num_tokens = case
    table = grid.make_table(vocab_size, d_model, dtype)
    ids = _ids(vocab_size, num_tokens)
    grad_out = _grad_out(ids, d_model, dtype, seed=1)
    out, grad = _lookup_vjp(table, ids, grad_out, backend=backend)
    return table, ids, grad_out, np.asarray(out), np.asarray(grad)


def _grad_tolerance(ids, grad_out, vocab_size, dtype):
    """Per-row bound on two summation orders of the same float contributions.

    Recursive summation of ``k`` terms errs by at most about ``k * eps * sum|terms|``;
    two orders differ by at most twice that. ``k`` is the row's count of live tokens.
    In NumPy: nothing to compile per shape.
    """
    flat_ids = np.asarray(ids).reshape(-1)
    terms = np.abs(np.asarray(grad_out, np.float32)).reshape(flat_ids.shape[0], -1)
    magnitude = grid.grad_in_token_order(terms, flat_ids, vocab_size)
    counts = grid.grad_in_token_order(np.ones_like(terms[:, :1]), flat_ids, vocab_size)
    return 2 * counts * float(jnp.finfo(dtype).eps) * magnitude


def _assert_grads_match(actual, expected, layout, ids, grad_out):
    if layout != "data":  # Each row's terms are added in the unsharded order.
        grid.assert_bits_equal(actual, expected)
        return
    # Data shards add partial sums, then psum them: another order of the same terms.
    actual, expected = np.asarray(actual), np.asarray(expected)
    vocab_size = actual.shape[0]
    bound = _grad_tolerance(ids, grad_out, vocab_size, actual.dtype)
    diff = np.abs(actual.astype(np.float32) - expected.astype(np.float32))
    assert actual.dtype == expected.dtype
    assert bool(np.all(diff <= bound)), float(np.max(diff - bound))


def _assert_grad_is_the_oracle(actual, ids, grad_out):
    """``actual`` is NumPy's float32 sum of each row's gradient rows (dropping the ids
    outside ``[-V, V)``), rounded to the table's dtype, up to summation order: a check
    that does not lean on the unsharded lookup's own backward."""
    vocab_size, d_model = actual.shape
    flat_grad = np.asarray(grad_out, np.float32).reshape(-1, d_model)
    oracle = grid.grad_in_token_order(flat_grad, np.asarray(ids).reshape(-1), vocab_size)
    oracle = oracle.astype(np.asarray(actual).dtype)
    _assert_grads_match(actual, oracle, "data", ids, grad_out)


@needs_devices
@pytest.mark.parametrize(("layout", "backend", "case"), grid.pairwise(LAYOUTS, BACKENDS, CASES))
def test_outputs_bit_identical_and_gradients_match(layout, backend, case):
    table, ids, grad_out, expected, expected_grad = _unsharded_vjp(backend, case)
    mesh = _mesh()

    def sharded(t):
        return parallel.sharded_lookup(
            t, ids, mesh=mesh, layout=layout, axis_name="x", backend=backend
        )

    out, grad = _vjp(sharded, table, grad_out)
    grid.assert_bits_equal(out, expected)
    _assert_grads_match(grad, expected_grad, layout, ids, grad_out)
    _assert_grad_is_the_oracle(grad, ids, grad_out)


def _edge_inputs(vocab_size, d_model):
    table = grid.make_table(vocab_size, d_model, jnp.float32)
    ids = jnp.asarray(np.tile(grid.edge_ids(vocab_size), (NUM_DEVICES, 2)))  # (8, 16)
    return table, ids, _grad_out(ids, d_model, jnp.float32, seed=2)


@functools.cache
def _unsharded_modes(backend, mode):
    """The unsharded lookup of the edge ids, once per backend and mode for the layouts."""
    table, ids, grad_out = _edge_inputs(7, 5)
    return _lookup_vjp(table, ids, grad_out, backend=backend, mode=mode, fill_value=-7.5)


@needs_devices
@pytest.mark.parametrize("mode", ["clip", "fill"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_modes_match_unsharded_with_edge_ids(layout, backend, mode):
    vocab_size, d_model = 7, 5
    table, ids, grad_out = _edge_inputs(vocab_size, d_model)
    kwargs = {"backend": backend, "mode": mode, "fill_value": -7.5}
    expected, expected_grad = _unsharded_modes(backend, mode)
    mesh = _mesh()

    def sharded(t):
        return parallel.sharded_lookup(t, ids, mesh=mesh, layout=layout, axis_name="x", **kwargs)

    out, grad = _vjp(sharded, table, grad_out)
    grid.assert_bits_equal(out, expected)
    _assert_grads_match(grad, expected_grad, layout, ids, grad_out)
    # The clamped rows 0 and V-1 were read by out-of-range ids; they must add nothing.
    live = (np.asarray(ids) >= -vocab_size) & (np.asarray(ids) < vocab_size)
    assert not np.all(live)
    only_live = np.where(live[..., None], grad_out, 0.0).reshape(-1, d_model)
    reference = gather_grad_reference(jnp.asarray(only_live), ids.reshape(-1), vocab_size)
    _assert_grads_match(grad, reference, layout, ids, grad_out)


@needs_devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_error_mode_raises_eagerly_and_under_checkify(layout):
    table = grid.make_table(7, 3, jnp.float32)
    mesh = _mesh()
    lookup_ = jax.tree_util.Partial(
        parallel.sharded_lookup, mesh=mesh, layout=layout, axis_name="x", mode="error"
    )
    good = jnp.asarray(np.tile([0, 6, -7, -1], (NUM_DEVICES, 1)))
    grid.assert_bits_equal(lookup_(table, good), lookup(table, good))
    bad = good.at[3, 2].set(7)
    with pytest.raises(IndexError, match=r"token id 7 at position \(3, 2\)"):
        lookup_(table, bad)
    checked = jax.jit(checkify.checkify(lookup_))  # One compile for both id arrays.
    err, _ = checked(table, bad)
    with pytest.raises(checkify.JaxRuntimeError, match="token id 7 at flat position 14"):
        err.throw()
    err, out = checked(table, good)
    err.throw()
    grid.assert_bits_equal(out, lookup(table, good))


@needs_devices
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_reduce_scatter_leaves_tokens_split_and_matches(backend):
    table = grid.make_table(50, 6, jnp.bfloat16)
    ids = jnp.asarray(grid.make_ids(50, 2 * 16).reshape(16, 2))  # [seq, batch], Megatron's
    grad_out = _grad_out(ids, 6, jnp.bfloat16, seed=3)
    mesh = _mesh()
    expected, expected_grad = _lookup_vjp(table, ids, grad_out, backend=backend)

    def sharded(t, scatter):
        return parallel.sharded_lookup(
            t, ids, mesh=mesh, layout="vocab", axis_name="x", backend=backend,
            reduce_scatter=scatter,
        )  # fmt: skip

    out, grad = _vjp(lambda t: sharded(t, True), table, grad_out)
    grid.assert_bits_equal(out, expected)
    grid.assert_bits_equal(grad, expected_grad)
    hlo = jax.jit(lambda t: sharded(t, True)).lower(table).compile().as_text()
    assert "reduce-scatter" in hlo and "all-reduce-start" not in hlo
    hlo = jax.jit(lambda t: sharded(t, False)).lower(table).compile().as_text()
    assert "reduce-scatter" not in hlo and "all-reduce" in hlo


@needs_devices
@pytest.mark.parametrize("layout", ["vocab", "model"])
def test_data_plus_tensor_parallel_on_a_2d_mesh(layout):
    table = grid.make_table(100, 24, jnp.float32)
    ids = _ids(100, 6)
    grad_out = _grad_out(ids, 24, jnp.float32, seed=4)
    expected, expected_grad = _lookup_vjp(table, ids, grad_out)
    mesh = _mesh((2, 4), ("dp", "tp"))

    def sharded(t):
        return parallel.sharded_lookup(
            t, ids, mesh=mesh, layout=layout, axis_name="tp", batch_axis="dp",
            reduce_scatter=layout == "vocab", gather_output=False,
        )  # fmt: skip

    out, grad = _vjp(sharded, table, grad_out)
    grid.assert_bits_equal(out, expected)
    # Two batch shards' partial gradients are summed: the data-parallel tolerance.
    _assert_grads_match(grad, expected_grad, "data", ids, grad_out)


@needs_devices
def test_model_layout_can_leave_columns_split():
    table = grid.make_table(9, 16, jnp.float32)
    ids = jnp.asarray(grid.make_ids(9, 8))
    mesh = _mesh()
    fn = jax.jit(
        lambda t: parallel._sharded_rows(
            t,
            ids,
            plan=parallel._Plan(mesh, "model", "x", (), "xla", False, False, False),
        )
    )
    out = fn(table)
    grid.assert_bits_equal(out, lookup(table, ids))
    assert out.sharding.spec == P(None, "x")


@needs_devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_mesh_under_set_mesh(layout):
    table = grid.make_table(16, 8, jnp.float32)
    ids = _ids(16, 2)
    mesh = _mesh(axis_type=AxisType.Explicit)
    if layout != "data":
        with jax.set_mesh(mesh), pytest.raises(ValueError, match="must be a multiple of 8"):
            parallel.sharded_lookup(table[:15, :7], ids, mesh=mesh, layout=layout, axis_name="x")
    with jax.set_mesh(mesh):
        fn = jax.jit(
            jax.value_and_grad(
                lambda t: parallel.sharded_lookup(
                    t, ids, mesh=mesh, layout=layout, axis_name="x"
                ).sum()
            )
        )
        value, grad = fn(table)
    expected_value, expected_grad = jax.value_and_grad(lambda t: lookup(t, ids).sum())(table)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_array_equal(grad, expected_grad)  # Integer counts: exact.


# --- MyEmbed's sharding metadata (needs the one-line change to embed/layer.py) ---------


@needs_devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_table_carries_logical_axes_and_shards_under_nnx_jit(layout):
    mesh = _mesh()
    rules = parallel.logical_axis_rules(layout, "x")
    layer = MyEmbed(16, 8, nnx.Rngs(0))
    assert layer.embedding.get_metadata()["out_sharding"] == parallel.LOGICAL_AXES
    with nnx.logical_axis_rules(rules):
        spec = nnx.get_partition_spec(nnx.state(layer))["embedding"].get_value()
    assert spec == {"vocab": P("x", None), "model": P(None, "x"), "data": P(None, None)}[layout]

    # Flax's recipe for a sharded init: nnx.jit, then a sharding constraint per spec.
    @nnx.jit
    def create():
        model = MyEmbed(16, 8, nnx.Rngs(0))
        state = nnx.state(model)
        with nnx.logical_axis_rules(rules):
            specs = nnx.get_partition_spec(state)
        nnx.update(model, jax.lax.with_sharding_constraint(state, specs))
        return model

    with jax.set_mesh(mesh):
        model = create()
    assert model.embedding[...].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
    grid.assert_bits_equal(model.embedding[...], layer.embedding[...])


@needs_devices
def test_layer_axes_can_be_overridden_or_dropped():
    assert MyEmbed(4, 2, nnx.Rngs(0), sharding=None).embedding.get_metadata().get(
        "out_sharding"
    ) in (None, ())
    custom = MyEmbed(4, 2, nnx.Rngs(0), sharding=("rows", None))
    assert custom.embedding.get_metadata()["out_sharding"] == ("rows", None)


@needs_devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_module_places_the_table(layout):
    mesh = _mesh()
    layer = parallel.shard_module(
        MyEmbed(16, 8, nnx.Rngs(0)), mesh, parallel.logical_axis_rules(layout, "x")
    )
    expected = {"vocab": P("x", None), "model": P(None, "x"), "data": P(None, None)}[layout]
    assert layer.embedding[...].sharding.is_equivalent_to(NamedSharding(mesh, expected), 2)


# --- embed.Embed partitioned the flax way ----------------------------------------------


def _placement(how, axes):
    init = nnx.initializers.normal(0.02)
    if how == "with_partitioning":
        return {"embedding_init": nnx.with_partitioning(init, axes)}
    return {"embedding_init": init, "embedding_metadata": {"out_sharding": axes}}


_PLACED_IDS = grid.make_ids(64, 32).reshape(8, 4)


def _rows_and_table_grad(model):
    """The model's rows for ``_PLACED_IDS`` and the table gradient of a tied loss, from
    one ``nnx.jit`` program."""
    ids = jnp.asarray(_PLACED_IDS)

    def loss(m):
        return jnp.sum(m.attend(m(ids)) ** 2)

    return nnx.jit(lambda m: (m(ids), nnx.grad(loss)(m).embedding[...]))(model)


@functools.cache
def _flax_placed(how, axes):
    """nnx.Embed's table, rows and table gradient, once for both backends."""
    with jax.set_mesh(_mesh()):
        flax = nnx.Embed(64, 16, rngs=nnx.Rngs(0), **_placement(how, axes))
        out, grad = _rows_and_table_grad(flax)
    return np.asarray(flax.embedding[...]), np.asarray(out), np.asarray(grad)


@needs_devices
@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("axes", [("x", None), (None, "x")], ids=str)
@pytest.mark.parametrize("how", ["with_partitioning", "embedding_metadata"])
def test_embed_table_is_placed_as_the_user_asks(how, axes, backend):
    mesh = _mesh()
    flax_table, flax_out, expected = _flax_placed(how, axes)
    with jax.set_mesh(mesh):
        ours = Embed(64, 16, rngs=nnx.Rngs(0), backend=backend, **_placement(how, axes))
        spec = nnx.get_partition_spec(nnx.state(ours))["embedding"].get_value()
        assert spec == P(*axes)
        # Placed at construction, as flax places its own (eager sharding).
        table = ours.embedding[...]
        assert table.sharding.is_equivalent_to(NamedSharding(mesh, P(*axes)), 2)
        grid.assert_bits_equal(table, flax_table)
        out, grad = _rows_and_table_grad(ours)
    grid.assert_bits_equal(out, flax_out)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


class _FrameworkModel(nnx.Module):
    """A model that partitions its own layers with mesh axis names and not its embedding."""

    def __init__(self, embed_cls, rngs):
        self.embed = embed_cls(num_embeddings=64, features=16, rngs=rngs)
        kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "x"))
        self.proj = nnx.Linear(16, 16, kernel_init=kernel_init, rngs=rngs)


@needs_devices
@pytest.mark.parametrize("embed_cls", [Embed, nnx.Embed], ids=["Embed", "nnx.Embed"])
def test_flax_sharding_recipe_runs_with_embed_as_with_nnx_embed(embed_cls):
    # Our logical axes on Embed's table would name axes this mesh lacks and break the
    # recipe; Embed adds none unless asked, as nnx.Embed.
    @nnx.jit
    def create():
        model = _FrameworkModel(embed_cls, nnx.Rngs(0))
        state = nnx.state(model)
        nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
        return model

    with jax.set_mesh(_mesh()):
        model = create()
    assert model.embed.embedding[...].sharding.is_fully_replicated
    assert model.proj.kernel[...].sharding.spec == P(None, "x")


_ROWS_SPLIT = P("x", None, None)


def _explicit_mesh_rows(model_fn):
    """A model's rows, their batch split over an Explicit mesh, placed as asked."""
    mesh = _mesh(axis_type=AxisType.Explicit)
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("x", None))
    with jax.set_mesh(mesh):
        model = model_fn(64, 16, rngs=nnx.Rngs(0), embedding_init=init)
        ids = jax.device_put(jnp.asarray(_PLACED_IDS), P("x"))
        return nnx.jit(lambda m, i: m(i, out_sharding=_ROWS_SPLIT))(model, ids)


@functools.cache
def _explicit_mesh_rows_of_nnx_embed():
    return np.asarray(_explicit_mesh_rows(nnx.Embed))


@needs_devices
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_embed_out_sharding_on_an_explicit_mesh_as_nnx_embed(backend):
    out = _explicit_mesh_rows(functools.partial(Embed, backend=backend))
    assert out.sharding.spec == _ROWS_SPLIT
    grid.assert_bits_equal(out, _explicit_mesh_rows_of_nnx_embed())


# --- A jit-compiled training step, sharded ---------------------------------------------


class _TinyModel(nnx.Module):
    """embed -> mean over the sequence -> linear: just enough to train."""

    def __init__(self, vocab_size, d_model, rngs, *, backend):
        self.embed = MyEmbed(vocab_size, d_model, rngs, backend=backend)
        self.head = nnx.Linear(d_model, 1, rngs=rngs)

    def __call__(self, ids, embed_fn):
        return self.head(embed_fn(self.embed, ids).mean(axis=1))[:, 0]


def _train(layout, backend, steps=3):
    mesh = _mesh()
    model = _TinyModel(64, 16, nnx.Rngs(0), backend=backend)
    if layout is not None:
        parallel.shard_module(model, mesh, parallel.logical_axis_rules(layout, "x"))

        def embed_fn(m, ids):
            return parallel.apply_sharded(m, ids, mesh=mesh, layout=layout, axis_name="x")
    else:

        def embed_fn(m, ids):
            return m(ids)

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    if layout is not None:
        # Its step count too, replicated as the step leaves it: one compiled step.
        parallel.shard_module(optimizer, mesh, parallel.logical_axis_rules(layout, "x"))

    @nnx.jit
    def step(model, optimizer, ids, targets):
        def loss_fn(model):
            return jnp.mean((model(ids, embed_fn) - targets) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    ids = _ids(64, 12, seed=5)
    targets = jnp.linspace(-1.0, 1.0, NUM_DEVICES)
    losses = [float(step(model, optimizer, ids, targets)) for _ in range(steps)]
    return losses, model


@functools.cache
def _train_unsharded():
    """The unsharded run on XLA's gather that every layout and backend compares with,
    trained once: a kernel's backward wrong sharded and unsharded alike fails too."""
    losses, model = _train(None, "xla")
    return losses, np.asarray(model.embed.embedding[...])


@needs_devices
@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_jitted_training_step_runs_sharded(layout, backend):
    losses, model = _train(layout, backend)
    expected_losses, expected_table = _train_unsharded()
    assert losses[-1] < losses[0]
    # Forward bits match; gradients differ in summation order only (over the data
    # shards, or in the kernel's atomics).
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    np.testing.assert_allclose(model.embed.embedding[...], expected_table, rtol=1e-5, atol=1e-6)
    assert len(model.embed.embedding[...].sharding.device_set) == NUM_DEVICES


# --- Validation ----------------------------------------------------------------------------


@needs_devices
def test_bad_arguments_are_rejected():
    table, ids, mesh = jnp.zeros((4, 2)), jnp.zeros((8,), jnp.int32), _mesh()
    with pytest.raises(ValueError, match=r"layout='rows' must be one of \('vocab'"):
        parallel.sharded_lookup(table, ids, mesh=mesh, layout="rows", axis_name="x")
    with pytest.raises(ValueError, match=r"axis_name='tp' must be an axis of the mesh"):
        parallel.sharded_lookup(table, ids, mesh=mesh, layout="vocab", axis_name="tp")
    with pytest.raises(ValueError, match=r"reduce_scatter=True needs layout='vocab'"):
        parallel.sharded_lookup(
            table, ids, mesh=mesh, layout="data", axis_name="x", reduce_scatter=True
        )
    with pytest.raises(ValueError, match=r"batch_axis='x' must be None for layout='data'"):
        parallel.sharded_lookup(table, ids, mesh=mesh, layout="data", axis_name="x", batch_axis="x")


# --- The tied loss under the data-parallel layout ---------------------------------------


def _tied_loss_inputs(vocab_size=61, d_model=24, per_shard=5):
    # Built in NumPy: no reshape or scaling compiled on the devices.
    table = grid.make_table(vocab_size, d_model, jnp.float32)
    hidden = 0.3 * np.asarray(grid.normal((NUM_DEVICES, per_shard, d_model), seed=1))
    targets = grid.make_ids(vocab_size, NUM_DEVICES * per_shard) % vocab_size
    return table, jnp.asarray(hidden), jnp.asarray(targets.reshape(NUM_DEVICES, per_shard))


@functools.cache
def _tied_loss_reference():
    """The naive loss of ``_tied_loss_inputs()`` and its gradients, compiled as one
    program, once for the tests that split it."""
    table, hidden, targets = _tied_loss_inputs()
    return jax.jit(
        jax.value_and_grad(
            lambda t, h: attend_cross_entropy_reference(t, h, targets), argnums=(0, 1)
        )
    )(table, hidden)


@needs_devices
def test_tied_loss_per_data_shard_sums_to_the_unsharded_loss():
    # The "data" layout's split: tokens over the mesh, the table replicated; each shard
    # runs the chunked loss on its tokens (in several chunks), and a psum adds them. The
    # table gradient is summed over the shards by shard_map's transpose.
    table, hidden, targets = _tied_loss_inputs()
    mesh = _mesh()

    def shard_loss(table, hidden, targets):
        part = attend_cross_entropy(table, hidden, targets, reduction="sum", chunk_size=2)
        return jax.lax.psum(part, "x")

    def sharded(table, hidden):
        total = jax.shard_map(shard_loss, mesh=mesh, in_specs=(P(), P("x"), P("x")), out_specs=P())(
            table, hidden, targets
        )
        return total / targets.size

    got, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(table, hidden)
    want, want_grads = _tied_loss_reference()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for grad, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


@needs_devices
def test_tied_loss_of_the_layer_under_jit_with_sharded_tokens():
    # The same without shard_map: the tokens placed over the mesh, the layer's table
    # replicated, and jit partitions the chunked loss itself.
    table, hidden, targets = _tied_loss_inputs()
    mesh = _mesh()
    layer = MyEmbed(*table.shape, nnx.Rngs(0))
    layer.embedding[...] = jax.device_put(table, NamedSharding(mesh, P()))
    split = NamedSharding(mesh, P("x"))
    hidden, targets = jax.device_put(hidden, split), jax.device_put(targets, split)

    @nnx.jit
    def step(layer, hidden):
        return nnx.value_and_grad(lambda m, h: m.attend_cross_entropy(h, targets), argnums=(0, 1))(
            layer, hidden
        )

    got, (layer_grads, hidden_grad) = step(layer, hidden)
    want, want_grads = _tied_loss_reference()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(layer_grads.embedding[...], want_grads[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hidden_grad, want_grads[1], rtol=1e-5, atol=1e-7)


@needs_devices
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "blocks", [{}, {"chunk_size": 4, "vocab_chunk_size": 3}], ids=["default", "small"]
)
def test_vocab_parallel_tied_loss_matches_unsharded(blocks, reduction):
    # Megatron's cross-entropy: the table's 56 rows split 7 per shard, and each shard's
    # log-sum-exp and target logit combined by pmax / psum. Under jit, against naive.
    table, hidden, scalar = _vocab_parallel_loss_problem(reduction)
    mesh = _mesh()
    sharded = scalar(
        lambda *a, **k: vocab_parallel_attend_cross_entropy(
            *a, mesh=mesh, axis_name="x", **k, **blocks
        )
    )
    # One compiled program gives both the values and the HLO looked at below.
    compiled = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1))).lower(table, hidden).compile()
    got, grads = compiled(table, hidden)
    want, want_grads = _vocab_parallel_loss_reference(reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for grad, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    # Only per-token statistics and the hidden gradient cross the shards: no gathers.
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo


def _vocab_parallel_loss_problem(reduction):
    """The inputs, and a wrapper that makes a loss function's output a scalar."""
    table, hidden, targets = _tied_loss_inputs(vocab_size=56, per_shard=2)
    hidden = jnp.asarray(np.asarray(hidden).reshape(-1, hidden.shape[-1]))
    targets = jnp.asarray(np.asarray(targets).reshape(-1))
    where = jnp.asarray(np.arange(targets.size) % 5 != 3)
    kwargs = {"where": where, "reduction": reduction, "logit_soft_cap": 3.0, "z_loss": 1e-2}
    weights = jnp.asarray(1.0 + np.arange(targets.size, dtype=np.float32) / 7)

    def scalar(fn):
        def run(table, hidden):
            out = fn(table, hidden, targets, **kwargs)
            return (out * weights).sum() if reduction == "none" else out

        return run

    return table, hidden, scalar


@functools.cache
def _vocab_parallel_loss_reference(reduction):
    """The naive loss and its gradients, compiled once per reduction for both blocks."""
    table, hidden, scalar = _vocab_parallel_loss_problem(reduction)
    return jax.jit(jax.value_and_grad(scalar(attend_cross_entropy_reference), argnums=(0, 1)))(
        table, hidden
    )


@needs_devices
def test_vocab_parallel_tied_loss_needs_a_divisible_vocabulary():
    table, hidden, targets = _tied_loss_inputs(vocab_size=61)
    with pytest.raises(ValueError, match=r"vocab_size=61 must be a multiple of the 8 shards"):
        vocab_parallel_attend_cross_entropy(table, hidden, targets, mesh=_mesh(), axis_name="x")
    with pytest.raises(ValueError, match=r"axis_name='y' must be an axis of the mesh"):
        vocab_parallel_attend_cross_entropy(table, hidden, targets, mesh=_mesh(), axis_name="y")


# --- Plain pytest with JAX already started on one device --------------------------------


@pytest.mark.skipif(
    HAVE_DEVICES or os.environ.get(_IN_SUBPROCESS) == "1",
    reason=f"this process has {NUM_DEVICES} CPU devices: the checks above ran here",
)
def test_eight_device_suite_in_a_subprocess():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_IN_SUBPROCESS] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    # Everything ran but this test, which skips itself where the devices exist.
    assert re.search(r"^\d+ passed, 1 skipped in ", run.stdout, re.MULTILINE), run.stdout
