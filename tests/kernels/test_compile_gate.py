"""The compile gate: every backend's kernels compiled for a real GPU, down to SASS, on CPU.

XLA's own CUDA pipeline (the ``jax-cuda13`` plugin wheels of the gpu_image and newest
stacks) compiles each case for a compile-only H100, and an A100 for every backend that
supports sm_80 (``tools.compiled_kernels.gate_cases``): a kernel that no longer compiles
fails its case, by name. Then the SASS must hold the rules in
``tools.compiled_kernels.problems``: no spills; our forwards' table loads and output
stores as wide as the rows allow; native float atomics or TMA reductions in every
atomic backward (xla's included), never a compare-and-swap loop; TMA in Mosaic GPU.
Two negative controls show the same checker failing on code known to break the rules.

Nothing runs: these are compile-time facts, not speed. Skipped, saying why, where the
CUDA compiler plugin is not installed (the min stack).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kernels import compat
from tests import grid
from tools import compiled_kernels as ck

pytestmark = pytest.mark.skipif(
    compat.cuda_compiler_problem() is not None,
    reason=f"needs XLA's CUDA compiler: {compat.cuda_compiler_problem()}",
)

CASES = ck.gate_cases(whole=grid.whole_grid())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_compiles_to_good_sass(case):
    problem = ck.backend_problem(case.backend)
    if problem:
        pytest.skip(f"{case.backend} cannot be compiled on this stack: {problem}")
    try:
        kernels = ck.compile_case(case)
    except Exception as e:  # Any compiler error: fail, naming the case.
        pytest.fail(f"{case.name} does not compile: {type(e).__name__}: {e}"[:4000])
    assert kernels, f"{case.name}: no kernel in the compiled code"
    problems = ck.problems(case, kernels)
    summary = {k.name: dict(k.mix(ck.MEMORY_OPS)) for k in kernels}
    assert not problems, f"{case.name}: {problems}; memory instructions: {summary}"


def test_grid_covers_every_backend_pass_and_dtype():
    whole = ck.grid()
    # 4 backends x 3 passes x 2 dtypes x 4 widths x 2 GPUs, less xla's deterministic
    # backward (its atomic one) and mosaic on an A100 (Hopper only).
    assert len(whole) == 2 * 4 * (4 + 6 * 3) - 4 * 6
    if grid.whole_grid():
        assert whole == CASES
    else:  # The cover: each backend's each pass at every width, dtype and GPU it has.
        assert len(CASES) == len(set(CASES)) < len(whole)
        for backend, pass_ in {(c.backend, c.pass_) for c in whole}:
            group = [c for c in whole if (c.backend, c.pass_) == (backend, pass_)]
            kept = [c for c in CASES if (c.backend, c.pass_) == (backend, pass_)]
            for axis in ("dtype", "d_model", "gpu"):
                assert {getattr(c, axis) for c in kept} == {getattr(c, axis) for c in group}
    assert {c.backend for c in CASES if c.gpu == "a100"} == {"xla", "pallas", "triton"}


def test_negative_control_narrow_access_fails_the_checker():
    """Triton's gather specialised as jax-triton would without the VEC trick fails.

    With ``VEC=1`` the row width is a runtime value Triton cannot prove 16-byte aligned,
    so every table load and output store is 32-bit (kernels/triton_gather.py's
    docstring): the width rule must reject it for rows that allow 128 bits.
    """
    from kernels import triton_gather
    from tools import cubin

    case = ck.Case("triton", "fwd", "float32", 768)
    narrow = triton_gather.compile_kernel(
        "gather",
        arch=90,
        dtype=jnp.float32,
        d_model=768,
        num_tokens=ck.NUM_TOKENS,
        vocab_size=ck.VOCAB_SIZE,
        vec=1,
    )
    kernels = cubin.disassemble(narrow.asm["cubin"])
    problems = ck.problems(case, kernels)
    assert any("narrower than the 128-bit rows allow" in p for p in problems), problems
    # And the kernel as shipped passes the same rule.
    assert not ck.problems(case, ck.compile_case(case))


def test_negative_control_compare_and_swap_fails_the_checker():
    """XLA's own bfloat16 scatter-add (``jax.grad`` of ``table[ids]``) is a CAS loop.

    That is why the xla backend accumulates in float32 (``kernels/xla.py``);
    the checker must reject the plain bfloat16 gradient it replaces.
    """
    case = ck.Case("xla", "bwd", "bfloat16", 768)

    def plain_grad(table, ids, grad_out):
        return jax.vjp(lambda t: t[ids], table)[1](grad_out)[0]

    args = [((ck.VOCAB_SIZE, 768), jnp.bfloat16), ((ck.NUM_TOKENS,), jnp.int32)]
    kernels = ck.compile_for("h100", plain_grad, args + [((ck.NUM_TOKENS, 768), jnp.bfloat16)])
    problems = ck.problems(case, kernels)
    assert any("compare-and-swap" in p for p in problems), problems


def test_static_table_row_reads_launch_dimensions_and_estimates():
    """tools/sass_report.py: XLA's gather gets its launch grid from the thunks."""
    from tools import sass_report

    case = ck.Case("xla", "fwd", "float32", 768)
    (row,) = sass_report.rows_for(case)
    # One thread per 4 float32 (128-bit accesses) over the [4096, 768] output.
    assert row.blocks * row.threads * 4 == ck.NUM_TOKENS * 768
    assert row.resident_blocks >= 1 and row.in_flight > 0
    text = sass_report.render([row], "h100", markdown=True)
    assert "COMPILED by XLA" in text and "NOT MEASURED" in text and "loop_gather_fusion" in text
