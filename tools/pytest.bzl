"""pytest_test: one pytest file as a Bazel py_test.

    load("//tools:pytest.bzl", "pytest_test")

    pytest_test(
        name = "test_foo",
        srcs = ["test_foo.py"],
        deps = ["//embed"],           # py_library targets it imports
        data = ["testdata/x.npz"],    # files it reads (runfiles-relative paths)
        tags = ["gpu"],               # "gpu" / "large": skipped by default, see .bazelrc
    )

The test runs `pytest <srcs> <args>` from the runfiles root, through the
shared runner //tools:pytest_runner.py, with the Python toolchain's venv
(@py_venv, built from requirements_lock.txt), so third-party packages need no
deps. `import embed`, `import kernels`, `import tests.x` work as in the source
tree. conftest.py next to the test, and the root's conftest.py / pytest.ini /
pyproject.toml, are added automatically; a conftest.py in a parent package that
has its own BUILD file must be passed in deps (e.g. a py_library in that
package).
"""

_RUNNER = "//tools:pytest_runner.py"

def pytest_test(
        name,
        srcs,
        deps = [],
        data = [],
        tags = [],
        size = "medium",
        args = [],
        env = {},
        **kwargs):
    """A py_test that runs pytest on `srcs`.

    Args:
      name: target name.
      srcs: the pytest file(s) (usually one); all are passed to pytest.
      deps: py_library targets the test imports (repo code, conftest libraries).
      data: files the test reads at run time.
      tags: e.g. "gpu", "large" (filtered in .bazelrc), "manual", "exclusive".
      size: Bazel test size; sets the default timeout.
      args: extra pytest arguments, after the test files (e.g. ["-x", "-q"]).
      env: extra environment variables for the test.
      **kwargs: anything else py_test accepts (timeout, shard_count, ...).
    """
    conftest = native.glob(["conftest.py"], allow_empty = True)
    native.py_test(
        name = name,
        srcs = srcs + [_RUNNER],
        main = _RUNNER,
        deps = deps,
        data = data + [c for c in conftest if c not in srcs] + ["//:pytest_config"],
        args = ["$(rootpath %s)" % s for s in srcs] + args,
        env = env,
        tags = tags,
        size = size,
        python_version = "PY3",
        srcs_version = "PY3",
        legacy_create_init = False,
        **kwargs
    )
