"""Embedding lookup benchmark: every backend against XLA and against a device copy.

``bazel run //tools:benchmark -- [flags]`` (or ``python tools/benchmark.py [flags]``)
answers three questions for a grid of shapes and dtypes: how fast each path is, how
close it gets to the bandwidth ceiling (a device copy of the same number of bytes,
timed in the same run), and which backend ``"auto"`` would pick (``--choose``).

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
    the ceiling each ``vs_copy`` ratio is taken against.

Passes: ``fwd`` (the rows), ``bwd`` (the table gradient: the VJP of the lookup applied
to a fixed cotangent; the forward is dead code there and XLA drops it) and ``fwd+bwd``
(rows and table gradient from one ``jax.vjp``).

Bytes moved (``itemsize`` of the table's dtype, ``T`` tokens, ``D`` = d_model):
  * fwd: ids ``T*4`` + rows read ``T*D*itemsize`` + output written ``T*D*itemsize``.
  * bwd: ids ``T*4`` + gradient rows read ``T*D*itemsize`` + table-gradient rows
    written ``T*D*itemsize`` + the zero-initialised dense table gradient written
    ``V*D*itemsize`` (every backend must produce that dense ``[V, D]`` array).
  * fwd+bwd: the sum of the two.

Every ratio is taken within one run, over interleaved repeats (providers take turns in
a random order each round, so drift on a shared machine hits all of them alike):
``vs_xla`` = provider time / ``xla`` time of the same shape and pass, ``vs_copy`` =
achieved GB/s / ``copy`` GB/s.

``--eager`` times something else, instead of the grid: eager (un-jitted) calls of
``MyEmbed`` in every mode against ``flax.nnx.Embed`` holding the same table, the cost a
user sees in a notebook or a data pipeline (``eager_report``).

Example:
    python tools/benchmark.py                      # quick grid, ~1 minute on 2 CPU cores
    python tools/benchmark.py --shape 1,2048,4096,32000 --providers xla,xla_rows,copy
    python tools/benchmark.py --grid full --ids both --csv out.csv --plot out.png
    python tools/benchmark.py --grid gpu --passes fwd,bwd --choose --max-seconds 150
    python tools/benchmark.py --eager              # MyEmbed vs nnx.Embed, eager calls
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __package__ in (None, ""):
    # `python tools/benchmark.py` from a checkout: make the repo's packages importable
    # (Bazel's py_binary does this through the deps' imports).
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import embed  # noqa: E402
from kernels import compat  # noqa: E402
from kernels.reference import attend_cross_entropy_reference, wrap_and_clamp  # noqa: E402

PROVIDERS = ("xla", "xla_take", "xla_rows", "one_hot", "pallas", "triton", "mosaic", "copy")
PASSES = ("fwd", "bwd", "fwd+bwd")
ID_DISTRIBUTIONS = ("uniform", "zipf")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ONE_HOT_MAX_ELEMENTS = 2**23
ONE_HOT_MAX_MACS = 2**33
MOSAIC_INTERPRET_MAX_ELEMENTS = 2**16
ZIPF_A = 1.1
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


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point: ``batch * seq_len`` tokens into a ``[vocab_size, d_model]`` table."""

    batch: int
    seq_len: int
    d_model: int
    vocab_size: int
    dtype: str = "float32"
    ids: str = "uniform"

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def itemsize(self) -> int:
        return jnp.dtype(DTYPES[self.dtype]).itemsize

    def __str__(self) -> str:
        b, t, d, v = self.batch, self.seq_len, self.d_model, self.vocab_size
        return f"B={b} T={t} D={d} V={v} {self.dtype} {self.ids}"


# Small enough for the whole default run (all providers, all passes, interpreted Pallas
# included) to take about a minute on 2 CPU cores. The second shape has the wide rows of
# the CPU investigation (D=4096, 2048 tokens) with a smaller vocabulary, so that the
# dense table gradient stays small; docs/benchmarks.md runs V=32000 separately.
QUICK_GRID = (
    Shape(4, 512, 256, 8192, "float32", "uniform"),
    Shape(1, 2048, 4096, 4096, "float32", "uniform"),
    Shape(8, 256, 768, 4096, "bfloat16", "zipf"),
)
# The shapes other embedding benchmarks use, so the figures compare.
FULL_BTD = ((32, 512, 768), (8, 2048, 4096))
FULL_VOCAB = tuple(2**k for k in range(10, 18))
FULL_DTYPES = ("float32", "bfloat16")


def full_grid(id_distributions: Sequence[str]) -> list[Shape]:
    return [
        Shape(b, t, d, v, dtype, ids)
        for (b, t, d), v, dtype, ids in itertools.product(
            FULL_BTD, FULL_VOCAB, FULL_DTYPES, id_distributions
        )
    ]


# The GPU grid (``--grid gpu``, what tools/gpu_check runs): one axis at a time around a
# base shape of 8192 tokens, D=1024, V=32768; every point in float32 and bfloat16, the
# base and the extremes with Zipf ids too. It is ordered by priority, so that a run cut
# short by ``--max-seconds`` still has the base and the sweeps' first points.
GPU_BASE = (4, 2048, 1024, 32768)
GPU_D_MODELS = (64, 256, 1024, 4096, 8192)
GPU_BATCH_SEQ = ((1, 1024), (4, 2048), (16, 4096))  # 1024, 8192 and 65536 tokens.
GPU_VOCABS = (8192, 32768, 262144)


def gpu_grid(id_distributions: Sequence[str] = ID_DISTRIBUTIONS) -> list[Shape]:
    b0, t0, d0, v0 = GPU_BASE
    sweeps = [(b0, t0, d, v0) for d in GPU_D_MODELS]
    sweeps += [(b, t, d0, v0) for b, t in GPU_BATCH_SEQ]
    sweeps += [(b0, t0, d0, v) for v in GPU_VOCABS]
    (b_max, t_max), d_max, v_max = GPU_BATCH_SEQ[-1], GPU_D_MODELS[-1], GPU_VOCABS[-1]
    extremes = [(b0, t0, d_max, v0), (b_max, t_max, d0, v0), (b0, t0, d0, v_max)]
    shapes = [Shape(*GPU_BASE, dt, ids) for ids in ID_DISTRIBUTIONS for dt in FULL_DTYPES]
    shapes += [Shape(*p, dt, "uniform") for p in sweeps for dt in FULL_DTYPES]
    shapes += [Shape(*p, "bfloat16", "zipf") for p in extremes]
    return [s for s in dict.fromkeys(shapes) if s.ids in id_distributions]


def bytes_moved(shape: Shape, pass_: str) -> int:
    """Bytes a lookup pass must move at least; see the module docstring."""
    t, d, v, s = shape.num_tokens, shape.d_model, shape.vocab_size, shape.itemsize
    fwd = t * 4 + 2 * t * d * s
    bwd = t * 4 + 2 * t * d * s + v * d * s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def make_ids(shape: Shape, seed: int = 0) -> np.ndarray:
    """``num_tokens`` int32 ids in ``[0, V)``: uniform, or Zipf-skewed (``a=1.1`` mod V)."""
    rng = np.random.default_rng(seed)
    if shape.ids == "uniform":
        ids = rng.integers(0, shape.vocab_size, shape.num_tokens)
    elif shape.ids == "zipf":
        # Rank 1 is the most frequent id; a random permutation spreads the hot rows.
        ranks = rng.zipf(ZIPF_A, shape.num_tokens) - 1
        ids = rng.permutation(shape.vocab_size)[ranks % shape.vocab_size]
    else:
        raise ValueError(f"{shape.ids=} must be one of {ID_DISTRIBUTIONS}")
    return ids.astype(np.int32)


# Providers: each is (table [V, D], ids [T] int32) -> rows [T, D].


def _xla(table, ids):
    return embed.lookup(table, ids, backend="xla")


def _xla_take(table, ids):
    # mode="clip" clamps a negative id to row 0; wrap once first, as the layer does.
    wrapped = jnp.where(ids < 0, ids + table.shape[0], ids)
    return jnp.take(table, wrapped, axis=0, mode="clip")


_ROW_GATHER = lax.GatherDimensionNumbers(
    offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,)
)


def _xla_rows(table, ids):
    rows = wrap_and_clamp(ids, table.shape[0])
    return lax.gather(
        table,
        rows[:, None],
        _ROW_GATHER,
        (1, table.shape[1]),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def _one_hot(table, ids):
    rows = wrap_and_clamp(ids, table.shape[0])
    one_hot = jax.nn.one_hot(rows, table.shape[0], dtype=table.dtype)
    return jnp.matmul(one_hot, table, precision=lax.Precision.HIGHEST)


def _pallas(table, ids):
    return embed.lookup(table, ids, backend="pallas")


def _triton(table, ids):
    return embed.lookup(table, ids, backend="triton")


def _mosaic(table, ids):
    return embed.lookup(table, ids, backend="mosaic")


_GATHERS = {
    "xla": _xla,
    "xla_take": _xla_take,
    "xla_rows": _xla_rows,
    "one_hot": _one_hot,
    "pallas": _pallas,
    "triton": _triton,
    "mosaic": _mosaic,
}


def provider_label(provider: str, platform: str) -> str:
    if provider in INTERPRETED and platform != "gpu":
        return f"{provider} (interpret)"
    if provider == "xla_take":
        return "xla_take (mode=clip)"
    if provider == "xla_rows":
        return "xla_rows (promise_in_bounds)"
    return provider


# Providers that run in an interpreter off GPU: a correctness path, not a speed figure.
INTERPRETED = ("pallas", "mosaic")


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
        if problem := embed.backend_problem("mosaic"):
            return problem
        elements = shape.num_tokens * shape.d_model
        if platform != "gpu" and elements > MOSAIC_INTERPRET_MAX_ELEMENTS:
            return f"T*D={elements} > 2**16: too slow in the Mosaic GPU interpreter"
    if provider == "triton":
        if platform != "gpu":
            return f"needs a CUDA GPU (platform is {platform})"
        problem = embed.backend_problem("triton")
        if problem:
            return problem
    return None


def _pass_fn(gather: Callable, pass_: str) -> Callable:
    if pass_ == "fwd":
        return gather

    def vjp(table, ids, cotangent):
        rows, pullback = jax.vjp(lambda t: gather(t, ids), table)
        (grad,) = pullback(cotangent)
        return grad if pass_ == "bwd" else (rows, grad)

    return vjp


def _copy_fn(src, offset):
    # A dynamic slice at a runtime offset: XLA cannot alias or elide it, so the whole
    # slice is read and written. (``x + 0`` or an identity would be simplified away.)
    return lax.dynamic_slice_in_dim(src, offset, src.shape[0] - 1, axis=0)


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
    dtype = DTYPES[shape.dtype]
    t, d, v = shape.num_tokens, shape.d_model, shape.vocab_size
    table = jax.random.normal(jax.random.key(0), (v, d), dtype)
    ids = jnp.asarray(make_ids(shape))
    cotangent = jax.random.normal(jax.random.key(1), (t, d), dtype)
    cases = []
    for pass_ in passes:
        for provider in providers:
            if provider == "copy":
                rows = math.ceil(bytes_moved(shape, pass_) / (2 * d * shape.itemsize))
                src = jnp.ones((rows + 1, d), dtype)
                args = (src, jnp.int32(0))
                cases.append(Case(provider, pass_, jax.jit(_copy_fn), args))
                continue
            reason = skip_reason(provider, shape, platform)
            fn = None if reason else jax.jit(_pass_fn(_GATHERS[provider], pass_))
            args = (table, ids) if pass_ == "fwd" else (table, ids, cotangent)
            cases.append(Case(provider, pass_, fn, args, skip=reason))
    return cases


def _leaves_bits(tree) -> list[np.ndarray]:
    out = []
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        out.append(leaf.view(f"uint{8 * leaf.dtype.itemsize}"))
    return out


def _same_bits(a, b) -> bool:
    la, lb = _leaves_bits(a), _leaves_bits(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


def _call(fn: Callable, args: tuple):
    return jax.block_until_ready(fn(*args))


def _run(case: Case):
    return _call(case.fn, case.args)


def _timed_rounds(calls: Sequence[Callable], rounds: int, rng) -> list[list[float]]:
    """Seconds of each call in each round, the calls taking turns in a fresh random order.

    Interleaving makes drift on a shared machine, and the cold caches after a slow call,
    hit every call alike, so ratios between them taken within one run hold.
    """
    times = [[] for _ in calls]
    for _ in range(rounds):
        for i in rng.permutation(len(calls)):
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return times


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
    reference = {}
    for case in live:
        try:
            result = _run(case)  # Compiles.
        except Exception as e:  # A provider that fails here is skipped, with the reason.
            case.skip, case.fn = f"failed: {type(e).__name__}: {str(e)[:200]}", None
            continue
        if case.provider == "xla":
            reference[case.pass_] = result
        case.result = result
    for case in live:
        if case.fn is not None and case.provider != "copy" and case.pass_ in reference:
            # The backward sums repeated ids in an unspecified order: bit equality is
            # checked on the forward; other passes are reported as compared.
            case.matches_xla = _same_bits(case.result, reference[case.pass_])
        case.__dict__.pop("result", None)
    live = [c for c in live if c.fn is not None]
    timed = [c for c in live if in_comparison(c.provider, platform)]
    slow = [c for c in live if not in_comparison(c.provider, platform)]
    rng = np.random.default_rng(0)
    _timed_rounds([functools.partial(_run, c) for c in live], warmup, rng)  # Warm-up.
    for group, rounds in ((timed, repeats), (slow, interpret_repeats)):
        calls = [functools.partial(_run, c) for c in group]
        for case, times in zip(group, _timed_rounds(calls, rounds, rng), strict=True):
            case.times.extend(times)
    return cases


def versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "jaxlib", "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def _percentiles(times: Sequence[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``times`` (seconds), in milliseconds."""
    p20, median, p80 = np.percentile(np.asarray(times) * 1e3, [20, 50, 80])
    return float(median), float(p20), float(p80)


def rows_for_shape(shape: Shape, cases: list[Case], platform: str, meta: dict) -> list[dict]:
    """One row per (provider, pass), with every ratio taken within this run."""
    rows = []
    for case in cases:
        nbytes = bytes_moved(shape, case.pass_)
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
            median_ms, p20_ms, p80_ms = _percentiles(case.times)
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
    pick = embed.backend_for("auto", platform)
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


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in CSV_COLUMNS})


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump([{k: r[k] for k in CSV_COLUMNS} for r in rows], f, indent=1)


def write_plot(rows: list[dict], path: str) -> None:
    """GB/s against bytes moved, one line per provider and one panel per pass.

    The ``copy`` ceiling is the dashed black line; interpreted Pallas is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
    for ax, pass_ in zip(axes[0], passes, strict=True):
        measured = [
            r for r in rows if r["pass"] == pass_ and r["gbps"] is not None and r["in_comparison"]
        ]
        for provider in PROVIDERS:
            points = sorted((r["bytes"], r["gbps"]) for r in measured if r["provider"] == provider)
            if not points:
                continue
            x, y = zip(*points, strict=True)
            if provider == "copy":
                ax.plot(x, y, "k--", label="copy (ceiling)", linewidth=2)
            else:
                label = next(r["label"] for r in measured if r["provider"] == provider)
                ax.plot(x, y, "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("bytes moved")
        ax.set_ylabel("GB/s")
        ax.set_title(pass_)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"embedding lookup on {device}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, t, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text=} must be B,T,D,V (four integers)") from None
    if min(b, t, d, v) < 1:
        raise argparse.ArgumentTypeError(f"{text=} must have positive sizes")
    return b, t, d, v


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time every embedding backend against xla and a device copy.",
    )
    p.add_argument("--grid", choices=("quick", "full", "gpu"), default="quick")
    p.add_argument("--shape", type=parse_shape, action="append", help="B,T,D,V (repeatable)")
    p.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="(repeatable)")
    p.add_argument(
        "--ids",
        choices=(*ID_DISTRIBUTIONS, "both"),
        help="id distribution (default: the quick grid's own; uniform otherwise)",
    )
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
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
        help="also time embed.sharding's layouts on N devices (on a CPU host: N simulated "
        "host devices, labelled CPU-simulated)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="instead of the grid: time eager calls of MyEmbed in every mode against "
        "flax.nnx.Embed (default shapes: ids (1, 8) and (1, 2048), D=768, V=50257; "
        "--shape overrides them)",
    )
    p.add_argument("--eager-repeats", type=int, default=200, help="calls timed per layer")
    p.add_argument(
        "--tied-loss",
        action="store_true",
        help="also time embed.attend_cross_entropy against the naive logits + "
        "cross-entropy at each shape (B*T tokens, vocabulary V), with compiled memory",
    )
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


def shapes_from_args(args: argparse.Namespace) -> list[Shape]:
    dists = ID_DISTRIBUTIONS if args.ids == "both" else (args.ids,) if args.ids else None
    if args.shape:
        dtypes = args.dtype or ["float32"]
        return [
            Shape(*s, dtype, ids)
            for s, dtype, ids in itertools.product(args.shape, dtypes, dists or ["uniform"])
        ]
    if args.grid in ("full", "gpu"):
        make = full_grid if args.grid == "full" else gpu_grid
        grid = make(dists or ID_DISTRIBUTIONS)
        return [s for s in grid if not args.dtype or s.dtype in args.dtype]
    grid = list(QUICK_GRID)
    if args.dtype:
        grid = [dataclasses.replace(s, dtype=dt) for s in grid for dt in args.dtype]
    if dists:
        grid = [dataclasses.replace(s, ids=ids) for s in grid for ids in dists]
    return list(dict.fromkeys(grid))


def sharded_report(shapes: Sequence[Shape], num_devices: int, args) -> str:
    """Times each mesh layout of ``embed.sharding`` against one device's ``xla`` lookup."""
    from embed import sharding

    lines = [
        f"sharded lookups on {num_devices} devices (median ms [p20, p80]; vs 1 device = "
        "sharded time / unsharded xla time, same run)"
    ]
    for shape in shapes:
        common = dict(vocab_size=shape.vocab_size, d_model=shape.d_model)
        common.update(num_tokens=shape.num_tokens, dtype=DTYPES[shape.dtype])
        for grad in (False, True):
            one = sharding.timing_case("data", num_devices=1, grad=grad, backend="xla", **common)
            cases = [one] + [
                sharding.timing_case(layout, num_devices=num_devices, grad=grad, **common)
                for layout in sharding.LAYOUTS
            ]
            calls = [functools.partial(_call, fn, fn_args) for fn, fn_args, _ in cases]
            rng = np.random.default_rng(0)
            _timed_rounds(calls, args.warmup, rng)  # Warm-up.
            times = _timed_rounds(calls, args.repeats, rng)
            base = _percentiles(times[0])[0]
            pass_ = "fwd+bwd" if grad else "fwd"
            for (_, _, label), samples in zip(cases, times, strict=True):
                median, p20, p80 = _percentiles(samples)
                lines.append(
                    f"  {shape!s:<44} {pass_:<8} {label:<58} {median:9.3f} "
                    f"[{p20:.3f}, {p80:.3f}]  vs 1 device {median / base:5.2f}x"
                )
    return "\n".join(lines)


# --- Eager calls (--eager): MyEmbed against flax.nnx.Embed --------------------------------

# GPT-2's vocabulary and width; a short and a long sequence (issue 15).
EAGER_SHAPES = ((1, 8, 768, 50257), (1, 2048, 768, 50257))


def eager_report(shapes: Sequence[tuple[int, int, int, int]], args) -> tuple[str, list[dict]]:
    """Eager (un-jitted) calls of ``MyEmbed`` in every mode against ``flax.nnx.Embed``.

    All layers hold the same float32 table and take the same int32 ids, uniform in
    ``[0, V)`` so every mode returns ``nnx.Embed``'s rows (checked bit for bit); the
    calls are interleaved in one run, and ``vs nnx`` = median time / ``nnx.Embed``'s.
    """
    from flax import nnx

    device = jax.devices()[0]
    lines = [
        f"eager calls on {device.platform} ({device.device_kind}): median us [p20, p80] of "
        f"{args.eager_repeats} calls each; vs nnx = time / nnx.Embed time, same run"
    ]
    rows = []
    for b, t, d, v in shapes:
        reference = nnx.Embed(v, d, rngs=nnx.Rngs(0))
        table = reference.embedding[...]
        layers = {"nnx.Embed": reference}
        for mode in embed.MODES:
            layer = embed.MyEmbed(v, d, nnx.Rngs(0), mode=mode)
            layer.embedding.set_value(table)
            layers[f"MyEmbed(mode={mode!r})"] = layer
        ids = jnp.asarray(make_ids(Shape(b, t, d, v)).reshape(b, t))
        expected = _call(reference, (ids,))
        matches = {name: _same_bits(_call(f, (ids,)), expected) for name, f in layers.items()}
        calls = [functools.partial(_call, layer, (ids,)) for layer in layers.values()]
        rng = np.random.default_rng(0)
        _timed_rounds(calls, args.warmup, rng)  # Warm-up (and compilation).
        times = _timed_rounds(calls, args.eager_repeats, rng)
        base = _percentiles(times[0])[0]
        for name, samples in zip(layers, times, strict=True):
            median, p20, p80 = _percentiles(samples)
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


# --- The tied output projection's loss (--tied-loss) ---------------------------------

TIED_LOSS_PROVIDERS = ("naive", "fused")
TIED_LOSS_PASSES = ("fwd", "fwd+bwd")


def _tied_loss_fn(provider: str, pass_: str) -> Callable:
    """``(table, hidden, targets) -> loss`` (``fwd``) or ``(loss, d table, d hidden)``."""
    loss = {
        "naive": attend_cross_entropy_reference,  # [T, V] logits, then optax's form
        "fused": embed.attend_cross_entropy,
    }[provider]
    if pass_ == "fwd":
        return loss

    def value_and_grads(table, hidden, targets):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(table, hidden, targets)
        return value, *grads

    return value_and_grads


def compiled_peak_bytes(compiled) -> tuple[int, int]:
    """``(arguments + outputs + temporaries, temporaries)`` of a compiled program, bytes.

    From XLA's buffer assignment (``memory_analysis()``), not a run: what the program
    needs at its peak, whatever the allocator does.
    """
    stats = compiled.memory_analysis()
    live = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return live + stats.temp_size_in_bytes, stats.temp_size_in_bytes


def _max_rel_diff(actual, expected) -> float:
    """Largest ``|actual - expected| / max|expected|`` over the leaves of two results."""
    out = 0.0
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
        out = max(out, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return out


def measure_tied_loss(shape: Shape, *, warmup: int, repeats: int) -> list[dict]:
    """Times ``naive`` and ``fused`` per pass, interleaved; adds their compiled memory.

    ``vs_naive`` = fused time / naive time of the same pass, in this run; ``rel_diff``
    = the largest relative difference of the fused outputs from naive's.
    """
    dtype = DTYPES[shape.dtype]
    t, d, v = shape.num_tokens, shape.d_model, shape.vocab_size
    table = jax.random.normal(jax.random.key(0), (v, d), dtype)
    hidden = (jax.random.normal(jax.random.key(1), (t, d)) / math.sqrt(d)).astype(dtype)
    targets = jnp.asarray(make_ids(shape))
    args = (table, hidden, targets)
    rows = []
    for pass_ in TIED_LOSS_PASSES:
        compiled = {
            p: jax.jit(_tied_loss_fn(p, pass_)).lower(*args).compile() for p in TIED_LOSS_PROVIDERS
        }
        results = {p: _call(fn, args) for p, fn in compiled.items()}
        calls = [functools.partial(_call, compiled[p], args) for p in TIED_LOSS_PROVIDERS]
        rng = np.random.default_rng(0)
        _timed_rounds(calls, warmup, rng)  # Warm-up.
        times = _timed_rounds(calls, repeats, rng)
        naive_ms = _percentiles(times[0])[0]
        for provider, samples in zip(TIED_LOSS_PROVIDERS, times, strict=True):
            median, p20, p80 = _percentiles(samples)
            peak, temp = compiled_peak_bytes(compiled[provider])
            diff = _max_rel_diff(results[provider], results["naive"])
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
                    rel_diff=diff,
                )
            )
    return rows


def tied_loss_report(shapes: Sequence[Shape], args) -> tuple[str, list[dict]]:
    """``embed.attend_cross_entropy`` against the naive logits + cross-entropy."""
    lines = [
        "tied output projection + cross-entropy: naive ([T, V] logits) vs fused "
        "(embed.attend_cross_entropy); median ms [p20, p80], vs naive = time ratio in this "
        "run; peak MB = arguments + outputs + temporaries of the compiled program "
        "(memory_analysis), temp MB = temporaries alone"
    ]
    rows = []
    for shape in shapes:
        for r in measure_tied_loss(shape, warmup=args.warmup, repeats=args.repeats):
            rows.append(r)
            lines.append(
                f"  {r['shape']:<44} {r['pass_']:<8} {r['provider']:<6} "
                f"{r['median_ms']:10.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]  "
                f"vs naive {r['vs_naive']:5.2f}x  peak {r['peak_mb']:9.1f} MB  "
                f"temp {r['temp_mb']:9.1f} MB  max rel diff {r['rel_diff']:.1e}"
            )
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the benchmark; returns the rows it printed and wrote."""
    args = parse_args(argv)
    # The CUDA compiler plugin on a machine with no driver (gpu_image, newest on a CPU
    # machine): the CPU, without JAX's CUDA start-up traceback. A GPU machine keeps it.
    compat.cpu_unless_cuda_driver()
    shapes = shapes_from_args(args)
    if args.sharded and "--xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        # Read when JAX starts its backends, which nothing above has done yet. It only
        # affects the CPU backend: on a GPU host the GPUs are the devices.
        flag = f"--xla_force_host_platform_device_count={args.sharded}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    device = jax.devices()[0]
    platform = device.platform
    meta = {
        "timestamp": "",
        "device": device.device_kind,
        "platform": platform,
        **versions(),
    }
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
        text, eager_rows = eager_report(args.shape or EAGER_SHAPES, args)
        print(text)
        return eager_rows
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
    print(format_table(rows))
    skipped = {(r["label"], r["reason"]) for r in rows if r["status"] == "skipped"}
    for label, reason in sorted(skipped):
        print(f"skipped {label}: {reason}")
    if args.choose:
        print(choose_report(rows, platform))
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        write_plot(rows, args.plot)
    if args.sharded:
        print(sharded_report(shapes, args.sharded, args))
    if args.tied_loss:
        print(tied_loss_report(shapes, args)[0])
    return rows


if __name__ == "__main__":
    main()
