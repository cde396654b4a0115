"""The shared grid's own promises: its covers hold every pair they claim to."""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from tests import grid


def _pairs(runs, num_axes):
    return {
        (a, run[a], b, run[b])
        for run in runs
        for a, b in itertools.combinations(range(num_axes), 2)
    }


def test_pairwise_covers_every_pair_in_fewer_runs():
    axes = (["xla", "pallas"], ["clip", "fill", "error"], [(8,), (1, 2048)], list("abcd"))
    runs = [param.values for param in grid.pairwise(*axes)]
    assert _pairs(runs, 4) == _pairs(itertools.product(*axes), 4)
    assert len(runs) == 12  # The fewest possible: 4 x 3 pairs of the two largest axes.
    assert grid.pairwise(*axes) == grid.pairwise(*axes)  # The same runs every time.


def test_pairwise_ids_name_dtypes():
    (param,) = grid.pairwise([jnp.bfloat16], [None], [7])
    assert param.id == "bfloat16-None-7"


def test_gather_cases_hold_every_pair_of_sizes_and_each_dtype():
    small = [c[1:] for c in grid.GATHER_CASES if c[0] == jnp.float32 and c[1] in (1, 7)]
    for a, b in itertools.combinations(range(3), 2):
        sizes = (grid.VOCAB_SIZES[:2], grid.D_MODELS, grid.NUM_TOKENS)
        assert {(c[a], c[b]) for c in small} == set(itertools.product(sizes[a], sizes[b]))
    for axis, values in ((2, grid.D_MODELS), (3, grid.NUM_TOKENS)):
        for dtype in grid.DTYPES:
            assert {c[axis] for c in grid.GATHER_CASES if c[0] == dtype} == set(values)
