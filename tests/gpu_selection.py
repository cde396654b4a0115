"""Which tests a CUDA machine runs, named once (no JAX import).

``tests/conftest.py`` registers the markers; ``tools/gpu_check`` selects with them, runs
the memcheck selection under compute-sanitizer, and fails when a required kind of gpu
test has no test.
"""

MARKERS = {
    "gpu": "needs a CUDA GPU (bazel test --config=gpu)",
    "large": "needs several GB of memory (--config=large)",
    "backends": "one body per backend: compiled on a CUDA GPU, interpreted on a CPU",
}
# Where gpu- and large-marked tests live.
PATHS = ("tests", "examples")
# On a CUDA machine: the one-body tests (every backend compiled there, the same bodies
# interpreted on a CPU: tests/kernels/test_contract.py, tests/embed/test_backends.py),
# every gpu test, and the large ones (a table past 2**31 elements).
GPU_MARKEXPR = "gpu or backends or large"
# On a CPU (tools/gpu_check --dry-run): "large" would run a 4.3 GB table on the CPU; the
# one-body tests are collected and skipped there (tests/conftest.py), as the gpu ones.
CPU_MARKEXPR = "gpu or backends"
# Run under compute-sanitizer memcheck: the out-of-range tests (tests/embed/test_backends.py)
# and the compiled large-table ones (tests/kernels/test_large_table.py,
# test_triton_gather.py), not the interpreter's.
MEMCHECK_KEYWORDS = "out_of_range or gpu_large_table or gpu_gather_large_table"
# What the gpu tests must cover: a part of a test name for each, so that a renamed or
# deleted test cannot go unseen.
REQUIRED = {
    "every backend against the contract": "test_forward_is_the_reference_bit_for_bit",
    "every backend bit-identical to xla": "test_forward_is_bit_identical_to_xla",
    "gradients": "test_gradient_matches_float32_reference",
    "nnx.jit": "test_layer_under_nnx_jit",
    "out-of-range modes": "test_out_of_range_",
    "a table past 2**31 elements on the GPU": "test_gpu_large_table",
}
