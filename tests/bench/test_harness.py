"""The harness: bytes counted, ids drawn, shapes chosen, flags written and read back."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from bench import harness, options


def test_bytes_are_counted_per_pass():
    shape = harness.Shape(2, 8, 16, 64, "bfloat16")
    fwd = 16 * 4 + 2 * 16 * 16 * 2
    assert harness.bytes_moved(shape, "fwd") == fwd
    assert harness.bytes_moved(shape, "bwd") == fwd + 64 * 16 * 2
    assert harness.bytes_moved(shape, "fwd+bwd") == 2 * fwd + 64 * 16 * 2


def test_zipf_ids_are_skewed_and_in_range():
    shape = harness.Shape(1, 4096, 8, 1000, ids="zipf")
    ids = harness.make_ids(shape)
    assert ids.dtype.name == "int32" and ids.min() >= 0 and ids.max() < 1000
    counts = sorted(collections.Counter(ids.tolist()).values())
    assert counts[-1] > 10 * 4096 / 1000  # The hottest id is far above uniform.


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,x", "0,2,3,4"])
def test_bad_shape_is_rejected(bad):
    with pytest.raises(SystemExit):
        options.parse_lookup_args([f"--shape={bad}"])


def test_gpu_grid_covers_every_axis():
    shapes = harness.gpu_grid()
    assert len(shapes) == len(set(shapes))
    assert {s.dtype for s in shapes} == {"float32", "bfloat16"}
    assert {s.ids for s in shapes} == {"uniform", "zipf"}
    assert {s.d_model for s in shapes} == {64, 256, 1024, 4096, 8192}
    assert max(s.num_tokens for s in shapes) == 65536
    assert max(s.vocab_size for s in shapes) == 262144
    # Every d_model in both dtypes; Zipf ids at the largest d_model, tokens and vocab.
    assert {(s.d_model, s.dtype) for s in shapes} >= {
        (d, dt) for d in harness.GPU_D_MODELS for dt in ("float32", "bfloat16")
    }
    zipf = [s for s in shapes if s.ids == "zipf"]
    assert {max(getattr(s, a) for s in zipf) for a in ("d_model", "vocab_size")} == {8192, 262144}
    assert max(s.num_tokens for s in zipf) == 65536
    assert harness.shapes_from_args(options.parse_lookup_args(["--grid=gpu"])) == shapes
    only_zipf = options.parse_lookup_args(["--grid=gpu", "--ids=zipf", "--dtype=bfloat16"])
    assert harness.shapes_from_args(only_zipf) == [s for s in zipf if s.dtype == "bfloat16"]


def test_lookup_argv_writes_flags_the_parser_reads_back():
    argv = options.lookup_argv(
        grid="gpu",
        shape=[(1, 2, 3, 4)],
        dtype=["bfloat16"],
        passes=("fwd", "bwd"),
        max_seconds=12.5,
        choose=True,
        no_progress=False,
        csv="out.csv",
    )
    assert argv == [
        "--grid=gpu",
        "--shape=1,2,3,4",
        "--dtype=bfloat16",
        "--passes=fwd,bwd",
        "--max-seconds=12.5",
        "--choose",
        "--csv=out.csv",
    ]
    args = options.parse_lookup_args(argv)
    assert (args.grid, args.shape, args.dtype, args.passes) == (
        "gpu",
        [(1, 2, 3, 4)],
        ["bfloat16"],
        ["fwd", "bwd"],
    )
    assert (args.max_seconds, args.choose, args.no_progress, args.csv) == (
        12.5,
        True,
        False,
        "out.csv",
    )


def test_lookup_argv_rejects_a_flag_the_parser_lacks():
    with pytest.raises(ValueError, match=r"dest='max_secs' must be one of the benchmark's flags"):
        options.lookup_argv(max_secs=3)


def test_timed_rounds_interleave_the_calls():
    order = []
    calls = [lambda i=i: order.append(i) for i in range(3)]
    times = harness.timed_rounds(calls, 4, np.random.default_rng(0))
    assert [len(t) for t in times] == [4, 4, 4]
    rounds = [order[3 * k : 3 * k + 3] for k in range(4)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)  # Each round calls each once.
    assert len({tuple(r) for r in rounds}) > 1  # In a fresh order.


def test_percentiles_are_milliseconds_in_order():
    median, p20, p80 = harness.percentiles([0.001 * k for k in range(1, 11)])
    assert (p20, median, p80) == pytest.approx((2.8, 5.5, 8.2))


def test_copy_case_moves_the_bytes_asked_for():
    fn, args = harness.copy_case(4 * 1000, 10, "float32")
    out = harness.call(fn, args)
    # Reads and writes 2 * 50 rows of 10 float32 = 4000 bytes; one spare row for the offset.
    assert out.shape == (50, 10) and args[0].shape == (51, 10)


def test_same_bits_tells_signed_zeros_apart():
    assert harness.same_bits(jnp.zeros(3), jnp.zeros(3))
    assert not harness.same_bits(jnp.zeros(3), -jnp.zeros(3))
    assert not harness.same_bits((jnp.zeros(3),), (jnp.zeros(3), jnp.zeros(3)))
