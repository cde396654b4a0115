"""Embedding lookup benchmark: every backend against XLA and against a device copy.

``python -m bench.lookup [flags]`` (``bazel run //tools:benchmark -- [flags]``, or
``python tools/benchmark.py [flags]``) answers three questions for a grid of shapes and
dtypes: how fast each path is, how close it gets to the bandwidth ceiling (a device copy
of the same number of bytes, timed in the same run), and which backend ``"auto"`` would
pick (``--choose``).

Providers (each skipped, with the reason printed, where it cannot run):
  * ``xla``: ``embed.lookup(..., backend="xla")``, i.e. ``table[ids]``.
  * ``xla_take``: ``jnp.take(table, wrapped_ids, axis=0, mode="clip")``; ``mode="clip"``
    alone clamps negative ids to row 0, so ids are wrapped once first (the layer's
    semantics).
  * ``xla_rows``: the row gather written as ``lax.gather`` of whole rows with explicit
    dimension numbers on ids already wrapped and clamped, ``mode=PROMISE_IN_BOUNDS``
    (no clamp in the gather itself). The candidate for ``"auto"`` on CPU.
  * ``one_hot``: ``one_hot(ids, V) @ table``, only where ``T * V <= 2**23`` and
    ``T * V * D <= 2**33``.
  * ``pallas``: ``embed.lookup(..., backend="pallas")``; off GPU it runs in the Pallas
    interpreter, is labelled ``pallas (interpret)`` and is kept out of every ratio.
  * ``triton``: ``embed.lookup(..., backend="triton")``; CUDA only.
  * ``mosaic``: ``embed.lookup(..., backend="mosaic")`` (Pallas on Mosaic GPU, JAX >= 0.11);
    off GPU it runs in the Mosaic GPU interpreter, is labelled ``mosaic (interpret)``,
    is kept out of every ratio, and runs only shapes with ``T*D <= 2**16`` (the
    interpreter simulates every row copy: larger shapes take minutes).
  * ``copy``: a device copy moving the same number of bytes as the pass being timed:
    the ceiling each ``vs_copy`` ratio is taken against (bench/harness.py counts them).

Passes: ``fwd`` (the rows), ``bwd`` (the table gradient: the VJP of the lookup applied
to a fixed cotangent; the forward is dead code there and XLA drops it) and ``fwd+bwd``
(rows and table gradient from one ``jax.vjp``).

Every ratio is taken within one run, over interleaved repeats: ``vs_xla`` = provider
time / ``xla`` time of the same shape and pass, ``vs_copy`` = achieved GB/s / ``copy``
GB/s. ``--sharded``, ``--eager`` and ``--tied-loss`` add the reports of
``bench.sharded``, ``bench.eager`` (instead of the grid) and ``bench.tied_loss``.

Example:
    python -m bench.lookup                      # quick grid, ~1 minute on 2 CPU cores
    python -m bench.lookup --shape 1,2048,4096,32000 --providers xla,xla_rows,copy
    python -m bench.lookup --grid full --ids both --csv out.csv --plot out.png
    python -m bench.lookup --grid gpu --passes fwd,bwd --choose --max-seconds 150
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench import harness
from bench.harness import Shape
from bench.options import INTERPRETED, parse_lookup_args

ONE_HOT_MAX_ELEMENTS = 2**23
ONE_HOT_MAX_MACS = 2**33
MOSAIC_INTERPRET_MAX_ELEMENTS = 2**16
CSV_COLUMNS = (
    "timestamp",
    "device",
    "platform",
    "jax",
    "jaxlib",
    "triton",
    "provider",
    "label",
    "pass",
    "batch",
    "seq_len",
    "d_model",
    "vocab_size",
    "dtype",
    "ids",
    "num_tokens",
    "bytes",
    "status",
    "reason",
    "in_comparison",
    "matches_xla",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "vs_xla",
    "vs_copy",
)

# --- Providers: each is (table [V, D], ids [T] int32) -> rows [T, D] ---------------------


def _xla_take(table, ids):
    # mode="clip" clamps a negative id to row 0; wrap once first, as the layer does.
    wrapped = jnp.where(ids < 0, ids + table.shape[0], ids)
    return jnp.take(table, wrapped, axis=0, mode="clip")


_ROW_GATHER = lax.GatherDimensionNumbers(
    offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,)
)


def _xla_rows(table, ids):
    rows = harness.wrap_and_clamp(ids, table.shape[0])
    return lax.gather(
        table,
        rows[:, None],
        _ROW_GATHER,
        (1, table.shape[1]),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def _one_hot(table, ids):
    rows = harness.wrap_and_clamp(ids, table.shape[0])
    one_hot = jax.nn.one_hot(rows, table.shape[0], dtype=table.dtype)
    return jnp.matmul(one_hot, table, precision=lax.Precision.HIGHEST)


def _backend(name: str) -> Callable:
    def gather(table, ids):
        return harness.lookup(table, ids, backend=name)

    return gather


GATHERS = {
    "xla": _backend("xla"),
    "xla_take": _xla_take,
    "xla_rows": _xla_rows,
    "one_hot": _one_hot,
    "pallas": _backend("pallas"),
    "triton": _backend("triton"),
    "mosaic": _backend("mosaic"),
}


def provider_label(provider: str, platform: str) -> str:
    if provider in INTERPRETED and platform != "gpu":
        return f"{provider} (interpret)"
    if provider == "xla_take":
        return "xla_take (mode=clip)"
    if provider == "xla_rows":
        return "xla_rows (promise_in_bounds)"
    return provider


def in_comparison(provider: str, platform: str) -> bool:
    """Interpreted Pallas (on Triton or Mosaic GPU) is a correctness path, not a speed figure."""
    return not (provider in INTERPRETED and platform != "gpu")


def skip_reason(provider: str, shape: Shape, platform: str) -> str | None:
    """Why ``provider`` cannot run ``shape`` here, or None."""
    if provider == "one_hot" and shape.num_tokens * shape.vocab_size > ONE_HOT_MAX_ELEMENTS:
        return f"T*V={shape.num_tokens * shape.vocab_size} > 2**23: one-hot matmul too large"
    macs = shape.num_tokens * shape.vocab_size * shape.d_model
    if provider == "one_hot" and macs > ONE_HOT_MAX_MACS:
        return f"T*V*D={macs} > 2**33: one-hot matmul too slow"
    if provider == "mosaic":
        if problem := harness.backend_problem("mosaic"):
            return problem
        elements = shape.num_tokens * shape.d_model
        if platform != "gpu" and elements > MOSAIC_INTERPRET_MAX_ELEMENTS:
            return f"T*D={elements} > 2**16: too slow in the Mosaic GPU interpreter"
    if provider == "triton":
        if platform != "gpu":
            return f"needs a CUDA GPU (platform is {platform})"
        return harness.backend_problem("triton")
    return None


def _pass_fn(gather: Callable, pass_: str) -> Callable:
    if pass_ == "fwd":
        return gather

    def vjp(table, ids, cotangent):
        rows, pullback = jax.vjp(lambda t: gather(t, ids), table)
        (grad,) = pullback(cotangent)
        return grad if pass_ == "bwd" else (rows, grad)

    return vjp


# --- Measuring one shape -----------------------------------------------------------------


@dataclasses.dataclass
class Case:
    provider: str
    pass_: str
    fn: Callable | None
    args: tuple
    skip: str | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    matches_xla: bool | None = None


def _build_cases(
    shape: Shape, providers: Sequence[str], passes: Sequence[str], platform: str
) -> list[Case]:
    dtype = harness.DTYPES[shape.dtype]
    t, d, v = shape.num_tokens, shape.d_model, shape.vocab_size
    table = jax.random.normal(jax.random.key(0), (v, d), dtype)
    ids = jnp.asarray(harness.make_ids(shape))
    cotangent = jax.random.normal(jax.random.key(1), (t, d), dtype)
    cases = []
    for pass_ in passes:
        for provider in providers:
            if provider == "copy":
                fn, args = harness.copy_case(harness.bytes_moved(shape, pass_), d, dtype)
                cases.append(Case(provider, pass_, fn, args))
                continue
            reason = skip_reason(provider, shape, platform)
            fn = None if reason else jax.jit(_pass_fn(GATHERS[provider], pass_))
            args = (table, ids) if pass_ == "fwd" else (table, ids, cotangent)
            cases.append(Case(provider, pass_, fn, args, skip=reason))
    return cases


def measure_shape(
    shape: Shape,
    *,
    providers: Sequence[str],
    passes: Sequence[str],
    platform: str,
    warmup: int,
    repeats: int,
    interpret_repeats: int,
) -> list[Case]:
    """Times every (provider, pass) of ``shape``, interleaving the repeats."""
    cases = _build_cases(shape, providers, passes, platform)
    live = [c for c in cases if c.skip is None]
    reference, results = {}, {}
    for case in live:
        try:
            results[id(case)] = harness.call(case.fn, case.args)  # Compiles.
        except Exception as e:  # A provider that fails here is skipped, with the reason.
            case.skip, case.fn = f"failed: {type(e).__name__}: {str(e)[:200]}", None
            continue
        if case.provider == "xla":
            reference[case.pass_] = results[id(case)]
    for case in live:
        if case.fn is not None and case.provider != "copy" and case.pass_ in reference:
            # The backward sums repeated ids in an unspecified order: bit equality is
            # checked on the forward; other passes are reported as compared.
            case.matches_xla = harness.same_bits(results[id(case)], reference[case.pass_])
    results.clear()
    live = [c for c in live if c.fn is not None]
    timed = [c for c in live if in_comparison(c.provider, platform)]
    slow = [c for c in live if not in_comparison(c.provider, platform)]
    rng = np.random.default_rng(0)
    harness.timed_rounds([_caller(c) for c in live], warmup, rng)  # Warm-up.
    for group, rounds in ((timed, repeats), (slow, interpret_repeats)):
        times = harness.timed_rounds([_caller(c) for c in group], rounds, rng)
        for case, samples in zip(group, times, strict=True):
            case.times.extend(samples)
    return cases


def _caller(case: Case) -> Callable:
    return functools.partial(harness.call, case.fn, case.args)


def rows_for_shape(shape: Shape, cases: list[Case], platform: str, meta: dict) -> list[dict]:
    """One row per (provider, pass), with every ratio taken within this run."""
    rows = []
    for case in cases:
        nbytes = harness.bytes_moved(shape, case.pass_)
        row = dict(meta)
        row.update(
            provider=case.provider,
            label=provider_label(case.provider, platform),
            batch=shape.batch,
            seq_len=shape.seq_len,
            d_model=shape.d_model,
            vocab_size=shape.vocab_size,
            dtype=shape.dtype,
            ids=shape.ids,
            num_tokens=shape.num_tokens,
            bytes=nbytes,
            status="skipped" if case.skip else "ok",
            reason=case.skip or "",
            in_comparison=in_comparison(case.provider, platform),
            matches_xla=case.matches_xla,
            median_ms=None,
            p20_ms=None,
            p80_ms=None,
            gbps=None,
            vs_xla=None,
            vs_copy=None,
        )
        row["pass"] = case.pass_
        if case.times:
            median_ms, p20_ms, p80_ms = harness.percentiles(case.times)
            row.update(
                median_ms=median_ms,
                p20_ms=p20_ms,
                p80_ms=p80_ms,
                gbps=nbytes / median_ms / 1e6,
            )
        rows.append(row)
    medians = {(r["provider"], r["pass"]): r["median_ms"] for r in rows}
    for row in rows:
        if row["median_ms"] is None or not row["in_comparison"]:
            continue
        xla = medians.get(("xla", row["pass"]))
        copy = medians.get(("copy", row["pass"]))
        if xla and row["provider"] != "copy":
            row["vs_xla"] = row["median_ms"] / xla
        if copy:
            # Same bytes on both sides: the GB/s ratio is the inverse time ratio.
            row["vs_copy"] = copy / row["median_ms"]
    return rows


# --- What it prints ----------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'shape':<44} {'pass':<8} {'provider':<29} {'median ms':>10} {'p20':>9} "
        f"{'p80':>9} {'GB/s':>7} {'vs xla':>7} {'vs copy':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = (
            f"B={r['batch']} T={r['seq_len']} D={r['d_model']} V={r['vocab_size']} "
            f"{r['dtype']} {r['ids']}"
        )
        if r["status"] == "skipped":
            note = f"skipped: {r['reason']}"
        elif not r["in_comparison"]:
            note = "not a speed figure (interpreted)"
        elif r["matches_xla"] is False and r["pass"] == "fwd":
            note = "NOT bit-identical to xla"
        else:
            note = ""
        lines.append(
            f"{shape:<44} {r['pass']:<8} {r['label']:<29} {_fmt(r['median_ms'], '10.3f')} "
            f"{_fmt(r['p20_ms'], '9.3f')} {_fmt(r['p80_ms'], '9.3f')} "
            f"{_fmt(r['gbps'], '7.2f')} {_fmt(r['vs_xla'], '7.2f')} "
            f"{_fmt(r['vs_copy'], '7.2f')}  {note}".rstrip()
        )
    return "\n".join(lines)


def choose_report(rows: list[dict], platform: str) -> str:
    """Per shape: what ``"auto"`` picks on ``platform``, and the measured ratios behind it."""
    pick = harness.backend_for("auto", platform)
    lines = [f'"auto" on {platform} lowers to backend "{pick}" (embed.backend_for)']
    keyed = {}
    for r in rows:
        key = (r["batch"], r["seq_len"], r["d_model"], r["vocab_size"], r["dtype"], r["ids"])
        keyed.setdefault(key, []).append(r)
    for key, group in keyed.items():
        fwd = [
            r
            for r in group
            if r["pass"] == "fwd" and r["median_ms"] is not None and r["in_comparison"]
        ]
        fwd = [r for r in fwd if r["provider"] != "copy"]
        chosen = next((r for r in fwd if r["provider"] == pick), None)
        best = min(fwd, key=lambda r: r["median_ms"], default=None)
        b, t, d, v, dtype, ids = key
        head = f"  B={b} T={t} D={d} V={v} {dtype} {ids}: auto -> {pick}"
        if chosen is None or best is None:
            lines.append(f"{head}; not measured in this run")
            continue
        why = f"{chosen['gbps']:.2f} GB/s fwd = {chosen['vs_copy']:.2f}x copy"
        if best["provider"] == pick:
            why += ", fastest measured"
        else:
            why += (
                f"; fastest measured is {best['label']} at "
                f"{chosen['median_ms'] / best['median_ms']:.2f}x less time"
            )
        lines.append(f"{head} ({why})")
    return "\n".join(lines)


# --- The main job ------------------------------------------------------------------------


def run_grid(shapes: Sequence[Shape], args, platform: str, meta: dict) -> list[dict]:
    """Measures each shape in turn, skipping those past ``--max-seconds``."""
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(shapes), file=sys.stderr, unit="shape", leave=False)
    rows = []
    start, slowest = time.monotonic(), 0.0
    for shape in shapes:
        if progress is not None:
            progress.set_description(str(shape))
        shape_start = time.monotonic()
        if args.max_seconds is not None and shape_start + slowest - start > args.max_seconds:
            reason = f"time budget: --max-seconds {args.max_seconds:g} reached"
            cases = [Case(p, q, None, (), skip=reason) for q in args.passes for p in args.providers]
            rows.extend(rows_for_shape(shape, cases, platform, meta))
            continue
        cases = measure_shape(
            shape,
            providers=args.providers,
            passes=args.passes,
            platform=platform,
            warmup=args.warmup,
            repeats=args.repeats,
            interpret_repeats=args.interpret_repeats,
        )
        meta["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        rows.extend(rows_for_shape(shape, cases, platform, meta))
        slowest = max(slowest, time.monotonic() - shape_start)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the benchmark; returns the rows it printed and wrote."""
    args = parse_lookup_args(argv)
    shapes = harness.shapes_from_args(args)
    if args.sharded:
        from bench import sharded

        sharded.simulate_host_devices(args.sharded)  # Before JAX starts its backends.
    device = jax.devices()[0]
    platform = device.platform
    meta = {"timestamp": "", "device": device.device_kind, "platform": platform}
    meta.update(harness.versions())
    print(
        f"device: {device.device_kind} ({platform}); "
        + ", ".join(f"{k} {meta[k] or '-'}" for k in ("jax", "jaxlib", "triton")),
        flush=True,
    )
    if platform == "cpu" and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", ""):
        print(
            "note: on CPU, large outputs are fresh mmap'd pages that fault on every call; "
            "GLIBC_TUNABLES (docs/benchmarks.md) made xla 3-5x faster here.",
            flush=True,
        )
    interpreted = [] if args.eager or platform == "gpu" else INTERPRETED
    for provider in (p for p in interpreted if p in args.providers):
        print(
            f"note: {provider} runs in its interpreter here; it is labelled "
            f'"{provider} (interpret)" and kept out of every ratio: not a GPU figure.',
            flush=True,
        )
    if args.eager:
        from bench import eager

        text, eager_rows = eager.report(
            args.shape or eager.SHAPES, warmup=args.warmup, repeats=args.eager_repeats
        )
        print(text)
        return eager_rows
    rows = run_grid(shapes, args, platform, meta)
    print(format_table(rows))
    skipped = {(r["label"], r["reason"]) for r in rows if r["status"] == "skipped"}
    for label, reason in sorted(skipped):
        print(f"skipped {label}: {reason}")
    if args.choose:
        print(choose_report(rows, platform))
    if args.csv:
        harness.write_csv(rows, args.csv, CSV_COLUMNS)
    if args.json:
        harness.write_json(rows, args.json, CSV_COLUMNS)
    if args.plot:
        harness.write_plot(rows, args.plot)
    if args.sharded:
        from bench import sharded

        print(sharded.report(shapes, args.sharded, warmup=args.warmup, repeats=args.repeats))
    if args.tied_loss:
        from bench import tied_loss

        print(tied_loss.report(shapes, warmup=args.warmup, repeats=args.repeats)[0])
    return rows


if __name__ == "__main__":
    main()
