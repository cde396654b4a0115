"""The tied output projection's loss: ``embed.attend_cross_entropy`` against the naive form.

Naive = ``[T, V]`` logits, then optax's cross-entropy; fused = the blocked tied head and
cross-entropy. Both run per pass (``fwd`` = the loss; ``fwd+bwd`` = the loss and both
gradients), interleaved in one run, with the compiled program's memory
(``memory_analysis``) and the largest relative difference of the fused outputs from
naive's.

    python -m bench.tied_loss --shape 1,1024,512,32768 [--dtype bfloat16]
    python -m bench.lookup --tied-loss ...      # after the lookup grid, same shapes
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from bench import harness
from bench.harness import Shape
from bench.options import add_shape_args

PROVIDERS = ("naive", "fused")
PASSES = ("fwd", "fwd+bwd")


def _loss_fn(provider: str, pass_: str) -> Callable:
    """``(table, hidden, targets) -> loss`` (``fwd``) or ``(loss, d table, d hidden)``."""
    loss = {
        "naive": harness.attend_cross_entropy_reference,  # [T, V] logits, then optax's form
        "fused": harness.attend_cross_entropy,
    }[provider]
    if pass_ == "fwd":
        return loss

    def value_and_grads(table, hidden, targets):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(table, hidden, targets)
        return value, *grads

    return value_and_grads


def measure(shape: Shape, *, warmup: int, repeats: int) -> list[dict]:
    """Times ``naive`` and ``fused`` per pass, interleaved; adds their compiled memory.

    ``vs_naive`` = fused time / naive time of the same pass, in this run; ``rel_diff``
    = the largest relative difference of the fused outputs from naive's.
    """
    dtype = harness.DTYPES[shape.dtype]
    t, d, v = shape.num_tokens, shape.d_model, shape.vocab_size
    table = jax.random.normal(jax.random.key(0), (v, d), dtype)
    hidden = (jax.random.normal(jax.random.key(1), (t, d)) / math.sqrt(d)).astype(dtype)
    targets = jnp.asarray(harness.make_ids(shape))
    args = (table, hidden, targets)
    rows = []
    for pass_ in PASSES:
        compiled = {p: jax.jit(_loss_fn(p, pass_)).lower(*args).compile() for p in PROVIDERS}
        results = {p: harness.call(fn, args) for p, fn in compiled.items()}
        times = harness.time_fns(
            [(compiled[p], args) for p in PROVIDERS], warmup=warmup, repeats=repeats
        )
        naive_ms = harness.percentiles(times[0])[0]
        for provider, samples in zip(PROVIDERS, times, strict=True):
            median, p20, p80 = harness.percentiles(samples)
            peak, temp = harness.compiled_peak_bytes(compiled[provider])
            rows.append(
                dict(
                    shape=str(shape),
                    provider=provider,
                    pass_=pass_,
                    median_ms=median,
                    p20_ms=p20,
                    p80_ms=p80,
                    vs_naive=median / naive_ms,
                    peak_mb=peak / 1e6,
                    temp_mb=temp / 1e6,
                    rel_diff=harness.max_rel_diff(results[provider], results["naive"]),
                )
            )
    return rows


def report(shapes: Sequence[Shape], *, warmup: int, repeats: int) -> tuple[str, list[dict]]:
    """The printed report and its rows, per shape, pass and provider."""
    lines = [
        "tied output projection + cross-entropy: naive ([T, V] logits) vs fused "
        "(embed.attend_cross_entropy); median ms [p20, p80], vs naive = time ratio in this "
        "run; peak MB = arguments + outputs + temporaries of the compiled program "
        "(memory_analysis), temp MB = temporaries alone"
    ]
    rows = []
    for shape in shapes:
        for r in measure(shape, warmup=warmup, repeats=repeats):
            rows.append(r)
            lines.append(
                f"  {r['shape']:<44} {r['pass_']:<8} {r['provider']:<6} "
                f"{r['median_ms']:10.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]  "
                f"vs naive {r['vs_naive']:5.2f}x  peak {r['peak_mb']:9.1f} MB  "
                f"temp {r['temp_mb']:9.1f} MB  max rel diff {r['rel_diff']:.1e}"
            )
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.tied_loss", description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    args = p.parse_args(argv)
    text, rows = report(harness.shapes_from_args(args), warmup=args.warmup, repeats=args.repeats)
    print(text)
    return rows


if __name__ == "__main__":
    main()
