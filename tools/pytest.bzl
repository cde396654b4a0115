"""pytest_test: one pytest file as a Bazel test on each JAX stack it names.

    load("//tools:pytest.bzl", "pytest_test")
    load("//tools:stacks.bzl", "ONE_STACK")

    pytest_test(
        name = "test_foo",
        srcs = ["test_foo.py"],
        stacks = ONE_STACK,           # default: every stack (tools/stacks.bzl)
        full_grid = ONE_STACK,        # default: FULL_GRID_STACK (tools/stacks.bzl)
        deps = ["//embed"],           # py_library targets it imports
        data = ["testdata/x.npz"],    # files it reads (runfiles-relative paths)
        tags = ["gpu"],               # "gpu" / "large": skipped by default, see .bazelrc
    )

makes, for each stack, `<name>_<stack>`: `pytest <srcs> <args>` from the runfiles root,
through the shared runner //tools:pytest_runner.py, with that stack's venv interpreter
(so third-party packages need no deps), tagged `stack_<stack>`; and `<name>`, a
test_suite of them all. The stacks not in `full_grid` run a cover of each test's
parameter grid (EMBED_TEST_GRID=cover, tests/conftest.py). One way to launch any test on
any stack: `bazel test //tests/embed:test_layer_newest`, or every stack's with
`bazel test //tests/embed:test_layer`, or one stack's whole suite with
`bazel test //... --test_tag_filters=stack_newest,-gpu,-large`.

`import embed`, `import kernels`, `import tests.x` work as in the source tree.
conftest.py next to the test, and the root's conftest.py / pytest.ini / pyproject.toml,
are added automatically; a conftest.py in a parent package that has its own BUILD file
must be passed in deps (e.g. a py_library in that package).
"""

load(":stacks.bzl", "ALL_STACKS", "FULL_GRID_STACK", "stack_repo")

_RUNNER = "//tools:pytest_runner.py"

def pytest_test(
        name,
        srcs,
        stacks = ALL_STACKS,
        full_grid = None,
        deps = [],
        data = [],
        tags = [],
        size = "medium",
        args = [],
        env = {},
        **kwargs):
    """A test per stack running pytest on `srcs`, and a test_suite `name` of them.

    Args:
      name: the test_suite's name; each stack's test is `<name>_<stack>`.
      srcs: the pytest file(s) (usually one); all are passed to pytest.
      stacks: the JAX stacks to run on (tools/stacks.bzl): ALL_STACKS for a test whose
        subject differs between JAX releases, ONE_STACK for one whose subject does not.
      deps: py_library targets the test imports (repo code, conftest libraries).
      data: files the test reads at run time.
      tags: e.g. "gpu", "large" (filtered in .bazelrc), "manual", "exclusive".
      size: Bazel test size; sets the default timeout.
      args: extra pytest arguments, after the test files (e.g. ["-x", "-q"]).
      env: extra environment variables for the test.
      **kwargs: anything else sh_test accepts (timeout, flaky, ...).
    """
    conftest = native.glob(["conftest.py"], allow_empty = True)
    data = data + [c for c in conftest if c not in srcs] + ["//:pytest_config"]
    pytest_args = ["$(rootpath %s)" % s for s in srcs] + args
    if full_grid == None:
        full_grid = [FULL_GRID_STACK] if FULL_GRID_STACK in stacks else stacks
    tests = []
    for stack in stacks:
        python = stack_repo(stack) + "//:python"
        grid = "full" if stack in full_grid else "cover"
        native.sh_test(
            name = name + "_" + stack,
            srcs = ["//tools:run_with_python.sh"],
            # py_library targets as data bring their sources' runfiles, as deps do.
            data = srcs + deps + data + [_RUNNER, python],
            args = ["$(rootpath %s)" % python, "$(rootpath %s)" % _RUNNER] + pytest_args,
            env = dict(env, EMBED_TEST_GRID = grid),
            tags = tags + ["stack_" + stack],
            size = size,
            **kwargs
        )
        tests.append(":" + name + "_" + stack)
    native.test_suite(name = name, tests = tests)
