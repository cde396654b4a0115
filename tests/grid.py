"""One parameter grid of shapes, dtypes and edge ids, shared by every test file."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.contract import REGISTRY

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
VOCAB_SIZES = (1, 7, 50257)
D_MODELS = (1, 3, 64, 129, 768)
NUM_TOKENS = (0, 1, 7, 129, 1000)
# flax.nnx.Embed's own axes: its output ``dtype`` (None: the table's), and id dtypes.
OUTPUT_DTYPES = (None, *DTYPES)
ID_DTYPES = (jnp.int16, jnp.int32, jnp.uint8)

INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)

# The custom call a Pallas-on-Triton kernel lowers to for cuda.
TRITON_CALL = "__gpu$xla.gpu.triton"


def edge_ids(vocab_size: int) -> list[int]:
    """Ids at and past every boundary of the clip semantics."""
    v = vocab_size
    return [0, v - 1, -1, -v, v, -v - 1, INT32_MIN, INT32_MAX]


def edge_ids_as(vocab_size: int, dtype) -> np.ndarray:
    """``edge_ids`` and the ids just past the int16 and uint8 ranges, saturated to ``dtype``."""
    ids = edge_ids(vocab_size) + [255, 256, -32768, 32767, 1, vocab_size // 2]
    info = np.iinfo(dtype)
    return np.clip(np.asarray(ids, np.int64), info.min, info.max).astype(dtype)


def make_ids(vocab_size: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """``num_tokens`` int32 ids: the edges first, then uniform in ``[-2V, 2V)``."""
    rng = np.random.default_rng(seed)
    ids = edge_ids(vocab_size) + list(rng.integers(-2 * vocab_size, 2 * vocab_size, num_tokens))
    return np.asarray(ids[:num_tokens], np.int32)


def normal(shape, dtype=jnp.float32, seed: int = 0) -> jax.Array:
    """Unit normals of ``shape``, drawn by NumPy and rounded once to ``dtype``.

    Not ``jax.random``: that compiles a sampler for every new shape and dtype, which on a
    CPU cost as much as the interpreted kernel under test.
    """
    draw = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(draw.astype(jnp.dtype(dtype)))


def make_table(vocab_size: int, d_model: int, dtype, seed: int = 0) -> jax.Array:
    return normal((vocab_size, d_model), dtype, seed)


def _cases():
    # Every (D, T) pair in float32, at V = 1 or 7 in turn so that each V meets every D and
    # every T too (each pair of axis values appears: a pairwise cover, 25 cases where the
    # full product is 50); the 16-bit dtypes and the GPT-2 vocabulary on a cover of the
    # same sizes, so each value of each axis appears with each dtype.
    small = (1, 7)
    yield from (
        (jnp.float32, small[(i + j) % 2], d, t)
        for (i, d), (j, t) in itertools.product(enumerate(D_MODELS), enumerate(NUM_TOKENS))
    )
    for dtype in DTYPES[1:]:
        yield from ((dtype, 7, d, t) for d, t in zip(D_MODELS, NUM_TOKENS, strict=True))
        yield dtype, 1, 129, 7
    # The GPT-2 vocabulary: a float32 model's 768-wide rows, and 16-bit tables at 64 wide
    # (the 16-bit dtypes meet 768 above; an interpreter's cost grows with V x D).
    yield jnp.float32, 50257, 768, 1000
    for dtype in DTYPES[1:]:
        yield dtype, 50257, 64, 1000
    yield jnp.float32, 50257, 3, 129


GATHER_CASES = list(_cases())


# A cover of GATHER_CASES: every dtype, odd sizes (1, 3, 7, 129), an empty batch, a
# table of 200 rows (several row blocks). Small enough for the Mosaic GPU interpreter,
# which simulates every row copy of every program on a CPU; for the backends whose
# interpreter is slow, and for checks run once per backend and case.
COVER_CASES = [
    (jnp.float32, 7, 129, 129),
    (jnp.bfloat16, 1, 3, 7),
    (jnp.float16, 200, 768, 33),
    (jnp.float32, 7, 1, 0),
]


def value_id(value) -> str:
    """A test id for a grid value: a dtype by its name, a tuple (a shape, a grid case) as
    its items' ids joined by ``-``, anything else as ``str``."""
    if isinstance(value, tuple):
        return "-".join(map(value_id, value))
    if isinstance(value, (type, np.dtype)):  # np.float32, jnp.bfloat16, np.dtype(...).
        try:
            return jnp.dtype(value).name
        except TypeError:  # A class that is not a dtype.
            pass
    return str(value)


def pairwise(*axes) -> list:
    """``pytest.param`` runs in which every pair of values of any two axes appears.

    A greedy covering array: each run is the one of the full product that covers the
    most pairs not yet covered (the first such, so the list is the same on every
    machine). Four axes of 4, 3, 2 and 2 values take 12 runs where the product takes 48;
    a fault that needs two parameters at given values is still found. For
    ``pytest.mark.parametrize(("a", "b", ...), pairwise(A, B, ...))``; ids by ``value_id``.
    """
    sizes = [range(len(axis)) for axis in axes]

    def pairs(run):
        return {(a, run[a], b, run[b]) for a, b in itertools.combinations(range(len(run)), 2)}

    uncovered = set().union(*(pairs(run) for run in itertools.product(*sizes)))
    runs = []
    while uncovered:
        run = max(itertools.product(*sizes), key=lambda run: len(pairs(run) & uncovered))
        uncovered -= pairs(run)
        runs.append(tuple(axis[i] for axis, i in zip(axes, run, strict=True)))
    return [pytest.param(*run, id=value_id(run)) for run in runs]


def whole_grid() -> bool:
    """Whether this run takes each test's whole parameter grid, or its cover.

    ``EMBED_TEST_GRID``: ``full`` (the default) or ``cover``, which tools/pytest.bzl sets
    on all stacks of a test but one; ``EMBED_TEST_FULL_GRID`` set (``bazel test
    --config=full_grid``) means the whole grid everywhere.
    """
    which = os.environ.get("EMBED_TEST_GRID", "full")
    if which not in ("full", "cover"):
        raise ValueError(f"EMBED_TEST_GRID={which!r} must be 'full' or 'cover'")
    return which == "full" or bool(os.environ.get("EMBED_TEST_FULL_GRID"))


def each_value(runs) -> list[bool]:
    """Which ``runs`` to keep so that each test still meets every value of every parameter.

    ``runs`` are ``(test, params)`` pairs in collection order: ``test`` names a test
    function, ``params`` maps its parameter names to values, and a tuple value (a grid
    case, a shape) counts item by item. Per test, a greedy cover as in ``pairwise``, of
    single values: the run that shows the most values not yet shown (the first such),
    until all are. This is the grid that a test running on several JAX stacks runs on
    all but one of them (``EMBED_TEST_GRID=cover``, set by tools/pytest.bzl): each
    backend, dtype, mode and odd size still runs on every stack, while the combinations,
    which tell our code apart rather than JAX's releases, run on one.
    """

    def values(params):
        shown = set()
        for name, value in params.items():
            items = value if isinstance(value, tuple) else (value,)
            shown.update((name, i, value_id(item)) for i, item in enumerate(items))
        return frozenset(shown)

    tests = {}
    for index, (test, params) in enumerate(runs):
        tests.setdefault(test, []).append((index, values(params)))
    keep = [False] * len(runs)
    for group in tests.values():
        unseen = set().union(*(shown for _, shown in group))
        keep[group[0][0]] = True  # A test without parameters, or the first of its grid.
        unseen -= group[0][1]
        while unseen:
            index, shown = max(group, key=lambda run: len(run[1] & unseen))
            keep[index] = True
            unseen -= shown
    return keep


# ----------------------------------------------------------------------------------------
# Backends: one parameter per backend of kernels.contract.REGISTRY, the same ids on every
# machine; each runs compiled where JAX's default backend is a GPU, interpreted elsewhere,
# and is skipped with the reason where it cannot run here. ("auto" is none of them: on a
# CPU it is "xla" again; tests/embed/test_dispatch.py checks it on its own.)

ON_GPU = jax.default_backend() == "gpu"


def interpreted(name: str) -> bool:
    """Whether backend ``name`` runs in its interpreter on this machine."""
    return bool(REGISTRY[name].compiled_on) and not ON_GPU


def backend_problem(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or ``None`` when it can."""
    backend = REGISTRY[name]
    if problem := backend.problem():
        return problem
    if interpreted(name) and not backend.interpreted:
        return f"{name} runs only compiled, on {backend.compiled_on}"
    return None


def backend_params(names) -> list:
    """``pytest.param`` per backend name, skipped with the reason where it cannot run."""
    params = []
    for name in names:
        problem = backend_problem(name)
        skip = pytest.mark.skipif(problem is not None, reason=str(problem))
        params.append(pytest.param(name, marks=skip, id=name))
    return params


# Every backend.
BACKENDS = backend_params(REGISTRY)
# The kernels: every backend with a compiled path (all but "xla").
KERNELS = backend_params(n for n, b in REGISTRY.items() if b.compiled_on)
# Cheap on a CPU: "xla" and the Pallas interpreter, for files that check the layer, ids,
# sharding and training around the gather rather than the kernels themselves.
CPU_BACKENDS = ("xla", "pallas")


def case_id(case) -> str:
    dtype, v, d, t = case
    return f"{jnp.dtype(dtype).name}-V{v}-D{d}-T{t}"


def grad_in_token_order(grad_out, ids, vocab_size: int) -> np.ndarray:
    """The table gradient in NumPy: each row's gradient rows summed in float32, in token
    order (ids in ``[-V, V)`` add into row ``i mod V``; the rest add nothing)."""
    ids = np.asarray(ids).astype(np.int64)
    live = (ids >= -vocab_size) & (ids < vocab_size)
    grad = np.zeros((vocab_size, grad_out.shape[1]), np.float32)
    np.add.at(grad, ids[live] % vocab_size, np.asarray(grad_out, np.float32)[live])
    return grad


def assert_bits_equal(actual, expected) -> None:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    unsigned = np.dtype(f"uint{8 * actual.dtype.itemsize}")
    np.testing.assert_array_equal(actual.view(unsigned), expected.view(unsigned))
