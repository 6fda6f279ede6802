"""Random guest programs: a seeded generator of small x86 programs that touch memory in every
way an engine can get wrong, for the differential engine test (`kvmem.difftest`).

Defines `generate(seed, mode, data, mmio)` → `RandomProgram` (its machine code, position
independent, and the list of its operations in words), `MODES` ("prot32": 32-bit protected
mode; "long64": 64-bit mode — the states `kvmem.cpu.modes` builds), and the ports a program
uses (`PORT_CHECKSUM`, `PORT_MISMATCH`, `PORTS_IN`, `PORTS_OUT`, `PORT_STRING`).

A program is a list of operations, each a few instructions:
- loads and stores of 1, 2, 4 (and 8 in long64) bytes at aligned, unaligned and page-crossing
  addresses, in the data window (RAM, holes and read-only slots, as the host lays it out) and
  in the MMIO window; every load is folded into a checksum (EBX/RBX);
- self-checks: a store, the load of the same bytes, and `out PORT_MISMATCH` if they differ;
- `rep movs` / `rep stos` of every element size, forwards or backwards (DF);
- `in` / `out` of every width, and `rep ins` / `rep outs` through `PORT_STRING`;
- the checksum reported with `out PORT_CHECKSUM` now and then and at the end, then `hlt`.
Stored values are XORed with EBP (the pass number the host starts the program with), so a
program run again writes new data. Inputs: EBP. No stack, no calls, no interrupts.

Encoding: a tiny encoder of the few instructions used (no assembler needed). Every memory
operand is [EDI] / [RDI] (loaded with `mov edi, imm32`, which zero-extends in 64-bit mode),
so the same bytes mean the same thing in both modes except where REX.W makes an 8-byte
access (long64 only).

Rules: pure — only `random.Random(seed)` decides; the same seed, mode and windows give the
same program on every machine and run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "MODES",
    "PORTS_IN",
    "PORTS_OUT",
    "PORT_CHECKSUM",
    "PORT_MISMATCH",
    "PORT_STRING",
    "RandomProgram",
    "generate",
]

MODES = ("prot32", "long64")
PORT_CHECKSUM = 0x10
PORT_MISMATCH = 0x14  # a self-check read back something else than it stored
PORTS_IN = (0x20, 0x21)
PORTS_OUT = (0x30, 0x31)
PORT_STRING = 0x40
_PAGE = 4096

# the offsets in a page where accesses go wrong first: both edges, and a few unaligned
_EDGES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7FE, 0x7FF, 0x800, 0xFF8, 0xFF9, 0xFFA, 0xFFB, 0xFFC,
          0xFFD, 0xFFE, 0xFFF)


@dataclass(frozen=True, slots=True)
class RandomProgram:
    seed: int
    mode: str
    code: bytes
    ops: tuple[str, ...]  # what each operation does, in order (for failure reports)

    def listing(self) -> str:
        return "\n".join(f"{i:3}: {op}" for i, op in enumerate(self.ops))


class _Asm:
    """The encoder: one method per instruction form used (EAX=0 ECX=1 EDX=2 EBX=3 EBP=5
    ESI=6 EDI=7)."""

    def __init__(self, long: bool) -> None:
        self.long = long
        self.out = bytearray()

    def b(self, *parts: int | bytes) -> None:
        for p in parts:
            self.out += bytes([p]) if isinstance(p, int) else p

    @staticmethod
    def imm32(v: int) -> bytes:
        return (v & 0xFFFF_FFFF).to_bytes(4, "little")

    def mov_imm(self, reg: int, value: int, wide: bool = False) -> None:
        """mov r32, imm32 (zero-extends in 64-bit mode); with `wide`, mov r64, imm64."""
        if wide:
            self.b(0x48, 0xB8 + reg, (value & (1 << 64) - 1).to_bytes(8, "little"))
        else:
            self.b(0xB8 + reg, self.imm32(value))

    def rex_w(self, size: int) -> None:
        if size == 8:
            self.b(0x48)

    def xor_rr(self, dst: int, src: int, wide: bool) -> None:
        if wide:
            self.b(0x48)
        self.b(0x31, 0xC0 | (src << 3) | dst)

    def store(self, size: int) -> None:
        """mov [edi], al/ax/eax/rax"""
        if size == 1:
            self.b(0x88, 0x07)
            return
        if size == 2:
            self.b(0x66)
        self.rex_w(size)
        self.b(0x89, 0x07)

    def load(self, size: int, reg: int = 0) -> None:
        """movzx reg, byte/word [edi]; mov reg, [edi] (4, 8)"""
        modrm = (reg << 3) | 0x07
        if size == 1:
            self.b(0x0F, 0xB6, modrm)
        elif size == 2:
            self.b(0x0F, 0xB7, modrm)
        else:
            self.rex_w(size)
            self.b(0x8B, modrm)

    def fold(self) -> None:
        """rol ebx, 5; xor ebx, eax (the 64-bit registers in long mode)"""
        if self.long:
            self.b(0x48)
        self.b(0xC1, 0xC3, 0x05)
        self.xor_rr(3, 0, self.long)

    def out_imm(self, port: int, size: int) -> None:
        if size == 1:
            self.b(0xE6, port)
        else:
            if size == 2:
                self.b(0x66)
            self.b(0xE7, port)

    def in_imm(self, port: int, size: int) -> None:
        if size == 1:
            self.b(0xE4, port)
        else:
            if size == 2:
                self.b(0x66)
            self.b(0xE5, port)

    def string(self, op: int, size: int, rep: bool = True) -> None:
        """`op` is the byte form (0x6C ins, 0x6E outs, 0xA4 movs, 0xAA stos)."""
        if rep:
            self.b(0xF3)
        if size == 2:
            self.b(0x66)
        self.rex_w(size)
        self.b(op + (0 if size == 1 else 1))


def _address(rng: random.Random, base: int, npages: int, size: int) -> int:
    page = rng.randrange(npages)
    offset = rng.choice(_EDGES) if rng.random() < 0.75 else rng.randrange(_PAGE)
    if rng.random() < 0.25:  # cross into the next page
        offset = _PAGE - rng.randrange(1, size) if size > 1 else _PAGE - 1
    return base + page * _PAGE + offset


def generate(seed: int, mode: str, data: tuple[int, int], mmio: tuple[int, int], *,
             length: int | None = None) -> RandomProgram:
    """A program of `length` operations (default: 8-24, by the seed) over the data window
    `data` = (gpa, pages) and the MMIO window `mmio` = (gpa, pages)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    rng = random.Random(seed)
    long = mode == "long64"
    a = _Asm(long)
    ops: list[str] = []
    sizes = (1, 2, 4, 8) if long else (1, 2, 4)

    def where(size: int, span: int = 1) -> int:
        base, npages = data if rng.random() < 0.75 else mmio
        addr = _address(rng, base, npages, size)
        return addr if span == 1 else max(base, addr - rng.randrange(span))

    a.b(0xFC)  # cld
    a.xor_rr(3, 3, long)  # checksum = 0
    n = length if length is not None else rng.randint(8, 24)
    for _ in range(n):
        kind = rng.choices(("store", "load", "check", "rep", "port", "string", "report"),
                           (5, 5, 3, 3, 2, 2, 1))[0]
        size = rng.choice(sizes)
        if kind == "store":
            addr, value = where(size), rng.getrandbits(8 * size)
            a.mov_imm(7, addr)
            a.mov_imm(0, value, wide=size == 8)
            a.xor_rr(0, 5, size == 8)
            a.store(size)
            ops.append(f"store{size} {addr:#x} {value:#x}^ebp")
        elif kind == "load":
            addr = where(size)
            a.mov_imm(7, addr)
            a.load(size)
            a.fold()
            ops.append(f"load{size} {addr:#x}")
        elif kind == "check":
            addr, value = where(size), rng.getrandbits(8 * size)
            wide = size == 8
            a.mov_imm(7, addr)
            a.mov_imm(0, value, wide=wide)
            a.xor_rr(0, 5, wide)
            a.store(size)
            a.load(size, reg=1)  # ecx = what is there now
            if size < 4:  # eax = what was stored, zero-extended as ecx
                a.b(0x0F, 0xB6 if size == 1 else 0xB7, 0xC0)
            if wide:
                a.b(0x48)
            a.b(0x39, 0xC8)  # cmp eax, ecx
            a.b(0x74, 0x02)  # je over the out
            a.out_imm(PORT_MISMATCH, 4)
            ops.append(f"check{size} {addr:#x} {value:#x}^ebp")
        elif kind == "rep":
            op = rng.choice(("movs", "stos"))
            count = rng.randint(1, 12)
            down = rng.random() < 0.2
            dst = where(size, span=count * size)
            a.mov_imm(7, dst)
            a.mov_imm(1, count)
            if op == "movs":
                src = where(size, span=count * size)
                a.mov_imm(6, src)
                what = f"rep movs{size} {src:#x} -> {dst:#x} x{count}"
            else:
                value = rng.getrandbits(32)
                a.mov_imm(0, value)
                a.xor_rr(0, 5, size == 8)
                what = f"rep stos{size} {dst:#x} {value:#x}^ebp x{count}"
            if down:
                a.b(0xFD)  # std
            a.string(0xA4 if op == "movs" else 0xAA, size)
            if down:
                a.b(0xFC)
            ops.append(what + (" down" if down else ""))
        elif kind == "port":
            size = rng.choice((1, 2, 4))
            if rng.random() < 0.5:
                port = rng.choice(PORTS_IN)
                a.in_imm(port, size)
                a.fold()
                ops.append(f"in{size} {port:#x}")
            else:
                port, value = rng.choice(PORTS_OUT), rng.getrandbits(32)
                a.mov_imm(0, value)
                a.xor_rr(0, 3, False)
                a.out_imm(port, size)
                ops.append(f"out{size} {port:#x} {value:#x}^checksum")
        elif kind == "string":
            size = rng.choice((1, 2, 4))
            count = rng.randint(1, 6)
            down = rng.random() < 0.2
            addr = where(size, span=count * size)
            ins = rng.random() < 0.5
            a.mov_imm(7 if ins else 6, addr)
            a.mov_imm(1, count)
            a.mov_imm(2, PORT_STRING)
            if down:
                a.b(0xFD)
            a.string(0x6C if ins else 0x6E, size)
            if down:
                a.b(0xFC)
            ops.append(f"rep {'ins' if ins else 'outs'}{size} {addr:#x} x{count}"
                       + (" down" if down else ""))
        else:
            a.b(0x89, 0xD8)  # mov eax, ebx
            a.out_imm(PORT_CHECKSUM, 4)
            ops.append("report")
    a.b(0x89, 0xD8)
    a.out_imm(PORT_CHECKSUM, 4)
    a.b(0xF4)  # hlt
    ops.append("report; hlt")
    return RandomProgram(seed, mode, bytes(a.out), tuple(ops))
