"""A minimal ``@triton.jit`` kernel for ``compat.triton_call_problem``'s probe.

Triton reads a kernel's source from its file, so the probe cannot be defined inline.
"""

import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets))
