#!/usr/bin/env bash
# Runs a Python program with another JAX stack's interpreter: the program of
# pytest_test()'s per-stack test targets (tools/pytest.bzl) and of the benchmark's
# per-stack binaries (tools/BUILD). Arguments: that interpreter (a runfiles path), then
# the script (or -m and a module) and its arguments. Bazel starts it in the runfiles tree.
set -euo pipefail
python="$1"
shift
exec "$python" "$@"
