"""What every benchmark shares: shapes and ids, the library calls, timing, checks, writers.

Timing: the calls of one comparison take turns in a fresh random order each round
(:func:`timed_rounds`), so drift on a shared machine, and the cold caches after a slow
call, hit all of them alike and ratios taken within one run hold. Each figure is the
median with p20 and p80 (:func:`percentiles`).

Bytes and GB/s: :func:`bytes_moved` counts what a lookup pass must move at least (``s``
the table's itemsize, ``T`` tokens, ``D`` = d_model, ``V`` the vocabulary):

* fwd: ids ``T*4`` + rows read ``T*D*s`` + output written ``T*D*s``;
* bwd: ids ``T*4`` + gradient rows read ``T*D*s`` + table-gradient rows written
  ``T*D*s`` + the zero-initialised dense table gradient written ``V*D*s`` (every
  backend must produce that dense ``[V, D]`` array);
* fwd+bwd: the sum of the two.

The ceiling is a device copy of the same bytes, timed in the same run (:func:`copy_case`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import embed
from bench.options import ID_DISTRIBUTIONS, PASSES, PROVIDERS
from embed import parallel
from kernels import compat, contract, reference

# The CUDA compiler plugin on a machine with no driver (gpu_image and newest on a CPU
# machine): the CPU, without JAX's CUDA start-up traceback. A GPU machine keeps its GPU.
compat.cpu_unless_cuda_driver()

# --- The library, as the benchmarks call it ----------------------------------------------
# Everything of embed/ and kernels/ that bench/ calls is named here, in one place.

lookup = embed.lookup  # (table, ids, backend=...) -> rows
backend_problem = embed.backend_problem  # backend -> why it cannot run here, or None
backend_for = embed.backend_for  # ("auto", platform) -> the backend it lowers to
MODES = embed.MODES
MyEmbed = embed.MyEmbed
attend_cross_entropy = embed.attend_cross_entropy  # the blocked tied loss
LAYOUTS = parallel.LAYOUTS
check_layout = parallel.check_layout  # layout -> layout, or ValueError
sharded_lookup = parallel.sharded_lookup
# The oracle of the tied loss, and the rows every backend reads for ids.
attend_cross_entropy_reference = reference.attend_cross_entropy_reference
wrap_and_clamp = contract.wrap_and_clamp

# --- Shapes and ids ----------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ZIPF_A = 1.1


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


def shapes_from_args(args) -> list[Shape]:
    """The shapes that ``--grid``, ``--shape``, ``--dtype`` and ``--ids`` ask for."""
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


def bytes_moved(shape: Shape, pass_: str) -> int:
    """Bytes a lookup pass must move at least; see the module docstring."""
    t, d, v, s = shape.num_tokens, shape.d_model, shape.vocab_size, shape.itemsize
    fwd = t * 4 + 2 * t * d * s
    bwd = t * 4 + 2 * t * d * s + v * d * s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# --- The copy ceiling --------------------------------------------------------------------


def _copy(src, offset):
    # A dynamic slice at a runtime offset: XLA cannot alias or elide it, so the whole
    # slice is read and written. (``x + 0`` or an identity would be simplified away.)
    return lax.dynamic_slice_in_dim(src, offset, src.shape[0] - 1, axis=0)


def copy_case(nbytes: int, d_model: int, dtype) -> tuple[Callable, tuple]:
    """A jitted device copy reading and writing ``nbytes`` in all, and its arguments."""
    rows = math.ceil(nbytes / (2 * d_model * jnp.dtype(dtype).itemsize))
    return jax.jit(_copy), (jnp.ones((rows + 1, d_model), dtype), jnp.int32(0))


# --- Timing ------------------------------------------------------------------------------


def call(fn: Callable, args: tuple):
    """``fn(*args)``, waited for."""
    return jax.block_until_ready(fn(*args))


def timed_rounds(calls: Sequence[Callable], rounds: int, rng) -> list[list[float]]:
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


def time_fns(cases: Sequence[tuple[Callable, tuple]], *, warmup: int, repeats: int):
    """Seconds of each ``(fn, args)`` call per timed round, after ``warmup`` rounds.

    The rounds are interleaved as :func:`timed_rounds` says, from a fixed seed.
    """
    calls = [functools.partial(call, fn, args) for fn, args in cases]
    rng = np.random.default_rng(0)
    timed_rounds(calls, warmup, rng)
    return timed_rounds(calls, repeats, rng)


def percentiles(times: Sequence[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``times`` (seconds), in milliseconds."""
    p20, median, p80 = np.percentile(np.asarray(times) * 1e3, [20, 50, 80])
    return float(median), float(p20), float(p80)


# --- Checks ------------------------------------------------------------------------------


def _leaves_bits(tree) -> list[np.ndarray]:
    out = []
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        out.append(leaf.view(f"uint{8 * leaf.dtype.itemsize}"))
    return out


def same_bits(a, b) -> bool:
    """Whether two results have the same leaves, bit for bit."""
    la, lb = _leaves_bits(a), _leaves_bits(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


def max_rel_diff(actual, expected) -> float:
    """Largest ``|actual - expected| / max|expected|`` over the leaves of two results."""
    out = 0.0
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
        out = max(out, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return out


def compiled_peak_bytes(compiled) -> tuple[int, int]:
    """``(arguments + outputs + temporaries, temporaries)`` of a compiled program, bytes.

    From XLA's buffer assignment (``memory_analysis()``), not a run: what the program
    needs at its peak, whatever the allocator does.
    """
    stats = compiled.memory_analysis()
    live = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return live + stats.temp_size_in_bytes, stats.temp_size_in_bytes


# --- Versions and writers ----------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "jaxlib", "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def write_csv(rows: list[dict], path: str, columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in columns})


def write_json(rows: list[dict], path: str, columns: Sequence[str]) -> None:
    with open(path, "w") as f:
        json.dump([{k: r[k] for k in columns} for r in rows], f, indent=1)


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
