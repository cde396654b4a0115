"""tools/cubin.py and the rules of tools/compiled_kernels.py, on bytes and text built here.

No compiler needed (every stack): Riegeli files are written by hand to the format's
specification, with block headers every 64 KiB and snappy chunks where ``cramjam`` is
installed; the ELF images are minimal CUDA ELFs; the SASS is the shape cuobjdump prints.
The same code on real executables is exercised by tests/kernels/test_compile_gate.py.
"""

from __future__ import annotations

import importlib.util
import os
import struct

import pytest

from tools import compiled_kernels as ck
from tools import cubin

HAVE_SNAPPY = importlib.util.find_spec("cramjam") is not None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def make_elf(payload: bytes, machine: int = cubin.EM_CUDA, flags: int = 0) -> bytes:
    """A CUDA ELF64: header, one section holding ``payload``, then the section table."""
    shoff = 64 + len(payload)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<QQ", header, 32, 0, shoff)  # No program headers.
    struct.pack_into("<HHHHH", header, 52, 64, 56, 0, 64, 2)
    null_section = bytes(64)
    section = bytearray(64)
    struct.pack_into("<IQQQQ", section, 4, 1, flags, 0, 64, len(payload))
    return bytes(header) + payload + null_section + bytes(section)


def _compress(compression: int, raw: bytes) -> bytes:
    if compression == 0:
        return raw
    import cramjam

    return _varint(len(raw)) + bytes(cramjam.snappy.compress_raw(raw))


def make_riegeli(records: list[bytes], compression: int = 0) -> bytes:
    """A Riegeli/records file: the signature, then one simple chunk of ``records``."""
    sizes = b"".join(_varint(len(r)) for r in records)
    values = b"".join(records)
    compressed_sizes = _compress(compression, sizes)
    data = bytes([compression]) + _varint(len(compressed_sizes)) + compressed_sizes
    data += _compress(compression, values)
    header = struct.pack("<QQQ", 0, len(data), 0) + b"r" + len(records).to_bytes(7, "little")
    header += struct.pack("<Q", len(values))
    logical = cubin.RIEGELI_SIGNATURE[24:] + header + data
    out = bytearray()
    for byte_at in range(0, len(logical), 1 << 12):
        piece = logical[byte_at : byte_at + (1 << 12)]
        while piece:
            if len(out) % (1 << 16) == 0:
                out += cubin.RIEGELI_SIGNATURE[:24] if not out else bytes(24)
            room = (1 << 16) - len(out) % (1 << 16)
            out += piece[:room]
            piece = piece[room:]
    return bytes(out)


def test_elf_size_reads_the_header_and_rejects_other_elves():
    elf = make_elf(b"\x00" * 100)
    assert cubin.elf_size(elf) == len(elf)
    assert cubin.elf_size(b"junk" + elf + b"tail", 4) == len(elf)
    assert cubin.elf_size(make_elf(b"x", machine=62)) is None  # x86-64, not CUDA.
    assert cubin.elf_size(elf[:-1]) is None  # Truncated: the section table is cut.
    assert cubin.elf_size(b"\x7fELF" + bytes(10)) is None


def test_only_images_with_code_are_disassembled(monkeypatch):
    calls = []

    def fake_cuobjdump(image, flag):
        calls.append(flag)
        return {"-sass": SASS}.get(flag, "")

    monkeypatch.setattr(cubin, "_cuobjdump", fake_cuobjdump)
    constants = make_elf(b"\x00" * 64)
    code = make_elf(b"a kernel of this test", flags=cubin.SHF_EXECINSTR)
    assert not cubin.has_code(constants) and cubin.has_code(code)
    assert cubin.disassemble(constants) == [] and calls == []
    first = cubin.disassemble(code)
    assert [k.name for k in first] == ["embedding_gather_block_t_16_block_d_256"] and calls
    # The same image again is not disassembled again, and callers get their own copies.
    calls.clear()
    first[0].instructions.clear()
    again = cubin.disassemble(code)
    assert calls == [] and again[0].instructions and again[0] is not first[0]


@pytest.mark.parametrize(
    "compression",
    [0, pytest.param(ord("s"), marks=pytest.mark.skipif(not HAVE_SNAPPY, reason="no cramjam"))],
)
def test_elf_images_found_in_nested_riegeli_across_block_headers(compression):
    rng = __import__("random").Random(0)
    big = make_elf(bytes(rng.getrandbits(8) for _ in range(100_000)))  # Spans 2 blocks.
    small = make_elf(b"kernel two")
    # Inner file: a proto-like record holding the big ELF after a fake magic.
    inner = make_riegeli([b"\x0a\x05\x7fELF!" + big, b""], compression)
    outer = make_riegeli([b"header", inner, b"\x12" + small], compression)
    blob = _varint(7) + b"pjrtifr" + outer
    assert len(outer) > (1 << 16)
    images = cubin.elf_images(blob)
    assert sorted(images, key=len) == [small, big]


def test_riegeli_records_round_trip_and_reject_non_riegeli():
    records = [b"a", b"", os.urandom(70_000), b"z" * 5]
    assert cubin.riegeli_records(make_riegeli(records)) == records
    with pytest.raises(cubin.FormatError):
        cubin.riegeli_records(b"not riegeli")


SASS = """
	code for sm_90a
		Function : embedding_gather_block_t_16_block_d_256
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*0040*/              ATOMG.E.ADD.F32x2.FTZ.RN.STRONG.GPU PT, R2, desc[UR4][R4.64], R6 ;
        /*0050*/                   STL [R1], R3 ;
        /*0060*/                   EXIT ;
		..........
"""
RESOURCES = """
Resource usage:
 Common:
  GLOBAL:0
 Function embedding_gather_block_t_16_block_d_256:
  REG:48 STACK:8 SHARED:0 LOCAL:8 CONSTANT[0]:544 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_sass_and_resource_usage():
    kernels = cubin.parse_sass(SASS)
    cubin.parse_resource_usage(RESOURCES, kernels)
    (k,) = kernels.values()
    assert k.name == "embedding_gather_block_t_16_block_d_256" and k.arch == "sm_90a"
    assert k.instructions == [
        "LDC",
        "S2R",
        "LDG.E.128",
        "STG.E.128",
        "ATOMG.E.ADD.F32x2.FTZ.RN.STRONG.GPU",
        "STL",
        "EXIT",
    ]
    assert (k.registers, k.stack, k.local) == (48, 8, 8)
    assert k.spill_instructions == ["STL"] and k.count("LDG") == 1


def _kernel(*ops, local=0):
    return cubin.KernelCode("k", registers=20, local=local, instructions=list(ops))


@pytest.mark.parametrize(
    "case, ops, local, wanted",
    [
        (ck.Case("pallas", "fwd", "float32", 768), ["LDG.E.128", "STG.E.128"], 0, None),
        (ck.Case("pallas", "fwd", "float32", 768), ["LDG.E.128", "STG.E.64"], 0, "narrower"),
        (ck.Case("pallas", "fwd", "float32", 768), ["LDG.E", "STG.E.128"], 0, "narrower"),
        (ck.Case("pallas", "fwd", "bfloat16", 100), ["LDG.E.64", "STG.E.64"], 0, None),
        (ck.Case("pallas", "fwd", "float32", 768), ["LDG.E.128", "STG.E.128"], 8, "local"),
        (ck.Case("xla", "bwd", "bfloat16", 768), ["ATOMG.E.CAS.STRONG.GPU"], 0, "compare"),
        (ck.Case("xla", "bwd", "float32", 768), ["REDG.E.ADD.F32x4.FTZ.RN"], 0, None),
        (ck.Case("xla", "bwd", "float32", 768), ["LDG.E", "STG.E"], 0, "no native"),
        (ck.Case("pallas", "bwd_det", "float32", 768), ["ATOMG.E.ADD.F32"], 0, "float atomics"),
        (ck.Case("mosaic", "fwd", "float32", 768), ["UTMALDG.2D", "UBLKCP.G.S"], 0, None),
        (ck.Case("mosaic", "fwd", "float32", 768), ["UTMALDG.2D", "STG.E"], 0, "TMA"),
        (ck.Case("mosaic", "bwd", "float32", 768), ["UTMAREDG.2D.ADD"], 0, None),
    ],
)
def test_problems_flags_each_rule(case, ops, local, wanted):
    found = ck.problems(case, [_kernel(*ops, local=local)])
    if wanted is None:
        assert found == []
    else:
        assert any(wanted in p for p in found), found


def test_widths():
    assert ck.row_vector_bits(768, "float32") == 128
    assert ck.row_vector_bits(100, "bfloat16") == 64
    assert ck.row_vector_bits(129, "bfloat16") == 16
    assert [ck.access_bits(op) for op in ("LDG.E", "LDG.E.64", "STG.E.128", "STG.E.U16")] == [
        32,
        64,
        128,
        16,
    ]
    assert ck.access_bits("ATOMG.E.ADD.F32x2.FTZ") == 64
