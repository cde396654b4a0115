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


def test_each_value_keeps_every_value_of_every_parameter_per_test():
    cases = [(jnp.float32, 1, 3), (jnp.float32, 7, 3), (jnp.bfloat16, 1, 3), (jnp.bfloat16, 7, 5)]
    runs = [("a", {"backend": b, "case": c}) for b in ("xla", "pallas") for c in cases]
    runs += [("b", {"backend": "xla"}), ("b", {"backend": "xla"}), ("c", {})]
    keep = grid.each_value(runs)
    kept = [run for run, k in zip(runs, keep, strict=True) if k]
    for test in ("a", "b"):
        params = [p for t, p in runs if t == test]
        shown = [p for t, p in kept if t == test]
        for name in params[0]:
            if name == "case":  # A grid case counts item by item.
                for i in range(3):
                    assert {c["case"][i] for c in shown} == {c["case"][i] for c in params}
            else:
                assert {p[name] for p in shown} == {p[name] for p in params}
    # Fewer runs: two of the product's 8 show every value of "a"; "b" repeats itself.
    assert sum(keep[:8]) == 2 and keep[8:] == [True, False, True]
