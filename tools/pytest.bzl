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
shared runner //tools:pytest_runner.py, once per JAX stack (WORKSPACE; README's
"Supported stacks"), so third-party packages need no deps:

    <name>            the `min` stack: the Python toolchain's venv (@py_venv,
                      requirements_lock.txt), as a py_test
    <name>_gpu_image  the same files on @py_gpu_image (an sh_test running that
    <name>_newest     venv's interpreter), and on @py_newest

Each target is tagged stack_<stack>, which `--config=<stack>` selects (.bazelrc). `import embed`, `import kernels`, `import tests.x` work as in the source
tree. conftest.py next to the test, and the root's conftest.py / pytest.ini /
pyproject.toml, are added automatically; a conftest.py in a parent package that
has its own BUILD file must be passed in deps (e.g. a py_library in that
package).
"""

_RUNNER = "//tools:pytest_runner.py"

# The stacks other than the toolchain's (`min`): target suffix -> venv repository.
OTHER_STACKS = {
    "gpu_image": "@py_gpu_image",
    "newest": "@py_newest",
}

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
    """A py_test that runs pytest on `srcs`, and its twins on the other stacks.

    Args:
      name: target name (the `min` stack); the others add _gpu_image / _newest.
      srcs: the pytest file(s) (usually one); all are passed to pytest.
      deps: py_library targets the test imports (repo code, conftest libraries).
      data: files the test reads at run time.
      tags: e.g. "gpu", "large" (filtered in .bazelrc), "manual", "exclusive".
      size: Bazel test size; sets the default timeout.
      args: extra pytest arguments, after the test files (e.g. ["-x", "-q"]).
      env: extra environment variables for the test.
      **kwargs: anything else py_test and sh_test both accept (timeout, shard_count, ...).
    """
    conftest = native.glob(["conftest.py"], allow_empty = True)
    data = data + [c for c in conftest if c not in srcs] + ["//:pytest_config"]
    pytest_args = ["$(rootpath %s)" % s for s in srcs] + args
    native.py_test(
        name = name,
        srcs = srcs + [_RUNNER],
        main = _RUNNER,
        deps = deps,
        data = data,
        args = pytest_args,
        env = env,
        tags = tags + ["stack_min"],
        size = size,
        python_version = "PY3",
        srcs_version = "PY3",
        legacy_create_init = False,
        **kwargs
    )
    for stack, repo in OTHER_STACKS.items():
        python = repo + "//:python"
        native.sh_test(
            name = name + "_" + stack,
            srcs = ["//tools:run_with_python.sh"],
            # py_library targets as data bring their sources' runfiles, as deps do.
            data = srcs + deps + data + [_RUNNER, python],
            args = ["$(rootpath %s)" % python, "$(rootpath %s)" % _RUNNER] + pytest_args,
            env = env,
            tags = tags + ["stack_" + stack],
            size = size,
            **kwargs
        )
