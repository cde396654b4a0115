"""Shared pytest setup: markers, and the skips for ``gpu`` and ``large`` tests.

``gpu`` tests need a CUDA GPU; Bazel excludes them unless ``--config=gpu``, and plain
pytest skips them when JAX's default backend is not a GPU. ``large`` tests need several
GB of memory; they run only when asked for: ``pytest -m large`` (``--config=large``).
``backends`` tests run everywhere (compiled on a GPU, interpreted elsewhere), except in
the CUDA selection (``-m`` naming ``gpu``) on a machine without a GPU, the dry run of
``tools/gpu_check``: there they are collected and skipped, as the gpu tests are.

``EMBED_TEST_GRID=cover`` (tools/pytest.bzl sets it on all stacks of a test but one)
keeps, of each test's parameter grid, the runs that show it every value of every
parameter (``tests.grid.each_value``); the default, ``full``, runs the whole grid, as
does any stack when ``EMBED_TEST_FULL_GRID`` is set (``bazel test --config=full_grid``).
"""

import jax
import pytest

from kernels import compat
from tests.gpu_selection import MARKERS

# A CPU machine with the CUDA compiler plugin installed (the gpu_image and newest
# stacks): run on the CPU without JAX's CUDA start-up traceback. A CUDA machine keeps
# its GPU.
compat.cpu_unless_cuda_driver()


def pytest_configure(config):
    for marker, what in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {what}")
    # pytest turns every DeprecationWarning on, over the filter the library installs for
    # this one (kernels/compat.py); tests/kernels/test_compat.py checks that filter.
    config.addinivalue_line(
        "filterwarnings", "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
    )


def pytest_collection_modifyitems(config, items):
    _grid(config, items)
    skips = {}
    if jax.default_backend() != "gpu":
        skips["gpu"] = "needs a CUDA GPU; JAX's default backend is not a GPU"
    markexpr = config.getoption("markexpr", "")
    if "gpu" in skips and "gpu" in markexpr and "not gpu" not in markexpr:
        skips["backends"] = "the CUDA selection without a GPU; the CPU suite runs it interpreted"
    if "large" not in markexpr or "not large" in markexpr:
        skips["large"] = "needs about 5 GB of memory; run with -m large (bazel: --config=large)"
    for item in items:
        for marker, reason in skips.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _grid(config, items):
    """Keep the cover of each test's grid unless this run takes the whole grid."""
    # Not at the top: tests.grid asks JAX for its backend on import, which must come
    # after cpu_unless_cuda_driver() above, or XLA's CUDA compiler is never registered.
    from tests import grid

    if grid.whole_grid():
        return
    runs = []
    for item in items:
        spec = getattr(item, "callspec", None)
        runs.append(((item.path, item.cls, item.originalname), spec.params if spec else {}))
    keep = grid.each_value(runs)
    config.hook.pytest_deselected(items=[i for i, k in zip(items, keep, strict=True) if not k])
    items[:] = [i for i, k in zip(items, keep, strict=True) if k]
