"""The one-import swap: ``model.py`` with ``embed.Embed`` for ``nnx.Embed``, unchanged otherwise.

``load_model`` reads ``model.py`` and replaces its one import line, exactly as a user
edits it. The swapped model must have the same parameters from the same seed,
bit-identical float32 logits and a matching optax step, on every backend that runs on
CPU.
"""

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import embed

MODEL = Path(__file__).with_name("model.py")
FLAX_IMPORT = "from flax.nnx import Embed\n"
OURS_IMPORT = "from embed import Embed\n"
# The plain swap (the default backend, "auto": "xla" on a CPU) and the Pallas kernel,
# interpreted on a CPU; a partial with "xla" would repeat the plain swap there.
BACKENDS = ["auto", "pallas"]


def load_model(import_line: str, backend: str = "auto"):
    """``model.py`` as a fresh module, with its ``Embed`` import replaced by ``import_line``.

    ``backend`` other than ``"auto"`` stands for the same import with a backend chosen,
    ``functools.partial(Embed, backend=...)``.
    """
    source = MODEL.read_text()
    assert source.count(FLAX_IMPORT) == 1, "model.py must import Embed in one line"
    name = f"flax_swap_model_{abs(hash((import_line, backend)))}"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(MODEL))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up.
    exec(compile(source.replace(FLAX_IMPORT, import_line), str(MODEL), "exec"), module.__dict__)
    if backend != "auto":
        module.Embed = functools.partial(module.Embed, backend=backend)
    return module


def _models(backend, **config):
    flax_module, ours_module = load_model(FLAX_IMPORT), load_model(OURS_IMPORT, backend)
    make = [m.Transformer(m.Config(**config), rngs=nnx.Rngs(0)) for m in (flax_module, ours_module)]
    return flax_module, *make


def _batch(vocab_size=97, seed=0):
    return jax.random.randint(jax.random.key(seed), (4, 17), 0, vocab_size)


def _assert_trees_bits_equal(actual, expected):
    """The same tree of arrays, bit for bit."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        bits = f"uint{8 * a.dtype.itemsize}"
        np.testing.assert_array_equal(a.view(bits), e.view(bits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_gives_the_same_parameters_from_the_same_seed(backend):
    _, flax_model, ours_model = _models(backend)
    assert type(flax_model.wte) is nnx.Embed
    assert isinstance(ours_model.wte, embed.Embed) and ours_model.wte.backend == backend
    assert isinstance(ours_model.wte, nnx.Embed)  # Found by code that asks the type.
    _assert_trees_bits_equal(
        nnx.to_pure_dict(nnx.state(ours_model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)),
    )
    assert 0.018 < float(jnp.std(ours_model.wte.embedding[...])) < 0.022


# What the unchanged model.py gives is the same for every backend: each is computed once.


def _logits(model, tokens):
    """``model``'s logits op by op, and compiled whole (XLA fuses differently)."""
    return model(tokens), nnx.jit(lambda m, t: m(t))(model, tokens)


def _one_step(flax_module, model, batch):
    """The loss of one optax step of ``model`` and its parameters after it."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    loss = flax_module.train_step(model, optimizer, batch)
    return loss, nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.cache
def _flax_logits():
    _, flax_model, _ = _models("auto")
    return _logits(flax_model, _batch()[:, :16])


@functools.cache
def _flax_step():
    flax_module, flax_model, _ = _models("auto")
    return _one_step(flax_module, flax_model, _batch())


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_gives_bit_identical_float32_logits(backend):
    _, _, ours_model = _models(backend)
    eager, compiled = _flax_logits()
    assert eager.dtype == jnp.float32
    # Op by op against op by op, and compiled against compiled.
    _assert_trees_bits_equal(_logits(ours_model, _batch()[:, :16]), (eager, compiled))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_optax_step_matches(backend):
    flax_module, _, ours_model = _models(backend)
    losses, params = zip(_flax_step(), _one_step(flax_module, ours_model, _batch()), strict=True)
    np.testing.assert_array_equal(losses[1], losses[0])
    if backend == "pallas":
        # The interpreted kernel's scatter-add sums a repeated id's rows in another
        # order than XLA's scatter: the step matches to float32 rounding.
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8),
            params[1],
            params[0],
        )
    else:  # The float32 gradient is XLA's own scatter-add: the step is bit-identical.
        _assert_trees_bits_equal(params[1], params[0])


@pytest.mark.parametrize("import_line", [FLAX_IMPORT, OURS_IMPORT])
def test_models_from_two_seeds_share_one_trace(import_line):
    # model.py builds a new initializer object for every model: like nnx.Embed, ours
    # keeps it out of the graph definition, so nnx.jit reuses its trace.
    module = load_model(import_line)
    traces = []

    @nnx.jit
    def forward(model, tokens):
        traces.append(None)  # Runs only when nnx.jit traces.
        return model(tokens)

    first, second = (module.Transformer(module.Config(), rngs=nnx.Rngs(s)) for s in (0, 1))
    assert nnx.graphdef(first) == nnx.graphdef(second)
    tokens = _batch()[:, :16]
    forward(first, tokens)
    logits = forward(second, tokens)
    assert len(traces) == 1
    np.testing.assert_allclose(logits, second(tokens), rtol=1e-5, atol=1e-6)
