"""The software page walker (`kvmem.cpu.paging`) and the identity map builder.

- hand-built tables in every mode (none, 32-bit with and without PSE, PAE, 4-level, 5-level):
  the gpa, and for every way an access can fail the page-fault error code a CPU pushes;
- `identity_map` maps what it says, with the user bit where asked;
- differential: random page tables (random present / writable / user / no-execute / page size
  bits, reserved bits sometimes set) loaded into a real KVM vCPU — `kvm_translate` must answer
  every linear address exactly as KVM_TRANSLATE does (KVM_TRANSLATE walks as a supervisor
  read, so it cannot see the write / user / fetch checks: the next test does);
- differential against the CPU itself: CPL-3 code reads, writes and jumps into pages whose
  leaf entries have random permission and reserved bits, under `modes.user_mode`, on both
  engines — every access must succeed or fault exactly as `translate_gva` predicts, error
  code and CR2 included;
- `walk_for_tlb` (a CPU's walk on a TLB miss, which Unicorn's TLB gets from kvmem): the
  accessed bit in every entry used, the dirty bit in a written leaf, nothing on a fault,
  none in PAE's PDPTEs, and what the entry grants;
- the same against QEMU's walker (Unicorn) in 32-bit, PAE and 4-level paging, at CPL 0 and 3,
  with CR0.WP and CR4.SMEP on and off — the KVM of kvmem's CI host runs 4/5-level paging only,
  so there the 32-bit and PAE cases of the KVM_TRANSLATE differential are skipped (saying so).
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable, Iterator

import pytest
from expect import GUEST_ENGINES

from kvmem import kvmapi
from kvmem.cpu import modes, raw
from kvmem.cpu.paging import (
    DEFAULT_FEATURES,
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PageFault,
    PagingFeatures,
    kvm_translate,
    paging_mode,
    table_pages,
    translate_gva,
    walk_for_tlb,
)
from kvmem.cpu.state import Sregs, VcpuState

KVM_MISSING = kvmapi.kvm_available()

P, RW, US, PS = 1, 2, 4, 0x80
NX = 1 << 63
CR0_PG_PE = (1 << 31) | 1
CR0_WP = 1 << 16
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21
EFER_LME_LMA, EFER_NXE = (1 << 8) | (1 << 10), 1 << 11


class Tables:
    """A sparse guest-physical memory with a bump allocator for 4 KiB tables."""

    def __init__(self, first: int = 0x10_0000) -> None:
        self.mem: dict[int, int] = {}  # byte address → value
        self.next = first

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem.get(gpa + i, 0) for i in range(n))

    def write(self, gpa: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[gpa + i] = b

    def table(self) -> int:
        gpa, self.next = self.next, self.next + 0x1000
        return gpa

    def set64(self, table: int, index: int, value: int) -> None:
        self.write(table + 8 * index, struct.pack("<Q", value))

    def set32(self, table: int, index: int, value: int) -> None:
        self.write(table + 4 * index, struct.pack("<I", value))

    def map4(self, pml4: int, gva: int, gpa: int, leaf: int = P | RW | US, *,
             level: int = 1, top: int = 4, upper: int = P | RW | US) -> None:
        """Map `gva` with a leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) under a
        `top`-level (4 or 5) root; intermediate entries get `upper`."""
        table = pml4
        for lv in range(top, level, -1):
            idx = (gva >> (12 + 9 * (lv - 1))) & 511
            raw = int.from_bytes(self.read(table + 8 * idx, 8), "little")
            if not raw & P:
                raw = self.table() | upper
                self.set64(table, idx, raw)
            table = raw & 0x000F_FFFF_FFFF_F000
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        self.set64(table, idx, gpa | leaf | (PS if level > 1 else 0))


def long_sregs(cr3: int, *, nxe: bool = True, cr0: int = CR0_PG_PE | CR0_WP, cr4: int = 0,
               la57: bool = False) -> Sregs:
    return Sregs(cr0=cr0, cr3=cr3, cr4=cr4 | CR4_PAE | (CR4_LA57 if la57 else 0),
                 efer=EFER_LME_LMA | (EFER_NXE if nxe else 0))


def fault(read: Callable[[int, int], bytes], s: VcpuState | Sregs, gva: int, *,
          write: bool = False, user: bool = False, fetch: bool = False,
          features: PagingFeatures = DEFAULT_FEATURES) -> int:
    with pytest.raises(PageFault) as info:
        translate_gva(read, s, gva, write=write, user=user, fetch=fetch, features=features)
    assert info.value.gva == gva
    return info.value.error_code


# ---------------------------------------------------------------------------------------------
# hand-built tables


def test_no_paging_is_the_identity() -> None:
    assert paging_mode(Sregs()) == "none"
    assert translate_gva(Tables().read, Sregs(), 0x1234_5678) == 0x1234_5678


def test_4level_page_sizes() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x0000_7F00_1234_5000, 0x3_4567_8000)
    t.map4(pml4, 0x0000_0040_0020_0000, 0x8_0000_0000, level=2)
    t.map4(pml4, 0xFFFF_8000_4000_0000, 0x40_0000_0000, level=3)
    s = long_sregs(pml4)
    assert paging_mode(s) == "4-level"
    assert translate_gva(t.read, s, 0x0000_7F00_1234_5ABC) == 0x3_4567_8ABC
    assert translate_gva(t.read, s, 0x0000_0040_002F_FFFF) == 0x8_000F_FFFF
    assert translate_gva(t.read, s, 0xFFFF_8000_7FFF_FFF8) == 0x40_3FFF_FFF8
    # a 1 GiB page without 1 GiB page support: PS is a reserved bit there
    code = fault(t.read, s, 0xFFFF_8000_4000_0000, features=PagingFeatures(gbpages=False))
    assert code == PFERR_PRESENT | PFERR_RSVD


def test_not_present_at_every_level() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x40_0000, 0x9000, leaf=RW | US)  # PTE not present
    s = long_sregs(pml4)
    assert fault(t.read, s, 0x40_0000) == 0
    assert fault(t.read, s, 0x40_0000, write=True, user=True) == PFERR_WRITE | PFERR_USER
    assert fault(t.read, s, 0x40_0000, fetch=True) == PFERR_FETCH  # NXE: I/D reported
    assert fault(t.read, long_sregs(pml4, nxe=False), 0x40_0000, fetch=True) == 0
    assert fault(t.read, s, 0x8000_0000_0000) == 0  # PML4E not present (non-canonical here
    # is not the walker's business: KVM_TRANSLATE walks the low 48 bits too)


def test_permissions() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x1000, 0x1000, leaf=P | US)  # user, read-only
    t.map4(pml4, 0x2000, 0x2000, leaf=P | RW)  # supervisor, writable
    t.map4(pml4, 0x3000, 0x3000, leaf=P | RW | US | NX)  # user, no-execute
    ro_above = 1 << 39  # its own PML4 entry, so its upper entries are the ones given here
    t.map4(pml4, ro_above, 0x4000, leaf=P | RW | US, upper=P | US)  # read-only above the leaf
    s = long_sregs(pml4)
    pu = PFERR_PRESENT | PFERR_USER
    assert fault(t.read, s, 0x1000, write=True, user=True) == pu | PFERR_WRITE
    assert fault(t.read, s, 0x1000, write=True) == PFERR_PRESENT | PFERR_WRITE  # CR0.WP
    no_wp = dataclasses.replace(s, cr0=s.cr0 & ~CR0_WP)
    assert translate_gva(t.read, no_wp, 0x1000, write=True) == 0x1000
    assert fault(t.read, no_wp, 0x1000, write=True, user=True) == pu | PFERR_WRITE
    assert fault(t.read, s, 0x2000, user=True) == pu
    assert fault(t.read, s, 0x3000, fetch=True, user=True) == pu | PFERR_FETCH
    assert translate_gva(t.read, s, 0x3000, user=True, write=True) == 0x3000
    assert fault(t.read, s, ro_above, write=True, user=True) == pu | PFERR_WRITE
    assert translate_gva(t.read, s, ro_above, user=True) == 0x4000
    # without EFER.NXE, bit 63 is reserved
    code = fault(t.read, long_sregs(pml4, nxe=False), 0x3000)
    assert code == PFERR_PRESENT | PFERR_RSVD


def test_smep_and_smap() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x1000, 0x1000, leaf=P | RW | US)
    s = long_sregs(pml4, cr4=CR4_SMEP | CR4_SMAP)
    assert fault(t.read, s, 0x1000, fetch=True) == PFERR_PRESENT | PFERR_FETCH
    assert fault(t.read, s, 0x1000) == PFERR_PRESENT
    assert translate_gva(t.read, s, 0x1000, user=True, fetch=True) == 0x1000
    with_ac = VcpuState(sregs=s).with_regs(rflags=0x2 | (1 << 18))
    assert translate_gva(t.read, with_ac, 0x1000, write=True) == 0x1000


def test_reserved_bits() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x1000, 1 << 40)  # beyond MAXPHYADDR 36
    t.map4(pml4, 0x20_0000, 0x20_0000 | (1 << 13), level=2)  # 2 MiB page: bit 13 reserved
    s = long_sregs(pml4)
    rsvd = PFERR_PRESENT | PFERR_RSVD
    assert fault(t.read, s, 0x1000, features=PagingFeatures(maxphyaddr=36)) == rsvd
    assert translate_gva(t.read, s, 0x1000) == 1 << 40
    assert fault(t.read, s, 0x20_0000, write=True) == rsvd | PFERR_WRITE
    # AMD reserves bit 8 of PML4Es (KVM: not of PDPTEs)
    t2 = Tables()
    root = t2.table()
    t2.map4(root, 0x1000, 0x1000, upper=P | RW | US | 0x100)
    s2 = long_sregs(root)
    assert translate_gva(t2.read, s2, 0x1000) == 0x1000
    assert fault(t2.read, s2, 0x1000, features=PagingFeatures(amd=True)) == rsvd
    t2.set64(root, 0, int.from_bytes(t2.read(root, 8), "little") & ~0x100)
    assert translate_gva(t2.read, s2, 0x1000, features=PagingFeatures(amd=True)) == 0x1000
    # PS in a PML4E
    t3 = Tables()
    root = t3.table()
    t3.set64(root, 0, 0x4000_0000 | P | RW | PS)
    assert fault(t3.read, long_sregs(root), 0x1000) == rsvd


def test_five_level() -> None:
    t = Tables()
    pml5 = t.table()
    gva = 0xFF12_3456_789A_B000  # bits 56:48 matter with LA57
    t.map4(pml5, gva, 0x7000, top=5)
    s = long_sregs(pml5, la57=True)
    assert paging_mode(s) == "5-level"
    assert translate_gva(t.read, s, gva + 0x10) == 0x7010


def test_32bit_paging() -> None:
    t = Tables()
    pd = t.table()
    pt = t.table()
    t.set32(pd, 1, pt | P | RW | US)
    t.set32(pt, 2, 0x1234_5000 | P | US)
    # a 4 MiB page with PSE-36 bits 13..16: physical bits 32..35
    t.set32(pd, 3, 0x0840_0000 | (0x5 << 13) | P | RW | PS)
    t.set32(pd, 4, 0x0880_0000 | (1 << 17) | P | RW | PS)  # bit 17: reserved (KVM: PSE-36)
    s = Sregs(cr0=CR0_PG_PE | CR0_WP, cr3=pd, cr4=CR4_PSE)
    assert paging_mode(s) == "32-bit"
    assert translate_gva(t.read, s, 0x0040_2ABC) == 0x1234_5ABC
    assert fault(t.read, s, 0x0040_2000, write=True, user=True) == (
        PFERR_PRESENT | PFERR_WRITE | PFERR_USER)
    assert translate_gva(t.read, s, 0x00C1_2345) == 0x5_0841_2345
    assert fault(t.read, s, 0x0100_0000) == PFERR_PRESENT | PFERR_RSVD
    # fetches: no NX in 32-bit paging, so no I/D bit
    assert fault(t.read, s, 0x0500_0000, fetch=True) == 0
    # without CR4.PSE, PS is ignored and the entry points to a page table
    no_pse = dataclasses.replace(s, cr4=0)
    assert fault(t.read, no_pse, 0x00C0_0000) == 0  # the "page table" at 0x0840a000 is empty


def test_pae_paging() -> None:
    t = Tables()
    pdpt = 0x20  # 32-byte aligned, below the allocator's tables
    pd = t.table()
    pt = t.table()
    t.set64(pdpt, 1, pd | P)
    t.set64(pd, 0, pt | P | RW)
    t.set64(pt, 5, 0x9_0000_0000 | P | RW | NX)
    t.set64(pd, 1, 0x4060_0000 | P | RW | US | PS)
    s = Sregs(cr0=CR0_PG_PE | CR0_WP, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    assert paging_mode(s) == "pae"
    assert translate_gva(t.read, s, 0x4000_5008) == 0x9_0000_0008
    assert fault(t.read, s, 0x4000_5008, fetch=True) == PFERR_PRESENT | PFERR_FETCH
    assert translate_gva(t.read, s, 0x4030_0010) == 0x4070_0010
    assert fault(t.read, s, 0x0000_1000) == 0  # PDPTE 0 not present
    t.set64(pdpt, 2, pd | P | (1 << 5))  # a reserved PDPTE bit
    assert fault(t.read, s, 0x8000_0000) == PFERR_PRESENT | PFERR_RSVD


A, D = 0x20, 0x40


def _ad(t: Tables, gpas: list[int]) -> list[int]:
    return [int.from_bytes(t.read(g, 8), "little") & (A | D) for g in gpas]


def test_table_pages_are_every_structure_below_cr3() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x40_0000, 0x9000)  # PDPT, PD, PT
    t.map4(pml4, 0x8000_0000, 0x20_0000, level=2)  # a 2 MiB leaf: a PDPT and a PD, no PT
    t.map4(pml4, 0x7F00_0000_0000, 0x4000_0000, level=3)  # a 1 GiB leaf: PDPT only
    tables = table_pages(t.read, long_sregs(pml4))
    assert tables == set(range(pml4, t.next, 0x1000))
    assert len(tables) == 6  # PML4; PDPT, PD, PT; a PD (the PDPT shared); a PDPT
    assert table_pages(t.read, Sregs(cr0=1)) == set()  # no paging
    pd = t.table()  # 32-bit paging, a 4 MiB page (with PSE) and a 4 KiB page table
    pt = t.table()
    t.set32(pd, 0, pt | P)
    t.set32(pd, 1, 0x40_0000 | P | PS)
    legacy = Sregs(cr0=CR0_PG_PE, cr3=pd, cr4=CR4_PSE)
    assert table_pages(t.read, legacy) == {pd, pt}
    # without CR4.PSE bit 7 is ignored: the entry is a page table's
    assert table_pages(t.read, Sregs(cr0=CR0_PG_PE, cr3=pd)) == {pd, pt, 0x40_0000}


def test_walk_for_tlb_sets_accessed_and_dirty_as_kvm() -> None:
    t = Tables()
    pml4 = t.table()
    t.map4(pml4, 0x40_0000, 0x9000, P | RW)  # 4 KiB leaf, supervisor, writable
    t.map4(pml4, 0x60_0000, 0xA000, P)  # read-only
    s = long_sregs(pml4)
    path, table = [], pml4  # the gpas of the PML4E, PDPTE, PDE and PTE of gva 0x40_0123
    for level in (4, 3, 2, 1):
        at = table + 8 * ((0x40_0123 >> (12 + 9 * (level - 1))) & 511)
        path.append(at)
        table = int.from_bytes(t.read(at, 8), "little") & 0x000F_FFFF_FFFF_F000
    writes: list[int] = []

    def write(gpa: int, data: bytes) -> None:
        writes.append(gpa)
        t.write(gpa, data)

    got = walk_for_tlb(t.read, write, s, 0x40_0123, access="read", user=False)
    assert (got.gpa, got.read, got.write, got.fetch) == (0x9000, True, False, True)
    assert _ad(t, path) == [A, A, A, A]  # a read: accessed everywhere, no dirty bit
    assert sorted(writes) == sorted(path)
    writes.clear()
    got = walk_for_tlb(t.read, write, s, 0x40_0123, access="write", user=False)
    assert (got.read, got.write) == (True, True)
    assert _ad(t, path) == [A, A, A, A | D] and writes == [path[3]]  # the leaf only
    writes.clear()
    walk_for_tlb(t.read, write, s, 0x40_0123, access="write", user=False)
    assert writes == []  # nothing left to set
    with pytest.raises(PageFault):  # a user access to a supervisor page: no bit set
        walk_for_tlb(t.read, write, s, 0x60_0000, access="read", user=True)
    assert writes == []
    got = walk_for_tlb(t.read, write, s, 0x60_0000, access="read", user=False)
    assert got.write is False  # read-only: never writable, dirty or not
    with pytest.raises(ValueError, match="access"):
        walk_for_tlb(t.read, write, s, 0x60_0000, access="exec", user=False)


def test_walk_for_tlb_leaves_pae_pdptes_alone() -> None:
    t = Tables()
    pdpt = t.table()
    pd = t.table()
    t.set64(pdpt, 0, pd | P)
    t.set64(pd, 1, 0x20_0000 | P | RW | PS)  # a 2 MiB leaf at gva 2 MiB
    s = Sregs(cr0=CR0_PG_PE | CR0_WP, cr3=pdpt, cr4=CR4_PAE)
    writes: list[int] = []

    def write(gpa: int, data: bytes) -> None:
        writes.append(gpa)
        t.write(gpa, data)

    got = walk_for_tlb(t.read, write, s, 0x20_1000, access="write", user=False)
    assert got.gpa == 0x20_1000 and got.write
    assert writes == [pd + 8] and _ad(t, [pdpt, pd + 8]) == [0, A | D]


def test_walk_for_tlb_without_paging_grants_everything() -> None:
    got = walk_for_tlb(lambda g, n: bytes(n), lambda g, d: None,
                       Sregs(cr0=1, cr3=0, cr4=0, efer=0), 0x1234_5678, access="write",
                       user=True)
    assert (got.gpa, got.read, got.write, got.fetch) == (0x1234_5000, True, True, True)


@pytest.mark.parametrize(("args", "error"), [
    ({"gva": -1}, ValueError),
    ({"gva": 1 << 64}, ValueError),
    ({"gva": 0, "write": True, "fetch": True}, ValueError),
    ({"gva": 0, "state": "sregs"}, TypeError),
])
def test_bad_input_is_refused(args: dict[str, object], error: type[Exception]) -> None:
    state = args.pop("state", Sregs())
    with pytest.raises(error):
        translate_gva(Tables().read, state, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# identity_map


@pytest.mark.parametrize("page_size", [modes.PAGE_4K, modes.PAGE_2M, modes.PAGE_1G])
def test_identity_map(page_size: int) -> None:
    t = Tables()
    size = 2 << 30 if page_size == modes.PAGE_1G else 8 << 20
    pml4 = 0x10_0000

    def user(gpa: int, n: int) -> bool:
        return gpa >= n  # everything but the first page

    end = modes.identity_map(t.write, pml4, size, page_size, user=user)
    assert end - pml4 == modes.identity_map_bytes(size, page_size)
    s = long_sregs(pml4)
    rng = random.Random(page_size)
    for gva in [0, size - 1, page_size, *(rng.randrange(size) for _ in range(50))]:
        assert translate_gva(t.read, s, gva, write=True) == gva
        if gva >= page_size:
            assert translate_gva(t.read, s, gva, user=True) == gva
        else:
            assert fault(t.read, s, gva, user=True) == PFERR_PRESENT | PFERR_USER
    assert fault(t.read, s, size) == 0
    with pytest.raises(ValueError, match="page_size"):
        modes.identity_map(t.write, pml4, size, 0x3000)
    with pytest.raises(ValueError, match="multiple"):
        modes.identity_map(t.write, pml4, page_size + 1, page_size)


# ---------------------------------------------------------------------------------------------
# differential: kvm_translate vs KVM_TRANSLATE on random page tables

MEM = 8 << 20
TABLES_AT = 0x40_0000  # page tables live in [4 MiB, 8 MiB) of guest memory


@pytest.fixture
def kvm_cpu() -> Iterator[raw.KvmCpu]:
    if KVM_MISSING is not None:
        pytest.skip(f"KVM: {KVM_MISSING}")
    mem = raw.GuestMemory(MEM)
    cpu = raw.KvmCpu(mem)
    yield cpu
    cpu.close()
    mem.close()


class RandomTables:
    """Random page tables in a GuestMemory, entries drawn with the bits that matter."""

    def __init__(self, mem: raw.GuestMemory, rng: random.Random, maxphyaddr: int,
                 entry_bytes: int = 8) -> None:
        self.mem, self.rng, self.maxphyaddr, self.size = mem, rng, maxphyaddr, entry_bytes
        self.next = TABLES_AT
        mem.write(TABLES_AT, bytes(MEM - TABLES_AT))

    def table(self) -> int:
        gpa, self.next = self.next, self.next + 0x1000
        assert self.next <= MEM
        return gpa

    def bits(self, *, leaf: bool, big: bool, level: int) -> int:
        r = self.rng
        v = (P if r.random() < 0.9 else 0) | (RW if r.random() < 0.7 else 0)
        v |= US if r.random() < 0.7 else 0
        if self.size == 8:
            v |= NX if r.random() < 0.2 else 0
            if r.random() < 0.05:
                v |= 1 << r.randrange(self.maxphyaddr, 52)  # a reserved address bit
            if r.random() < 0.05 and not leaf and level >= 3:
                v |= 0x100  # bit 8: reserved on AMD in non-leaf PML4E/PDPTE
            if r.random() < 0.03 and level == 4:
                v |= PS
        if big:
            v |= PS
            if r.random() < 0.05:
                v |= 1 << 13  # reserved in 2 MiB / 1 GiB leaves
        return v

    def fill(self, table: int, level: int, top: int, depth_left: int) -> None:
        """Fill a few random entries of `table` (a level-`level` table)."""
        r = self.rng
        per = 512 if self.size == 8 else 1024
        for idx in r.sample(range(per), 4 if level == top else 3):
            big_ok = (level in (2, 3) and self.size == 8) or (level == 2 and self.size == 4)
            big = big_ok and r.random() < 0.3
            leaf = level == 1 or big
            frame = r.randrange(1 << min(self.maxphyaddr, 40)) & ~0xFFF if leaf else \
                self.table()
            if big and self.size == 8:
                frame &= ~((1 << (12 + 9 * (level - 1))) - 1)
            elif big:
                frame &= 0xFFC0_0000
                frame |= r.randrange(16) << 13  # PSE-36 high bits
            value = frame | self.bits(leaf=leaf, big=big, level=level)
            if self.size == 8:
                self.mem.write(table + 8 * idx, struct.pack("<Q", value))
            else:
                self.mem.write(table + 4 * idx, struct.pack("<I", value & 0xFFFF_FFFF))
            if not leaf and depth_left:
                self.fill(frame, level - 1, top, depth_left - 1)

    def probes(self, bits: int, n: int) -> list[int]:
        """Linear addresses to translate: random ones, biased to the filled entries' ranges
        by reusing random index combinations."""
        return [self.rng.getrandbits(bits) for _ in range(n)]


def kvm_says(cpu: raw.KvmCpu, gva: int) -> tuple[int, bool, bool, bool]:
    t = cpu.vcpu.translate(gva)
    return t.physical_address, t.valid, t.writeable, t.usermode


def canonical48(addr: int) -> int:
    return addr | (0xFFFF << 48) if addr & (1 << 47) else addr


@pytest.mark.parametrize(("mode", "seed"), [
    *((m, s) for m in ("32-bit", "32-bit-pse", "pae") for s in range(3)),
    *(("4-level", s) for s in range(16)),
])
def test_walker_agrees_with_kvm_translate(kvm_cpu: raw.KvmCpu, mode: str, seed: int) -> None:
    rng = random.Random(f"{mode}/{seed}")
    feats = kvm_cpu.features
    mem = kvm_cpu.memory
    base = modes.protected_mode(0x10000, mem.write, 0x1000)
    nxe = rng.random() < 0.7
    if mode.startswith("32-bit"):
        tables = RandomTables(mem, rng, feats.maxphyaddr, entry_bytes=4)
        root = tables.table()
        tables.fill(root, 2, 2, 1)
        sregs = dataclasses.replace(base.sregs, cr0=base.sregs.cr0 | CR0_PG_PE, cr3=root,
                                    cr4=CR4_PSE if mode.endswith("pse") else 0)
        gvas = tables.probes(32, 300)
    elif mode == "pae":
        tables = RandomTables(mem, rng, feats.maxphyaddr)
        root = tables.table()
        for i in range(4):  # PDPTEs: present or not, no reserved bits (KVM checks them at
            if rng.random() < 0.8:  # CR3 load; a CPU would #GP there)
                pd = tables.table()
                mem.write(root + 8 * i, struct.pack("<Q", pd | P))
                tables.fill(pd, 2, 2, 1)
        sregs = dataclasses.replace(base.sregs, cr0=base.sregs.cr0 | CR0_PG_PE, cr3=root,
                                    cr4=CR4_PAE, efer=EFER_NXE if nxe else 0)
        gvas = tables.probes(32, 300)
    else:
        tables = RandomTables(mem, rng, feats.maxphyaddr)
        root = tables.table()
        tables.fill(root, 4, 4, 3)
        long = modes.long_mode(0x10000, mem.write, 0x1000, gdt_gpa=0x8000)
        sregs = dataclasses.replace(long.sregs, cr3=root,
                                    efer=long.sregs.efer & ~EFER_NXE | (EFER_NXE if nxe
                                                                        else 0))
        gvas = [canonical48(g) for g in tables.probes(48, 300)]
    # every filled entry is reached by some probe: add addresses built from the tables
    gvas += walk_targets(mem, sregs, rng)
    try:
        kvm_cpu.set_state(dataclasses.replace(base, sregs=sregs))
    except OSError as e:
        if "did not take the mode" not in str(e):
            raise
        pytest.skip(f"{mode} paging cannot be loaded into this KVM: {e}")
    for gva in gvas:
        ours = kvm_translate(mem.read, sregs, gva, features=feats)
        assert ours == kvm_says(kvm_cpu, gva), f"{mode}: gva {gva:#x}"
    assert {kvm_says(kvm_cpu, g)[1] for g in gvas} == {True, False}  # both kinds seen


def walk_targets(mem: raw.GuestMemory, sregs: Sregs, rng: random.Random) -> list[int]:
    """Linear addresses that reach every filled entry of the tables, present or not, at every
    level — so the differential covers deep walks, not only misses at the root."""
    mode = paging_mode(sregs)
    out: list[int] = []
    esize = 4 if mode == "32-bit" else 8
    per = 4096 // esize
    bits = 10 if mode == "32-bit" else 9

    def entry(table: int, idx: int) -> int:
        return int.from_bytes(mem.read(table + esize * idx, esize), "little")

    def visit(table: int, level: int, prefix: int) -> None:
        shift = 12 + bits * (level - 1)
        for idx in range(per):
            e = entry(table, idx)
            if not e:
                continue
            base = prefix | (idx << shift)
            out.extend(base | rng.getrandbits(shift) for _ in range(2))
            frame = e & (0xFFFF_F000 if esize == 4 else 0x000F_FFFF_FFFF_F000)
            if e & P and level > 1 and not e & PS and frame + 0x1000 <= MEM:
                visit(frame, level - 1, base)

    if mode == "pae":
        for i in range(4):
            pdpte = entry(sregs.cr3 & ~0x1F, i)
            if pdpte & P:
                visit(pdpte & 0xFFFF_F000, 2, i << 30)
    else:
        visit(sregs.cr3 & ~0xFFF, 2 if mode == "32-bit" else 4, 0)
    return [canonical48(a) if mode == "4-level" else a for a in out]


# ---------------------------------------------------------------------------------------------
# differential: translate_gva vs the page faults CPL-3 code takes, on both engines

ENGINES = GUEST_ENGINES
# rdi -> (address, kind): kind 0 reads, 1 writes, 2 calls it (a RET sits there); then INT3.
#   mov (%rdi),%rax; mov 8(%rdi),%rcx; cmp $1,%rcx; je W; cmp $2,%rcx; je F
#   mov (%rax),%rbx; int3;  W: mov %rbx,(%rax); int3;  F: call *%rax; int3
PROBE = bytes.fromhex("488b07488b4f084883f901740a4883f9027408488b18cc488918ccffd0cc")
SYSTEM, CODE, PROBES, TARGETS, STACK = 0x20_0000, 0x40_0000, 0x41_0000, 0x60_0000, 0x58_0000
PAGES = 48


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", range(3))
def test_walker_agrees_with_the_cpu_on_user_accesses(engine: str, seed: int) -> None:
    rng = random.Random(seed)
    mem = raw.GuestMemory(MEM)
    cpu: raw.RawCpu = raw.KvmCpu(mem) if engine == "kvm" else raw.UcCpu(mem)
    try:
        base = modes.user_mode(CODE, mem.write, SYSTEM, rsp=STACK, identity_size=MEM)
        mem.write(CODE, PROBE)
        features = cpu.features if isinstance(cpu, raw.KvmCpu) else raw.UcCpu.features
        pt = base.sregs.cr3 + 3 * 0x1000 + (TARGETS >> 21) * 0x1000  # PML4, PDPT, PD, PTs
        for page in range(PAGES):
            gpa = TARGETS + page * 0x1000
            mem.write(gpa, b"\xc3")  # RET, for the fetches
            bits = P | 0x60 | (RW if rng.random() < 0.5 else 0) | (US if rng.random() < 0.7
                                                                   else 0)
            bits |= NX if rng.random() < 0.3 else 0
            bits &= ~P if rng.random() < 0.15 else ~0
            if rng.random() < 0.08:
                bits |= 1 << rng.randrange(features.maxphyaddr, 52)
            index = (gpa >> 12) & 511
            mem.write(pt + 8 * index, struct.pack("<Q", gpa | bits))
        # fetches at the RET at offset 0; reads and writes elsewhere (a write must not
        # overwrite the RET a later fetch runs)
        probes = [(TARGETS + p * 0x1000 + (0 if k == 2 else rng.randrange(8, 0xFF8, 8)), k)
                  for p in range(PAGES) for k in (0, 1, 2)]
        for i, (addr, kind) in enumerate(probes):
            mem.write(PROBES + 16 * i, struct.pack("<QQ", addr, kind))
        outcomes = []
        for i, (addr, kind) in enumerate(probes):
            cpu.set_state(base.with_regs(rdi=PROBES + 16 * i))
            exit_ = cpu.run()
            assert exit_.kind == "io" and exit_.port == modes.PORT_EXCEPTION, exit_
            got = cpu.get_state().regs
            expected: tuple[int, tuple[int, int] | None]
            try:
                translate_gva(mem.read, base, addr, user=True, write=kind == 1,
                              fetch=kind == 2, features=features)
                expected = (3, None)
            except PageFault as pf:
                expected = (14, (pf.error_code, pf.gva))
            seen = (exit_.value, (got.rdx, got.rcx) if exit_.value == 14 else None)
            outcomes.append(seen)
            assert seen == expected, f"{engine}: {('read', 'write', 'fetch')[kind]} {addr:#x}"
        assert {o[0] for o in outcomes} == {3, 14}
    finally:
        cpu.close()
        mem.close()


# ---------------------------------------------------------------------------------------------
# differential: translate_gva vs QEMU's walker (Unicorn), in every paging mode, CPL 0 and 3
#
# The KVM here runs 4/5-level paging only, so 32-bit and PAE paging are checked against the
# other real walker at hand. No delivery is needed: Unicorn stops at the #PF (uc_state.UcTrap).

# ecx: 0 read [eax], 1 write [eax], 2 call eax (a RET sits there); then INT3. The same bytes
# are the same program in 32-bit and 64-bit code.
LEGACY_PROBE = bytes.fromhex("83f901740883f90274068b18cc8918ccffd0cc")
L_CODE, L_STACK, L_TABLES, L_FRAMES = 0x1_0000, 0x2_0000, 0x40_0000, 0x10_0000


class Mapper:
    """Page tables of one mode in a GuestMemory: permissive upper entries, given leaves."""

    def __init__(self, mem: raw.GuestMemory, mode: str) -> None:
        self.mem, self.mode, self.next = mem, mode, L_TABLES
        mem.write(L_TABLES, bytes(0x40_0000))
        self.root = self.table()
        if mode == "pae":  # four PDPTEs, each with its page directory
            for i in range(4):
                self.put(self.root + 8 * i, self.table() | P)

    def table(self) -> int:
        gpa, self.next = self.next, self.next + 0x1000
        return gpa

    def put(self, gpa: int, value: int) -> None:
        size = 4 if self.mode.startswith("32-bit") else 8
        self.mem.write(gpa, value.to_bytes(size, "little"))

    def get(self, gpa: int) -> int:
        size = 4 if self.mode.startswith("32-bit") else 8
        return int.from_bytes(self.mem.read(gpa, size), "little")

    def map(self, gva: int, gpa: int, leaf: int) -> None:
        if self.mode.startswith("32-bit"):
            levels, table = [(22, 4), (12, 4)], self.root
        elif self.mode == "pae":
            levels = [(21, 8), (12, 8)]
            table = self.get(self.root + 8 * ((gva >> 30) & 3)) & ~0xFFF
        else:
            levels, table = [(39, 8), (30, 8), (21, 8), (12, 8)], self.root
        for shift, size in levels[:-1]:
            slot = table + size * ((gva >> shift) & (4096 // size - 1))
            if not self.get(slot) & P:
                self.put(slot, self.table() | P | RW | US)
            table = self.get(slot) & 0x000F_FFFF_FFFF_F000
        shift, size = levels[-1]
        self.put(table + size * ((gva >> shift) & (4096 // size - 1)), gpa | leaf)


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("mode", ["32-bit", "pae", "4-level"])
def test_walker_agrees_with_qemu(mode: str, cpl: int) -> None:
    from unicorn import unicorn_const as UC
    from unicorn.unicorn_py3 import Uc

    from kvmem.cpu import uc_state
    from kvmem.cpu.events import Interrupt

    rng = random.Random(f"{mode}/{cpl}")
    mem = raw.GuestMemory(MEM)
    uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
    uc.mem_map_ptr(0, MEM, UC.UC_PROT_ALL, mem.hva)
    uc_state.configure(uc)
    trap = uc_state.UcTrap(uc)
    features = raw.UcCpu.features
    try:
        mem.write(L_CODE, LEGACY_PROBE)
        m = Mapper(mem, mode)
        m.map(L_CODE, L_CODE, P | (US if cpl == 3 else 0))  # (SMEP: no user code at CPL 0)
        m.map(L_STACK, L_STACK, P | RW | US | (NX if mode != "32-bit" else 0))
        first = 0x8000_0000 if mode != "4-level" else 0x7F00_0000_0000
        targets = []
        for i in range(40):
            gva, gpa = first + i * 0x1000, L_FRAMES + i * 0x1000
            mem.write(gpa, b"\xc3")  # RET
            leaf = (P if rng.random() < 0.85 else 0) | (RW if rng.random() < 0.5 else 0)
            leaf |= US if rng.random() < 0.6 else 0
            if mode != "32-bit":
                leaf |= NX if rng.random() < 0.3 else 0
                leaf |= (1 << rng.randrange(features.maxphyaddr, 52)) if rng.random() < 0.1 else 0
            m.map(gva, gpa, leaf)
            targets.append(gva)
        if mode == "4-level":
            base = modes.long_mode(L_CODE, mem.write, 0x20_0000, gdt_gpa=0x3_0000)
            code, data = modes.SEL_USER_CODE64, modes.SEL_USER_DATA
        else:
            base = modes.protected_mode(L_CODE, mem.write, 0x3_0000)
            code, data = modes.SEL_USER_CODE32, modes.SEL_USER_DATA
        for trial in range(4):
            wp = CR0_WP if trial % 2 else 0
            smep = CR4_SMEP if trial >= 2 else 0
            sregs = dataclasses.replace(
                base.sregs, cr0=base.sregs.cr0 | CR0_PG_PE | (1 << 5) | wp, cr3=m.root,
                cr4=(CR4_PAE if mode != "32-bit" else 0) | smep | (1 << 9),
                efer=base.sregs.efer | (EFER_NXE if mode != "32-bit" else 0))
            if cpl == 3:
                seg = modes.GDT[data]
                sregs = dataclasses.replace(sregs, cs=modes.GDT[code], ss=seg, ds=seg, es=seg)
            state = dataclasses.replace(base, sregs=sregs).with_regs(rsp=L_STACK + 0x1000)
            for page in targets:
                for kind in (0, 1, 2):
                    addr = page if kind == 2 else page + 8 * rng.randrange(1, 512)
                    uc_state.set_state(uc, state.with_regs(rax=addr, rcx=kind, rip=L_CODE))
                    uc_state.resume(uc)
                    event = trap.take()
                    assert isinstance(event, Interrupt), event
                    try:
                        translate_gva(mem.read, sregs, addr, user=cpl == 3, write=kind == 1,
                                      fetch=kind == 2, features=features)
                        expected: tuple[int, int | None, int | None] = (3, None, None)
                    except PageFault as pf:
                        expected = (14, pf.error_code, pf.gva)
                    cr2 = uc_state.get_state(uc).sregs.cr2 if event.vector == 14 else None
                    assert (event.vector, event.error_code, cr2) == expected, (
                        f"{mode} CPL {cpl} trial {trial}: {('read', 'write', 'fetch')[kind]} "
                        f"{addr:#x}")
    finally:
        trap.remove(uc)
        uc.mem_unmap(0, MEM)
        mem.close()
