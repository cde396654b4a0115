"""bench.eager: eager calls of MyEmbed in every mode against flax.nnx.Embed."""

import pytest

from bench import eager, harness, lookup


def _check_rows(rows, shapes, printed):
    names = ["nnx.Embed"] + [f"MyEmbed(mode={m!r})" for m in harness.MODES]
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


def test_eager_times_every_mode_against_nnx_embed(capsys):
    shapes = [(1, 8, 16, 64), (2, 5, 8, 300)]
    rows = eager.main([*(f"--shape={','.join(map(str, s))}" for s in shapes), "--repeats=3"])
    _check_rows(rows, shapes, capsys.readouterr().out)


def test_the_main_jobs_eager_flag_runs_it_instead_of_the_grid(capsys):
    shape = (1, 4, 8, 32)
    argv = ["--shape=1,4,8,32", "--eager", "--eager-repeats=2", "--warmup=1", "--no-progress"]
    rows = lookup.main(argv)
    printed = capsys.readouterr().out
    _check_rows(rows, [shape], printed)
    assert "B=" not in printed  # The grid did not run.
