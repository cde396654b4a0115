"""The benchmark's CLI on a tiny grid: the table, the CSV, the JSON and the PNG."""

import collections
import csv
import json

import pytest

from kernels import compat
from tools import benchmark

# Two tiny shapes: one where one_hot runs, one where it is skipped for size.
_SHAPES = ("2,8,16,64", "1,64,8,200000")
_ARGS = [
    *(f"--shape={s}" for s in _SHAPES),
    "--dtype=float32",
    "--dtype=bfloat16",
    "--ids=zipf",
    "--warmup=1",
    "--repeats=3",
    "--interpret-repeats=1",
    "--choose",
    "--no-progress",
]
_NUM_SHAPES = len(_SHAPES) * 2  # shapes x dtypes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    paths = {k: out / f"bench.{k}" for k in ("csv", "json", "png")}
    rows = benchmark.main(
        [*_ARGS, f"--csv={paths['csv']}", f"--json={paths['json']}", f"--plot={paths['png']}"]
    )
    return rows, paths


def test_one_row_per_provider_pass_and_shape(run):
    rows, paths = run
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == benchmark.CSV_COLUMNS
        csv_rows = list(reader)
    keys = [
        (r["provider"], r["pass"], r["batch"], r["seq_len"], r["d_model"], r["vocab_size"])
        + (r["dtype"], r["ids"])
        for r in csv_rows
    ]
    assert len(keys) == len(set(keys))
    assert len(csv_rows) == len(benchmark.PROVIDERS) * len(benchmark.PASSES) * _NUM_SHAPES
    assert len(rows) == len(csv_rows)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(rows, default=str))


def test_every_row_carries_device_versions_and_timestamp(run):
    rows, _ = run
    for r in rows:
        assert r["device"] and r["platform"] and r["jax"] and r["jaxlib"]
        assert "T" in r["timestamp"] and r["timestamp"].endswith("+00:00")


def test_ratios_are_taken_within_the_run(run):
    rows, _ = run
    medians = {
        (r["provider"], r["pass"], r["vocab_size"], r["dtype"], r["ids"]): r["median_ms"]
        for r in rows
    }
    compared = [r for r in rows if r["status"] == "ok" and r["in_comparison"]]
    assert compared
    for r in compared:
        key = (r["pass"], r["vocab_size"], r["dtype"], r["ids"])
        assert r["vs_copy"] == pytest.approx(medians[("copy", *key)] / r["median_ms"])
        if r["provider"] != "copy":
            assert r["vs_xla"] == pytest.approx(r["median_ms"] / medians[("xla", *key)])
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]


def test_forward_providers_are_bit_identical_to_xla(run):
    rows, _ = run
    checked = [r for r in rows if r["pass"] == "fwd" and r["matches_xla"] is not None]
    assert {r["provider"] for r in checked} >= {"xla_take", "xla_rows", "one_hot", "pallas"}
    assert all(r["matches_xla"] for r in checked)


def test_skipped_providers_are_reported_with_reasons(run):
    rows, _ = run
    skipped = {(r["provider"], r["vocab_size"]) for r in rows if r["status"] == "skipped"}
    assert ("one_hot", 200000) in skipped
    assert ("one_hot", 64) not in skipped
    assert all(r["reason"] for r in rows if r["status"] == "skipped")
    assert all(r["median_ms"] is None for r in rows if r["status"] == "skipped")


def test_interpreted_pallas_is_kept_out_of_ratios(run):
    rows, _ = run
    pallas = [r for r in rows if r["provider"] == "pallas"]
    if rows[0]["platform"] == "gpu":
        pytest.skip("Pallas is compiled on GPU")
    assert pallas and all(r["label"] == "pallas (interpret)" for r in pallas)
    assert all(r["vs_xla"] is None and r["vs_copy"] is None for r in pallas)
    assert all(r["median_ms"] is not None for r in pallas)


def test_interpreted_mosaic_is_kept_out_of_ratios_or_skipped_with_the_reason(run):
    rows, _ = run
    mosaic = [r for r in rows if r["provider"] == "mosaic"]
    if rows[0]["platform"] == "gpu":
        pytest.skip("Mosaic GPU is compiled on GPU")
    assert mosaic and all(r["label"] == "mosaic (interpret)" for r in mosaic)
    assert all(r["vs_xla"] is None and r["vs_copy"] is None for r in mosaic)
    if problem := compat.mosaic_gpu_problem():  # JAX 0.10.2: every row says why not.
        assert all(r["status"] == "skipped" and r["reason"] == problem for r in mosaic)
    else:  # Both shapes are small enough for the interpreter, and match bit for bit.
        assert all(r["median_ms"] is not None for r in mosaic)
        assert all(r["matches_xla"] for r in mosaic if r["pass"] == "fwd")


def test_plot_is_a_png(run):
    _, paths = run
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_are_counted_per_pass():
    shape = benchmark.Shape(2, 8, 16, 64, "bfloat16")
    fwd = 16 * 4 + 2 * 16 * 16 * 2
    assert benchmark.bytes_moved(shape, "fwd") == fwd
    assert benchmark.bytes_moved(shape, "bwd") == fwd + 64 * 16 * 2
    assert benchmark.bytes_moved(shape, "fwd+bwd") == 2 * fwd + 64 * 16 * 2


def test_zipf_ids_are_skewed_and_in_range():
    shape = benchmark.Shape(1, 4096, 8, 1000, ids="zipf")
    ids = benchmark.make_ids(shape)
    assert ids.dtype.name == "int32" and ids.min() >= 0 and ids.max() < 1000
    counts = sorted(collections.Counter(ids.tolist()).values())
    assert counts[-1] > 10 * 4096 / 1000  # The hottest id is far above uniform.


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,x", "0,2,3,4"])
def test_bad_shape_is_rejected(bad):
    with pytest.raises(SystemExit):
        benchmark.parse_args([f"--shape={bad}"])


def test_gpu_grid_covers_the_issue_axes():
    shapes = benchmark.gpu_grid()
    assert len(shapes) == len(set(shapes))
    assert {s.dtype for s in shapes} == {"float32", "bfloat16"}
    assert {s.ids for s in shapes} == {"uniform", "zipf"}
    assert {s.d_model for s in shapes} == {64, 256, 1024, 4096, 8192}
    assert max(s.num_tokens for s in shapes) == 65536
    assert max(s.vocab_size for s in shapes) == 262144
    # Every d_model in both dtypes; Zipf ids at the largest d_model, tokens and vocab.
    assert {(s.d_model, s.dtype) for s in shapes} >= {
        (d, dt) for d in benchmark.GPU_D_MODELS for dt in ("float32", "bfloat16")
    }
    zipf = [s for s in shapes if s.ids == "zipf"]
    assert {max(getattr(s, a) for s in zipf) for a in ("d_model", "vocab_size")} == {8192, 262144}
    assert max(s.num_tokens for s in zipf) == 65536
    assert benchmark.shapes_from_args(benchmark.parse_args(["--grid=gpu"])) == shapes
    only_zipf = benchmark.parse_args(["--grid=gpu", "--ids=zipf", "--dtype=bfloat16"])
    assert benchmark.shapes_from_args(only_zipf) == [s for s in zipf if s.dtype == "bfloat16"]


def test_time_budget_reports_the_shapes_left_as_skipped():
    rows = benchmark.main(
        [f"--shape={_SHAPES[0]}", "--passes=fwd", "--max-seconds=0", "--no-progress"]
    )
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert all(r["reason"] == "time budget: --max-seconds 0 reached" for r in rows)
    assert {r["provider"] for r in rows} == set(benchmark.PROVIDERS)


# --- --eager: MyEmbed against flax.nnx.Embed -------------------------------------------


def test_eager_pass_times_every_mode_against_nnx_embed(capsys):
    shapes = [(1, 8, 16, 64), (2, 5, 8, 300)]
    rows = benchmark.main(
        [*(f"--shape={','.join(map(str, s))}" for s in shapes), "--eager", "--eager-repeats=3"]
        + ["--warmup=1", "--no-progress"]
    )
    printed = capsys.readouterr().out
    names = ["nnx.Embed"] + [f"MyEmbed(mode={m!r})" for m in benchmark.embed.MODES]
    assert [(r["batch"], r["seq_len"], r["d_model"], r["vocab_size"]) for r in rows] == [
        s for s in shapes for _ in names
    ]
    assert [r["provider"] for r in rows] == names * len(shapes)
    base = {r["seq_len"]: r["median_ms"] for r in rows if r["provider"] == "nnx.Embed"}
    for r in rows:
        assert r["matches_nnx"] is True
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["vs_nnx"] == pytest.approx(r["median_ms"] / base[r["seq_len"]])
        assert f"{r['provider']:<24} {r['median_ms'] * 1e3:9.1f}" in printed
    assert "B=" not in printed  # The grid did not run.


# --- --tied-loss ---------------------------------------------------------------------


def test_tied_loss_rows_time_both_forms_and_report_memory():
    shape = benchmark.Shape(2, 16, 24, 300, "float32")
    rows = benchmark.measure_tied_loss(shape, warmup=1, repeats=3)
    keys = [(r["provider"], r["pass_"]) for r in rows]
    assert sorted(keys) == sorted(
        (p, q) for p in benchmark.TIED_LOSS_PROVIDERS for q in benchmark.TIED_LOSS_PASSES
    )
    medians = {(r["provider"], r["pass_"]): r["median_ms"] for r in rows}
    for r in rows:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["vs_naive"] == pytest.approx(r["median_ms"] / medians[("naive", r["pass_"])])
        # Arguments alone: the table, hidden states and targets.
        assert r["peak_mb"] * 1e6 >= (300 * 24 + 32 * 24 + 32) * 4
        assert 0 < r["temp_mb"] <= r["peak_mb"]
        assert r["rel_diff"] < 1e-5  # The fused loss and gradients match naive's.


def test_tied_loss_flag_is_parsed():
    assert benchmark.parse_args(["--tied-loss"]).tied_loss
    assert not benchmark.parse_args([]).tied_loss
