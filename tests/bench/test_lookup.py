"""bench.lookup, the main job, on a tiny grid: the table, the CSV, the JSON and the PNG."""

import csv
import json

import pytest

from bench import harness, lookup, options

# Two tiny shapes: one where one_hot runs, one where it is skipped for size.
_SHAPES = ("2,8,16,64", "1,64,8,200000")
_ARGS = [
    *(f"--shape={s}" for s in _SHAPES),
    "--dtype=bfloat16",
    "--ids=zipf",
    # No warm-up round and two timed ones: the first call of each case (its compilation
    # and the bit check) warms it, and the interpreted Mosaic GPU kernel, which takes most
    # of this test's time, runs twice per case rather than three times.
    "--warmup=0",
    "--repeats=2",
    "--interpret-repeats=1",
    "--choose",
    "--no-progress",
]
_NUM_SHAPES = len(_SHAPES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    paths = {k: out / f"bench.{k}" for k in ("csv", "json", "png")}
    rows = lookup.main(
        [*_ARGS, f"--csv={paths['csv']}", f"--json={paths['json']}", f"--plot={paths['png']}"]
    )
    return rows, paths


def test_one_row_per_provider_pass_and_shape(run):
    rows, paths = run
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == lookup.CSV_COLUMNS
        csv_rows = list(reader)
    keys = [
        (r["provider"], r["pass"], r["batch"], r["seq_len"], r["d_model"], r["vocab_size"])
        + (r["dtype"], r["ids"])
        for r in csv_rows
    ]
    assert len(keys) == len(set(keys))
    assert len(csv_rows) == len(options.PROVIDERS) * len(options.PASSES) * _NUM_SHAPES
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
    if problem := harness.backend_problem("mosaic"):  # JAX 0.10.2: every row says why not.
        assert all(r["status"] == "skipped" and r["reason"] == problem for r in mosaic)
    else:  # Both shapes are small enough for the interpreter, and match bit for bit.
        assert all(r["median_ms"] is not None for r in mosaic)
        assert all(r["matches_xla"] for r in mosaic if r["pass"] == "fwd")


def test_plot_is_a_png(run):
    _, paths = run
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_budget_reports_the_shapes_left_as_skipped():
    rows = lookup.main(
        [f"--shape={_SHAPES[0]}", "--passes=fwd", "--max-seconds=0", "--no-progress"]
    )
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert all(r["reason"] == "time budget: --max-seconds 0 reached" for r in rows)
    assert {r["provider"] for r in rows} == set(options.PROVIDERS)
