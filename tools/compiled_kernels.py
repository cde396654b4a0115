"""Every backend's kernels compiled for a real GPU by XLA, on a machine with no GPU.

What this compiles: ``backend x pass x dtype x d_model`` for a compile-only H100 (sm_90a)
and, for every backend that supports it, an A100 (sm_80), through XLA's own CUDA
pipeline (``kernels.compat.compile_only_gpu``): the same passes, with the embedded
Triton and Mosaic GPU compilers, that a CUDA machine runs. The ``triton`` backend is
compiled by Triton itself (``kernels.triton_gather.compile_kernel``, the specialisation
jax-triton uses; Triton's own ptxas makes the cubin): jax-triton's lowering calls the
CUDA driver for the compute capability, and with no driver fails ("cuInit(device)
failed", jaxlib 0.11.2 with jax-triton 0.3.1).

``compile_case`` returns every kernel's SASS and resources (``tools.cubin``);
``problems`` says what in them breaks the rules the compile gate
(tests/kernels/test_compile_gate.py) holds every kernel to:

* no local-memory spills (no ``LDL``/``STL``, no local bytes);
* forward, our own kernels (pallas, triton): the output stores, and the widest table
  loads, are as wide as the row allows (``row_vector_bits``: 128 bits when a row is a
  multiple of 16 bytes); Mosaic GPU copies rows with TMA (``UTMALDG``, and
  ``UTMASTG`` or a bulk ``UBLKCP`` store) instead. XLA's own gather is reported
  (``tools/sass_report.py``), not held to it: its width depends on dtype and shape;
* backward: float adds are native atomics or reductions (``ATOMG``/``REDG`` ``.ADD.F32``,
  TMA ``UTMAREDG``), never a compare-and-swap loop (``ATOMG.E.CAS``/``ATOM.CAS``); the
  deterministic backward has no float atomics at all.

Everything here is COMPILED, never run: SASS says what the GPU would execute, not how
fast. ``tools/sass_report.py`` prints it as a table.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import jax
import jax.numpy as jnp

from kernels import compat
from kernels.contract import REGISTRY
from tools import cubin

BACKENDS = ("xla", "pallas", "mosaic", "triton")
PASSES = ("fwd", "bwd", "bwd_det")
# The GPU grid's shape (tools/benchmark.py --grid gpu): 4096 tokens, a 32000-row table.
NUM_TOKENS = 4096
VOCAB_SIZE = 32000
# Row widths the gate compiles: tiny, GPT-2, a large model's, and one that is not a
# multiple of 8 elements (its 16-bit rows are 8-byte aligned, not 16).
D_MODELS = (64, 768, 4096, 100)
DTYPES = ("float32", "bfloat16")
# sm_90a is what the kernels are written for; sm_80 where the backend supports it
# (Mosaic GPU's kernels use TMA and warpgroups: Hopper only).
GPUS = ("h100", "a100")
_ARCH = {"h100": 90, "a100": 80}

# Opcodes (the part before the first dot) of global-memory traffic.
GLOBAL_LOADS = ("LDG",)
GLOBAL_STORES = ("STG",)
ATOMICS = ("ATOMG", "ATOM", "RED", "REDG", "ATOMS")
TMA_OPS = ("UTMALDG", "UTMASTG", "UTMAREDG", "UBLKCP", "UBLKRED")
MEMORY_OPS = GLOBAL_LOADS + GLOBAL_STORES + ATOMICS + TMA_OPS + ("LDS", "STS", "LDL", "STL")


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    pass_: str
    dtype: str
    d_model: int
    gpu: str = "h100"
    num_tokens: int = NUM_TOKENS
    vocab_size: int = VOCAB_SIZE

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.pass_}-{self.dtype}-d{self.d_model}-{self.gpu}"


def supports(backend: str, gpu: str) -> bool:
    """Whether ``backend`` compiles for ``gpu`` at all (Mosaic GPU's kernels: Hopper)."""
    return not (backend == "mosaic" and _ARCH[gpu] < 90)


def grid(gpus=GPUS, d_models=D_MODELS) -> list[Case]:
    """Every case the gate compiles: all backends, passes and dtypes on each GPU.

    ``xla``'s deterministic backward is its atomic one (``kernels/xla.py``: XLA orders
    its own additions), so it is compiled once, as ``bwd``.
    """
    cases = []
    for gpu in gpus:
        for backend in BACKENDS:
            if not supports(backend, gpu):
                continue
            for pass_ in PASSES:
                if pass_ == "bwd_det" and backend == "xla":
                    continue
                for dtype in DTYPES:
                    for d_model in d_models:
                        cases.append(Case(backend, pass_, dtype, d_model, gpu))
    return cases


def gate_cases(*, whole: bool = True) -> list[Case]:
    """What the compile gate compiles, out of ``grid()``.

    ``whole``: all of it, every backend x pass x dtype x d_model x GPU (152 cases). That
    runs on the CUDA machines' stack (tools/stacks.bzl), whose compiler is theirs.
    Otherwise a cover (44 cases): each backend's each pass at every width, alternating
    the dtype and the GPU, so that each pass still compiles every width, dtype and GPU it
    supports with this stack's JAX and Triton; the combinations are the whole product's.
    """
    cases = grid()
    if whole:
        return cases
    cover = [
        Case(backend, pass_, DTYPES[i % 2], d_model, gpus[i % len(gpus)])
        for backend, pass_ in dict.fromkeys((c.backend, c.pass_) for c in cases)
        for gpus in [[g for g in GPUS if supports(backend, g)]]
        for i, d_model in enumerate(D_MODELS)
    ]
    assert set(cover) <= set(cases)
    return cover


def backend_problem(backend: str) -> str | None:
    """Why ``backend``'s kernels cannot be compiled on this stack, or None.

    Triton compiles the ``triton`` backend's kernels itself (``_triton_cubins``), so it
    needs no jax-triton here.
    """
    problem = compat.cuda_compiler_problem()
    if problem or backend == "triton":
        return problem
    return REGISTRY[backend].problem()


def _lookup(backend: str, deterministic: bool):
    """``backend``'s ``lookup`` (the contract's), compiled, with the backward asked for."""
    module = importlib.import_module(REGISTRY[backend].module)
    return lambda t, i: module.lookup(t, i, False, deterministic)


def program(case: Case):
    """The jitted computation of ``case`` and its abstract arguments."""
    lookup = _lookup(case.backend, case.pass_ == "bwd_det")
    dtype = jnp.dtype(case.dtype)
    table = (case.vocab_size, case.d_model), dtype
    ids = (case.num_tokens,), jnp.int32
    if case.pass_ == "fwd":
        return lookup, [table, ids]

    def backward(table, ids, grad_out):
        _, vjp = jax.vjp(lambda t: lookup(t, ids), table)
        return vjp(grad_out)[0]

    return backward, [table, ids, ((case.num_tokens, case.d_model), dtype)]


@functools.cache
def _device(gpu: str):
    return compat.compile_only_gpu(gpu)


def serialized_executable(gpu: str, fn, args) -> bytes:
    """``fn`` compiled by XLA for the compile-only ``gpu``, serialized (cubins inside).

    ``args``: ``(shape, dtype)`` pairs. Traced under ``compat.abstract_gpu()``, so Pallas
    kernels lower for cuda as on a GPU host.
    """
    sharding = jax.sharding.SingleDeviceSharding(_device(gpu))
    specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in args]
    with compat.abstract_gpu():
        compiled = jax.jit(fn).trace(*specs).lower().compile()
    return compiled.runtime_executable().serialize()


def kernels_in(blob: bytes) -> list[cubin.KernelCode]:
    """Every kernel of a serialized executable, disassembled."""
    images = cubin.elf_images(blob)
    if not images:
        raise cubin.FormatError("the serialized executable holds no CUDA ELF image")
    return [k for image in images for k in cubin.disassemble(image)]


def compile_for(gpu: str, fn, args) -> list[cubin.KernelCode]:
    """``fn`` compiled by XLA for the compile-only ``gpu``, every kernel disassembled."""
    return kernels_in(serialized_executable(gpu, fn, args))


def _triton_cubins(case: Case) -> list[bytes]:
    from kernels import triton_gather

    common = dict(
        arch=_ARCH[case.gpu],
        dtype=case.dtype,
        d_model=case.d_model,
        num_tokens=case.num_tokens,
        vocab_size=case.vocab_size,
    )
    kernel = {"fwd": "gather", "bwd": "scatter_add", "bwd_det": "segment_sum"}[case.pass_]
    return [triton_gather.compile_kernel(kernel, **common).asm["cubin"]]


def compile_case(case: Case) -> list[cubin.KernelCode]:
    """Every kernel ``case`` compiles to, disassembled. Raises if it does not compile."""
    if case.backend == "triton":
        kernels = [k for c in _triton_cubins(case) for k in cubin.disassemble(c)]
    else:
        kernels = compile_for(case.gpu, *program(case))
    if not kernels:
        raise cubin.FormatError(f"{case.name}: the cubins hold no kernel")
    return kernels


# ----------------------------------------------------------------------------------------
# What the compiled code must look like.


def row_vector_bits(d_model: int, dtype: str) -> int:
    """The widest access a row allows: 16 bytes, or less when rows are not 16-byte aligned."""
    row_bytes = d_model * jnp.dtype(dtype).itemsize
    width = 16
    while row_bytes % width:
        width //= 2
    return 8 * width


def access_bits(opcode: str) -> int:
    """Bits moved per thread by a global load/store/atomic: its ``.64``/``.128`` or 32."""
    for part in opcode.split(".")[1:]:
        if part in ("64", "128", "U8", "S8", "U16", "S16"):
            return {"U8": 8, "S8": 8, "U16": 16, "S16": 16}.get(part) or int(part)
    if ".F32x2" in opcode or ".F16x2" in opcode or ".BF16x2" in opcode:
        return 64
    if ".F32x4" in opcode:
        return 128
    return 32


def _is_cas(opcode: str) -> bool:
    return opcode.split(".")[0] in ATOMICS and ".CAS" in opcode


def _is_float_add(opcode: str) -> bool:
    parts = opcode.split(".")
    return parts[0] in ATOMICS + ("UTMAREDG",) and "ADD" in parts


def problems(case: Case, kernels: list[cubin.KernelCode]) -> list[str]:
    """What in ``case``'s compiled kernels breaks the gate's rules (empty: all hold)."""
    found = []
    for k in kernels:
        if k.local or k.spill_instructions:
            spills = k.spill_instructions
            found.append(
                f"{k.name}: {k.local} bytes of local memory, "
                f"{len(spills)} spill instructions {sorted(set(spills))}"
            )
        cas = sorted({op for op in k.instructions if _is_cas(op)})
        if cas:
            found.append(f"{k.name}: a compare-and-swap loop ({', '.join(cas)}), not a native add")
    ops = [op for k in kernels for op in k.instructions]
    if case.backend == "mosaic":
        # Any of these opcodes: TMA loads; TMA or bulk (UBLKCP) stores; TMA reductions.
        wanted = {
            "fwd": (("UTMALDG",), ("UTMASTG", "UBLKCP")),
            "bwd": (("UTMAREDG",),),
            "bwd_det": (("UTMALDG",),),
        }
        for opcodes in wanted[case.pass_]:
            if not any(op.split(".")[0] in opcodes for op in ops):
                found.append(f"no TMA {'/'.join(opcodes)}: Mosaic GPU moves rows with TMA")
    if case.pass_ == "fwd" and case.backend in ("pallas", "triton"):
        found += _width_problems(case, ops)
    if case.pass_ == "bwd" and not any(_is_float_add(op) for op in ops):
        found.append("no native float atomic add or reduction in the backward")
    if case.pass_ == "bwd_det":
        adds = sorted({op for op in ops if _is_float_add(op)})
        if adds:
            found.append(f"float atomics {adds} in the deterministic backward")
    return found


def _width_problems(case: Case, ops: list[str]) -> list[str]:
    want = row_vector_bits(case.d_model, case.dtype)
    found = []
    stores = [op for op in ops if op.split(".")[0] in GLOBAL_STORES]
    narrow = sorted({op for op in stores if access_bits(op) < want})
    if not stores:
        found.append("no global store in the forward")
    elif narrow:
        found.append(f"output stores {narrow} narrower than the {want}-bit rows allow")
    loads = [op for op in ops if op.split(".")[0] in GLOBAL_LOADS]
    if not loads or max(access_bits(op) for op in loads) < want:
        found.append(f"table loads {sorted(set(loads))} narrower than the {want}-bit rows allow")
    return found


def environment() -> dict[str, str]:
    """What the figures were compiled with: jaxlib and the compiler plugin."""
    import jaxlib

    return {
        "jaxlib": jaxlib.__version__,
        "cuda_plugin": compat.cuda_compiler_version() or "none",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
