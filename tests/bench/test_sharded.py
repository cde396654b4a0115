"""bench.sharded: each mesh layout against one device's lookup.

In this process JAX has whatever devices it started with; the command line, which asks
for simulated host devices before JAX starts, runs in a fresh interpreter.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bench import harness, sharded

ROOT = Path(__file__).absolute().parents[2]


@pytest.mark.parametrize("layout", harness.LAYOUTS)
def test_timing_case_runs_the_layouts_lookup_and_labels_it(layout):
    fn, args, label = sharded.timing_case(
        layout, vocab_size=64, d_model=16, num_tokens=32, grad=True
    )
    value, grad = fn(*args)
    table, ids = args
    rows = harness.lookup(table, ids, backend="xla")
    # Summed in another order: within float32 rounding of the sum of magnitudes.
    np.testing.assert_allclose(value, rows.sum(), rtol=0, atol=1e-6 * float(abs(rows).sum()))
    assert grad.shape == table.shape
    where = "CPU-simulated" if jax.default_backend() == "cpu" else jax.default_backend().upper()
    assert label == f"{layout}-parallel x{jax.device_count()} ({where}, backend=auto)"


def test_timing_case_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match=r"layout='rows' must be one of"):
        sharded.timing_case("rows", vocab_size=8, d_model=4, num_tokens=4)


def test_command_line_simulates_the_devices_it_is_asked_for():
    cmd = [sys.executable, "-m", "bench.sharded", "--devices=2", "--shape=1,8,4,16"]
    cmd += ["--warmup=0", "--repeats=2"]
    if jax.default_backend() != "cpu":
        pytest.skip("host devices are simulated only on a CPU")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sharded lookups on 2 devices")
    labels = re.findall(r"(\w+-parallel x\d) \(CPU-simulated, backend=(\w+)\)", proc.stdout)
    expected = [("data-parallel x1", "xla")] + [
        (f"{layout}-parallel x2", "auto") for layout in harness.LAYOUTS
    ]
    assert labels == expected * 2  # fwd, then fwd+bwd.
    assert all(re.search(r"vs 1 device +\d+\.\d\dx$", line) for line in lines[1:])
