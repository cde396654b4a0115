"""``embed.Embed`` and ``embed.MyEmbed`` are ``nnx.Embed``s, with ``nnx.Embed``'s graph.

NNX code finds embedding tables by type (``isinstance(module, nnx.Embed)`` in a
re-initialisation loop) and extends them by subclassing (Gemma's ``__call__`` scaled
by ``sqrt(features)``): both must work with our layer swapped in, and keep its
backend. Layers equal in configuration must have equal graph definitions whatever
initializer objects built them, as ``nnx.Embed``'s do (Flax's ``TestLayersSameGraph``),
so that ``nnx.jit`` traces such models once.

Run as a script, this file prints the gradient differences from ``nnx.Embed`` that
README's "What still differs" reports (``python -m tests.embed.test_flax_subtype``).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from embed import Embed, MyEmbed
from tests import grid

VOCAB, FEATURES = 61, 16
# Our options, beside the attributes nnx.Embed keeps: all static, none callable.
OUR_ATTRIBUTES = {"backend", "mode", "fill_value", "scale_by_sqrt_d", "deterministic"}


def _faces(backend="xla"):
    """Each face as ``make(num_embeddings, features, **kwargs)``, and ``nnx.Embed``."""
    return {
        "Embed": functools.partial(Embed, backend=backend),
        "MyEmbed": lambda v, f, *, rngs, **kwargs: MyEmbed(v, f, rngs, backend=backend, **kwargs),
        "nnx.Embed": nnx.Embed,
    }


FACES = list(_faces())


def _tokens(shape, seed=5):
    """In-vocabulary ids, where every face agrees (out-of-range ids: test_flax_embed)."""
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("face", FACES[:2])
def test_both_faces_are_nnx_embeds(face):
    layer = _faces()[face](VOCAB, FEATURES, rngs=nnx.Rngs(0))
    assert isinstance(layer, nnx.Embed)
    # What nnx.Embed keeps, and our options: nothing else, and no initializer.
    flax = nnx.Embed(VOCAB, FEATURES, rngs=nnx.Rngs(0))
    assert set(vars(layer)) == set(vars(flax)) | OUR_ATTRIBUTES

    def functions(module):  # Callables other than the table and dtypes.
        return {
            name
            for name, value in vars(module).items()
            if callable(value) and not isinstance(value, (nnx.Variable, type))
        }

    assert functions(layer) == functions(flax) == {"promote_dtype"}


# --- A re-initialisation loop that dispatches on the type --------------------------------


class TiedLM(nnx.Module):
    """Token embedding, one MLP layer, head tied through ``attend``."""

    def __init__(self, embed_cls, *, rngs: nnx.Rngs, **embed_kwargs):
        self.wte = embed_cls(VOCAB, FEATURES, rngs=rngs, **embed_kwargs)
        self.fc = nnx.Linear(FEATURES, FEATURES, rngs=rngs)

    def __call__(self, tokens):
        return self.wte.attend(nnx.gelu(self.fc(self.wte(tokens))))


def gpt2_init(model: nnx.Module, key: jax.Array) -> None:
    """GPT-2's initialisation, as NNX training code writes it: dispatch on the type."""
    for path, module in nnx.iter_modules(model):
        key_for = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
        if isinstance(module, nnx.Linear):
            module.kernel[...] = jax.random.normal(key_for, module.kernel.shape) * 0.02
            module.bias[...] = jnp.zeros_like(module.bias[...])
        elif isinstance(module, nnx.Embed):
            module.embedding[...] = jax.random.normal(key_for, module.embedding.shape) * 0.02


def _train(model, batches, learning_rate=1e-2):
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [step(model, optimizer, batch) for batch in batches]
    return np.asarray(losses), nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("face", FACES[:2])
def test_reinit_loop_on_nnx_embed_trains_identically(face, backend):
    batches = [_tokens((4, 17))] * 4
    ours = TiedLM(_faces(backend)[face], rngs=nnx.Rngs(0))
    flax = TiedLM(nnx.Embed, rngs=nnx.Rngs(0))
    before = np.asarray(ours.wte.embedding[...])
    for model in (ours, flax):
        gpt2_init(model, jax.random.key(1))
    # The loop found our table: GPT-2's scale now, not the face's default init's.
    assert not np.array_equal(np.asarray(ours.wte.embedding[...]), before)
    assert 0.017 < float(jnp.std(ours.wte.embedding[...])) < 0.023
    grid.assert_bits_equal(ours.wte.embedding[...], flax.wte.embedding[...])
    (ours_losses, ours_params), (flax_losses, flax_params) = (
        _train(ours, batches),
        _train(flax, batches),
    )
    assert np.all(np.diff(flax_losses) < 0)  # It trains.
    if backend == "xla":
        np.testing.assert_array_equal(ours_losses, flax_losses)
        jax.tree.map(grid.assert_bits_equal, ours_params, flax_params)
    else:
        # A kernel's backward returns its own float32 sum for the tied table (README,
        # "What still differs"): the same steps, to float32 rounding.
        np.testing.assert_allclose(ours_losses, flax_losses, rtol=1e-6)
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
            ours_params,
            flax_params,
        )


# --- A subclass written for nnx.Embed ----------------------------------------------------


def scaled(base):
    """Gemma's ``ScaledEmbed``, written against ``base`` as against ``nnx.Embed``."""

    class ScaledEmbed(base):
        def __call__(self, x):
            x = super().__call__(x)
            return x * jnp.sqrt(self.features).astype(x.dtype)

    return ScaledEmbed


@pytest.mark.parametrize("face", FACES[:2])
def test_gemma_style_subclass_keeps_our_backend(face):
    base = {"Embed": Embed, "MyEmbed": MyEmbed}[face]
    init = nnx.initializers.normal(1.0)
    ours = scaled(base)(VOCAB, FEATURES, backend="pallas", embedding_init=init, rngs=nnx.Rngs(0))
    flax = scaled(nnx.Embed)(VOCAB, FEATURES, embedding_init=init, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.Embed) and ours.backend == "pallas"
    ids = _tokens((2, 12))
    grid.assert_bits_equal(ours(ids), flax(ids))
    expected = flax.embedding[...][ids] * jnp.sqrt(FEATURES).astype(jnp.float32)
    grid.assert_bits_equal(ours(ids), expected)
    # Traced, the subclass's call runs the Pallas kernel (interpreted on a CPU);
    # nnx.Embed's and the xla backend's do not.
    assert "pallas_call" in str(jax.make_jaxpr(ours)(ids))
    assert "pallas_call" not in str(jax.make_jaxpr(flax)(ids))
    as_xla = scaled(base)(VOCAB, FEATURES, backend="xla", rngs=nnx.Rngs(0))
    assert "pallas_call" not in str(jax.make_jaxpr(as_xla)(ids))


# --- Graph definitions and traces --------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_same_graph_for_different_initializers(face):
    """Flax's ``TestLayersSameGraph`` (its Embed case), for each face and nnx.Embed."""
    make = _faces()[face]
    zeros = make(2, 4, embedding_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    ones = make(2, 4, embedding_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
    assert nnx.graphdef(zeros) == nnx.graphdef(ones)
    assert hash(nnx.graphdef(zeros)) == hash(nnx.graphdef(ones))


@pytest.mark.parametrize("face", FACES)
def test_same_graph_for_distinct_initializer_objects(face):
    make = _faces()[face]
    graphs = [
        nnx.graphdef(make(VOCAB, FEATURES, embedding_init=init, rngs=nnx.Rngs(seed)))
        for seed, init in enumerate([nnx.initializers.normal(0.02) for _ in range(2)])
    ]
    assert graphs[0] == graphs[1] and hash(graphs[0]) == hash(graphs[1])
    # A configuration that differs still gives another graph.
    other = nnx.graphdef(make(VOCAB, FEATURES, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert other != graphs[0]


@pytest.mark.parametrize("face", FACES[:2])
def test_graph_holds_our_options(face):
    make = _faces()[face]
    # Each NaN fill value is its own object (and hashes apart): one is stored.
    nans = [
        nnx.graphdef(make(VOCAB, FEATURES, fill_value=float("nan"), rngs=nnx.Rngs(0)))
        for _ in range(2)
    ]
    assert nans[0] == nans[1] and hash(nans[0]) == hash(nans[1])
    base = nnx.graphdef(make(VOCAB, FEATURES, rngs=nnx.Rngs(0)))
    for option in [dict(mode="error"), dict(fill_value=0.0), dict(deterministic=True)]:
        assert nnx.graphdef(make(VOCAB, FEATURES, rngs=nnx.Rngs(0), **option)) != base, option
    pallas = {"Embed": Embed, "MyEmbed": MyEmbed}[face]
    other_backend = _faces("pallas")[face](VOCAB, FEATURES, rngs=nnx.Rngs(0))
    assert type(other_backend) is pallas and nnx.graphdef(other_backend) != base


@pytest.mark.parametrize("face", FACES)
def test_models_with_distinct_initializer_objects_share_one_trace(face):
    make = _faces()[face]
    traces = []

    @nnx.jit
    def forward(model, tokens):
        traces.append(None)  # Runs when nnx.jit traces, not when it reuses a trace.
        return model(tokens)

    def model(seed, **kwargs):
        init = nnx.initializers.normal(0.02)  # A new object for every model.
        return TiedLM(make, rngs=nnx.Rngs(seed), embedding_init=init, **kwargs)

    tokens = _tokens((2, 8))
    first, second = model(0), model(1)
    outputs = [forward(first, tokens), forward(second, tokens)]
    assert len(traces) == 1
    grid.assert_bits_equal(outputs[1], second(tokens))
    # Another configuration is another trace: the counter counts.
    forward(model(2, dtype=jnp.bfloat16), tokens)
    assert len(traces) == 2


# --- Gradient differences from nnx.Embed (README, "What still differs") -----------------


def _ulps(actual, expected):
    """``|actual - expected|`` in float32 ulps of ``expected``."""
    expected = np.asarray(expected, np.float64)
    spacing = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    return np.abs(np.asarray(actual, np.float64) - expected) / spacing


def _repeated_ids(num_tokens=2048):
    # Zipf-like, as in test_flax_embed: row 0 gets about a third of the tokens.
    ranks = np.minimum(np.random.default_rng(0).zipf(1.3, num_tokens) - 1, VOCAB - 1)
    return jnp.asarray(ranks.astype(np.int32))


def _tied_loss(head_table, rows, targets):
    logits = jnp.tanh(rows) @ head_table.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _pair(backend, **kwargs):
    """Ours and nnx.Embed, the same table from the same seed."""
    ours = Embed(VOCAB, FEATURES, rngs=nnx.Rngs(0), backend=backend, **kwargs)
    return ours, nnx.Embed(VOCAB, FEATURES, rngs=nnx.Rngs(0), **kwargs)


def tied_head_gradients(backend: str):
    """The float32 table gradient of a tied model, jitted: ours, nnx.Embed's, exact.

    ``exact`` sums in float64 the terms both sum in float32: the head's gradient and
    the lookup's cotangents, from one XLA program.
    """
    ids = _repeated_ids()
    targets = jnp.roll(ids, 1)

    @nnx.jit
    def grad(layer):
        return nnx.grad(lambda m: _tied_loss(m.embedding[...], m(ids), targets))(layer)

    ours, flax = (np.asarray(grad(layer).embedding[...]) for layer in _pair(backend))
    table = nnx.Embed(VOCAB, FEATURES, rngs=nnx.Rngs(0)).embedding[...]
    head, rows = jax.jit(jax.grad(_tied_loss, argnums=(0, 1)))(table, table[ids], targets)
    exact = np.asarray(head, np.float64)
    np.add.at(exact, np.asarray(ids), np.asarray(rows, np.float64))
    return ours, flax, exact


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_tied_head_gradient_is_as_close_to_the_exact_sum_as_nnx_embeds(backend):
    ours, flax, exact = tied_head_gradients(backend)
    ours_error, flax_error = _ulps(ours, exact), _ulps(flax, exact)
    # Float32 sums of the same terms in another order: near the exact sum, both.
    scale = np.abs(exact).max()
    for grad in (ours, flax):
        np.testing.assert_allclose(grad, exact, rtol=1e-5, atol=1e-6 * scale)
    # Both a few ulps from it on average (about 3 each, README), entries that nearly
    # cancel included.
    assert max(ours_error.mean(), flax_error.mean()) < 8, (ours_error.mean(), flax_error.mean())
    if backend == "xla":  # The same XLA scatter, folded alike: nnx.Embed's numbers.
        grid.assert_bits_equal(ours, flax)


def bf16_compute_adamw_step(backend: str, learning_rate=1e-2):
    """Float32 tables after one jitted adamw step of a ``dtype=bfloat16`` layer.

    Returns ours, nnx.Embed's, and the two float32 gradients (ours, flax's).
    """
    ids = _repeated_ids()
    cotangent = jax.random.normal(jax.random.key(1), (*ids.shape, FEATURES), jnp.float32)

    @nnx.jit
    def step(layer, optimizer):
        grads = nnx.grad(lambda m: jnp.vdot(m(ids).astype(jnp.float32), cotangent))(layer)
        optimizer.update(layer, grads)
        return grads.embedding[...]

    tables, grads = [], []
    for layer in _pair(backend, dtype=jnp.bfloat16):
        grads.append(np.asarray(step(layer, nnx.Optimizer(layer, optax.adamw(learning_rate),
                                                          wrt=nnx.Param))))  # fmt: skip
        tables.append(np.asarray(layer.embedding[...]))
    return *tables, *grads


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_bf16_compute_step_differs_by_at_most_twice_the_learning_rate(backend):
    learning_rate = 1e-2
    ours, flax, ours_grad, flax_grad = bf16_compute_adamw_step(backend, learning_rate)
    assert ours.dtype == flax.dtype == ours_grad.dtype == flax_grad.dtype == np.float32
    # adamw's first step moves an entry by about learning_rate * sign(gradient): the
    # tables differ where the gradients' signs differ, by up to twice that.
    difference = np.abs(ours - flax)
    assert difference.max() <= 2.001 * learning_rate, difference.max()
    flipped = np.sign(ours_grad) != np.sign(flax_grad)
    assert flipped.any()  # README: no backend gives nnx.Embed's numbers here.
    assert np.all(difference[flipped] > 0.5 * learning_rate)
    assert np.all(difference[~flipped] < 1e-3 * learning_rate)


def main():
    jax.config.update("jax_platforms", "cpu")
    for backend in ["xla", "pallas"]:
        ours, flax, exact = tied_head_gradients(backend)
        print(
            f"tied head, float32, jitted, {backend}: ours vs nnx.Embed max"
            f" {_ulps(ours, flax).max():.0f} ulp in {np.mean(ours != flax):.0%} of entries;"
            f" mean ulp from the float64 sum: ours {_ulps(ours, exact).mean():.2f},"
            f" nnx.Embed {_ulps(flax, exact).mean():.2f}"
        )
        ours, flax, ours_grad, flax_grad = bf16_compute_adamw_step(backend)
        flipped = np.sign(ours_grad) != np.sign(flax_grad)
        print(
            f"dtype=bfloat16 on float32, one adamw(1e-2) step, {backend}: max |ours - nnx.Embed|"
            f" {np.abs(ours - flax).max():.4g}; gradient signs differ in {flipped.sum()} of"
            f" {flipped.size} entries; {np.mean(ours != flax):.0%} of entries differ"
        )


if __name__ == "__main__":
    main()
