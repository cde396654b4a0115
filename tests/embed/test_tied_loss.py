"""The chunked tied cross-entropy against the naive one: loss, both gradients, memory."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from embed import MyEmbed, loss
from kernels.reference import REDUCTIONS, attend_cross_entropy_reference
from tests import grid

# (V, D, T) from the shared grid: the token counts 1, 7 and 129, vocabularies of one row,
# seven rows and GPT-2's 50257 (29 x 1733: a multiple of no block size), widths 3, 129.
SHAPES = [(7, 3, 1), (7, 129, 7), (1, 3, 7), (7, 3, 129), (50257, 3, 129)]
assert all(v in grid.VOCAB_SIZES and d in grid.D_MODELS for v, d, _ in SHAPES)
assert all(t in grid.NUM_TOKENS for _, _, t in SHAPES)
# Block sizes: the default, and small ones that force several token chunks (padded: 4
# divides none of 7, 129) and several vocabulary blocks (the last overlapping).
BLOCKS = {"default": {}, "small": {"chunk_size": 4, "vocab_chunk_size": 3}}
OPTIONS = {
    "plain": {},
    "where": {"where": True},
    "cap": {"logit_soft_cap": 2.0},
    "zloss": {"z_loss": 1e-2},
    "all": {"where": True, "logit_soft_cap": 5.0, "z_loss": 1e-3},
}


def _inputs(vocab_size, d_model, num_tokens, dtype, seed=0):
    table = grid.make_table(vocab_size, d_model, dtype, seed)
    # Hidden states scaled so logits spread over a few units, as a trained model's do.
    hidden = 2.0 * grid.make_table(num_tokens, d_model, jnp.float32, seed + 1) / d_model**0.5
    # Drawn by NumPy, as grid.normal says why: jax.random compiles a sampler per shape.
    rng = np.random.default_rng(seed + 2)
    targets = rng.integers(0, vocab_size, num_tokens).astype(np.int32)
    where = rng.random(num_tokens) < 0.6
    where[0] = True
    return table, hidden.astype(dtype), jnp.asarray(targets), jnp.asarray(where)


def _value_and_grads_fn(fn, targets, reduction, **kwargs):
    """``(table, hidden) ->`` loss and the gradients of (loss, or a weighted sum of
    per-token losses)."""
    weights = 1.0 + jnp.arange(targets.shape[0], dtype=jnp.float32) / 7

    def scalar(table, hidden):
        out = fn(table, hidden, targets, reduction=reduction, **kwargs)
        return (out * weights).sum() if reduction == "none" else out, out

    def run(table, hidden):
        (_, out), grads = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(table, hidden)
        return out, grads

    return run


def _value_and_grads(fn, table, hidden, targets, reduction, **kwargs):
    """Loss and the gradients of (loss, or a weighted sum of per-token losses)."""
    return jax.jit(_value_and_grads_fn(fn, targets, reduction, **kwargs))(table, hidden)


def _fused_and_naive(blocks, table, hidden, targets, reduction, **kwargs):
    """``_value_and_grads`` of the blocked loss (``BLOCKS[blocks]``) and of the oracle.

    Both in one compiled program: on a CPU the compilations are most of this file's
    time, and one program costs less to compile than two.
    """

    def fused(*args, **options):
        return loss.attend_cross_entropy(*args, **options, **BLOCKS[blocks])

    both = [
        _value_and_grads_fn(f, targets, reduction, **kwargs)
        for f in (fused, attend_cross_entropy_reference)
    ]
    return jax.jit(lambda *args: tuple(f(*args) for f in both))(table, hidden)


def _assert_close(actual, expected, rtol, scale=0.0):
    """Elementwise ``rtol``, with an absolute floor of ``rtol`` x the largest magnitude.

    ``scale`` raises the floor's magnitude to that of the terms a gradient is the sum
    of: ``softmax - onehot`` cancels (exactly, with one row), so an ulp of a
    probability is an error of ``eps x`` (cotangent x the other operand), whatever
    the gradient's own size.
    """
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(scale, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _term_scales(table, hidden, targets, reduction, where=None):
    """For ``_assert_close``: the largest term of the table and hidden gradients."""
    num_kept = targets.shape[0] if where is None else int(where.sum())
    cotangent = {"mean": 1 / max(num_kept, 1), "sum": 1.0, "none": 2.0}[reduction]
    largest = lambda x: float(np.max(np.abs(np.asarray(x, np.float32)), initial=0.0))  # noqa: E731
    return cotangent * largest(hidden), cotangent * largest(table)


# Every shape with no option and with all of them; each option alone on one shape. Each
# case meets every reduction, and each reduction both block sizes (grid.pairwise).
FLOAT32_CASES = [(s, o) for s in SHAPES for o in ("plain", "all")] + [
    (SHAPES[1], o) for o in ("where", "cap", "zloss")
]


def _case_id(case):
    return "V{}-D{}-T{}".format(*case[0]) + f"-{case[1]}"


@pytest.mark.parametrize(
    ("case", "reduction", "blocks"),
    grid.pairwise(FLOAT32_CASES, REDUCTIONS, list(BLOCKS)),
)
def test_float32_matches_naive(case, reduction, blocks):
    shape, option = case
    table, hidden, targets, where = _inputs(*shape, jnp.float32)
    kwargs = dict(OPTIONS[option])
    if kwargs.pop("where", False):
        kwargs["where"] = where
    (out, grads), (expected, expected_grads) = _fused_and_naive(
        blocks, table, hidden, targets, reduction, **kwargs
    )
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    _assert_close(out, expected, 1e-5)
    scales = _term_scales(table, hidden, targets, reduction, kwargs.get("where"))
    for grad, want, like, scale in zip(grads, expected_grads, (table, hidden), scales, strict=True):
        assert grad.dtype == like.dtype
        _assert_close(grad, want, 1e-5, scale)


@pytest.mark.parametrize(
    ("dtype", "blocks", "reduction"), grid.pairwise(grid.DTYPES[1:], list(BLOCKS), REDUCTIONS)
)
def test_16_bit_matches_naive(dtype, blocks, reduction):
    # The logits are float32 sums of 16-bit products in both, so the losses agree to
    # float32 rounding. The gradients are rounded once to the 16-bit dtype, after float32
    # sums whose terms (the logits' gradient, cast to 16 bits for the matmul in both) may
    # round differently: tolerance 2 ulp of the 16-bit dtype (2**-7 for bfloat16,
    # 2**-10 for float16), relative, with the same floor of that times the largest entry.
    table, hidden, targets, where = _inputs(50257, 129, 7, dtype)
    kwargs = {"where": where, "logit_soft_cap": 30.0, "z_loss": 1e-4}
    (out, grads), (expected, expected_grads) = _fused_and_naive(
        blocks, table, hidden, targets, reduction, **kwargs
    )
    _assert_close(out, expected, 1e-5)
    ulp = float(jnp.finfo(dtype).eps)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        _assert_close(grad, want, 2 * ulp)


def test_reference_is_optax_with_where_and_odd_targets():
    # The oracle itself: optax's integer-label cross-entropy, negative targets counting
    # from the end once, out-of-range ones NaN unless masked.
    table, hidden, _, where = _inputs(7, 3, 8, jnp.float32)
    targets = jnp.asarray([0, 6, -1, -7, 7, -8, 3, 2], jnp.int32)
    logits = hidden @ table.T
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    got = attend_cross_entropy_reference(table, hidden, targets, reduction="none")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isnan(got[4]) and np.isnan(got[5]) and not np.isnan(got[:4]).any()
    chunked = loss.attend_cross_entropy(table, hidden, targets, reduction="none")
    np.testing.assert_allclose(chunked, expected, rtol=1e-5)
    kept = where.at[4].set(False).at[5].set(False)
    masked = loss.attend_cross_entropy(table, hidden, targets, where=kept)
    want = float(np.where(kept, expected, 0.0).sum() / kept.sum())
    np.testing.assert_allclose(masked, want, rtol=1e-5)
    grads = jax.grad(loss.attend_cross_entropy, argnums=(0, 1))(table, hidden, targets, where=kept)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_targets_of_any_integer_width_saturate_not_wrap():
    # 2**32 - 1 would be -1 (the last row) if cast to int32; it is out of range: NaN.
    table, hidden, _, _ = _inputs(7, 3, 2, jnp.float32)
    targets = jnp.asarray([2**32 - 1, 3], jnp.uint32)
    got = loss.attend_cross_entropy(table, hidden, targets, reduction="none")
    assert np.isnan(got[0]) and np.isfinite(got[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nothing_kept_gives_zero_loss_and_gradient(reduction):
    table, hidden, targets, _ = _inputs(7, 3, 5, jnp.float32)
    none = jnp.zeros(5, bool)
    out, grads = _value_and_grads(
        loss.attend_cross_entropy, table, hidden, targets, reduction, where=none
    )
    assert not bool(jnp.any(out)) and not any(bool(jnp.any(g)) for g in grads)


def test_no_tokens():
    table = grid.make_table(7, 3, jnp.float32)
    hidden, targets = jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)
    assert loss.attend_cross_entropy(table, hidden, targets, reduction="none").shape == (0,)
    assert float(loss.attend_cross_entropy(table, hidden, targets, reduction="sum")) == 0.0
    grad = jax.grad(loss.attend_cross_entropy)(table, hidden, targets)
    assert grad.shape == table.shape and not bool(jnp.any(grad))


def test_batch_dimensions_and_jit():
    table, hidden, targets, where = _inputs(97, 64, 12, jnp.float32)
    shaped = (hidden.reshape(3, 4, 64), targets.reshape(3, 4), where.reshape(3, 4))
    fn = jax.jit(loss.attend_cross_entropy, static_argnames=("reduction", "chunk_size"))
    per_token = fn(table, *shaped[:2], where=shaped[2], reduction="none", chunk_size=5)
    assert per_token.shape == (3, 4)
    expected = attend_cross_entropy_reference(table, hidden, targets, where=where, reduction="none")
    np.testing.assert_allclose(per_token.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_default_block_sizes():
    # The rule in embed/loss.py's docstring: at most 2**23 logits per block.
    assert loss._block_sizes(4096, 50257, None, None) == (160, 50257)
    assert loss._block_sizes(4096, 32000, None, None) == (256, 32000)
    assert loss._block_sizes(4096, 256000, None, None) == (128, 65536)
    assert loss._block_sizes(100, 64, None, None) == (100, 64)
    assert loss._block_sizes(0, 64, None, None) == (1, 64)
    assert loss._block_sizes(100, 64, 7, 1000) == (7, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "avg"}, "reduction='avg' must be one of"),
        ({"chunk_size": 0}, "chunk_size=0 must be a positive integer"),
        ({"vocab_chunk_size": 2.5}, "vocab_chunk_size=2.5 must be"),
        ({"logit_soft_cap": 0.0}, "logit_soft_cap=0.0 must be a positive"),
        ({"z_loss": -1.0}, "z_loss=-1.0 must be"),
        ({"where": jnp.ones(3, jnp.int32)}, "where.shape=.* must be bool"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    table, hidden, targets, _ = _inputs(7, 3, 3, jnp.float32)
    with pytest.raises(ValueError, match=match):
        loss.attend_cross_entropy(table, hidden, targets, **kwargs)


def test_bad_shapes_and_dtypes_are_named():
    table, hidden, targets, _ = _inputs(7, 3, 3, jnp.float32)
    with pytest.raises(ValueError, match=r"hidden.shape=\(3, 4\) must be"):
        loss.attend_cross_entropy(table, jnp.zeros((3, 4)), targets)
    with pytest.raises(ValueError, match=r"targets.shape=\(2,\) must be"):
        loss.attend_cross_entropy(table, hidden, targets[:2])
    with pytest.raises(TypeError, match="targets.dtype=.* must be an integer"):
        loss.attend_cross_entropy(table, hidden, targets.astype(jnp.float32))
    with pytest.raises(TypeError, match="table.dtype=.* must be one of"):
        loss.attend_cross_entropy(table.astype(jnp.int32), hidden, targets)


# --- The layer method ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("param_dtype", "dtype"),
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)],
    ids=str,
)
def test_layer_method_is_the_loss_of_its_table_in_its_dtype(param_dtype, dtype):
    layer = MyEmbed(97, 48, nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)
    _, hidden, targets, where = _inputs(97, 48, 10, jnp.float32)
    got = layer.attend_cross_entropy(hidden, targets, where=where, logit_soft_cap=9.0)
    table = layer.embedding[...]
    want = attend_cross_entropy_reference(
        table, hidden, targets, where=where, logit_soft_cap=9.0, dtype=dtype or param_dtype
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if dtype is None and param_dtype == jnp.float32:
        # The naive tied head a user would write: attend, then optax.
        logits = 9.0 * jnp.tanh(layer.attend(hidden) / 9.0)
        naive = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        np.testing.assert_allclose(got, naive.mean(where=where), rtol=1e-5)


class _TiedModel(nnx.Module):
    """Lookup, a nonlinearity, and the tied loss: the table gets two gradients."""

    def __init__(self, fused: bool):
        self.embed = MyEmbed(61, 24, nnx.Rngs(0))
        self.fused = fused

    def __call__(self, ids, targets):
        hidden = jnp.tanh(self.embed(ids))
        if self.fused:
            return self.embed.attend_cross_entropy(hidden, targets, chunk_size=3)
        logits = self.embed.attend(hidden)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_tied_gradients_add_up():
    ids = jnp.asarray(grid.make_ids(61, 20).reshape(4, 5) % 61)
    targets = jnp.roll(ids, -1, axis=1)
    fused, naive = _TiedModel(True), _TiedModel(False)
    # Compiled: the gradients trace the layer either way, and op by op costs more here.
    value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: m(ids, targets)))
    value, grads = value_and_grad(fused)
    want_value, want_grads = value_and_grad(naive)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    grad, want = grads.embed.embedding[...], want_grads.embed.embedding[...]
    _assert_close(grad, want, 1e-5)
    # Both parts are there: the loss's gradient alone (hidden held fixed) differs.
    hidden = jnp.tanh(fused.embed(ids))
    loss_only = jax.jit(jax.grad(lambda t: loss.attend_cross_entropy(t, hidden, targets)))(
        fused.embed.embedding[...]
    )
    assert float(jnp.max(jnp.abs(loss_only - grad))) > 1e-3


# --- Memory, from the compiled programs ----------------------------------------------


def peak_bytes(fn, *args) -> int:
    """Arguments + outputs + temporaries of ``jax.jit(fn)`` compiled for ``args``.

    ``memory_analysis()`` reports these fields on every stack here (jax 0.10 to 0.12,
    CPU); aliased bytes are counted once.
    """
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def loss_and_grads(fn, **kwargs):
    """``(table, hidden, targets) -> (loss, d table, d hidden)`` for the fused or naive loss."""

    def run(table, hidden, targets):
        value, grads = jax.value_and_grad(lambda t, h: fn(t, h, targets, **kwargs), argnums=(0, 1))(
            table, hidden
        )
        return value, *grads

    return run


def test_peak_memory_is_far_below_naive():
    # GPT-2's vocabulary and width, 4096 tokens: the naive logits alone are 4096 x
    # 50257 x 4 B = 823 MB, and their gradient as much again. Compiled only, not run.
    t, v, d = 4096, 50257, 768
    args = (
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((t, d), jnp.float32),
        jax.ShapeDtypeStruct((t,), jnp.int32),
    )
    fused = peak_bytes(loss_and_grads(loss.attend_cross_entropy), *args)
    naive = peak_bytes(loss_and_grads(attend_cross_entropy_reference), *args)
    # Arguments and outputs alone: table and its gradient (154 MB each), hidden and its
    # gradient (12.6 MB each). The fused form adds about two [160, 50257] float32
    # blocks; the naive form holds [4096, 50257] arrays.
    floor = 2 * (v * d + t * d) * 4 + t * 4
    assert naive > floor + t * v * 4  # At least the logits on top.
    assert fused < floor + 8 * 160 * v * 4, (fused, floor)
    assert naive > 3 * fused, (naive, fused)


def test_block_math_covers_each_element_once():
    # Every (token, vocabulary) pair is in exactly one unmasked block, whatever the sizes.
    sizes = list(itertools.product((1, 7), (1, 5, 11), (1, 3), (2, 5)))

    # One compiled program for every size: a compilation each costs several times more.
    # The zeros are arguments, not constants, so the blocks are computed, not folded.
    @jax.jit
    def losses(tables, hiddens):
        return [
            # All logits 0: the per-token loss is log(V) exactly when each column counts once.
            loss.attend_cross_entropy(
                tables[v],
                hiddens[t],
                jnp.zeros(t, jnp.int32),
                reduction="none",
                chunk_size=c,
                vocab_chunk_size=vc,
            )
            for t, v, c, vc in sizes
        ]

    tables = {v: jnp.zeros((v, 1)) for v in (1, 5, 11)}
    hiddens = {t: jnp.zeros((t, 1)) for t in (1, 7)}
    for (t, v, _, _), got in zip(sizes, losses(tables, hiddens), strict=True):
        np.testing.assert_allclose(got, np.full(t, np.log(v)), rtol=1e-6, atol=1e-7)
