"""Train ``TinyLM`` on the shipped corpus with optax Adam; print the loss curve.

    bazel run //examples/tiny_lm:train -- --backend=pallas --steps=200

Uses only ``//embed``'s public API (through ``model.py``), as another team's target would.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from embed import BACKENDS
from examples.tiny_lm import data, model

_SPARKS = "▁▂▃▄▅▆▇█"


def make_model(
    *,
    backend: str = "auto",
    deterministic: bool = False,
    d_model: int = 32,
    seq_len: int = 32,
    seed: int = 0,
) -> model.TinyLM:
    return model.TinyLM(
        data.VOCAB_SIZE,
        d_model,
        nnx.Rngs(seed),
        max_len=seq_len,
        backend=backend,
        deterministic=deterministic,
    )


def fit(
    lm: model.TinyLM,
    *,
    steps: int,
    batch_size: int = 8,
    seq_len: int = 32,
    learning_rate: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    fused_loss: bool = False,
) -> list[float]:
    """Trains ``lm`` in place for ``steps`` Adam steps; returns the loss before each step.

    ``fused_loss``: take the loss from ``MyEmbed.attend_cross_entropy`` (no logits array).
    """
    optimizer = nnx.Optimizer(lm, optax.adam(learning_rate), wrt=nnx.Param)
    loss_fn = functools.partial(model.loss_fn, fused=fused_loss)

    @nnx.jit
    def step(lm, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(lm, inputs, targets)
        optimizer.update(lm, grads)
        return loss

    losses = []
    batches = data.batches(batch_size, seq_len, seed=seed)
    with tqdm.tqdm(total=steps, disable=not progress, unit="step") as bar:
        for _ in range(steps):
            inputs, targets = next(batches)
            losses.append(float(step(lm, optimizer, jnp.asarray(inputs), jnp.asarray(targets))))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    return losses


def loss_curve(losses: list[float], every: int) -> str:
    """A text table of the loss every ``every`` steps, and a sparkline of the whole run."""
    # The sparkline shows the mean of each of at most 60 equal chunks of the run.
    chunks = np.array_split(np.asarray(losses), min(len(losses), 60))
    means = [float(chunk.mean()) for chunk in chunks]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    spark = "".join(_SPARKS[round((x - lo) / span * (len(_SPARKS) - 1))] for x in means)
    rows = [f"{'step':>6}  {'loss':>7}"]
    rows += [f"{i:>6}  {losses[i]:>7.4f}" for i in range(0, len(losses), every)]
    if (len(losses) - 1) % every:
        rows.append(f"{len(losses) - 1:>6}  {losses[-1]:>7.4f}")
    return "\n".join([*rows, f"{lo:.3f} {spark} {hi:.3f}"])


def sample(lm: model.TinyLM, length: int, seq_len: int) -> str:
    """Greedy continuation of the corpus' first ``seq_len`` characters (one shape, one jit)."""
    forward = nnx.jit(lambda lm, ids: jnp.argmax(lm(ids)[0, -1, : len(data.CHARS)]))
    ids = list(data.encode(data.CORPUS[:seq_len]))
    for _ in range(length):
        ids.append(int(forward(lm, jnp.asarray([ids[-seq_len:]], jnp.int32))))
    return data.decode(ids[seq_len:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument(
        "--deterministic", action="store_true", help="bit-reproducible embedding gradient"
    )
    parser.add_argument(
        "--fused-loss",
        action="store_true",
        help="take the loss from MyEmbed.attend_cross_entropy, without the logits array",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lm = make_model(
        backend=args.backend,
        deterministic=args.deterministic,
        d_model=args.d_model,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    loss = "fused" if args.fused_loss else "logits + optax"
    print(f"backend={args.backend} on {jax.default_backend()}, steps={args.steps}, loss: {loss}")
    losses = fit(
        lm,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=True,
        fused_loss=args.fused_loss,
    )
    print(loss_curve(losses, args.every))
    print(f"after {data.CORPUS[: args.seq_len]!r}: {sample(lm, 40, args.seq_len)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
