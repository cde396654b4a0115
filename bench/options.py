"""The benchmarks' names and flags, with no JAX import.

One definition of each, read by the benchmarks (``bench/``) and by ``tools/gpu_check``,
which builds its benchmark command line with :func:`lookup_argv` and must run where
JAX does not start.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

PROVIDERS = ("xla", "xla_take", "xla_rows", "one_hot", "pallas", "triton", "mosaic", "copy")
# XLA's own formulations of the gather, and the copy ceiling: the other providers are
# this project's kernels.
XLA_PROVIDERS = ("xla", "xla_take", "xla_rows", "one_hot", "copy")
KERNELS = tuple(p for p in PROVIDERS if p not in XLA_PROVIDERS)
# Providers that run in an interpreter off GPU: a correctness path, not a speed figure.
INTERPRETED = ("pallas", "mosaic")
PASSES = ("fwd", "bwd", "fwd+bwd")
ID_DISTRIBUTIONS = ("uniform", "zipf")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
GRIDS = ("quick", "full", "gpu")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"B,T,D,V"`` -> ``(B, T, D, V)``, four positive integers."""
    try:
        b, t, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text=} must be B,T,D,V (four integers)") from None
    if min(b, t, d, v) < 1:
        raise argparse.ArgumentTypeError(f"{text=} must have positive sizes")
    return b, t, d, v


def add_shape_args(p: argparse.ArgumentParser, *, repeats: int = 10) -> None:
    """The flags every benchmark shares: which shapes, and how many timed rounds."""
    p.add_argument("--grid", choices=GRIDS, default="quick")
    p.add_argument("--shape", type=parse_shape, action="append", help="B,T,D,V (repeatable)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, action="append", help="(repeatable)")
    p.add_argument(
        "--ids",
        choices=(*ID_DISTRIBUTIONS, "both"),
        help="id distribution (default: the quick grid's own; uniform otherwise)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)


def lookup_parser() -> argparse.ArgumentParser:
    """The main job's flags (``bench.lookup``, ``//tools:benchmark``)."""
    p = argparse.ArgumentParser(
        prog="bench.lookup",
        description="Time every embedding backend against xla and a device copy.",
    )
    add_shape_args(p)
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated")
    p.add_argument(
        "--interpret-repeats", type=int, default=2, help="repeats for interpreted Pallas"
    )
    p.add_argument("--csv", metavar="PATH")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG of GB/s against bytes")
    p.add_argument("--choose", action="store_true", help='print what "auto" picks, and why')
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="stop starting new shapes once the next would end past S seconds; the "
        "shapes left are reported as skipped (tools/gpu_check's time limit)",
    )
    p.add_argument(
        "--sharded",
        type=int,
        metavar="N",
        help="also time embed.parallel's layouts on N devices (on a CPU host: N simulated "
        "host devices, labelled CPU-simulated); alone: python -m bench.sharded",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="instead of the grid: time eager calls of MyEmbed in every mode against "
        "flax.nnx.Embed (default shapes: ids (1, 8) and (1, 2048), D=768, V=50257; "
        "--shape overrides them); alone: python -m bench.eager",
    )
    p.add_argument("--eager-repeats", type=int, default=200, help="calls timed per layer")
    p.add_argument(
        "--tied-loss",
        action="store_true",
        help="also time embed.attend_cross_entropy against the naive logits + "
        "cross-entropy at each shape (B*T tokens, vocabulary V), with compiled memory; "
        "alone: python -m bench.tied_loss",
    )
    return p


def parse_lookup_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = lookup_parser()
    args = p.parse_args(argv)
    for name, allowed in (("providers", PROVIDERS), ("passes", PASSES)):
        values = [x for x in getattr(args, name).split(",") if x]
        bad = [x for x in values if x not in allowed]
        if bad or not values:
            p.error(f"--{name}={getattr(args, name)} must be a comma-separated subset of {allowed}")
        setattr(args, name, values)
    if "copy" not in args.providers or "xla" not in args.providers:
        # Every ratio needs both references from the same run.
        args.providers = list(dict.fromkeys(["xla", *args.providers, "copy"]))
    return args


def lookup_argv(**options) -> list[str]:
    """The main job's command line for ``options`` named as its parser's destinations.

    ``lookup_argv(grid="gpu", passes=("fwd", "bwd"), choose=True)`` ->
    ``["--grid=gpu", "--passes=fwd,bwd", "--choose"]``. A name the parser does not know
    is a ``ValueError``, and the result is parsed once, so a renamed flag fails here.
    """
    actions = {a.dest: a for a in lookup_parser()._actions if a.option_strings}
    argv = []
    for dest, value in options.items():
        if dest not in actions:
            raise ValueError(f"{dest=} must be one of the benchmark's flags: {sorted(actions)}")
        flag = actions[dest].option_strings[-1]
        if isinstance(actions[dest], argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(actions[dest], argparse._AppendAction):
            argv += [f"{flag}={_text(v)}" for v in value]
        elif value is not None:
            argv.append(f"{flag}={_text(value)}")
    parse_lookup_args(argv)
    return argv


def _text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return format(value, "g") if isinstance(value, float) else str(value)
