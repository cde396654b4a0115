"""One process of the multi-process checks (tests/embed/test_multiprocess.py).

``python -m tests.embed.multiprocess_worker PORT PROCESS_ID NUM_PROCESSES OUT_DIR`` joins
a JAX distributed runtime on 127.0.0.1:PORT (CPU devices from ``XLA_FLAGS``, collectives
over gloo), runs every check in ``run_checks`` on meshes that span all the processes,
and writes what it saw to ``OUT_DIR/<process_id>.npz`` (arrays, fetched whole on every
process) and ``OUT_DIR/<process_id>.json`` (error messages, mesh axis types). If the
CPU collectives do not work here, it writes ``{"skip": reason}`` instead.

``expected()`` computes the same keys in one process, unsharded: the parent test
compares the two. Keys say how to compare: ``bits/...`` bit for bit, ``close/...``
within float32 rounding (``RTOL``, ``ATOL``; sums over data shards in another order).
"""

from __future__ import annotations

import json
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np

V, D = 13, 5  # A vocabulary that 4 devices do not divide: the vocab layout pads it.
ROWS, T = 4, 6  # Ids [ROWS, T]: rows split over the mesh's 4 devices.
LOSS_V, LOSS_D, LOSS_TOKENS = 16, 8, 12
TRAIN_V, TRAIN_D, TRAIN_T, TRAIN_STEPS = 64, 16, 12, 3
RTOL, ATOL = 1e-5, 1e-6
LAYOUTS = ("vocab", "model", "data")
BACKENDS = ("xla", "pallas")  # "pallas" in the Pallas interpreter on CPU.
TRAIN_BACKENDS = ("xla",)  # Both backends' gradients are checked above, step by step.
KINDS = ("split", "replicated")  # Ids split across processes, or on every process whole.
MODES = ("clip", "fill", "error")
FILL = -7.5
# Not resolved: under Bazel this is the runfiles tree, where the doc is a declared input.
DOC = Path(__file__).parents[2] / "docs" / "scaling.md"
# The docs/scaling.md code blocks the checks execute follow this line.
RECIPE_MARK = "<!-- run by tests/embed/test_multiprocess.py -->"
RECIPE_IDS_SHAPE = (2, 16)  # local_ids, per process, in the recipes.
# The recipes' vocab_size and d_model: small, so that they run in seconds on a CPU.
RECIPE_VOCAB, RECIPE_D = 96, 8


def recipes() -> list[str]:
    """The code blocks of docs/scaling.md that follow ``RECIPE_MARK``, in order."""
    text = DOC.read_text()
    blocks = re.findall(re.escape(RECIPE_MARK) + r"\n```python\n(.*?)```", text, re.DOTALL)
    if len(blocks) != 2:
        raise ValueError(f"{len(blocks)=} recipe blocks in {DOC} must be 2")
    return blocks


# --- Inputs, the same in every process and in the parent -------------------------------


def _inputs():
    from tests import grid

    table = np.asarray(grid.make_table(V, D, np.float32))
    ids = grid.make_ids(V, ROWS * T).reshape(ROWS, T)
    grad_out = np.asarray(grid.make_table(ROWS * T, D, np.float32, seed=1)).reshape(ROWS, T, D)
    edge = np.tile(grid.edge_ids(V), (ROWS, 1))  # Every clip/fill boundary, in each row.
    good = np.tile(np.arange(-V, V, 3, dtype=np.int32)[:T], (ROWS, 1))  # All in range.
    bad = good.copy()
    bad[2, 3] = V  # Out of range, in the second process's rows.
    floats = edge.astype(np.float32)  # Integral; +-2**31 and beyond saturate.
    fractional = floats.copy()
    fractional[3, 1] = 2.5
    return table, ids, grad_out, edge, good, bad, floats, fractional


def _loss_inputs():
    from tests import grid

    table = np.asarray(grid.make_table(LOSS_V, LOSS_D, np.float32))
    hidden = 0.3 * np.asarray(grid.make_table(LOSS_TOKENS, LOSS_D, np.float32, seed=1))
    targets = grid.make_ids(LOSS_V, LOSS_TOKENS) % LOSS_V
    return table, hidden, targets


def _train_ids():
    from tests import grid

    return grid.make_ids(TRAIN_V, ROWS * TRAIN_T, seed=5).reshape(ROWS, TRAIN_T)


def _tiny_model(backend):
    from flax import nnx

    from embed import MyEmbed

    class TinyModel(nnx.Module):
        """embed -> mean over the sequence -> linear: just enough to train."""

        def __init__(self, rngs):
            self.embed = MyEmbed(TRAIN_V, TRAIN_D, rngs, backend=backend)
            self.head = nnx.Linear(TRAIN_D, 1, rngs=rngs)

        def __call__(self, ids, embed_fn):
            return self.head(embed_fn(self.embed, ids).mean(axis=1))[:, 0]

    return TinyModel(nnx.Rngs(0))


def _train(model, embed_fn, ids, targets, mesh=None):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from embed.parallel import logical_axis_rules, shard_module

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    if mesh is not None:
        # Its step count replicated over the mesh, as the step leaves it: one compile.
        shard_module(optimizer, mesh, logical_axis_rules("data", "x"))

    @nnx.jit
    def step(model, optimizer, ids, targets):
        def loss_fn(model):
            return jnp.mean((model(ids, embed_fn) - targets) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [step(model, optimizer, ids, targets) for _ in range(TRAIN_STEPS)]
    return losses, model.embed.embedding[...]


def _message(fn) -> str:
    """The text of the error ``fn()`` raises (IndexError, ValueError or checkify's)."""
    from jax.experimental import checkify

    try:
        fn()
    except (IndexError, ValueError, checkify.JaxRuntimeError) as error:
        return f"{type(error).__name__}: {error}".split("\n")[0]
    raise AssertionError("expected an error")


def _checkified(fn, *args):
    import jax
    from jax.experimental import checkify

    err, out = jax.jit(checkify.checkify(fn))(*args)
    return err, out


# --- The single-process expectations ----------------------------------------------------


def expected() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every key ``run_checks`` writes, computed unsharded in this process."""
    import jax
    import jax.numpy as jnp

    from embed import lookup
    from kernels.reference import attend_cross_entropy_reference

    table, ids, grad_out, edge, good, bad, floats, fractional = _inputs()
    table = jnp.asarray(table)
    arrays, messages = {}, {}
    for backend in BACKENDS:
        out, vjp = jax.vjp(lambda t, b=backend: lookup(t, ids, backend=b), jnp.asarray(table))
        (grad,) = vjp(jnp.asarray(grad_out))
        for layout in LAYOUTS:
            for kind in KINDS:
                arrays[f"bits/forward/{layout}/{backend}/{kind}"] = out
                exact = "bits" if layout != "data" else "close"
                arrays[f"{exact}/grad/{layout}/{backend}/{kind}"] = grad
    for mode in MODES:
        these = good if mode == "error" else edge
        out = lookup(table, these, mode=mode, fill_value=FILL)
        for how in ("eager", "jit"):
            for path in ("sharded", "layer"):
                arrays[f"bits/mode/{mode}/{how}/{path}"] = out
    err, _ = _checkified(lambda t, i: lookup(t, i, mode="error"), table, bad)
    for path in ("sharded", "layer"):
        arrays[f"bits/float_ids/{path}"] = lookup(table, floats)
        messages[f"float_ids/{path}"] = _message(partial(lookup, table, fractional))
        messages[f"error/eager/{path}"] = _message(partial(lookup, table, bad, mode="error"))
        messages[f"error/jit/{path}"] = _message(err.throw)

    arrays["bits/explicit/float_ids"] = lookup(table, floats)
    arrays["bits/explicit/error"] = lookup(table, good)
    messages["explicit/error"] = messages["error/eager/sharded"]

    table, hidden, targets = map(jnp.asarray, _loss_inputs())
    # One compiled program, not the naive loss's dozens of ops compiled one by one.
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda t, h: attend_cross_entropy_reference(t, h, targets), argnums=(0, 1)
        )
    )(table, hidden)
    for name in ("vocab_parallel", "data_parallel"):
        arrays[f"close/loss/{name}"] = loss
        arrays[f"close/loss/{name}/grad_table"] = grads[0]
        arrays[f"close/loss/{name}/grad_hidden"] = grads[1]

    train_ids = _train_ids()
    targets = jnp.linspace(-1.0, 1.0, ROWS)
    for backend in TRAIN_BACKENDS:
        losses, table = _train(_tiny_model(backend), lambda m, i: m(i), train_ids, targets)
        for layout in LAYOUTS:
            arrays[f"close/train/{layout}/{backend}/losses"] = np.asarray(losses)
            arrays[f"close/train/{layout}/{backend}/table"] = table
    return {k: np.asarray(v) for k, v in arrays.items()}, messages


def expected_recipe(out_ids: np.ndarray) -> np.ndarray:
    """The recipes' output for the global ids they ran on, by the unsharded lookup."""
    from flax import nnx

    from embed import MyEmbed, lookup

    layer = MyEmbed(RECIPE_VOCAB, RECIPE_D, nnx.Rngs(0))
    return np.asarray(lookup(layer.embedding[...], out_ids))


# --- The multi-process run --------------------------------------------------------------


class _Env:
    """Placing NumPy data on a mesh that spans the processes, and fetching it back."""

    def __init__(self, mesh):
        self.mesh = mesh

    def place(self, x, spec):
        import jax
        from jax.sharding import NamedSharding

        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda i: x[i])

    def split(self, x):
        """``x``'s rows split over the mesh, built as docs/scaling.md tells users to."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        x = np.asarray(x)
        sharding = NamedSharding(self.mesh, P(self.mesh.axis_names[0]))
        starts = {
            i[0].start or 0 for i in sharding.addressable_devices_indices_map(x.shape).values()
        }
        rows = x.shape[0] // self.mesh.shape[self.mesh.axis_names[0]]
        local = np.concatenate([x[s : s + rows] for s in sorted(starts)])
        array = jax.make_array_from_process_local_data(sharding, local, x.shape)
        assert not array.is_fully_addressable  # Really spans the processes.
        return array

    def replicate(self, x):
        from jax.sharding import PartitionSpec as P

        return self.place(x, P())


def _fetch(x) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _mesh(shape, names, axis_type):
    import jax

    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def run_checks() -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import checkify
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from embed import MyEmbed
    from embed.loss import attend_cross_entropy
    from embed.parallel import (
        apply_sharded,
        logical_axis_rules,
        shard_module,
        sharded_lookup,
        vocab_parallel_attend_cross_entropy,
    )

    arrays, messages = {}, {}
    env = _Env(_mesh((jax.device_count(),), ("x",), AxisType.Auto))
    mesh = env.mesh
    table, ids, grad_out, edge, good, bad, floats, fractional = _inputs()
    placed_table = env.replicate(table)

    # Three layouts x two backends: the rows and the table gradient from one jitted
    # program each, compiled per kind of ids. (The eager path is the same for every
    # layout; the modes below run it on split ids.)
    for layout in LAYOUTS:
        for backend in BACKENDS:

            def fn(t, i, layout=layout, backend=backend):
                return sharded_lookup(
                    t, i, mesh=mesh, layout=layout, axis_name="x", backend=backend
                )

            @jax.jit
            def rows_and_grad(t, i, g, fn=fn):
                out, vjp = jax.vjp(lambda t: fn(t, i), t)
                return out, vjp(g)[0]

            for kind in KINDS:
                place = env.split if kind == "split" else env.replicate
                out, grad = rows_and_grad(placed_table, place(ids), place(grad_out))
                key = f"{layout}/{backend}/{kind}"
                arrays[f"bits/forward/{key}"] = _fetch(out)
                exact = "bits" if layout != "data" else "close"
                arrays[f"{exact}/grad/{key}"] = _fetch(grad)

    # The three modes, eager and jitted, through sharded_lookup and a placed MyEmbed.
    def sharded(mode):
        def fn(t, i):
            return sharded_lookup(
                t, i, mesh=mesh, layout="vocab", axis_name="x", mode=mode, fill_value=FILL
            )

        return fn

    def layer_fn(mode):
        layer = MyEmbed(V, D, nnx.Rngs(0), mode=mode, fill_value=FILL)
        layer.embedding[...] = jnp.asarray(table)
        shard_module(layer, mesh, logical_axis_rules("data", "x"))  # Replicated.
        return lambda t, i: layer(i)

    paths = {"sharded": sharded, "layer": layer_fn}
    fns = {(mode, path): make(mode) for mode in MODES for path, make in paths.items()}
    # The error mode under checkify, compiled once per path for the good and the bad ids.
    checked = {path: jax.jit(checkify.checkify(fns["error", path])) for path in paths}
    for mode in MODES:
        these = env.split(good if mode == "error" else edge)
        for path in paths:
            fn = fns[mode, path]
            arrays[f"bits/mode/{mode}/eager/{path}"] = _fetch(fn(placed_table, these))
            if mode == "error":
                err, out = checked[path](placed_table, these)
                err.throw()
            else:
                out = jax.jit(fn)(placed_table, these)
            arrays[f"bits/mode/{mode}/jit/{path}"] = _fetch(out)
    for path in paths:
        clip, error = fns["clip", path], fns["error", path]
        arrays[f"bits/float_ids/{path}"] = _fetch(clip(placed_table, env.split(floats)))
        split_fractional = env.split(fractional)
        messages[f"float_ids/{path}"] = _message(partial(clip, placed_table, split_fractional))
        split_bad = env.split(bad)
        messages[f"error/eager/{path}"] = _message(partial(error, placed_table, split_bad))
        err, _ = checked[path](placed_table, split_bad)
        messages[f"error/jit/{path}"] = _message(err.throw)

    # The same eager checks on a mesh with Explicit axes (jax.make_mesh's default).
    explicit = _Env(_mesh((jax.device_count(),), ("x",), AxisType.Explicit))
    with jax.set_mesh(explicit.mesh):
        data = partial(sharded_lookup, mesh=explicit.mesh, layout="data", axis_name="x")
        placed = explicit.replicate(table)
        arrays["bits/explicit/float_ids"] = _fetch(data(placed, explicit.split(floats)))
        arrays["bits/explicit/error"] = _fetch(data(placed, explicit.split(good), mode="error"))
        split_bad = explicit.split(bad)
        messages["explicit/error"] = _message(partial(data, placed, split_bad, mode="error"))

    # The tied losses: vocab-parallel (rows split, tokens replicated) and data-parallel
    # (tokens split, the table replicated, jit partitions the chunked loss).
    table, hidden, targets = _loss_inputs()
    vocab_parallel = jax.jit(
        jax.value_and_grad(
            lambda t, h, y: vocab_parallel_attend_cross_entropy(t, h, y, mesh=mesh, axis_name="x"),
            argnums=(0, 1),
        )
    )
    data_parallel = jax.jit(
        jax.value_and_grad(lambda t, h, y: attend_cross_entropy(t, h, y), argnums=(0, 1))
    )
    for name, fn, place in (
        ("vocab_parallel", vocab_parallel, env.replicate),
        ("data_parallel", data_parallel, env.split),
    ):
        loss, grads = fn(
            env.place(table, P("x") if name == "vocab_parallel" else P()),
            place(hidden),
            place(targets),
        )
        arrays[f"close/loss/{name}"] = _fetch(loss)
        arrays[f"close/loss/{name}/grad_table"] = _fetch(grads[0])
        arrays[f"close/loss/{name}/grad_hidden"] = _fetch(grads[1])

    # A few jitted SGD steps of a small model, ids split across the processes.
    train_ids = env.split(_train_ids())
    targets = env.replicate(np.linspace(-1.0, 1.0, ROWS, dtype=np.float32))
    for layout in LAYOUTS:
        for backend in TRAIN_BACKENDS:
            model = _tiny_model(backend)
            shard_module(model, mesh, logical_axis_rules(layout, "x"))

            def embed_fn(m, i, layout=layout):
                return apply_sharded(m, i, mesh=mesh, layout=layout, axis_name="x")

            losses, trained = _train(model, embed_fn, train_ids, targets, mesh)
            arrays[f"close/train/{layout}/{backend}/losses"] = np.asarray(
                [_fetch(x) for x in losses]
            )
            arrays[f"close/train/{layout}/{backend}/table"] = _fetch(trained)

    # docs/scaling.md's recipes as written, on jax.make_mesh's default axis types and on
    # Auto axes.
    make_mesh = jax.make_mesh
    for kind in ("default", "auto"):
        if kind == "auto":

            def auto_mesh(shape, names, **kwargs):
                return make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), **kwargs)

            jax.make_mesh = auto_mesh
        try:
            rng = np.random.default_rng(jax.process_index())
            local_ids = rng.integers(-RECIPE_VOCAB, 2 * RECIPE_VOCAB, RECIPE_IDS_SHAPE, np.int32)
            scope = {
                "jax": jax,
                "vocab_size": RECIPE_VOCAB,
                "d_model": RECIPE_D,
                "local_ids": local_ids,
            }
            for i, block in enumerate(recipes()):
                exec(compile(block, f"{DOC}:recipe{i}", "exec"), scope)
                arrays[f"recipe/{kind}/{i}/ids"] = _fetch(scope["ids"])
                arrays[f"recipe/{kind}/{i}/out"] = _fetch(scope["out"])
                spec = tuple(scope["layer"].embedding[...].sharding.spec)
                messages[f"recipe/{kind}/{i}/table_spec"] = list(spec + (None,) * (2 - len(spec)))
            messages[f"recipe/{kind}/axis_types"] = str(scope["mesh"].axis_types)
        finally:
            jax.make_mesh = make_mesh
    return arrays, messages


def _probe_collectives() -> str | None:
    """Why collectives across these processes do not work here, or None if they do."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        env = _Env(_mesh((jax.device_count(),), ("x",), AxisType.Auto))
        ones = env.split(np.ones((jax.device_count(),), np.float32))
        total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(env.mesh, P()))(ones))
    except Exception as error:  # Whatever the runtime raises, it is the reason to skip.
        return f"CPU collectives across processes fail here: {type(error).__name__}: {error}"
    if total != jax.device_count():
        return f"a cross-process sum gave {total}, not {jax.device_count()}"
    return None


def main(port: str, process_id: str, num_processes: str, out_dir: str) -> None:
    import jax

    out = Path(out_dir)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
        problem = _probe_collectives()
    except Exception as error:  # No gloo, or no distributed CPU runtime, on this stack.
        problem = f"no distributed CPU runtime with gloo here: {type(error).__name__}: {error}"
    if problem:
        (out / f"{process_id}.json").write_text(json.dumps({"skip": problem}))
        return
    arrays, messages = run_checks()
    np.savez(out / f"{process_id}.npz", **arrays)
    (out / f"{process_id}.json").write_text(json.dumps({"messages": messages}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
