"""Runs pytest on the test files given as arguments; the `main` of pytest_test().

Bazel runs it from the runfiles tree (cwd = <runfiles>/<workspace>), where the
repo's packages (embed, kernels, tests, ...) sit at the top level.
"""

import os
import sys


def _workspace_root() -> str:
    """The runfiles directory holding this repo's files (embed/, tests/, ...)."""
    srcdir, workspace = os.environ.get("TEST_SRCDIR"), os.environ.get("TEST_WORKSPACE")
    if srcdir and workspace and os.path.isdir(os.path.join(srcdir, workspace)):
        return os.path.abspath(os.path.join(srcdir, workspace))
    # `bazel run`: this file is <runfiles>/<workspace>/tools/pytest_runner.py.
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    root = _workspace_root()
    # Python put the *resolved* directory of this script (tools/ in the source
    # tree) first on sys.path; drop it so that only runfiles are importable.
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if root not in sys.path:
        sys.path.insert(0, root)
    os.chdir(root)
    sys.dont_write_bytecode = True  # runfiles link back into the source tree

    # Caches go to the test's private scratch dir (HOME may be read-only).
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tmp, "triton_cache"))
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(tmp, "matplotlib"))
        os.environ.setdefault("XDG_CACHE_HOME", os.path.join(tmp, "cache"))

    args = list(argv)
    args += ["-p", "no:cacheprovider", "-ra", f"--rootdir={root}"]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    test_filter = os.environ.get("TESTBRIDGE_TEST_ONLY")  # bazel test --test_filter=EXPR
    if test_filter:
        args += ["-k", test_filter]

    import pytest  # after sys.path is fixed

    code = int(pytest.main(args))
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        sys.stdout.flush()
        print(f"pytest_runner: no tests collected from {argv}: failing", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
