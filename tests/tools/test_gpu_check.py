"""tools/gpu_check: its dry run end to end, and that a failing step fails the run.

The dry run is the CPU form of the check a CUDA machine runs (README, "GPU tests"), so
CI checks the tool before a GPU ever sees it. It runs as ``python3 tools/gpu_check``:
under Bazel inside the runfiles tree, found through TEST_SRCDIR; from a checkout, beside
this file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from kernels import compat
from tests import gpu_selection
from tools.gpu_check import running, steps, wheels
from tools.gpu_check.summary import coverage, junit_counts


def _repo_root() -> Path:
    srcdir, workspace = os.environ.get("TEST_SRCDIR"), os.environ.get("TEST_WORKSPACE")
    if srcdir and workspace and (Path(srcdir) / workspace / "tools" / "gpu_check").exists():
        return Path(srcdir) / workspace
    return Path(__file__).absolute().parents[2]


ROOT = _repo_root()
GPU_CHECK = ROOT / "tools" / "gpu_check"


def _run(*args, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(GPU_CHECK), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _output(proc) -> str:
    return f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc = _run("--dry-run", "--out", out, "--repo", ROOT)
    return proc, out, time.monotonic() - start


def _step_rows(summary: str) -> dict[str, str]:
    """summary.md's steps table: step name -> its result."""
    steps = summary.split("### Steps", 1)[1]
    rows = re.findall(r"^\| (\w+) \| (pass|fail|skip|not run) \|", steps, re.M)
    return dict(rows)


def test_dry_run_passes_and_writes_every_file(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, _output(proc)
    for name in ("summary.md", "gpu_check.log", "tests.xml", "benchmark.csv", "benchmark.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: PASS") and "0 failed" in last
    # Every step's limit is printed before anything runs.
    assert re.search(r"time limits .*versions \d+, wheels \d+, tests \d+", proc.stdout)
    assert seconds < 300  # The dry run's own budget.


def test_dry_run_summary_says_what_each_step_did_and_left_out(dry_run):
    proc, out, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## DRY RUN on cpu") and "not GPU figures" in summary
    assert _step_rows(summary) == {
        "versions": "skip",
        "wheels": "skip",
        "tests": "pass",
        "sanitizer": "skip",
        "benchmark": "pass",
        "summary": "pass",
    }
    assert "skipped: no nvidia-smi on this machine (dry run)" in summary
    assert "skipped: no --wheels given" in summary
    assert "- Command: `python3 tools/gpu_check --dry-run --out" in summary
    assert re.search(r"- Versions: jax \d", summary)

    tests = re.search(
        r"- Tests \(`python -m pytest tests( examples)? -m \"gpu or backends\"`\): "
        r"\*\*PASS\*\*, (.*)",
        summary,
    )
    assert tests, summary
    passed, failed, skipped = map(int, re.findall(r"(\d+) \w+", tests.group(2))[:3])
    assert (passed, failed) == (0, 0) and skipped > 0  # No GPU: every gpu test skips.
    cover = re.search(r"- The gpu tests cover: (.*)", summary).group(1)
    for what in gpu_selection.REQUIRED:
        found = re.search(re.escape(what) + r" \(0 of (\d+) passed\)", cover)
        assert found and int(found.group(1)) > 0, what

    memcheck = re.search(r"the selection it would run holds (\d+) tests", summary)
    assert memcheck and int(memcheck.group(1)) > 0
    assert "dry run: memcheck not run" in summary


def test_dry_run_prints_the_compiled_table_beside_the_measured_rows(dry_run):
    """Where XLA's CUDA compiler is installed, the summary carries tools/sass_report.py's
    table, labelled as compiled and not measured, after the benchmark's rows; elsewhere
    the steps table says why it is not there."""
    _, out, _ = dry_run
    summary = (out / "summary.md").read_text()
    head = "### Compiled by XLA for an H100, NOT MEASURED (tools/sass_report.py)"
    if compat.cuda_compiler_problem() is not None:
        assert head not in summary and "compiled table skipped" in summary
        return
    assert head in summary and summary.index(head) > summary.index("### Per shape")
    table = summary.split(head, 1)[1].split("### Steps", 1)[0]
    assert "COMPILED by XLA" in table and "NOT MEASURED" in table
    for backend in ("xla", "pallas"):  # The dry run's grid: d_model 64, float32.
        assert re.search(rf"^\| {backend} \| fwd \| float32 \| 64 \|", table, re.M), table


def test_dry_run_headline_ratios_come_from_the_benchmark_json(dry_run):
    _, out, _ = dry_run
    rows = json.loads((out / "benchmark.json").read_text())
    assert {r["platform"] for r in rows} == {"cpu"}
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert {(r["dtype"], r["ids"]) for r in rows} == {
        ("bfloat16", ids) for ids in ("uniform", "zipf")
    }
    assert all(r["status"] == "skipped" for r in rows if r["provider"] == "triton")
    summary = (out / "summary.md").read_text()
    for pass_ in ("fwd", "bwd"):
        ratios = [r["vs_copy"] for r in rows if r["provider"] == "xla" and r["pass"] == pass_]
        line = re.search(
            rf"^\| xla \| {pass_} \| 2 \| 1\.00 \[1\.00, 1\.00\] \| (.*?) \[", summary, re.M
        )
        assert line, summary
        geomean = statistics.geometric_mean(ratios)
        assert float(line.group(1)) == pytest.approx(geomean, abs=0.006)
    # Interpreted Pallas is not a speed figure: no ratio of it in the summary.
    assert "pallas (interpret) |" not in summary


def _test_names() -> set[str]:
    """The names of the test functions in the tree's gpu test paths, read without importing."""
    names = set()
    for top in gpu_selection.PATHS:
        for path in (ROOT / top).rglob("test_*.py"):
            tree = ast.parse(path.read_text())
            names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    return {n for n in names if n.startswith("test_")}


def test_the_selections_name_tests_that_exist():
    names = _test_names()
    for what, part in gpu_selection.REQUIRED.items():
        assert any(part in n for n in names), f"no test named *{part}* for {what}"
    for keyword in gpu_selection.MEMCHECK_KEYWORDS.split(" or "):
        assert any(keyword in n for n in names), f"no test matches the memcheck keyword {keyword}"


def _fake_repo(tmp_path: Path, test_source: str) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "__init__.py").write_text("")
    (repo / "bench" / "lookup.py").write_text("")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_one.py").write_text(test_source)
    return repo


def test_a_failing_step_makes_the_run_fail(tmp_path):
    # A collection error in the gpu tests: the tests step fails, the run exits 1.
    repo = _fake_repo(tmp_path, "import a_module_that_does_not_exist\n")
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", out, "--repo", repo, "--steps", "tests,summary")
    assert proc.returncode == 1, _output(proc)
    summary = (out / "summary.md").read_text()
    assert _step_rows(summary)["tests"] == "fail"
    assert "FAIL: pytest exit 2" in summary
    assert "FAIL: no gpu test for every backend bit-identical to xla" in summary
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: FAIL")


def test_gpu_tests_missing_a_category_fail_even_when_pytest_passes(tmp_path):
    source = "import pytest\n\n@pytest.mark.gpu\ndef test_layer_under_nnx_jit():\n    pass\n"
    repo = _fake_repo(tmp_path, source)
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", out, "--repo", repo, "--steps", "tests,summary")
    assert proc.returncode == 1, _output(proc)
    summary = (out / "summary.md").read_text()
    assert "nnx.jit (1 of 1 passed)" in summary
    assert "FAIL: no gpu test for out-of-range modes" in summary


def _wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel holding one module, ``<name>_probe``."""
    dist = f"{name}-{version}.dist-info"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}_probe.py": "VALUE = 7\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_wheels_go_to_a_temporary_target_not_the_machine(tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _wheel(wheel_dir, "gpu_check_probe", "1.2.3")
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", out, "--wheels", wheel_dir, "--steps", "wheels,summary")
    assert proc.returncode == 0, _output(proc)
    assert "now visible: gpu-check-probe 1.2.3" in proc.stdout
    assert "gpu-check-probe 1.2.3 (from --wheels)" in (out / "summary.md").read_text()
    # The interpreter's own site-packages never saw it, and the target is gone.
    check = subprocess.run([sys.executable, "-c", "import gpu_check_probe"], capture_output=True)
    assert check.returncode != 0
    target = re.search(r"into (\S+) \(PYTHONPATH", proc.stdout).group(1)
    assert not Path(target).exists()


def test_a_wheel_that_replaces_a_machine_package_fails(tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _wheel(wheel_dir, "numpy", "0.0.1")
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", out, "--wheels", wheel_dir, "--steps", "wheels,summary")
    assert proc.returncode == 1, _output(proc)
    assert re.search(
        r"FAIL: the wheels replace the machine's own packages: numpy \S+ -> 0\.0\.1", proc.stdout
    )


def test_a_command_past_its_limit_is_interrupted():
    start = time.monotonic()
    code = "import time; print('started', flush=True); time.sleep(120)"
    result = running.run_command([sys.executable, "-c", code], timeout=2, echo=0)
    assert result.timed_out and result.returncode != 0
    assert result.lines[0] == "started"
    assert time.monotonic() - start < 2 + running.GRACE_S


def test_a_command_that_ignores_sigint_is_killed(monkeypatch):
    monkeypatch.setattr(running, "GRACE_S", 1.0)
    code = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "print('started', flush=True); time.sleep(120)"
    )
    start = time.monotonic()
    result = running.run_command([sys.executable, "-c", code], timeout=2, echo=0)
    assert result.timed_out and result.returncode == -9
    assert time.monotonic() - start < 20


def test_step_limits_share_the_budget():
    limits = steps.step_limits(450)
    assert tuple(limits) == steps.STEPS
    assert sum(limits.values()) == pytest.approx(450)
    assert limits["tests"] > limits["versions"] and limits["benchmark"] > limits["wheels"]
    assert set(steps.step_limits(10).values()) == {steps.MIN_LIMIT_S}


def test_junit_counts_and_coverage(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="a" name="test_layer_under_nnx_jit[pallas]"/>'
        '<testcase classname="a" name="test_layer_under_nnx_jit[triton]"><failure message="x"/>'
        "</testcase>"
        '<testcase classname="b" name="test_out_of_range_x"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["skip_reasons"] == {"no GPU": 1}
    cover = coverage(counts)
    assert cover["nnx.jit"] == (1, 2)
    assert cover["out-of-range modes"] == (0, 1)
    assert cover["gradients"] == (0, 0)


def test_wheels_checks_requirements_against_the_machine(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "other", "1.0")
    requires = ("jax>=0.8.2", "triton>=3.6", "other", 'pytest; extra == "tests"')
    _wheel(good, "jax_triton", "1.0", requires)
    assert wheels.check(good) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "jax_triton", "1.0", ("jax>=0.12", "somethingelse"))
    _wheel(bad, "jaxlib", "0.12.0")
    problems = wheels.check(bad)
    assert any("needs jax>=0.12; the machine has jax 0.11.2" in p for p in problems), problems
    assert any("needs somethingelse: not on the machine" in p for p in problems), problems
    assert any("the machine has jaxlib already" in p for p in problems), problems


# --- The GPU form of the steps, on this CPU, against stand-ins ---------------------------
# A GPU run cannot happen here, so its parsing and its pass/fail rules are checked with a
# stand-in repo (gpu-marked tests without the GPU skip), a stand-in compute-sanitizer and
# a stand-in benchmark that writes given rows.

_GPU_TESTS = "import pytest\n\npytestmark = pytest.mark.gpu\n\n" + "".join(
    f"\ndef {name}():\n    pass\n"
    for name in (
        "test_forward_is_the_reference_bit_for_bit",
        "test_forward_is_bit_identical_to_xla",
        "test_gradient_matches_float32_reference",
        "test_layer_under_nnx_jit",
        "test_out_of_range_modes",
        "test_gpu_large_table_forward",
    )
)

_FAKE_SANITIZER = """#!/bin/sh
if [ "$1" = "--help" ]; then echo "  --report-api-errors arg   --print-limit arg"; exit 0; fi
echo "args: $*"
while [ "${1#--}" != "$1" ]; do shift 2; done  # The options: pairs.
"$@"
code=$?
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors"
exit $code
"""


def _gpu_env(tmp_path: Path, **extra) -> dict:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    sanitizer = tools / "compute-sanitizer"
    sanitizer.write_text(_FAKE_SANITIZER)
    sanitizer.chmod(0o755)
    return {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", **extra}


def _run_env(env, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(GPU_CHECK), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(("errors", "code"), [(0, 0), (3, 1)])
def test_gpu_form_of_tests_and_sanitizer(tmp_path, errors, code):
    repo = _fake_repo(tmp_path, _GPU_TESTS)
    out = tmp_path / "out"
    env = _gpu_env(tmp_path, FAKE_ERRORS=str(errors))
    proc = _run_env(env, "--out", out, "--repo", repo, "--steps", "tests,sanitizer,summary")
    assert proc.returncode == code, _output(proc)
    summary = (out / "summary.md").read_text()
    markexpr = gpu_selection.GPU_MARKEXPR
    assert f'- Tests (`python -m pytest tests -m "{markexpr}"`): **PASS**, 6 passed' in summary
    assert "nnx.jit (1 of 1 passed)" in summary
    assert "--report-api-errors no" in summary  # Offered by this compute-sanitizer.
    result = "PASS" if errors == 0 else "FAIL"
    # Two tests selected: test_out_of_range_modes and test_gpu_large_table_forward.
    assert f"**{result}**, {errors} errors; tests 2 passed" in summary
    if errors:
        assert "FAIL: memcheck found 3 errors" in summary


def test_gpu_form_fails_when_gpu_tests_skip(tmp_path):
    repo = _fake_repo(
        tmp_path,
        _GPU_TESTS + "\n\n@pytest.mark.skip(reason='no GPU here')\ndef test_other():\n    pass\n",
    )
    out = tmp_path / "out"
    proc = _run_env(_gpu_env(tmp_path), "--out", out, "--repo", repo, "--steps", "tests,summary")
    assert proc.returncode == 1, _output(proc)
    assert "FAIL: 1 gpu tests skipped on a GPU: {'no GPU here': 1}" in proc.stdout


def _fake_benchmark(repo: Path, rows: list[dict]) -> None:
    (repo / "rows.json").write_text(json.dumps(rows))
    (repo / "bench" / "lookup.py").write_text(
        "import json, shutil, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "shutil.copy('rows.json', args['--json'])\n"
        "open(args['--csv'], 'w').write('provider\\n')\n"
        "open(args['--plot'], 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n')\n"
        'print(\'"auto" on gpu lowers to backend "pallas" (embed.backend_for)\')\n'
        "print('  B=1 T=8 D=4 V=16 float32 uniform: auto -> pallas (fastest measured)')\n"
    )


def _row(provider, pass_, median, *, d_model=4, vs_xla=None, vs_copy=None, **kw):
    row = dict(
        provider=provider,
        label=provider,
        pass_=pass_,
        num_tokens=8,
        d_model=d_model,
        vocab_size=16,
        dtype="float32",
        ids="uniform",
        status="ok",
        reason="",
        in_comparison=True,
        matches_xla=True if pass_ == "fwd" else None,
        median_ms=median,
        gbps=1.0,
        vs_xla=vs_xla,
        vs_copy=vs_copy,
    )
    row.update(kw)
    row["pass"] = row.pop("pass_")
    return row


def test_gpu_form_of_the_benchmark_summary(tmp_path):
    rows = []
    for d, (p_xla, p_copy) in {4: (0.5, 0.9), 8: (2.0, 0.4)}.items():
        for pass_ in ("fwd", "bwd"):
            rows += [
                _row("xla", pass_, 1.0, d_model=d, vs_xla=1.0, vs_copy=0.5),
                _row("pallas", pass_, p_xla, d_model=d, vs_xla=p_xla, vs_copy=p_copy),
                _row("copy", pass_, 0.5, d_model=d, vs_copy=1.0, matches_xla=None),
            ]
    budget = dict(status="skipped", reason="time budget: --max-seconds 9 reached")
    rows += [
        _row(p, q, None, d_model=16, matches_xla=None, **budget)
        for p in ("xla", "pallas", "copy")
        for q in ("fwd", "bwd")
    ]
    repo = _fake_repo(tmp_path, "")
    _fake_benchmark(repo, rows)
    out = tmp_path / "out"
    proc = _run_env(
        _gpu_env(tmp_path), "--out", out, "--repo", repo, "--steps", "benchmark,summary"
    )
    assert proc.returncode == 0, _output(proc)
    assert "--grid=gpu" in proc.stdout and "--max-seconds=" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## GPU figures:")
    # pallas: vs xla 0.5 and 2.0 (geomean 1.0), vs copy 0.9 and 0.4 (geomean 0.6).
    assert "| pallas | fwd | 2 | 1.00 [0.50, 2.00] | 0.60 [0.40, 0.90] | 2 of 2 shapes |" in summary
    assert "| pallas | bwd | 2 | 1.00 [0.50, 2.00] | 0.60 [0.40, 0.90] | - |" in summary
    assert "auto -> pallas" in summary
    assert "2 of 3 shapes measured" in proc.stdout
    assert "1 shapes left out by the time limit" in proc.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(matches_xla=False), "pallas is NOT bit-identical to xla"),
        (
            dict(status="skipped", reason="failed: XlaRuntimeError", median_ms=None),
            "pallas fwd did not run on T=8 D=4 V=16 float32 uniform: failed: XlaRuntimeError",
        ),
    ],
)
def test_gpu_form_of_the_benchmark_fails_on_a_wrong_or_missing_kernel(tmp_path, change, message):
    rows = [
        _row("xla", "fwd", 1.0, vs_xla=1.0, vs_copy=0.5),
        _row("pallas", "fwd", 1.0, vs_xla=1.0, vs_copy=0.5, **change),
        _row("copy", "fwd", 0.5, vs_copy=1.0, matches_xla=None),
    ]
    repo = _fake_repo(tmp_path, "")
    _fake_benchmark(repo, rows)
    out = tmp_path / "out"
    proc = _run_env(
        _gpu_env(tmp_path), "--out", out, "--repo", repo, "--steps", "benchmark,summary"
    )
    assert proc.returncode == 1, _output(proc)
    assert message in proc.stdout
