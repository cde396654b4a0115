#!/usr/bin/env bash
# The test program of pytest_test()'s per-stack targets (tools/pytest.bzl): runs the
# shared pytest runner with another stack's interpreter. Arguments: that interpreter
# (a runfiles path), then the runner and its arguments. Bazel starts it in the
# runfiles tree, where the runner expects to be.
set -euo pipefail
python="$1"
shift
exec "$python" "$@"
