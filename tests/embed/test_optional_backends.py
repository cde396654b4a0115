"""``import embed`` survives the loss of any GPU backend's modules, alone or together.

JAX deprecated Pallas on Triton in 0.11 and will remove ``jax.experimental.pallas.triton``;
Mosaic GPU, triton and jax-triton may be missing on a user's machine. Each case runs in a
fresh interpreter whose import system refuses the named modules, as if uninstalled:
``import embed`` works, the default backend gives ``nnx.Embed``'s output, ``"auto"`` falls
back to ``"xla"`` where its kernel is gone, and asking for a missing backend raises a
``RuntimeError`` naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# What each module's removal takes away.
REMOVALS = {
    "jax.experimental.pallas.triton": "pallas",
    "jax.experimental.pallas.mosaic_gpu": "mosaic",
    "triton": "triton",
    "jax_triton": "triton",
}

_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    REMOVED = tuple(sys.argv[1:])

    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == m or name.startswith(m + ".") for m in REMOVED):
                raise ImportError(f"No module named {name!r} (uninstalled for this test)")

    sys.meta_path.insert(0, Uninstalled())

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import embed

    ids = jnp.array([[0, 3, -1, 10], [11, -12, 5, 2]])
    ours = np.asarray(embed.Embed(11, 6, rngs=nnx.Rngs(0))(ids))
    flax = np.asarray(nnx.Embed(11, 6, rngs=nnx.Rngs(0))(ids))
    errors = {}
    for backend in embed.BACKENDS:
        try:
            embed.MyEmbed(11, 6, nnx.Rngs(0), backend=backend)
        except RuntimeError as e:
            errors[backend] = str(e)
    print(json.dumps({
        "same_as_flax": ours.tobytes() == flax.tobytes(),
        "auto_on_cuda": embed.backend_for("auto", "cuda"),
        "errors": errors,
        "imported": sorted(m for m in REMOVED if m in sys.modules),
    }))
    """
)

CASES = [(module,) for module in REMOVALS] + [tuple(REMOVALS)]


@pytest.mark.parametrize("removed", CASES, ids=lambda r: "+".join(r))
def test_import_embed_without(removed):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *removed],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == []  # The refusal held: nothing got them some other way.
    assert result["same_as_flax"]
    for backend in {REMOVALS[m] for m in removed}:
        message = result["errors"].get(backend, "")
        assert message.startswith(f"backend={backend!r} cannot run here: "), result["errors"]
    assert "xla" not in result["errors"] and "auto" not in result["errors"]
    if "jax.experimental.pallas.triton" in removed:
        assert result["auto_on_cuda"] == "xla"
