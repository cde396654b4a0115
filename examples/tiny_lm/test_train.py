"""Training ``TinyLM`` on CPU: the loss falls, and "xla" and "pallas" train alike."""

import math

import numpy as np
import pytest

from examples.tiny_lm import data, train

STEPS = 40


@pytest.fixture(scope="module")
def losses():
    runs = {
        backend: train.fit(train.make_model(backend=backend), steps=STEPS)
        for backend in ("xla", "pallas")  # "pallas" runs the kernels in interpret mode here.
    }
    runs["xla fused"] = train.fit(train.make_model(backend="xla"), steps=STEPS, fused_loss=True)
    return runs


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_loss_falls(losses, backend):
    curve = losses[backend]
    assert len(curve) == STEPS and all(math.isfinite(x) for x in curve)
    # From about ln(64) ~ 4.2 plus the initial logits' spread, to well under half of it:
    # the model has learned the corpus' character statistics.
    assert np.mean(curve[-5:]) < 0.6 * curve[0], curve


def test_backends_give_the_same_losses(losses):
    # The forward is bit-identical across backends. The table gradients differ in
    # float32 rounding: XLA may add the lookup's scatter straight into the tied
    # projection's gradient, the kernel sums it apart first. Adam carries such
    # last-bit differences forward; measured over these 40 steps: at most 2.3e-7
    # relative (from step 3 on). 1e-5 leaves a 40x margin for other XLA versions
    # and stays far below the loss's change per step (~1e-2).
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    assert losses["pallas"][0] == losses["xla"][0]  # Same model, same first batch.


def test_fused_loss_gives_the_same_curve(losses):
    # MyEmbed.attend_cross_entropy against logits + optax: the same float32 loss, its
    # sums in another order (blocks, online log-sum-exp). Measured over these 40
    # steps: at most 2.3e-7 relative; 1e-5 as above, far below the change per step.
    np.testing.assert_allclose(losses["xla fused"], losses["xla"], rtol=1e-5)


def test_loss_curve_is_printable(losses):
    text = train.loss_curve(losses["xla"], every=10)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "loss"]
    assert [int(line.split()[0]) for line in lines[1:-1]] == [0, 10, 20, 30, STEPS - 1]
    assert len(lines[-1].split()[1]) == STEPS  # One spark per step for short runs.


def test_batches_are_deterministic_next_token_pairs():
    first = next(data.batches(8, 32, seed=3))
    again = next(data.batches(8, 32, seed=3))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[0][:, 1:], first[1][:, :-1])
    assert first[0].shape == (8, 32) and first[0].max() < data.VOCAB_SIZE
