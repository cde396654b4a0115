"""The command line: the arguments, then each step in turn under its time limit."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.gpu_check.running import GRACE_S
from tools.gpu_check.steps import MIN_LIMIT_S, STEPS, Check, step_limits
from tools.gpu_check.summary import render_summary

DESCRIPTION = "Verify and measure a CUDA machine from a checkout, with no Bazel."
# The whole check's time budget: each step gets its share (steps.SHARES).
DEFAULT_BUDGET_S = 450.0
DRY_RUN_BUDGET_S = 300.0


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown (no git checkout)"


def parse_args(argv):
    # tools/gpu_check/cli.py -> the repository root; not resolved, so runfiles work.
    default_repo = Path(__file__).absolute().parents[2]
    p = argparse.ArgumentParser(prog="gpu_check", description=DESCRIPTION)
    p.add_argument("--out", type=Path, required=True, help="directory for every file written")
    p.add_argument(
        "--wheels", type=Path, help="directory of *.whl to install (tools/gpu_check/wheels.py)"
    )
    p.add_argument("--dry-run", action="store_true", help="the CPU form of every step")
    p.add_argument(
        "--budget",
        type=float,
        help=f"seconds for all steps (default {DEFAULT_BUDGET_S:.0f}; "
        f"{DRY_RUN_BUDGET_S:.0f} with --dry-run)",
    )
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in order")
    p.add_argument("--repo", type=Path, default=default_repo, help="the repository's root")
    args = p.parse_args(argv)
    args.steps = [x for x in args.steps.split(",") if x]
    bad = [x for x in args.steps if x not in STEPS]
    if bad or not args.steps:
        p.error(f"--steps={','.join(args.steps)} must be a comma-separated subset of {STEPS}")
    if args.budget is None:
        args.budget = DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    if args.budget <= 0:
        p.error(f"--budget={args.budget} must be positive")
    args.repo = args.repo.absolute()
    if not (args.repo / "bench" / "lookup.py").exists() or not (args.repo / "tests").is_dir():
        p.error(f"--repo={args.repo} must be the repository root (bench/lookup.py, tests/)")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels={args.wheels} must be a directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.absolute()
    check = Check(args)
    check.command = "python3 tools/gpu_check " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    check.commit = _git_commit(args.repo)
    limits = step_limits(args.budget)
    mode = "DRY RUN (CPU form of each step)" if args.dry_run else "GPU"
    print(f"gpu_check: {mode}; repo {args.repo}; out {args.out}", flush=True)
    print(
        "time limits (s; time a step leaves unused, or overruns, passes on to the next): "
        + ", ".join(f"{n} {limits[n]:.0f}" for n in STEPS if n in args.steps),
        flush=True,
    )
    spare = 0.0
    start = time.monotonic()
    try:
        for name in STEPS:
            step = check.steps[name]
            if name not in args.steps:
                continue
            # A step that overran (by at most its SIGINT grace) takes it from the next.
            step.limit = max(MIN_LIMIT_S / 3, limits[name] + spare)
            print(
                f"\n== {STEPS.index(name) + 1}. {name} (time limit {step.limit:.0f} s)", flush=True
            )
            step_start = time.monotonic()
            check.deadline = step_start + step.limit
            check.log.write(f"\n== {name} (limit {step.limit:.0f} s)\n")
            try:
                getattr(check, name)(step)
            except Exception as e:  # A bug in a step is that step's failure, not the run's.
                step.fail(f"{type(e).__name__}: {e}")
            step.seconds = time.monotonic() - step_start
            if step.seconds > step.limit + GRACE_S + 5:
                step.fail(f"took {step.seconds:.0f} s, past its limit of {step.limit:.0f} s")
            spare = step.limit - step.seconds
            print(f"== {name}: {step.status} in {step.seconds:.1f} s", flush=True)
        if "summary" in args.steps:  # Again, now with every step's time in the table.
            (args.out / "summary.md").write_text(render_summary(check))
    finally:
        check.log.close()
        shutil.rmtree(check.tmp, ignore_errors=True)
    total = time.monotonic() - start
    failed = [s.name for s in check.steps.values() if s.status == "fail"]
    summary = args.out / "summary.md"
    if summary.exists():
        print(f"\n{summary}:\n{summary.read_text()}")
    counts = {k: sum(s.status == k for s in check.steps.values()) for k in ("pass", "fail", "skip")}
    print(
        f"gpu_check: {'FAIL' if failed else 'PASS'} in {total:.0f} s: steps "
        f"{counts['pass']} passed, {counts['fail']} failed ({', '.join(failed) or 'none'}), "
        f"{counts['skip']} skipped; files in {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
