"""A static table of what every backend compiles to for an H100: COMPILED, NOT MEASURED.

    python tools/sass_report.py [--gpu h100] [--d-models 64,1024,4096] [--markdown]
    bazel run //tools:sass_report_newest -- --markdown     (or _gpu_image)

Needs XLA's CUDA compiler (the jax-cuda13 plugin wheels of the gpu_image and newest
stacks); no GPU. For the GPU benchmark grid's base shape (``tools/benchmark.py --grid
gpu``: 8192 tokens, a 32768-row table) and its d_model sweep, each backend, pass and
dtype is compiled by XLA (``tools.compiled_kernels``) and each kernel's SASS read back
(``tools.cubin``). Per kernel: registers, local (spill) bytes, instruction count, the
global-memory instruction mix, the launch grid, an occupancy estimate, and the bytes
of loads it can keep in flight per SM set against what Little's law needs to saturate
the device's bandwidth.

Assumptions (stated in every table's header):

* H100 SXM: 3.35 TB/s of HBM3, 132 SMs, 2048 threads, 65536 registers, 32 blocks and
  228 KiB of shared memory per SM; A100 SXM 80 GB: 2.04 TB/s, 108 SMs, 164 KiB.
* DRAM latency under load 700 ns (600-800 ns). Little's law: bytes in flight needed
  per SM = bandwidth x latency / SMs (H100: 17.8 KB, 15.2-20.3 KB at 600-800 ns).
* Occupancy: resident blocks per SM from threads, registers (allocated per warp in
  units of 256), shared memory and the 32-block limit, capped by blocks per SM in
  the launch grid.
* In flight per SM: resident warps x the bytes of every global load instruction in
  the SASS (32 lanes x its width), each counted once, as if all were outstanding at
  once (an upper estimate: loop bodies count once, a load that waits on another
  counts in full). For TMA kernels (Mosaic GPU): resident blocks x the rows one
  block has in flight (``block_t x block_d x itemsize``, from the kernel's name).

These are compile-time estimates for people reading the code, not speed: the
measured figures come from ``tools/gpu_check`` on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import compat  # noqa: E402
from tools import compiled_kernels as ck  # noqa: E402
from tools import cubin  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes/s
    sms: int
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    latency_s: tuple[float, float, float] = (600e-9, 700e-9, 800e-9)

    def bytes_in_flight_needed(self, latency_s: float | None = None) -> float:
        """Little's law, per SM: bandwidth x latency / SMs."""
        latency_s = self.latency_s[1] if latency_s is None else latency_s
        return self.bandwidth * latency_s / self.sms


DEVICES = {
    "h100": Device("H100 SXM", 3.35e12, 132),
    "a100": Device("A100 SXM 80GB", 2.04e12, 108, shared_per_sm=164 * 1024),
}
# The GPU benchmark grid's base shape (tools/benchmark.py GPU_BASE, GPU_D_MODELS).
NUM_TOKENS = 4 * 2048
VOCAB_SIZE = 32768
D_MODELS = (64, 256, 1024, 4096, 8192)

_BLOCKS_IN_NAME = re.compile(r"block_t_(\d+)_block_d_(\d+)")


@dataclasses.dataclass
class Row:
    case: ck.Case
    kernel: cubin.KernelCode
    blocks: int | None  # Blocks in the launch grid, when known.
    threads: int | None  # Threads per block.
    resident_blocks: int | None
    in_flight: float | None  # Bytes per SM.


def occupancy(
    device: Device, kernel: cubin.KernelCode, threads, blocks, shared: int = 0
) -> int | None:
    """Resident blocks per SM (see the module docstring), or None without a block size.

    ``shared``: bytes of shared memory per block beyond the static ``kernel.shared``
    (Mosaic GPU's TMA tiles are dynamic shared memory, invisible to cuobjdump).
    """
    if not threads:
        return None
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(kernel.registers, 1) * 32 / 256) * 256
    limits = [
        device.blocks_per_sm,
        device.threads_per_sm // (warps * 32),
        device.registers_per_sm // (regs_per_warp * warps),
    ]
    if kernel.shared + shared:
        limits.append(device.shared_per_sm // (kernel.shared + shared))
    if blocks:
        limits.append(math.ceil(blocks / device.sms))
    return max(min(limits), 0)


def load_bytes_per_warp(kernel: cubin.KernelCode) -> int:
    """Bytes one warp's global loads move, each load instruction counted once."""
    return sum(32 * ck.access_bits(op) // 8 for op in kernel.instructions if op.startswith("LDG"))


def _tma_block_bytes(case: ck.Case, kernel: cubin.KernelCode) -> int | None:
    m = _BLOCKS_IN_NAME.search(kernel.name)
    if not m or not kernel.count("UTMALDG"):
        return None
    return int(m.group(1)) * int(m.group(2)) * jnp.dtype(case.dtype).itemsize


def _grid_from_blocks(case: ck.Case, kernel: cubin.KernelCode) -> int | None:
    """Blocks in the launch grid of a kernel XLA does not launch itself, from its tiles."""
    if case.backend == "triton":
        from kernels import triton_gather

        itemsize = jnp.dtype(case.dtype).itemsize
        config = triton_gather.Config()
        if "segment_sum" in kernel.name:  # Rows of the table, tiled for float32 sums.
            block_t, block_d = config.block_v, config.launch(case.d_model, 4)["BLOCK_D"]
        else:
            cfg = config.launch(case.d_model, itemsize)
            block_t, block_d = cfg["BLOCK_T"], cfg["BLOCK_D"]
    elif m := _BLOCKS_IN_NAME.search(kernel.name):
        block_t, block_d = int(m.group(1)), int(m.group(2))
    else:
        return None
    rows = case.num_tokens if "segment_sum" not in kernel.name else case.vocab_size
    return math.ceil(rows / block_t) * math.ceil(case.d_model / block_d)


def rows_for(case: ck.Case) -> list[Row]:
    """Compile ``case`` and estimate each kernel's occupancy and bytes in flight."""
    device = DEVICES[case.gpu]
    kernels, dims = compile_with_launch_dims(case)
    rows = []
    for k in kernels:
        blocks, threads = None, k.threads or None
        if k.name in dims:
            (bx, by, bz), (tx, ty, tz) = dims[k.name]
            blocks, threads = bx * by * bz, tx * ty * tz
        else:
            blocks = _grid_from_blocks(case, k)
        tma = _tma_block_bytes(case, k)
        resident = occupancy(device, k, threads, blocks, shared=tma or 0)
        in_flight = None
        if resident is not None:
            if tma is not None:
                in_flight = resident * tma
            else:
                in_flight = resident * math.ceil(threads / 32) * load_bytes_per_warp(k)
        rows.append(Row(case, k, blocks, threads, resident, in_flight))
    return rows


def compile_with_launch_dims(case: ck.Case):
    """``compile_case`` plus the launch dimensions XLA's thunks record, by kernel name."""
    if case.backend == "triton":
        return ck.compile_case(case), {}
    blob = ck.serialized_executable(case.gpu, *ck.program(case))
    kernels = ck.kernels_in(blob)
    return kernels, cubin.launch_dimensions(blob, [k.name for k in kernels])


def _mix(kernel: cubin.KernelCode) -> str:
    counts = kernel.mix(ck.GLOBAL_LOADS + ck.GLOBAL_STORES + ck.ATOMICS + ck.TMA_OPS)
    short = {}
    for op, n in counts.items():
        parts = op.split(".")
        keep = [p for p in parts[1:] if p not in ("E", "CONSTANT", "FTZ", "RN", "STRONG", "GPU")]
        name = ".".join([parts[0]] + keep)
        short[name] = short.get(name, 0) + n
    return " ".join(f"{op}x{n}" for op, n in sorted(short.items())) or "-"


def _short_name(name: str) -> str:
    name = re.sub(r"_mosaic_gpu_kernel.*$", "", name)
    return name if len(name) <= 44 else name[:41] + "..."


def header(gpu: str) -> list[str]:
    d = DEVICES[gpu]
    env = ck.environment()
    lo, mid, hi = (d.bytes_in_flight_needed(t) / 1e3 for t in d.latency_s)
    return [
        f"COMPILED by XLA for a compile-only {d.name}, NOT MEASURED: jaxlib {env['jaxlib']} "
        f"({env['cuda_plugin']}), {jax.__version__=}; nothing here ran on a GPU.",
        f"Assumptions: {d.bandwidth / 1e12:.2f} TB/s, {d.sms} SMs, DRAM latency "
        f"{d.latency_s[1] * 1e9:.0f} ns ({d.latency_s[0] * 1e9:.0f}-{d.latency_s[2] * 1e9:.0f}); "
        f"Little's law needs {mid:.1f} KB in flight per SM ({lo:.1f}-{hi:.1f} KB). "
        "'in flight/SM' counts every load in the SASS as outstanding at once "
        "(tools/sass_report.py).",
    ]


COLUMNS = (
    "backend",
    "pass",
    "dtype",
    "D",
    "kernel",
    "regs",
    "spill B",
    "instrs",
    "global memory instructions",
    "grid x threads",
    "blocks/SM",
    "in flight/SM",
    "vs need",
)


def format_row(row: Row) -> list[str]:
    k, case = row.kernel, row.case
    need = DEVICES[case.gpu].bytes_in_flight_needed()
    grid = f"{row.blocks if row.blocks else '?'} x {row.threads or '?'}"
    flight = f"{row.in_flight / 1e3:.1f} KB" if row.in_flight is not None else "?"
    ratio = f"{row.in_flight / need:.2f}" if row.in_flight is not None else "?"
    return [
        case.backend,
        case.pass_,
        case.dtype,
        str(case.d_model),
        _short_name(k.name),
        str(k.registers),
        str(k.local),
        str(len(k.instructions)),
        _mix(k),
        grid,
        "?" if row.resident_blocks is None else str(row.resident_blocks),
        flight,
        ratio,
    ]


def render(rows: list[Row], gpu: str, markdown: bool) -> str:
    table = [format_row(r) for r in rows]
    lines = [("> " if markdown else "") + h for h in header(gpu)]
    lines.append("")
    if markdown:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(cells) + " |" for cells in table]
    else:
        widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(COLUMNS)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(lines)


def cases(gpu, backends, passes, dtypes, d_models, num_tokens, vocab_size) -> list[ck.Case]:
    out = []
    for c in ck.grid(gpus=(gpu,), d_models=d_models):
        if c.backend in backends and c.pass_ in passes and c.dtype in dtypes:
            out.append(dataclasses.replace(c, num_tokens=num_tokens, vocab_size=vocab_size))
    return out


def report(args) -> tuple[str, list[str]]:
    """The table's text and the cases that did not compile (with why)."""
    rows, failures = [], []
    for case in cases(
        args.gpu,
        args.backends,
        args.passes,
        args.dtypes,
        args.d_models,
        args.tokens,
        args.vocab,
    ):
        problem = ck.backend_problem(case.backend)
        if problem:
            failures.append(f"{case.name}: skipped: {problem}")
            continue
        try:
            rows += rows_for(case)
        except Exception as e:  # Report and go on: one case must not hide the rest.
            failures.append(f"{case.name}: does not compile: {type(e).__name__}: {e}"[:500])
    return render(rows, args.gpu, args.markdown), failures


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(DEVICES), default="h100")
    p.add_argument("--backends", type=_csv(str), default=ck.BACKENDS)
    p.add_argument("--passes", type=_csv(str), default=("fwd", "bwd"))
    p.add_argument("--dtypes", type=_csv(str), default=ck.DTYPES)
    p.add_argument("--d-models", type=_csv(int), default=D_MODELS)
    p.add_argument("--tokens", type=int, default=NUM_TOKENS)
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.add_argument("--output", help="write the table to this file as well")
    args = p.parse_args(argv)
    for name, allowed in (("backends", ck.BACKENDS), ("passes", ck.PASSES), ("dtypes", ck.DTYPES)):
        bad = set(getattr(args, name)) - set(allowed)
        if bad:
            p.error(f"--{name}={sorted(bad)} must be among {allowed}")
    return args


def main(argv=None) -> int:
    compat.cpu_unless_cuda_driver()
    problem = compat.cuda_compiler_problem()
    if problem:
        print(f"sass_report: nothing to compile with: {problem}", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    text, failures = report(args)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if any("does not compile" in f for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
