"""The lookups, losses, training and docs/scaling.md's recipes on several processes.

One JAX distributed runtime on this host: ``NUM_PROCESSES`` worker processes on
127.0.0.1, each with ``LOCAL_DEVICES`` CPU devices
(``--xla_force_host_platform_device_count``), their collectives over gloo. The workers
(``tests/embed/multiprocess_worker.py``) are started once for this module, run every
check on meshes spanning all of them, and write what they saw; each test here compares
one group of it with the unsharded result computed in this process. The workers run
in their own process groups, are bounded by ``TIMEOUT_S`` and are killed, whatever
happens, before the fixture returns. Where the CPU collectives do not work, the
workers' probe says why and every test here skips with that reason.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import grid
from tests.embed import multiprocess_worker as worker

NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 240  # A hung worker fails the test long before its Bazel timeout (900 s).


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(processes):
    # The whole group, even if its leader exited: nothing a worker started survives.
    for p in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each worker's ``(arrays, messages)``, after all of them exited cleanly."""
    out = tmp_path_factory.mktemp("multiprocess")
    root = Path(worker.__file__).parents[2]  # Not resolved: Bazel's runfiles tree.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    port = _free_port()
    processes, logs = [], []
    start = time.monotonic()
    try:
        for i in range(NUM_PROCESSES):
            log = open(out / f"{i}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            command = [sys.executable, "-m", worker.__name__, str(port), str(i)]
            processes.append(
                subprocess.Popen(
                    [*command, str(NUM_PROCESSES), str(out)],
                    cwd=root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Its own process group, killed as one.
                )
            )
        while any(p.poll() is None for p in processes):
            if time.monotonic() - start > TIMEOUT_S:
                break
            if any(p.poll() not in (None, 0) for p in processes):
                break  # One crashed: the others may wait for it forever.
            time.sleep(0.2)
    finally:
        _kill(processes)
        for log in logs:
            log.close()
    wall = time.monotonic() - start
    codes = [p.returncode for p in processes]
    tails = "\n".join(
        f"--- process {i} (exit {codes[i]}):\n" + (out / f"{i}.log").read_text()[-3000:]
        for i in range(NUM_PROCESSES)
    )
    reports = [out / f"{i}.json" for i in range(NUM_PROCESSES)]
    for report in reports:
        if report.exists() and "skip" in json.loads(report.read_text()):
            pytest.skip(json.loads(report.read_text())["skip"])
    assert codes == [0] * NUM_PROCESSES, f"workers failed or hung after {wall:.0f}s\n{tails}"
    print(f"{NUM_PROCESSES} processes x {LOCAL_DEVICES} devices: {wall:.1f}s")
    return [
        (dict(np.load(out / f"{i}.npz")), json.loads(reports[i].read_text())["messages"])
        for i in range(NUM_PROCESSES)
    ]


@pytest.fixture(scope="module")
def expected():
    return worker.expected()


def _compare(runs, expected, prefix):
    arrays, _ = expected
    keys = sorted(k for k in arrays if k.split("/", 1)[1].startswith(prefix))
    assert keys, prefix
    for got, _ in runs:
        assert sorted(k for k in got if k.split("/", 1)[1].startswith(prefix)) == keys
        for key in keys:
            if key.startswith("bits/"):
                grid.assert_bits_equal(got[key], arrays[key])
            else:
                np.testing.assert_allclose(
                    got[key], arrays[key], rtol=worker.RTOL, atol=worker.ATOL, err_msg=key
                )


def test_layouts_and_backends_forward_and_gradient(runs, expected):
    # Three layouts x xla and interpreted pallas, ids split per process and replicated.
    _compare(runs, expected, "forward/")
    _compare(runs, expected, "grad/")
    # And each table gradient against NumPy's sums, not only against the unsharded
    # lookup of the same backend: a backward wrong in both ways alike fails here.
    _, ids, grad_out, *_ = worker._inputs()
    oracle = grid.grad_in_token_order(grad_out.reshape(-1, worker.D), ids.reshape(-1), worker.V)
    for got, _ in runs:
        grads = [k for k in got if k.split("/", 2)[1] == "grad"]
        assert len(grads) == len(worker.LAYOUTS) * len(worker.BACKENDS) * len(worker.KINDS)
        for key in grads:
            np.testing.assert_allclose(
                got[key], oracle, rtol=worker.RTOL, atol=worker.ATOL, err_msg=key
            )


def test_modes_eager_and_jitted_with_split_ids(runs, expected):
    _compare(runs, expected, "mode/")
    _compare(runs, expected, "float_ids/")
    _compare(runs, expected, "explicit/")  # On a mesh with Explicit axes.


def test_errors_raise_the_same_text_on_every_process(runs, expected):
    # Out-of-range ids (mode="error") and fractional float ids, split across processes:
    # every process raises the unsharded lookup's error, eagerly and under checkify.
    _, want = expected
    assert want
    for _, messages in runs:
        assert {k: messages[k] for k in want} == want
    assert want["error/eager/sharded"].startswith("IndexError: token id 13 at position (2, 3)")


def test_tied_losses_vocab_and_data_parallel(runs, expected):
    _compare(runs, expected, "loss/")


def test_training_steps_track_the_unsharded_run(runs, expected):
    _compare(runs, expected, "train/")
    for got, _ in runs:
        losses = got["close/train/vocab/xla/losses"]
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", ["default", "auto"])
def test_doc_recipes_run_as_written(runs, kind):
    # docs/scaling.md's code blocks, executed by the workers on jax.make_mesh's default
    # axis types and on Auto axes: both recipes give the unsharded lookup's rows.
    for got, messages in runs:
        for i in range(len(worker.recipes())):
            ids = got[f"recipe/{kind}/{i}/ids"]
            assert ids.shape == (NUM_PROCESSES * worker.RECIPE_IDS_SHAPE[0],) + ids.shape[1:]
            grid.assert_bits_equal(got[f"recipe/{kind}/{i}/out"], worker.expected_recipe(ids))
            # The table is really split by rows over "tp", not left replicated.
            assert messages[f"recipe/{kind}/{i}/table_spec"] == ["tp", None]
        if kind == "auto":
            assert "Explicit" not in messages[f"recipe/{kind}/axis_types"]
