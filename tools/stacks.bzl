"""The JAX stacks this repository supports: the one list the rest of the build reads.

Each stack is a CPython and a hash-pinned lock, built into a venv repository by
tools/python_venv.bzl. WORKSPACE builds them all (`stack_venvs()`), tools/pytest.bzl
makes a test target per stack (`<name>_<stack>`, tagged `stack_<stack>`), tools/BUILD a
benchmark per stack, and .ci/run counts results per stack (it reads `STACKS` below as
a Python literal, so keep it one), and tools/stacks.py prints it as a table with what
each lock pins (README, "Supported stacks").

Adding a stack: its lock, and an entry here (and in the lists below that it belongs to).
"""

load(":python_venv.bzl", "python_venv")

STACKS = {
    "min": {
        "python": "3.11",
        "lock": "requirements_lock.txt",
        "repo": "py_venv",
        "about": "the oldest JAX we support, the newest for CPython 3.11; torch for Triton's CPU interpreter",
    },
    "gpu_image": {
        "python": "3.12",
        "lock": "requirements_gpu_image_lock.txt",
        "repo": "py_gpu_image",
        "about": "what the CUDA machines carry, with XLA's CUDA compiler plugin",
    },
    "newest": {
        "python": "3.12",
        "lock": "requirements_newest_lock.txt",
        "repo": "py_newest",
        "about": "the newest JAX we support, with XLA's CUDA compiler plugin",
    },
}

# The stack whose venv is the registered Python toolchain: py_binary targets and the
# lint test run on it.
TOOLCHAIN_STACK = "min"

# The stack the CUDA machines carry.
CUDA_MACHINES_STACK = "gpu_image"

# Where a test runs whose subject no JAX release changes (our own Python, NumPy, plain
# jnp): one stack, the one the CUDA machines carry.
ONE_STACK = [CUDA_MACHINES_STACK]

# Where a version-sensitive test runs: every stack.
ALL_STACKS = list(STACKS)

# Where a test that runs on several stacks runs its whole parameter grid. On its other
# stacks it runs a cover of the grid (EMBED_TEST_GRID=cover, tests/conftest.py): every
# test, and every value of every parameter, but not every combination. The combinations
# tell our code apart, which one stack does; the releases differ in JAX's APIs and
# lowerings, which every test still reaches on every stack.
FULL_GRID_STACK = "newest"

# The stacks whose JAX has Mosaic GPU (JAX >= 0.11).
MOSAIC_STACKS = ["gpu_image", "newest"]

# The stacks whose locks carry XLA's CUDA compiler (the jax-cuda13 plugin and pjrt): the
# compile gate and the SASS report run there, with no GPU.
CUDA_COMPILER_STACKS = ["gpu_image", "newest"]

# One stack per distinct triton and jax-triton pair (gpu_image has min's), min first:
# only its torch runs Triton's CPU interpreter.
TRITON_STACKS = ["min", "newest"]

def stack_repo(stack):
    """`@<repo>`: the venv repository of `stack`."""
    return "@" + STACKS[stack]["repo"]

def stack_venvs():
    """WORKSPACE: a venv repository per stack, and the toolchain stack's Python registered."""
    for stack in STACKS.values():
        python_venv(name = stack["repo"], lock = "//:" + stack["lock"], python_version = stack["python"])
    native.register_toolchains(stack_repo(TOOLCHAIN_STACK) + "//:python_toolchain")

def stack_binaries(name, stacks, args, data):
    """`<name>_<stack>` for each of `stacks`: `python <args>` on that stack's venv.

    `bazel run` runs it in its runfiles tree, where `python -m <module>` finds the
    repository's packages; `args` may use $(rootpath) of `data`.
    """
    for stack in stacks:
        python = stack_repo(stack) + "//:python"
        native.sh_binary(
            name = name + "_" + stack,
            srcs = ["//tools:run_with_python.sh"],
            args = ["$(rootpath %s)" % python] + args,
            data = data + [python],
        )
