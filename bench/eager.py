"""Eager (un-jitted) calls of ``MyEmbed`` in every mode against ``flax.nnx.Embed``.

The cost a user sees in a notebook, an inference loop or a data pipeline. All layers
hold the same float32 table and take the same int32 ids, uniform in ``[0, V)`` so every
mode returns ``nnx.Embed``'s rows (checked bit for bit); the calls are interleaved in
one run, and ``vs nnx`` = median time / ``nnx.Embed``'s.

    python -m bench.eager [--shape B,T,D,V ...] [--repeats 200]
    python -m bench.lookup --eager             # the same, from the main job's flags
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bench import harness
from bench.harness import Shape
from bench.options import parse_shape

# GPT-2's vocabulary and width; a short and a long sequence.
SHAPES = ((1, 8, 768, 50257), (1, 2048, 768, 50257))


def report(
    shapes: Sequence[tuple[int, int, int, int]], *, warmup: int, repeats: int
) -> tuple[str, list[dict]]:
    """The printed report and its rows, one per layer and shape."""
    from flax import nnx

    device = jax.devices()[0]
    lines = [
        f"eager calls on {device.platform} ({device.device_kind}): median us [p20, p80] of "
        f"{repeats} calls each; vs nnx = time / nnx.Embed time, same run"
    ]
    rows = []
    for b, t, d, v in shapes:
        reference = nnx.Embed(v, d, rngs=nnx.Rngs(0))
        table = reference.embedding[...]
        layers = {"nnx.Embed": reference}
        for mode in harness.MODES:
            layer = harness.MyEmbed(v, d, nnx.Rngs(0), mode=mode)
            layer.embedding.set_value(table)
            layers[f"MyEmbed(mode={mode!r})"] = layer
        ids = jnp.asarray(harness.make_ids(Shape(b, t, d, v)).reshape(b, t))
        expected = harness.call(reference, (ids,))
        matches = {
            n: harness.same_bits(harness.call(f, (ids,)), expected) for n, f in layers.items()
        }
        # The warm-up rounds compile each layer's call.
        times = harness.time_fns(
            [(layer, (ids,)) for layer in layers.values()], warmup=warmup, repeats=repeats
        )
        base = harness.percentiles(times[0])[0]
        for name, samples in zip(layers, times, strict=True):
            median, p20, p80 = harness.percentiles(samples)
            rows.append(
                dict(
                    provider=name,
                    batch=b,
                    seq_len=t,
                    d_model=d,
                    vocab_size=v,
                    median_ms=median,
                    p20_ms=p20,
                    p80_ms=p80,
                    vs_nnx=median / base,
                    matches_nnx=matches[name],
                )
            )
            note = "" if matches[name] else "  NOT bit-identical to nnx.Embed"
            lines.append(
                f"  ids ({b}, {t}) D={d} V={v}  {name:<24} {median * 1e3:9.1f} "
                f"[{p20 * 1e3:.1f}, {p80 * 1e3:.1f}]  vs nnx {median / base:5.2f}x{note}"
            )
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.eager", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        help="B,T,D,V (repeatable; default: ids (1, 8) and (1, 2048), D=768, V=50257)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200, help="calls timed per layer")
    args = p.parse_args(argv)
    text, rows = report(args.shape or SHAPES, warmup=args.warmup, repeats=args.repeats)
    print(text)
    return rows


if __name__ == "__main__":
    main()
