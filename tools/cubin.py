"""The GPU code inside a compiled JAX executable: cubins out, SASS and resource usage in.

No GPU is needed. XLA's CUDA compiler (the ``jax-cuda13-plugin`` wheel) compiles for a
compile-only device (``kernels.compat.compile_only_gpu``); the executable it returns
serializes (``compiled.runtime_executable().serialize()``) as a length-prefixed header
proto followed by a Riegeli/records file whose chunks are snappy-compressed, and whose
records hold further Riegeli files and protos. Every kernel XLA, Triton or Mosaic GPU
compiled is an ELF image (a cubin) somewhere in there. ``elf_images`` finds them all:

* A Riegeli file (its fixed 64-byte signature) is decoded chunk by chunk: block headers
  every 64 KiB are skipped, each simple chunk's sizes and values are decompressed
  (none, or snappy through ``cramjam``), and every record is searched again.
* Anywhere else, ``\\x7fELF`` starts a candidate image. It counts only if its header is
  a 64-bit little-endian CUDA ELF (``e_machine == EM_CUDA``) whose section and program
  header tables lie inside the blob; its length is the furthest byte those tables or a
  section reach.

``cuobjdump`` (``-sass``, ``-res-usage``), from the ``triton`` wheel (or ``$CUOBJDUMP``
or ``PATH``), disassembles a cubin; ``parse_sass`` and ``parse_resource_usage`` read its
output into ``KernelCode``: registers, spills, stack, shared memory, and every
instruction's opcode with its modifiers (``LDG.E.128``, ``ATOMG.E.ADD.F32x2.FTZ``,
``UTMALDG.2D``...), which is what the compile gate and ``tools/sass_report.py`` check.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

# ----------------------------------------------------------------------------------------
# Riegeli/records (github.com/google/riegeli, doc/riegeli_records_file_format.md).

# The fixed first 64 bytes of every Riegeli/records file (block header, signature chunk).
RIEGELI_SIGNATURE = bytes.fromhex(
    "83af70d10d884a3f0000000000000000"
    "400000000000000091bac23c9287e1a9"
    "0000000000000000e19f13c0e9b1c372"
    "73000000000000000000000000000000"
)
_BLOCK_SIZE = 1 << 16
_BLOCK_HEADER_SIZE = 24
_USABLE_BLOCK_SIZE = _BLOCK_SIZE - _BLOCK_HEADER_SIZE
_CHUNK_HEADER_SIZE = 40


class FormatError(ValueError):
    """Bytes that are not what their signature promised (a truncated or unknown file)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise FormatError(f"varint past the end of {len(data)} bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _add_with_overhead(pos: int, size: int) -> int:
    overhead_blocks = (size + (pos + _USABLE_BLOCK_SIZE - 1) % _BLOCK_SIZE) // _USABLE_BLOCK_SIZE
    return pos + size + overhead_blocks * _BLOCK_HEADER_SIZE


def _round_up_to_chunk_boundary(pos: int) -> int:
    remaining = _BLOCK_SIZE - 1 - (pos + _BLOCK_SIZE - 1) % _BLOCK_SIZE
    return pos + max(remaining - (_USABLE_BLOCK_SIZE - 1), 0)


def _read_skipping_block_headers(data: bytes, pos: int, size: int) -> tuple[bytes, int]:
    """``size`` bytes of a Riegeli file from physical ``pos``, minus block headers."""
    out = bytearray()
    while len(out) < size:
        if pos % _BLOCK_SIZE == 0:
            pos += _BLOCK_HEADER_SIZE
        take = min(size - len(out), _BLOCK_SIZE - pos % _BLOCK_SIZE)
        if pos + take > len(data):
            raise FormatError(f"Riegeli chunk past the end of {len(data)} bytes")
        out += data[pos : pos + take]
        pos += take
    return bytes(out), pos


def _decompress(compression: int, data: bytes) -> bytes:
    if compression == 0:
        return data
    size, pos = _varint(data, 0)
    if compression == ord("s"):
        import cramjam  # Only needed for compressed chunks.

        out = bytes(cramjam.snappy.decompress_raw(data[pos:]))
    else:
        raise FormatError(f"Riegeli compression {chr(compression)!r} is not supported")
    if len(out) != size:
        raise FormatError(f"decompressed {len(out)} bytes where {size} were announced")
    return out


def riegeli_records(data: bytes) -> list[bytes]:
    """The records of the Riegeli/records file ``data`` (simple chunks; others skipped)."""
    if not data.startswith(RIEGELI_SIGNATURE):
        raise FormatError("not a Riegeli/records file (no signature)")
    records, chunk_begin = [], 0
    while chunk_begin < len(data):
        header, pos = _read_skipping_block_headers(data, chunk_begin, _CHUNK_HEADER_SIZE)
        data_size, chunk_type, num_records, decoded_size = struct.unpack_from("<8xQ8xB7sQ", header)
        num_records = int.from_bytes(num_records, "little")
        body, _ = _read_skipping_block_headers(data, pos, data_size)
        if chunk_type == ord("r"):
            compression = body[0]
            sizes_size, start = _varint(body, 1)
            sizes = _decompress(compression, body[start : start + sizes_size])
            values = _decompress(compression, body[start + sizes_size :])
            if len(values) != decoded_size:
                raise FormatError(f"chunk holds {len(values)} bytes, header says {decoded_size}")
            offset, at = 0, 0
            for _ in range(num_records):
                length, at = _varint(sizes, at)
                records.append(values[offset : offset + length])
                offset += length
        chunk_end = max(
            _add_with_overhead(chunk_begin, _CHUNK_HEADER_SIZE + data_size),
            _round_up_to_chunk_boundary(chunk_begin + num_records),
        )
        chunk_begin = chunk_end
    return records


# ----------------------------------------------------------------------------------------
# ELF images.

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
SHF_EXECINSTR = 0x4


def elf_size(data: bytes, start: int = 0) -> int | None:
    """Length of the CUDA ELF image at ``data[start:]``, or None if it is not one."""
    if len(data) - start < 64 or data[start : start + 4] != ELF_MAGIC:
        return None
    if data[start + 4] != 2 or data[start + 5] != 1:  # ELFCLASS64, little-endian.
        return None
    (e_machine,) = struct.unpack_from("<H", data, start + 18)
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, start + 32)
    e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from(
        "<HHHHH", data, start + 52
    )
    if e_machine != EM_CUDA or e_ehsize != 64 or e_shentsize != 64:
        return None
    available = len(data) - start
    end = max(64, e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    if end > available:
        return None
    for i in range(e_shnum):
        sh_type, _, _, sh_offset, sh_size = struct.unpack_from(
            "<IQQQQ", data, start + e_shoff + i * 64 + 4
        )
        if sh_type != 8:  # SHT_NOBITS occupies no file space.
            end = max(end, sh_offset + sh_size)
    return end if end <= available else None


def elf_images(blob: bytes) -> list[bytes]:
    """Every distinct CUDA ELF image in ``blob``, searching Riegeli files recursively."""
    found: dict[bytes, None] = {}

    def search(data: bytes, depth: int) -> None:
        if depth > 8:
            raise FormatError("Riegeli files nested more than 8 deep")
        covered = []
        at = data.find(RIEGELI_SIGNATURE)
        while at >= 0:
            for record in riegeli_records(data[at:]):
                search(record, depth + 1)
            covered.append(at)  # Anything after a Riegeli signature is that file's.
            at = data.find(RIEGELI_SIGNATURE, at + 1)
        limit = covered[0] if covered else len(data)
        at = data.find(ELF_MAGIC, 0, limit)
        while at >= 0:
            size = elf_size(data[:limit], at)
            if size:
                found.setdefault(data[at : at + size])
                at = data.find(ELF_MAGIC, at + size, limit)
            else:
                at = data.find(ELF_MAGIC, at + 1, limit)

    search(blob, 0)
    return list(found)


# ----------------------------------------------------------------------------------------
# Launch dimensions, from the executable's thunks (a protobuf read without its schema).


def _proto_fields(data: bytes) -> list[tuple[int, int, object]] | None:
    """``(field, wire_type, value)`` of a protobuf message, or None if ``data`` is not one."""
    fields, pos = [], 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            field, wire = key >> 3, key & 7
            if field == 0:
                return None
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire == 1 or wire == 5:
                size = 8 if wire == 1 else 4
                value, pos = data[pos : pos + size], pos + size
            elif wire == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos : pos + size], pos + size
            else:
                return None
            if pos > len(data):
                return None
            fields.append((field, wire, value))
    except FormatError:
        return None
    return fields


def _dim3(data: bytes) -> tuple[int, int, int] | None:
    """``(x, y, z)`` of a message ``{k: {1: x, 2: y, 3: z}}`` (absent fields are 1)."""
    outer = _proto_fields(data)
    if not outer or len(outer) != 1 or outer[0][1] != 2:
        return None
    inner = _proto_fields(outer[0][2])
    if not inner or any(w != 0 or f not in (1, 2, 3) for f, w, _ in inner):
        return None
    dims = {f: v for f, _, v in inner}
    return dims.get(1, 1), dims.get(2, 1), dims.get(3, 1)


def launch_dimensions(blob: bytes, names) -> dict[str, tuple[tuple, tuple]]:
    """``{kernel: ((blocks x, y, z), (threads x, y, z))}`` for kernels XLA launches itself.

    XLA's kernel thunks hold the kernel's name, its cubin and two ``dim3`` messages,
    blocks then threads per block. Found by shape, without XLA's schema: a message with
    a string field naming a kernel in ``names`` whose direct children include exactly
    two ``dim3``. Kernels launched by a custom call (Mosaic GPU) have no such thunk.
    """
    names = set(names)
    found: dict[str, tuple[tuple, tuple]] = {}

    def walk(data: bytes, depth: int) -> None:
        fields = _proto_fields(data) if depth < 24 else None
        if not fields:
            return
        strings = {v.decode("ascii", "replace") for _, w, v in fields if w == 2 and v in names_b}
        dims = [d for _, w, v in fields if w == 2 and len(v) < 40 and (d := _dim3(v))]
        if strings and len(dims) == 2:
            for name in strings:
                found.setdefault(name, (dims[0], dims[1]))
        for _, w, v in fields:
            if w == 2 and len(v) > 8 and not v.startswith(ELF_MAGIC):
                walk(v, depth + 1)

    names_b = {n.encode() for n in names}

    def search(data: bytes) -> None:
        at = data.find(RIEGELI_SIGNATURE)
        if at < 0:
            walk(data, 0)
            return
        for record in riegeli_records(data[at:]):
            search(record)

    search(blob)
    return found


# ----------------------------------------------------------------------------------------
# cuobjdump and its output.


def cuobjdump_path() -> str:
    """``$CUOBJDUMP``, else the one in the triton wheel, else ``cuobjdump`` on PATH."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError("no cuobjdump: install the triton wheel or set $CUOBJDUMP")
    return found


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [cuobjdump_path(), flag, f.name], check=True, capture_output=True, text=True
        ).stdout


@dataclasses.dataclass
class KernelCode:
    """One kernel (an ELF ``.text.<name>`` function) as compiled: SASS and resources."""

    name: str
    arch: str = ""
    registers: int = 0
    stack: int = 0
    shared: int = 0
    local: int = 0  # Bytes of local memory per thread (spills and local arrays).
    threads: int = 0  # Threads per block it was compiled for (0: not recorded).
    instructions: list[str] = dataclasses.field(default_factory=list)  # "LDG.E.128", ...

    @property
    def spill_instructions(self) -> list[str]:
        """Local-memory loads and stores: register spills (or stack arrays)."""
        return [op for op in self.instructions if op.split(".")[0] in ("LDL", "STL")]

    def count(self, opcode: str) -> int:
        """Instructions whose opcode (before the first dot) is ``opcode``."""
        return sum(op.split(".")[0] == opcode for op in self.instructions)

    def mix(self, opcodes) -> collections.Counter:
        """Counter of full opcodes (with modifiers) among ``opcodes`` (base names)."""
        return collections.Counter(op for op in self.instructions if op.split(".")[0] in opcodes)


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"code for (sm_\w+)")
# "        /*0050*/                   LDG.E.128 R4, desc[UR4][R2.64] ;"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.x]*)")
_RESOURCES = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_sass(text: str) -> dict[str, KernelCode]:
    """``cuobjdump -sass`` output: kernels by name, with their instruction opcodes."""
    kernels: dict[str, KernelCode] = {}
    arch, current = "", None
    for line in text.splitlines():
        if m := _ARCH.search(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            current = kernels.setdefault(m.group(1), KernelCode(m.group(1), arch=arch))
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.instructions.append(m.group(1))
    return kernels


def parse_resource_usage(text: str, kernels: dict[str, KernelCode]) -> None:
    """Fill registers, stack, shared and local bytes from ``cuobjdump -res-usage``."""
    current = None
    for line in text.splitlines():
        if m := _RESOURCES.match(line):
            name = m.group(1)
            current = kernels.setdefault(name, KernelCode(name))
        elif current is not None and "REG:" in line:
            usage = {k: int(v) for k, v in _USAGE.findall(line)}
            current.registers = usage.get("REG", 0)
            current.stack = usage.get("STACK", 0)
            current.shared = usage.get("SHARED", 0)
            current.local = usage.get("LOCAL", 0)


_INFO_SECTION = re.compile(r"^\.nv\.info\.(\S+)")
_REQNTID = re.compile(r"EIATTR_(?:REQNTID|MAX_THREADS)\s*\n\s*Format:.*\n\s*Value:\s*(0x[0-9a-f]+)")


def parse_threads(text: str, kernels: dict[str, KernelCode]) -> None:
    """Threads per block each kernel was compiled for (``cuobjdump -elf``: REQNTID)."""
    sections = re.split(r"(?m)^(?=\.nv\.info\.)", text)
    for section in sections:
        m = _INFO_SECTION.match(section)
        if m and m.group(1) in kernels and (t := _REQNTID.search(section)):
            kernels[m.group(1)].threads = int(t.group(1), 16)


def has_code(image: bytes) -> bool:
    """Whether the CUDA ELF ``image`` holds any instructions (an executable section).

    XLA also emits images that hold only constants; they have no kernel to disassemble.
    """
    (e_shoff,) = struct.unpack_from("<Q", image, 40)
    (e_shnum,) = struct.unpack_from("<H", image, 60)
    for i in range(e_shnum):
        sh_flags, _, _, sh_size = struct.unpack_from("<QQQQ", image, e_shoff + i * 64 + 8)
        if sh_flags & SHF_EXECINSTR and sh_size:
            return True
    return False


def disassemble(cubin: bytes) -> list[KernelCode]:
    """Every kernel in ``cubin``: its SASS opcodes and resource usage (cuobjdump).

    An image is disassembled once per process: the compile gate meets the same XLA
    helper kernels (the ids' sort, iotas, broadcasts) in case after case, and
    ``cuobjdump -sass`` costs about 0.3 s a call however small the image.
    """
    return [dataclasses.replace(k, instructions=list(k.instructions)) for k in _disassemble(cubin)]


@functools.cache
def _disassemble(cubin: bytes) -> tuple[KernelCode, ...]:
    if not has_code(cubin):
        return ()
    kernels = parse_sass(_cuobjdump(cubin, "-sass"))
    parse_resource_usage(_cuobjdump(cubin, "-res-usage"), kernels)
    parse_threads(_cuobjdump(cubin, "-elf"), kernels)
    return tuple(kernels.values())
