"""The ``"xla"`` backend: XLA's own gather and scatter-add, under the kernels' contract.

The forward is ``table[ids]``, bit for bit. The table gradient is a scatter-add into a
float32 array, cast once to the table's dtype (``contract.differentiable``), as every
kernel's is; ``jax.grad`` of ``table[ids]`` would scatter-add in the table's dtype, which
for a 16-bit table rounds after every repeated id and makes the backends disagree.

``segment_sum`` is the same scatter: XLA orders its own additions, deterministically on
CPU and on GPU under ``--xla_gpu_deterministic_ops``; no option of ours changes that.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import contract


@dataclasses.dataclass(frozen=True)
class Config:
    """XLA chooses its own tiling: nothing to tune."""


@contract.forward(Config)
def gather(table, ids, *, config, interpret) -> jax.Array:  # [num_tokens, d_model]
    """``table[ids]``: XLA's gather, which wraps negative ids once and clamps the rest."""
    del config, interpret  # One implementation on every platform.
    return table[ids]


@contract.backward(Config)
def scatter_add(
    grad_out, ids, *, vocab_size, config, interpret
) -> jax.Array:  # [vocab_size, d_model] float32
    """Table gradient of ``gather``: rows added into rows ``i mod V`` in float32."""
    del config, interpret
    d_model = grad_out.shape[1]
    rows = contract.gradient_rows(ids, vocab_size)
    grad = jnp.zeros((vocab_size, d_model), jnp.float32)
    return grad.at[rows].add(grad_out.astype(jnp.float32), mode="drop")


# XLA's scatter is its own deterministic path (see the module docstring).
segment_sum = scatter_add

lookup = contract.differentiable(gather, scatter_add, segment_sum)
