"""Sharded lookups: each mesh layout of ``embed.parallel`` against one device's lookup.

Each layout (vocab-, model- and data-parallel) runs over a 1-D mesh of ``N`` devices,
forward and forward plus table gradient, interleaved with the unsharded ``xla`` lookup
on one device; ``vs 1 device`` = sharded time / unsharded time, same run. On a CPU host
the ``N`` devices are host devices simulated by ``--xla_force_host_platform_device_count``
and labelled ``CPU-simulated``: they show the mechanism runs, not what a GPU mesh does.

    python -m bench.sharded --devices 8 --shape 4,512,256,8192
    python -m bench.lookup --sharded 8 ...      # after the lookup grid, same shapes
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench import harness
from bench.harness import Shape
from bench.options import add_shape_args


def simulate_host_devices(n: int) -> None:
    """Asks for ``n`` host CPU devices, unless XLA_FLAGS already says how many.

    XLA reads the flag when JAX starts its backends, so call this before anything asks
    for a device. It only affects the CPU backend: on a GPU host the GPUs are the devices.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        flag = f"--xla_force_host_platform_device_count={n}"
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def timing_case(
    layout: str,
    *,
    vocab_size: int,
    d_model: int,
    num_tokens: int,
    dtype=jnp.float32,
    backend: str = "auto",
    num_devices: int | None = None,
    grad: bool = False,
    seed: int = 0,
) -> tuple[Callable, tuple, str]:
    """A jitted sharded lookup over a 1-D mesh of ``num_devices``, its inputs, a label.

    ``fn(*args)`` runs one lookup (or, with ``grad=True``, one forward plus table
    gradient); the inputs are already placed as the layout wants them. The label says
    ``CPU-simulated`` when the devices are host CPU devices, whose timings say nothing
    about GPUs.
    """
    harness.check_layout(layout)
    devices = jax.devices()[: num_devices or jax.device_count()]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("shard",))
    keys = jax.random.split(jax.random.key(seed))
    table = jax.random.normal(keys[0], (vocab_size, d_model), dtype)
    ids = jax.random.randint(keys[1], (num_tokens,), 0, vocab_size, jnp.int32)
    table_spec = {"vocab": P("shard", None), "model": P(None, "shard"), "data": P()}[layout]
    ids_spec = P("shard") if layout == "data" and num_tokens % len(devices) == 0 else P()
    table = jax.device_put(table, NamedSharding(mesh, table_spec))
    ids = jax.device_put(ids, NamedSharding(mesh, ids_spec))
    lookup = functools.partial(
        harness.sharded_lookup, mesh=mesh, layout=layout, axis_name="shard", backend=backend
    )
    if grad:
        fn = jax.jit(jax.value_and_grad(lambda t, i: lookup(t, i).astype(jnp.float32).sum()))
    else:
        fn = jax.jit(lookup)
    platform = devices[0].platform
    where = "CPU-simulated" if platform == "cpu" else platform.upper()
    label = f"{layout}-parallel x{len(devices)} ({where}, backend={backend})"
    return fn, (table, ids), label


def report(shapes: Sequence[Shape], num_devices: int, *, warmup: int, repeats: int) -> str:
    """Times each mesh layout against one device's ``xla`` lookup, per shape and pass."""
    lines = [
        f"sharded lookups on {num_devices} devices (median ms [p20, p80]; vs 1 device = "
        "sharded time / unsharded xla time, same run)"
    ]
    for shape in shapes:
        common = dict(vocab_size=shape.vocab_size, d_model=shape.d_model)
        common.update(num_tokens=shape.num_tokens, dtype=harness.DTYPES[shape.dtype])
        for grad in (False, True):
            one = timing_case("data", num_devices=1, grad=grad, backend="xla", **common)
            cases = [one] + [
                timing_case(layout, num_devices=num_devices, grad=grad, **common)
                for layout in harness.LAYOUTS
            ]
            times = harness.time_fns(
                [(fn, args) for fn, args, _ in cases], warmup=warmup, repeats=repeats
            )
            base = harness.percentiles(times[0])[0]
            pass_ = "fwd+bwd" if grad else "fwd"
            for (_, _, label), samples in zip(cases, times, strict=True):
                median, p20, p80 = harness.percentiles(samples)
                lines.append(
                    f"  {shape!s:<44} {pass_:<8} {label:<58} {median:9.3f} "
                    f"[{p20:.3f}, {p80:.3f}]  vs 1 device {median / base:5.2f}x"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="bench.sharded", description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--devices", type=int, required=True, metavar="N", help="devices in the mesh")
    args = p.parse_args(argv)
    if args.devices < 1:
        p.error(f"--devices={args.devices} must be positive")
    simulate_host_devices(args.devices)
    text = report(
        harness.shapes_from_args(args), args.devices, warmup=args.warmup, repeats=args.repeats
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
