"""Shared pytest setup: markers, and the GPU skip.

``gpu`` tests need a CUDA GPU; Bazel excludes them unless ``--config=gpu``, and plain
pytest skips them when JAX's default backend is not a GPU.
"""

import jax
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bazel test --config=gpu)")
    config.addinivalue_line("markers", "large: needs several GB of memory (--config=large)")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; JAX's default backend is not a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
