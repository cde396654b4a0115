"""The six steps of a check, in order, and the state they share.

Each step is a method of :class:`Check` that fills in its :class:`Step` (a status,
notes for summary.md, data); the time limits come from :func:`step_limits`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.options import KERNELS, lookup_argv
from tests import gpu_selection
from tools.gpu_check.running import Log, Result, run_command
from tools.gpu_check.summary import (
    coverage,
    format_counts,
    junit_counts,
    pytest_line,
    render_summary,
    shape_text,
)

STEPS = ("versions", "wheels", "tests", "sanitizer", "benchmark", "summary")
# Each step's share of --budget; the time a step leaves unused goes to the next one.
SHARES = {
    "versions": 0.06,
    "wheels": 0.04,
    "tests": 0.33,
    "sanitizer": 0.20,
    "benchmark": 0.335,
    "summary": 0.035,
}
# No step gets less than this, whatever the budget (importing JAX takes seconds).
MIN_LIMIT_S = 15.0

PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "triton",
    "jax-triton",
    "flax",
    "optax",
    "numpy",
    "torch",
    "pytest",
    "hypothesis",
    "matplotlib",
)
# Packages the --wheels must not replace: the check is of the machine's own.
PINNED = ("jax", "jaxlib", "triton", "numpy", "flax")

# The benchmark of a dry run: one tiny shape with both id distributions. On a CPU the
# interpreted Mosaic GPU kernel takes most of its time, in proportion to the tokens and
# the rounds: 16 tokens, and no warm-up round (each case's first call, its compilation
# and bit check, warms it).
DRY_RUN_BENCHMARK = dict(
    shape=[(2, 8, 64, 512)],
    dtype=["bfloat16"],
    ids="both",
    warmup=0,
    repeats=2,
    interpret_repeats=1,
)

_PROBE = r"""
import importlib.metadata, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for name in sys.argv[1].split(","):
    try:
        out["packages"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
if sys.argv[2] == "jax":
    try:
        import jax
        out["backend"] = jax.default_backend()
        out["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as e:
        out["jax_error"] = f"{type(e).__name__}: {e}"[:500]
print("PROBE " + json.dumps(out))
"""


@dataclasses.dataclass
class Step:
    name: str
    status: str = "not run"  # "pass", "fail", "skip" or "not run".
    limit: float = 0.0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)  # Lines for summary.md.
    data: dict = dataclasses.field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {self.name}: {text}", flush=True)

    def fail(self, text: str) -> None:
        self.status = "fail"
        self.note(f"FAIL: {text}")

    def skip(self, text: str) -> None:
        if self.status != "fail":
            self.status = "skip"
        self.note(f"skipped: {text}")


def step_limits(budget: float) -> dict[str, float]:
    """Each step's own time limit: its share of ``budget``, at least MIN_LIMIT_S."""
    return {name: max(MIN_LIMIT_S, SHARES[name] * budget) for name in STEPS}


# --- The steps --------------------------------------------------------------------------


class Check:
    """The state shared by the steps of one run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.repo: Path = args.repo
        self.out: Path = args.out
        self.dry = args.dry_run
        self.python = sys.executable
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        # Several processes share the GPU, one after another: none may take 75% of it.
        self.env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.log = Log(self.out / "gpu_check.log")
        self.steps = {name: Step(name) for name in STEPS}
        self.deadline = 0.0  # The current step's, from time.monotonic().
        self.started = datetime.datetime.now(datetime.UTC)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd, **kwargs) -> Result:
        kwargs.setdefault("env", self.env)
        kwargs.setdefault("cwd", self.repo)
        return run_command(cmd, timeout=self.left(), log=self.log, **kwargs)

    def test_paths(self) -> list[str]:
        """Where gpu-marked tests live: tests/, and examples/ where it is there."""
        return [p for p in gpu_selection.PATHS if (self.repo / p).is_dir()]

    def probe(self, with_jax: bool, names: tuple[str, ...] = PACKAGES) -> dict:
        """Versions of ``names`` (and JAX's devices) as the children will see them."""
        mode = "jax" if with_jax else "-"
        result = self.run([self.python, "-c", _PROBE, ",".join(names), mode], echo=0)
        for line in result.lines:
            if line.startswith("PROBE "):
                return json.loads(line[len("PROBE ") :])
        return {"error": (result.text or f"exit {result.returncode}")[-500:]}

    # 1.
    def versions(self, step: Step) -> None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            if self.dry:
                step.skip("no nvidia-smi on this machine (dry run): no GPU, driver or CUDA")
            else:
                step.fail("nvidia-smi not found: is this a CUDA machine?")
        else:
            query = "name,driver_version,memory.total,compute_cap"
            r = self.run([smi, f"--query-gpu={query}", "--format=csv,noheader"])
            gpus = [line.strip() for line in r.lines if line.strip()]
            if r.returncode or not gpus:
                (step.skip if self.dry else step.fail)(f"nvidia-smi failed (exit {r.returncode})")
            else:
                step.data["gpus"] = gpus
                step.note(f"GPU: {'; '.join(gpus)}")
            r = self.run([smi], echo=0)
            cuda = re.search(r"CUDA Version:\s*([\d.]+)", r.text)
            step.data["cuda_driver"] = cuda.group(1) if cuda else ""
            step.note(f"CUDA (driver): {step.data['cuda_driver'] or 'unknown'}")
        for tool, pattern in (
            ("nvcc", r"release ([\d.]+)"),
            ("compute-sanitizer", r"Version ([\d.]+)"),
        ):
            path = shutil.which(tool)
            if path:
                r = self.run([path, "--version"], echo=0)
                found = re.search(pattern, r.text)
                step.data[tool] = found.group(1) if found else "present"
                step.note(f"{tool}: {step.data[tool]}")
            else:
                step.data[tool] = ""
                step.note(f"{tool}: not found")
        info = self.probe(with_jax=True)
        step.data["python"] = info
        if "error" in info:
            step.fail(f"the Python probe failed: {info['error']}")
            return
        step.note(f"python {info['python']} ({info['executable']})")
        step.note(
            "packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items())
            or "none of them"
        )
        if "jax_error" in info:
            step.fail(f"JAX does not start: {info['jax_error']}")
            return
        step.note(f"JAX backend {info['backend']}, devices {info['devices']}")
        if info["backend"] != "gpu":
            if self.dry:
                step.note(f"dry run: JAX's backend is {info['backend']}, not a GPU (expected)")
            else:
                step.fail(
                    f"JAX's default backend is {info['backend']}, not gpu: no GPU check can run"
                )
        if step.status == "not run":
            step.status = "pass"

    # 2.
    def wheels(self, step: Step) -> None:
        step.data["installed"] = {}
        if self.args.wheels is None:
            step.skip(
                "no --wheels given: nothing installed (the triton backend needs jax-triton; "
                "python3 tools/gpu_check/wheels.py DIR fetches it)"
            )
            return
        wheels = sorted(Path(self.args.wheels).glob("*.whl"))
        if not wheels:
            step.fail(f"--wheels {self.args.wheels}: no *.whl files there")
            return
        # Distribution names from the file names (PEP 427: name-version-...-tag.whl).
        names = (*PACKAGES, *(w.name.split("-")[0].replace("_", "-") for w in wheels))
        before = self.probe(with_jax=False, names=names).get("packages", {})
        target = self.tmp / "site"
        pip = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        pip += ["--no-compile", "--no-cache-dir", "--target", str(target), *map(str, wheels)]
        r = self.run(pip)
        if r.returncode:
            if "No module named pip" in r.text and self.dry:
                step.skip("this Python has no pip (dry run)")
            else:
                step.fail(f"pip install failed (exit {r.returncode}): {r.text[-300:]}")
            return
        paths = [str(target), *filter(None, [self.env.get("PYTHONPATH")])]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        step.note(f"installed {len(wheels)} wheel(s) into {target} (PYTHONPATH of the children)")
        after = self.probe(with_jax=False, names=names).get("packages", {})
        changed = [
            f"{n} {before.get(n)} -> {after.get(n)}"
            for n in PINNED
            if before.get(n) != after.get(n)
        ]
        if changed:
            step.fail(f"the wheels replace the machine's own packages: {', '.join(changed)}")
            return
        added = {n: v for n, v in after.items() if before.get(n) != v}
        step.data["installed"] = added
        step.note(
            "now visible: " + (", ".join(f"{n} {v}" for n, v in added.items()) or "nothing new")
        )
        if "jax-triton" in added and not self.dry:
            r = self.run([self.python, "-c", "import jax_triton; print(jax_triton.__file__)"])
            if r.returncode:
                step.fail(f"jax_triton does not import: {r.text[-300:]}")
                return
        step.status = "pass"

    # 3.
    def tests(self, step: Step) -> None:
        markers = gpu_selection.CPU_MARKEXPR if self.dry else gpu_selection.GPU_MARKEXPR
        extra = []
        if not self.dry and _has_module(self, "xdist"):
            extra = ["-n", "4"]  # Compiles dominate: 4 processes, one GPU.
        paths = " ".join(self.test_paths())
        step.data["command"] = f'python -m pytest {paths} -m "{markers}" {" ".join(extra)}'.strip()
        cmd = [self.python, "-m", "pytest", *self.test_paths(), "-m", markers, *extra]
        cmd += ["-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={self.out / 'tests.xml'}"]
        result = self.run(cmd)
        counts = junit_counts(self.out / "tests.xml")
        step.data["counts"] = counts
        line = pytest_line(result.lines)
        step.note(f"pytest: {format_counts(counts)} ({line or 'no summary line'})")
        if self.dry:
            step.note(
                "dry run: the gpu tests are collected and skipped (JAX sees no GPU); "
                '"large" tests are left out (a 4.3 GB table)'
            )
        if result.timed_out:
            step.fail(f"timed out after {result.seconds:.0f} s")
        elif result.returncode not in (0,):
            step.fail(f"pytest exit {result.returncode}")
        step.data["coverage"] = coverage(counts)
        for what, (passed, total) in step.data["coverage"].items():
            if not total:
                step.fail(f"no gpu test for {what} (a test named *{gpu_selection.REQUIRED[what]}*)")
            else:
                step.note(f"{what}: {passed} of {total} passed")
        if not counts["total"]:
            step.fail("no gpu-marked test was collected")
        elif not self.dry and counts["skipped"]:
            step.fail(f"{counts['skipped']} gpu tests skipped on a GPU: {counts['skip_reasons']}")
        elif not self.dry and not counts["passed"]:
            step.fail("no test passed")
        if step.status == "not run":
            step.status = "pass"

    # 4.
    def sanitizer(self, step: Step) -> None:
        select = ["-k", gpu_selection.MEMCHECK_KEYWORDS]
        step.data["selection"] = (
            f'-m "{gpu_selection.GPU_MARKEXPR}" -k "{gpu_selection.MEMCHECK_KEYWORDS}"'
        )
        sanitizer = shutil.which("compute-sanitizer")
        if self.dry or sanitizer is None:
            why = "dry run" if self.dry else "compute-sanitizer is not installed here"
            cmd = [
                self.python,
                "-m",
                "pytest",
                *self.test_paths(),
                "-m",
                gpu_selection.GPU_MARKEXPR,
                *select,
            ]
            r = self.run([*cmd, "--collect-only", "-q", "-p", "no:cacheprovider"], echo=0)
            selected = [line for line in r.lines if "::" in line]
            step.data["selected"] = len(selected)
            step.skip(
                f"{why}: memcheck not run; the selection it would run holds {len(selected)} tests"
            )
            if r.returncode or not selected:
                step.fail(f"the sanitizer's test selection is broken (collect exit {r.returncode})")
            return
        env = dict(self.env)
        # One cudaMalloc per buffer (no pool), so memcheck sees each buffer's bounds.
        env.update(XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        step.data["env"] = env
        # Failed CUDA API calls that the frameworks make on purpose (probing) are not
        # memory errors: left out of the count where this version has the option.
        options = ["--tool", "memcheck"]
        help_text = self.run([sanitizer, "--help"], echo=0).text
        if "--report-api-errors" in help_text:
            options += ["--report-api-errors", "no"]
        if "--print-limit" in help_text:
            options += ["--print-limit", "20"]
        pytest = [
            self.python,
            "-m",
            "pytest",
            *self.test_paths(),
            "-m",
            gpu_selection.GPU_MARKEXPR,
            *select,
        ]
        cmd = [sanitizer, *options, *pytest]
        cmd += ["-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={self.out / 'sanitizer.xml'}"]
        step.data["command"] = shlex.join(["compute-sanitizer", *options, "python", *pytest[1:]])
        result = self.run(cmd, env=env)
        counts = junit_counts(self.out / "sanitizer.xml")
        step.data["counts"] = counts
        summaries = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", result.text)]
        step.data["errors"] = sum(summaries) if summaries else None
        step.note(
            f"memcheck: {step.data['errors'] if summaries else 'no'} errors reported "
            f"({len(summaries)} ERROR SUMMARY lines); pytest: {format_counts(counts)}"
        )
        if result.timed_out:
            step.fail(f"timed out after {result.seconds:.0f} s")
        if not summaries:
            step.fail("compute-sanitizer printed no ERROR SUMMARY")
        elif step.data["errors"]:
            kinds = sorted(
                {
                    m[:80]
                    for m in re.findall(r"^=+ ((?:Invalid|Out-of|Misal).*)$", result.text, re.M)
                }
            )
            step.fail(f"memcheck found {step.data['errors']} errors: {kinds[:5]}")
        if result.returncode or counts["failed"] or not counts["passed"]:
            step.fail(f"the tests under memcheck did not pass (exit {result.returncode})")
        if step.status == "not run":
            step.status = "pass"

    # 5.
    def benchmark(self, step: Step) -> None:
        # The benchmark's flag -> the file it writes.
        paths = {
            k: self.out / f"benchmark.{ext}"
            for k, ext in (("csv", "csv"), ("json", "json"), ("plot", "png"))
        }
        if self.dry:
            grid = lookup_argv(**DRY_RUN_BENCHMARK)
            step.note("dry run: a tiny grid on the CPU (not GPU figures); triton needs CUDA")
        else:
            # JAX's start-up and the files' writing come on top of the measuring, and
            # about a minute stays for the compiled table (compiled_table).
            grid = lookup_argv(grid="gpu", max_seconds=round(max(10.0, self.left() - 100)))
        flags = [*grid, *lookup_argv(passes=("fwd", "bwd"), choose=True, no_progress=True)]
        cmd = [self.python, "-m", "bench.lookup", *flags, *lookup_argv(**paths)]
        step.data["command"] = " ".join(["python -m bench.lookup", *flags])
        step.data["command"] += " --csv/--json/--plot OUT/benchmark.{csv,json,png}"
        result = self.run(cmd, echo=60)
        step.data["choose"] = [
            line for line in result.lines if line.startswith('"auto"') or ": auto -> " in line
        ]
        if result.timed_out:
            step.fail(f"timed out after {result.seconds:.0f} s")
        if result.returncode:
            step.fail(f"exit {result.returncode}: {result.text[-300:]}")
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            step.fail(f"not written: {', '.join(missing)}")
            return
        rows = json.loads(paths["json"].read_text())
        step.data["rows"] = rows
        shapes = {shape_text(r) for r in rows}
        measured = {shape_text(r) for r in rows if r["median_ms"] is not None}
        cut = shapes - measured
        step.note(f"{len(shapes) - len(cut)} of {len(shapes)} shapes measured ({len(rows)} rows)")
        if cut:
            step.note(f"{len(cut)} shapes left out by the time limit")
        wrong = [r for r in rows if r["pass"] == "fwd" and r["matches_xla"] is False]
        for r in wrong:
            step.fail(f"{r['label']} is NOT bit-identical to xla on {shape_text(r)}")
        kernels = {r["provider"] for r in rows if r["provider"] in KERNELS}
        for r in rows:
            cut_short = r["reason"].startswith("time budget")
            if (
                r["provider"] in kernels
                and r["status"] == "skipped"
                and not (self.dry or cut_short)
            ):
                step.fail(
                    f"{r['provider']} {r['pass']} did not run on {shape_text(r)}: {r['reason']}"
                )
        if self.dry:
            skipped = sorted(
                {f"{r['label']}: {r['reason']}" for r in rows if r["status"] == "skipped"}
            )
            for reason in skipped:
                step.note(f"dry run skipped {reason}")
        self.compiled_table(step)
        if step.status == "not run":
            step.status = "pass"

    def compiled_table(self, step: Step) -> None:
        """tools/sass_report.py's COMPILED-not-measured table, beside the measured rows.

        Informational: it never fails the step. It gets what is left of the step's time
        (the benchmark leaves it about a minute), and a narrower grid in a dry run.
        """
        script = self.repo / "tools" / "sass_report.py"
        left = self.left() - 5
        if not script.exists() or left < 20:
            why = "no time left" if script.exists() else f"no {script}"
            step.note(f"compiled table skipped: {why}")
            return
        path = self.out / "sass_report.md"
        cmd = [self.python, str(script), "--markdown", "--d-models=1024,4096", f"--output={path}"]
        if self.dry:
            cmd += ["--d-models=64", "--dtypes=float32", "--backends=xla,pallas"]
        result = run_command(cmd, timeout=left, log=self.log, env=self.env, cwd=self.repo, echo=0)
        if result.returncode or result.timed_out or not path.exists():
            step.note(f"compiled table skipped: {' '.join(result.text.split())[-300:]}")
            return
        step.data["compiled"] = path.read_text().strip()

    # 6.
    def summary(self, step: Step) -> None:
        path = self.out / "summary.md"
        path.write_text(render_summary(self))
        step.status = "pass"
        step.note(f"wrote {path}")


def _has_module(check: Check, name: str) -> bool:
    r = check.run([check.python, "-c", f"import {name}"], echo=0)
    return r.returncode == 0
