"""What a VMM starts x86 guests in: real mode, 32-bit protected mode, 64-bit long mode, and
64-bit user mode (CPL 3) under a small ring-0 stub — each as the `VcpuState` to load, plus the
tables it needs written into guest memory.

Defines:
- `real_mode(entry)`, `protected_mode(entry, write, gdt_gpa)`,
  `long_mode(entry, write, page_table_gpa)`, `user_mode(entry, write, system_gpa, rsp=...)`;
- `identity_map(write, pml4_gpa, size, page_size)` — 4-level page tables mapping
  [0, size) to itself with 4 KiB, 2 MiB or 1 GiB pages, and `identity_map_bytes`;
- `GDT` — the one descriptor table every protected mode here uses (selectors below), and the
  stub's exit ports `PORT_SYSCALL` / `PORT_EXCEPTION`.

Rules:
- Memory is written only through `write(gpa, data)`, so any memory works (a raw buffer, a
  `Vm`'s `write`); nothing is read back.
- Every segment in a returned state is exactly what a CPU loading its descriptor from `GDT`
  would cache (accessed bit set, TR busy): a guest that reloads a selector sees no change, and
  the state is already `canonical`. The descriptors are written with their accessed (and TSS
  busy) bits set, and page-table entries with accessed and dirty set, so no engine needs to
  write the tables back while the guest runs — memory stays comparable across engines.
- The IDT of `protected_mode` and `long_mode` is empty (limit 0): any exception ends in a
  triple fault, a "shutdown" exit on both engines. `user_mode` fills all 256 gates.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from .. import guests
from .state import (
    MSR_CSTAR,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    DTable,
    Regs,
    Segment,
    Sregs,
    VcpuState,
)

__all__ = [
    "GDT",
    "GDT_BYTES",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "PORT_EXCEPTION",
    "PORT_SYSCALL",
    "SEL_KERNEL_CODE32",
    "SEL_KERNEL_CODE64",
    "SEL_KERNEL_DATA",
    "SEL_TSS",
    "SEL_USER_CODE32",
    "SEL_USER_CODE64",
    "SEL_USER_DATA",
    "STUB_SYSCALL",
    "STUB_VECTORS",
    "USER_SYSTEM_BYTES",
    "identity_map",
    "identity_map_bytes",
    "long_mode",
    "protected_mode",
    "real_mode",
    "user_mode",
]

Write = Callable[[int, bytes], None]

PAGE_4K: Final = 1 << 12
PAGE_2M: Final = 1 << 21
PAGE_1G: Final = 1 << 30

PORT_SYSCALL: Final = 0x12  # user_stub: SYSCALL, eax = number
PORT_EXCEPTION: Final = 0x13  # user_stub: vector v, edx = error code, rcx = CR2
STUB_SYSCALL: Final = 0x0  # offset of the SYSCALL entry in user_stub.bin
STUB_VECTORS: Final = 0x100  # offset of vector 0's entry; vector v at + 16 * v

# the GDT: the SYSCALL/SYSRET layout (STAR[47:32] = kernel code64, +8 kernel data;
# STAR[63:48] = user code32, +8 user data, +16 user code64), a 32-bit kernel code segment,
# and a 16-byte TSS descriptor
SEL_KERNEL_CODE64: Final = 0x08
SEL_KERNEL_DATA: Final = 0x10
SEL_USER_CODE32: Final = 0x18
SEL_USER_DATA: Final = 0x20
SEL_USER_CODE64: Final = 0x28
SEL_KERNEL_CODE32: Final = 0x30
SEL_TSS: Final = 0x38
GDT_BYTES: Final = 0x48
_TSS_BYTES: Final = 0x68  # a 64-bit (or 32-bit) TSS without I/O bitmap
_TSS_OFFSET: Final = 0x80  # where the modes put the TSS, from the GDT's gpa

_CR0_PE: Final = 1 << 0
_CR0_MP: Final = 1 << 1
_CR0_ET: Final = 1 << 4
_CR0_NE: Final = 1 << 5
_CR0_WP: Final = 1 << 16
_CR0_PG: Final = 1 << 31
_CR4_PAE: Final = 1 << 5
_CR4_OSFXSR: Final = 1 << 9
_CR4_OSXMMEXCPT: Final = 1 << 10
_EFER_SCE: Final = 1 << 0
_EFER_LME: Final = 1 << 8
_EFER_LMA: Final = 1 << 10
_EFER_NXE: Final = 1 << 11
_RFLAGS_IF: Final = 1 << 9

_PTE_P: Final = 1 << 0
_PTE_RW: Final = 1 << 1
_PTE_US: Final = 1 << 2
_PTE_A: Final = 1 << 5
_PTE_D: Final = 1 << 6
_PTE_PS: Final = 1 << 7


def _flat(selector: int, type_: int, dpl: int, *, l: int = 0, db: int = 1) -> Segment:  # noqa: E741
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector | dpl, type=type_, present=1,
                   dpl=dpl, db=db, s=1, l=l, g=1, avl=0, unusable=0)


GDT: Final[dict[int, Segment]] = {
    SEL_KERNEL_CODE64: _flat(SEL_KERNEL_CODE64, 11, 0, l=1, db=0),
    SEL_KERNEL_DATA: _flat(SEL_KERNEL_DATA, 3, 0),
    SEL_USER_CODE32: _flat(SEL_USER_CODE32, 11, 3),
    SEL_USER_DATA: _flat(SEL_USER_DATA, 3, 3),
    SEL_USER_CODE64: _flat(SEL_USER_CODE64, 11, 3, l=1, db=0),
    SEL_KERNEL_CODE32: _flat(SEL_KERNEL_CODE32, 11, 0),
}
"""selector → the segment a CPU caches when it loads that descriptor (RPL = DPL)."""

_NO_IDT: Final = DTable(0, 0)
_UNUSABLE: Final = Segment(base=0, limit=0, selector=0, type=0, present=0, dpl=0, db=0, s=0,
                           l=0, g=0, avl=0, unusable=1)


def _descriptor(seg: Segment) -> bytes:
    """The 8-byte code/data descriptor a CPU would load `seg` from."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    access = (seg.present << 7) | (seg.dpl << 5) | (seg.s << 4) | seg.type
    flags = (seg.g << 3) | (seg.db << 2) | (seg.l << 1) | seg.avl
    return struct.pack("<HHBBBB", limit & 0xFFFF, seg.base & 0xFFFF, (seg.base >> 16) & 0xFF,
                       access, (flags << 4) | ((limit >> 16) & 0xF), (seg.base >> 24) & 0xFF)


def _tss_segment(base: int) -> Segment:
    # busy 64-bit (or 32-bit) TSS: what TR caches after LTR
    return Segment(base=base, limit=_TSS_BYTES - 1, selector=SEL_TSS, type=11, present=1,
                   dpl=0, db=0, s=0, l=0, g=0, avl=0, unusable=0)


def _write_gdt(write: Write, gdt_gpa: int, *, rsp0: int = 0) -> Segment:
    """GDT (with its TSS descriptor) at `gdt_gpa`, the TSS at `gdt_gpa + 0x80` (RSP0 =
    `rsp0`); returns TR's segment."""
    tss = _tss_segment(gdt_gpa + _TSS_OFFSET)
    table = bytearray(GDT_BYTES)
    for sel, seg in GDT.items():
        table[sel:sel + 8] = _descriptor(seg)
    lo = struct.pack("<HHBBBB", tss.limit, tss.base & 0xFFFF, (tss.base >> 16) & 0xFF,
                     0x80 | tss.type, 0, (tss.base >> 24) & 0xFF)
    table[SEL_TSS:SEL_TSS + 16] = lo + struct.pack("<II", tss.base >> 32, 0)
    write(gdt_gpa, bytes(table))
    tss_bytes = bytearray(_TSS_BYTES)
    struct.pack_into("<Q", tss_bytes, 4, rsp0)  # RSP0
    struct.pack_into("<H", tss_bytes, 0x66, _TSS_BYTES)  # I/O map base: no bitmap
    write(tss.base, bytes(tss_bytes))
    return tss


def _state(cs: int, data: int, tr: Segment, gdt_gpa: int, *, rip: int, rsp: int, cr0: int,
           cr3: int = 0, cr4: int = 0, efer: int = 0, idt: DTable = _NO_IDT) -> VcpuState:
    segs: dict[str, Any] = {name: GDT[data] for name in ("ds", "es", "fs", "gs", "ss")}
    return VcpuState(
        regs=Regs(rip=rip, rsp=rsp),
        sregs=Sregs(cs=GDT[cs], tr=tr, ldt=_UNUSABLE, gdt=DTable(gdt_gpa, GDT_BYTES - 1),
                    idt=idt, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, **segs))


# ---------------------------------------------------------------------------------------------


def real_mode(entry: int, *, sp: int = 0) -> VcpuState:
    """Real mode at linear `entry` (below 1 MiB + 64 KiB): CS = entry >> 4, IP = entry & 15;
    DS = ES = FS = GS = SS = 0 with SP = `sp`; the IVT at 0 (IDTR 0, 0x3ff); interrupts off.
    A program whose labels are offsets from its start needs `entry % 16 == 0`."""
    if not 0 <= entry < 0x10_FFF0:
        raise ValueError(f"entry {entry:#x} is not reachable in real mode (below 0x10fff0)")
    if not 0 <= sp <= 0xFFFF:
        raise ValueError(f"sp {sp:#x} is not a 16-bit offset")
    cs = entry >> 4
    return VcpuState(
        regs=Regs(rip=entry & 0xF, rsp=sp),
        sregs=Sregs(cs=Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=11),
                    idt=DTable(0, 0x3FF)))


def protected_mode(entry: int, write: Write, gdt_gpa: int, *, esp: int = 0) -> VcpuState:
    """32-bit protected mode at `entry`: flat 4 GiB segments (CS `SEL_KERNEL_CODE32`, data
    `SEL_KERNEL_DATA`), CPL 0, no paging, no IDT. Writes `GDT` at `gdt_gpa` and a TSS at
    `gdt_gpa + 0x80` (0xe8 bytes in all)."""
    _check_u32("entry", entry)
    _check_u32("esp", esp)
    tr = _write_gdt(write, gdt_gpa)
    return _state(SEL_KERNEL_CODE32, SEL_KERNEL_DATA, tr, gdt_gpa, rip=entry, rsp=esp,
                  cr0=_CR0_PE | _CR0_ET)


def long_mode(entry: int, write: Write, page_table_gpa: int, *, identity_gib: int = 1,
              page_size: int = PAGE_2M, gdt_gpa: int | None = None, rsp: int = 0) -> VcpuState:
    """64-bit long mode at `entry`, CPL 0: 4-level paging identity-mapping the first
    `identity_gib` GiB (`page_size` pages, supervisor, writable), CS `SEL_KERNEL_CODE64`, data
    `SEL_KERNEL_DATA`, EFER.SCE|LME|LMA|NXE, CR4.PAE|OSFXSR|OSXMMEXCPT, CR0.WP, no IDT.
    The page tables take [page_table_gpa, + identity_map_bytes(...)); the GDT and TSS follow
    them unless `gdt_gpa` says where."""
    if identity_gib < 1:
        raise ValueError(f"identity_gib={identity_gib} must be at least 1")
    end = identity_map(write, page_table_gpa, identity_gib << 30, page_size)
    gdt = end if gdt_gpa is None else gdt_gpa
    tr = _write_gdt(write, gdt)
    return _state(SEL_KERNEL_CODE64, SEL_KERNEL_DATA, tr, gdt, rip=entry, rsp=rsp,
                  cr0=_CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_PG,
                  cr3=page_table_gpa, cr4=_CR4_PAE | _CR4_OSFXSR | _CR4_OSXMMEXCPT,
                  efer=_EFER_SCE | _EFER_LME | _EFER_LMA | _EFER_NXE)


USER_SYSTEM_BYTES: Final = 0x5000
"""The fixed part of `user_mode`'s system area: GDT + TSS, IDT, stub, kernel stack; the page
tables follow it."""


def user_mode(entry: int, write: Write, system_gpa: int, *, rsp: int,
              identity_size: int = 4 << 20, page_size: int = PAGE_4K) -> VcpuState:
    """64-bit code at CPL 3 at `entry`, with `rsp` its stack, over a ring-0 stub.

    The system area at `system_gpa` (page aligned) holds, at these offsets: 0x0 the GDT and
    TSS (RSP0 = the top of the kernel stack), 0x1000 the IDT (256 interrupt gates to the stub;
    vectors 3, 4 and 0x80 callable from CPL 3), 0x2000 the stub (`user_stub`), 0x4000-0x5000 the
    kernel stack, 0x5000 the page tables: [0, identity_size) identity-mapped, user-accessible
    and writable except the system area's own pages (supervisor-only; so the area must not
    share a page with user code or data — with 2 MiB pages, not even a 2 MiB page).
    SYSCALL enters the stub (STAR, LSTAR, SFMASK = IF|TF|DF|AC set up); the stub turns each
    entry into one port write (`PORT_SYSCALL`, `PORT_EXCEPTION`) and returns to user code.
    Interrupts stay off at CPL 3 (RFLAGS.IF = 0): nothing here could deliver them."""
    if system_gpa % PAGE_4K:
        raise ValueError(f"system_gpa {system_gpa:#x} is not page aligned")
    stub = guests.program("user_stub")
    if len(stub) > 0x2000:  # pragma: no cover - a build-time contract
        raise AssertionError(f"user_stub is {len(stub)} bytes; the area has 0x2000")
    gdt_gpa, idt_gpa, stub_gpa = system_gpa, system_gpa + 0x1000, system_gpa + 0x2000
    kernel_stack_top = system_gpa + 0x5000
    tables_gpa = system_gpa + USER_SYSTEM_BYTES
    tables_end = tables_gpa + identity_map_bytes(identity_size, page_size)

    def user_page(gpa: int, size: int) -> bool:
        return gpa + size <= system_gpa or gpa >= tables_end

    identity_map(write, tables_gpa, identity_size, page_size, user=user_page)
    tr = _write_gdt(write, gdt_gpa, rsp0=kernel_stack_top)
    idt = bytearray(256 * 16)
    for vec in range(256):
        target = stub_gpa + STUB_VECTORS + 16 * vec
        dpl = 3 if vec in (3, 4, 0x80) else 0
        struct.pack_into("<HHBBHII", idt, 16 * vec, target & 0xFFFF, SEL_KERNEL_CODE64, 0,
                         0x80 | (dpl << 5) | 0xE, (target >> 16) & 0xFFFF, target >> 32, 0)
    write(idt_gpa, bytes(idt))
    write(stub_gpa, stub)
    state = _state(SEL_USER_CODE64, SEL_USER_DATA, tr, gdt_gpa, rip=entry, rsp=rsp,
                   cr0=_CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_PG,
                   cr3=tables_gpa, cr4=_CR4_PAE | _CR4_OSFXSR | _CR4_OSXMMEXCPT,
                   efer=_EFER_SCE | _EFER_LME | _EFER_LMA | _EFER_NXE,
                   idt=DTable(idt_gpa, 256 * 16 - 1))
    star = (SEL_USER_CODE32 << 48) | (SEL_KERNEL_CODE64 << 32)
    sfmask = _RFLAGS_IF | (1 << 8) | (1 << 10) | (1 << 18)  # IF, TF, DF, AC
    return state.with_msrs({MSR_STAR: star, MSR_LSTAR: stub_gpa + STUB_SYSCALL,
                            MSR_CSTAR: stub_gpa + STUB_SYSCALL, MSR_SFMASK: sfmask})


# ---------------------------------------------------------------------------------------------
# page tables


_LEVEL_SPAN: Final = {1: PAGE_4K, 2: PAGE_2M, 3: PAGE_1G, 4: PAGE_1G << 9}
_LEAF_LEVEL: Final = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}


def _table_counts(size: int, page_size: int) -> dict[int, int]:
    """level → how many 4 KiB tables of that level map [0, size), leaf level to PML4 (4)."""
    _check_map(size, page_size)
    counts = {}
    for level in range(_LEAF_LEVEL[page_size], 4):
        entries = -(-size // _LEVEL_SPAN[level])
        counts[level] = -(-entries // 512)
    counts[4] = 1
    return counts


def identity_map_bytes(size: int, page_size: int = PAGE_2M) -> int:
    """Bytes of page tables `identity_map` writes for `size` bytes of `page_size` pages."""
    return sum(_table_counts(size, page_size).values()) * PAGE_4K


def identity_map(write: Write, pml4_gpa: int, size: int, page_size: int = PAGE_2M, *,
                 user: bool | Callable[[int, int], bool] = False) -> int:
    """4-level page tables at `pml4_gpa` mapping linear [0, size) to the same physical
    addresses with `page_size` pages (PAGE_4K, PAGE_2M, or PAGE_1G — which needs 1 GiB page
    support in the guest CPUID). Leaves are present, writable, accessed and dirty, and user-
    accessible where `user` says (a bool, or `user(gpa, page_size)` per page); non-leaf
    entries allow everything, so the leaves decide. The tables follow each other in 4 KiB
    pages — PML4, PDPTs, PDs, PTs — and the gpa after the last one is returned."""
    counts = _table_counts(size, page_size)
    if pml4_gpa % PAGE_4K:
        raise ValueError(f"pml4_gpa {pml4_gpa:#x} is not page aligned")
    leaf = _LEAF_LEVEL[page_size]
    first: dict[int, int] = {4: pml4_gpa}  # level → gpa of its first table
    gpa = pml4_gpa + PAGE_4K
    for level in range(3, leaf - 1, -1):
        first[level] = gpa
        gpa += counts[level] * PAGE_4K
    leaf_flags = _PTE_P | _PTE_RW | _PTE_A | _PTE_D | (_PTE_PS if leaf > 1 else 0)
    table_flags = _PTE_P | _PTE_RW | _PTE_US | _PTE_A
    for level in range(4, leaf - 1, -1):
        span = _LEVEL_SPAN[level]
        entries = -(-size // span)
        table = bytearray(8 * entries)
        for i in range(entries):
            if level == leaf:
                addr = i * span
                flags = leaf_flags | (_PTE_US if _is_user(user, addr, span) else 0)
                struct.pack_into("<Q", table, 8 * i, addr | flags)
            else:  # entry i covers 512 entries of the level below: its i-th table
                struct.pack_into("<Q", table, 8 * i, (first[level - 1] + i * PAGE_4K)
                                 | table_flags)
        write(first[level], bytes(table))
    return gpa


def _is_user(user: bool | Callable[[int, int], bool], gpa: int, size: int) -> bool:
    return user(gpa, size) if callable(user) else user


def _check_map(size: int, page_size: int) -> None:
    if page_size not in (PAGE_4K, PAGE_2M, PAGE_1G):
        raise ValueError(f"page_size {page_size:#x} is not 4 KiB, 2 MiB or 1 GiB")
    if size <= 0 or size % page_size:
        raise ValueError(f"size {size:#x} is not a positive multiple of the page size")
    if size > 1 << 48:
        raise ValueError(f"size {size:#x} is beyond 4-level paging's 256 TiB")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{name} {value:#x} is not a 32-bit address")
