"""Tables of 2**31 elements or more: the kernels address them in 64 bit.

Two checks. The untagged ones lower the Pallas kernels for CUDA on this CPU host and
read the Triton IR that would be compiled: the table's pointer offsets must be i64 for
a table past 2**31 elements (and are i32 for a small one, so the check can fail). The
``large`` one runs a real bfloat16 table of 2**31 + 2**13 elements (about 4.3 GB)
through the Pallas kernel in interpret mode and the XLA path, and reads rows past the
boundary; it is skipped unless asked for (``bazel test --config=large``, or
``pytest -m large``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir

import embed
from kernels import compat, pallas_gather
from tests import grid

# A bfloat16 table one row of 1024 past the 2**31-element boundary, plus 7 more rows.
LARGE_VOCAB, LARGE_D = 2**21 + 8, 1024


def _triton_modules(fn, *args) -> list[str]:
    """The Triton IR (text) of every Pallas kernel in ``fn`` lowered for CUDA.

    The IR travels as MLIR bytecode in the custom call's ``ir`` field; it is parsed back
    as generic MLIR: exactly what XLA hands to Triton.
    """
    lowered = compat.lower(fn, *args)
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.name == "stablehlo.custom_call":
                        calls.append(inner)
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    texts = []
    for call in calls:
        if ir.StringAttr(call.attributes["call_target_name"]).value != grid.TRITON_CALL:
            continue
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        bytecode = ir.StringAttr(config["ir"]).value_bytes
        with mlir.make_ir_context() as context:
            # The Triton dialect is not registered in JAX's context; its ops parse as
            # generic ones, which is all the check needs.
            context.allow_unregistered_dialects = True
            texts.append(ir.Module.parse(bytecode).operation.get_asm())
    return texts


def _offset_types(triton_ir: str, arg: int) -> set[str]:
    """Element types of the offsets added to pointer argument ``arg`` of the kernel."""
    splats = set(re.findall(rf'(%\w+) = "tt.splat"\(%arg{arg}\)', triton_ir))
    types = set()
    for base, offsets_type in re.findall(
        r'"tt.addptr"\((%\w+), %\w+\) : \([^,]+, tensor<[\dx]*x?(i\d+)>\)', triton_ir
    ):
        if base in splats:
            types.add(offsets_type)
    return types


def _gather_ir(vocab_size, d_model, num_tokens=16):
    [text] = _triton_modules(
        pallas_gather.gather,
        jax.ShapeDtypeStruct((vocab_size, d_model), jnp.bfloat16),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    )
    return text


@pytest.mark.parametrize(
    ("vocab_size", "d_model"),
    [(LARGE_VOCAB, LARGE_D), (2**20 + 1, 2048), (2**31 - 1, 2), (2**21 + 1, 1025)],
)
def test_gather_addresses_a_large_table_with_i64_offsets(vocab_size, d_model):
    assert vocab_size * d_model > 2**31
    # Kernel arguments: ids (0), table (1), output (2).
    assert _offset_types(_gather_ir(vocab_size, d_model), arg=1) == {"i64"}


def test_gather_addresses_a_small_table_with_i32_offsets():
    # The counterpart that shows the check above can fail: i32 when it is safe.
    text = _gather_ir(50, 64)
    assert _offset_types(text, arg=1) == {"i32"}
    assert _offset_types(text, arg=2) == {"i32"}


@pytest.mark.parametrize(("vocab_size", "d_model"), [(2**20 + 1, 2048), (2**30 + 1, 2)])
def test_scatter_add_addresses_a_large_gradient_with_i64_offsets(vocab_size, d_model):
    def grad(table, ids):
        return jax.grad(lambda t: pallas_gather.lookup(t, ids).astype(jnp.float32).sum())(table)

    [text] = _triton_modules(
        grad,
        jax.ShapeDtypeStruct((vocab_size, d_model), jnp.bfloat16),
        jax.ShapeDtypeStruct((16,), jnp.int32),
    )
    # Kernel arguments: ids (0), grad_out (1), zeros (2, aliased), float32 gradient (3).
    assert _offset_types(text, arg=3) == {"i64"}
    assert "tt.atomic_rmw" in text


@jax.jit
def _large_table():
    rows = jax.lax.broadcasted_iota(jnp.int32, (LARGE_VOCAB, LARGE_D), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (LARGE_VOCAB, LARGE_D), 1)
    return ((rows ^ (cols * 7)) & 0xFF).astype(jnp.bfloat16)  # Exact in bfloat16.


_BOUNDARY_ROW = 2**31 // LARGE_D  # Its first element is element 2**31.
# Rows on both sides of the 2**31-element boundary, the last row, and out-of-range ids
# (LARGE_VOCAB: clamped, or filled; -LARGE_VOCAB: row 0).
LARGE_IDS = np.array(
    [
        LARGE_VOCAB - 1,
        -1,
        _BOUNDARY_ROW,
        _BOUNDARY_ROW - 1,
        _BOUNDARY_ROW + 3,
        LARGE_VOCAB,
        0,
        -LARGE_VOCAB,
    ],
    np.int32,
)


def _large_expected(ids):
    rows = np.clip(np.where(ids < 0, ids + LARGE_VOCAB, ids), 0, LARGE_VOCAB - 1)[:, None]
    return ((rows ^ (np.arange(LARGE_D) * 7)) & 0xFF).astype(jnp.bfloat16)


@pytest.mark.large
def test_bfloat16_table_past_two_to_the_31_elements():
    assert LARGE_VOCAB * LARGE_D > 2**31
    table = _large_table()
    ids = LARGE_IDS
    expected = _large_expected(ids)
    for out in (
        pallas_gather.gather(table, jnp.asarray(ids), interpret=True),
        table[ids],
        embed.lookup(table, ids, backend="pallas"),
        embed.lookup(table, ids, backend="xla"),
    ):
        grid.assert_bits_equal(out, expected)
    filled = embed.lookup(table, ids, backend="pallas", mode="fill")
    assert np.isnan(np.asarray(filled[5], np.float32)).all()
    grid.assert_bits_equal(filled[:5], expected[:5])


@pytest.mark.gpu
@pytest.mark.large
# Each kernel, compiled ("auto" is "pallas" there). Mosaic's TMA copies from a 64-bit
# base at 32-bit row/column coordinates (mosaic_gather).
@pytest.mark.parametrize("backend", grid.KERNELS)
def test_gpu_large_table_forward_modes_and_gradient(backend):
    """On the GPU, compiled: rows past element 2**31 in each mode, and the gradient
    written to exactly the rows looked up (tools/gpu_check runs it under memcheck)."""
    table = _large_table()
    ids = LARGE_IDS
    expected = _large_expected(ids)
    lookup = jax.jit(embed.lookup, static_argnames=("backend", "mode"))
    grid.assert_bits_equal(lookup(table, ids, backend=backend, mode="clip"), expected)
    filled = np.asarray(lookup(table, ids, backend=backend, mode="fill"), np.float32)
    inside = (ids >= -LARGE_VOCAB) & (ids < LARGE_VOCAB)
    assert np.isnan(filled[~inside]).all()
    grid.assert_bits_equal(filled[inside].astype(jnp.bfloat16), expected[inside])

    # Token k's cotangent is k + 1 in every column (exact in bfloat16 and in the sums).
    cotangent = jnp.broadcast_to(
        jnp.arange(1, len(ids) + 1, dtype=jnp.bfloat16)[:, None], (len(ids), LARGE_D)
    )
    grad = jax.jit(jax.grad(lambda t: jnp.vdot(embed.lookup(t, ids, backend=backend), cotangent)))(
        table
    )
    sums = {}
    for k, i in enumerate(ids):
        if inside[k]:
            sums[int(i) % LARGE_VOCAB] = sums.get(int(i) % LARGE_VOCAB, 0) + k + 1
    rows = np.array(sorted(sums))
    got = np.asarray(grad[rows], np.float32)
    np.testing.assert_array_equal(got, np.array([[sums[r]] * LARGE_D for r in rows], np.float32))
    # Nothing written anywhere else in the 2**31 + 2**13 elements.
    assert int(jnp.count_nonzero(grad)) == len(rows) * LARGE_D
