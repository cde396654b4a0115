"""bench.tied_loss: the blocked tied loss against the naive one, time and memory."""

import pytest

from bench import harness, options, tied_loss


def test_tied_loss_rows_time_both_forms_and_report_memory():
    shape = harness.Shape(2, 16, 24, 300, "float32")
    rows = tied_loss.measure(shape, warmup=1, repeats=3)
    keys = [(r["provider"], r["pass_"]) for r in rows]
    assert sorted(keys) == sorted((p, q) for p in tied_loss.PROVIDERS for q in tied_loss.PASSES)
    medians = {(r["provider"], r["pass_"]): r["median_ms"] for r in rows}
    for r in rows:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["vs_naive"] == pytest.approx(r["median_ms"] / medians[("naive", r["pass_"])])
        # Arguments alone: the table, hidden states and targets.
        assert r["peak_mb"] * 1e6 >= (300 * 24 + 32 * 24 + 32) * 4
        assert 0 < r["temp_mb"] <= r["peak_mb"]
        assert r["rel_diff"] < 1e-5  # The fused loss and gradients match naive's.


def test_main_prints_a_line_per_shape_pass_and_provider(capsys):
    rows = tied_loss.main(["--shape=1,8,16,40", "--dtype=bfloat16", "--warmup=0", "--repeats=1"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("tied output projection + cross-entropy")
    assert len(printed) == 1 + len(rows) == 1 + len(tied_loss.PROVIDERS) * len(tied_loss.PASSES)
    assert all(r["shape"] == "B=1 T=8 D=16 V=40 bfloat16 uniform" for r in rows)


def test_the_main_jobs_tied_loss_flag_is_parsed():
    assert options.parse_lookup_args(["--tied-loss"]).tied_loss
    assert not options.parse_lookup_args([]).tied_loss
