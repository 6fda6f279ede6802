"""One software walker of x86 page tables: linear address (gva) → guest physical (gpa).

Defines:
- `translate_gva(read, state_or_sregs, gva, *, write, user, fetch)` — the gpa an access of
  that kind reaches, or `PageFault` with the error code the CPU would push (and KVM would
  inject): P, W/R, U/S, RSVD, I/D;
- `kvm_translate(read, sregs, gva)` — the same walk, answered the way KVM_TRANSLATE answers;
- `paging_mode(sregs)` — which of the five modes (none, 32-bit, PAE, 4-level, 5-level) a
  vCPU is in;
- `table_pages(read, controls)` — the gpa of every paging-structure page reachable from
  CR3 (what a VMM that rewrites guest memory behind the CPU's back must know of);
- `walk_for_tlb(read, write, controls, gva, ...)` — a CPU's walk on a TLB miss: the same
  translation, then the accessed and dirty bits set as KVM's walker sets them, and what the
  page grants (`TlbEntry`) — for an engine whose CPU lets kvmem fill its TLB;
- `PagingFeatures` — the guest CPUID facts the walk depends on (MAXPHYADDR, 1 GiB pages, AMD).

Rules:
- Pure: the walker reads guest memory only through `read(gpa, size) -> bytes` and never
  writes it — but for `walk_for_tlb`, which sets accessed/dirty bits through its `write`
  after a walk that succeeded, as KVM's update_accessed_dirty_bits does. A `read`
  that raises ValueError, LookupError or OSError (no memory there) fails the walk as KVM's
  does: a not-present page fault.
- It follows KVM's walker (arch/x86/kvm/mmu/paging_tmpl.h, reserved-bit masks of mmu.c), so
  its answer is the one KVM gives on the same tables; where KVM and the SDM differ, KVM wins
  and the place says so. Protection keys (CR4.PKE) are not modelled.
- PAE: a CPU reads the four PDPTEs when CR3 is loaded and keeps them; the walker reads them
  from memory, so it agrees with a vCPU whose PDPTEs were not rewritten since its CR3 was set.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from .state import Sregs, VcpuState

__all__ = [
    "DEFAULT_FEATURES",
    "INVALID_GPA",
    "PFERR_FETCH",
    "PFERR_PRESENT",
    "PFERR_RSVD",
    "PFERR_USER",
    "PFERR_WRITE",
    "Controls",
    "PageFault",
    "PagingFeatures",
    "TlbEntry",
    "kvm_translate",
    "paging_mode",
    "table_pages",
    "translate_gva",
    "walk_for_tlb",
]

Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]

# page-fault error code bits (SDM vol. 3 §4.7)
PFERR_PRESENT: Final = 1 << 0
PFERR_WRITE: Final = 1 << 1
PFERR_USER: Final = 1 << 2
PFERR_RSVD: Final = 1 << 3
PFERR_FETCH: Final = 1 << 4

INVALID_GPA: Final = (1 << 64) - 1  # what KVM_TRANSLATE reports for an untranslatable gva

_CR0_WP: Final = 1 << 16
_CR0_PG: Final = 1 << 31
_CR4_PSE: Final = 1 << 4
_CR4_PAE: Final = 1 << 5
_CR4_LA57: Final = 1 << 12
_CR4_SMEP: Final = 1 << 20
_CR4_SMAP: Final = 1 << 21
_EFER_LMA: Final = 1 << 10
_EFER_NXE: Final = 1 << 11
_RFLAGS_AC: Final = 1 << 18

_P: Final = 1 << 0
_RW: Final = 1 << 1
_US: Final = 1 << 2
_A: Final = 1 << 5
_D: Final = 1 << 6
_PS: Final = 1 << 7
_NX: Final = 1 << 63

_PAGE: Final = 4096
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


def _bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive (KVM's rsvd_bits)."""
    return ((1 << (hi - lo + 1)) - 1) << lo if hi >= lo else 0


@dataclass(frozen=True, slots=True)
class PagingFeatures:
    """What the guest's CPUID tells the walker (KVM takes the same from the vCPU's CPUID):
    `maxphyaddr` (leaf 0x80000008 EAX[7:0]; KVM assumes 36 without that leaf), `gbpages`
    (1 GiB pages, leaf 0x80000001 EDX[26]), `amd` (vendor AMD/Hygon: bit 8 of PML4Es and
    PML5Es is reserved — in KVM's masks, not in PDPTEs)."""

    maxphyaddr: int = 52
    gbpages: bool = True
    amd: bool = False

    def __post_init__(self) -> None:
        if not 32 <= self.maxphyaddr <= 52:
            raise ValueError(f"PagingFeatures.maxphyaddr={self.maxphyaddr} is not in 32..52")


DEFAULT_FEATURES: Final = PagingFeatures()


class PageFault(Exception):
    """A #PF: the faulting linear address (what CR2 gets) and the error code."""

    def __init__(self, gva: int, error_code: int, why: str) -> None:
        self.gva = gva
        self.error_code = error_code
        self.why = why
        flags = [name for bit, name in ((PFERR_PRESENT, "P"), (PFERR_WRITE, "W"),
                                        (PFERR_USER, "U"), (PFERR_RSVD, "RSVD"),
                                        (PFERR_FETCH, "I/D")) if error_code & bit]
        super().__init__(f"#PF at {gva:#x}, error code {error_code:#x} "
                         f"({'|'.join(flags) or 'not present, read, supervisor'}): {why}")

    @property
    def present(self) -> bool:
        return bool(self.error_code & PFERR_PRESENT)


class Controls(NamedTuple):
    """The four registers a walk depends on (an `Sregs` has them too)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """What a walk grants one 4 KiB page to the CPL that walked, as a TLB caches it: the gpa
    of the page, and the accesses that may use the entry without walking again — a write
    only once the leaf's dirty bit is set (a CPU walks again to set it)."""

    gpa: int
    read: bool
    write: bool
    fetch: bool


def paging_mode(sregs: Sregs | Controls) -> str:
    """"none", "32-bit", "pae", "4-level" or "5-level"."""
    if not sregs.cr0 & _CR0_PG:
        return "none"
    if not sregs.cr4 & _CR4_PAE:
        return "32-bit"
    if not sregs.efer & _EFER_LMA:
        return "pae"
    return "5-level" if sregs.cr4 & _CR4_LA57 else "4-level"


def translate_gva(read: Read, state_or_sregs: VcpuState | Sregs | Controls, gva: int, *,
                  write: bool = False, user: bool = False, fetch: bool = False,
                  features: PagingFeatures = DEFAULT_FEATURES, rflags: int = 0) -> int:
    """The gpa that an access to linear address `gva` reaches: a data read by default,
    `write`, or instruction `fetch`; by supervisor code, or `user` (CPL 3). Raises
    `PageFault` with the error code a CPU would push. With a whole `VcpuState`, SMAP honours
    its RFLAGS.AC; with `Sregs` (or `Controls`) alone, that of `rflags`."""
    sregs: Sregs | Controls
    if isinstance(state_or_sregs, VcpuState):
        sregs, ac = state_or_sregs.sregs, bool(state_or_sregs.regs.rflags & _RFLAGS_AC)
    elif isinstance(state_or_sregs, Sregs | Controls):
        sregs, ac = state_or_sregs, bool(rflags & _RFLAGS_AC)
    else:
        raise TypeError(f"translate_gva needs a VcpuState or Sregs, got "
                        f"{type(state_or_sregs).__name__}")
    if isinstance(gva, bool) or not isinstance(gva, int) or not 0 <= gva < 1 << 64:
        raise ValueError(f"gva={gva!r} is not a 64-bit linear address")
    if write and fetch:
        raise ValueError("an access is a write or a fetch, not both")
    return _Walk(read, sregs, ac, gva, write, user, fetch, features).run()


def kvm_translate(read: Read, sregs: Sregs, gva: int, *,
                  features: PagingFeatures = DEFAULT_FEATURES) -> tuple[int, bool, bool, bool]:
    """(physical_address, valid, writeable, usermode) as KVM_TRANSLATE reports them. KVM walks
    as a supervisor read (kvm_mmu_gva_to_gpa_system) and reports writeable=1, usermode=0
    whatever the page tables say (arch/x86/kvm/x86.c, kvm_arch_vcpu_ioctl_translate); an
    untranslatable gva is physical_address ~0, valid 0."""
    try:
        gpa = translate_gva(read, sregs, gva, features=features)
    except PageFault:
        return INVALID_GPA, False, True, False
    return gpa, True, True, False


def table_pages(read: Read, controls: Controls | Sregs) -> set[int]:
    """The gpa of every page holding a paging structure reachable from CR3 in the mode the
    registers say (none: empty): the root, and below it every present entry that is not a
    leaf. A table `read` cannot read (no memory there) ends that branch."""
    mode = paging_mode(controls)
    out: set[int] = set()
    if mode == "none":
        return out
    addr = _bits(12, 51)

    def entries(gpa: int, fmt: struct.Struct) -> list[int]:
        try:
            raw = read(gpa, _PAGE)
        except (ValueError, LookupError, OSError):
            return []
        return [e for (e,) in fmt.iter_unpack(raw)]

    def below(table: int, level: int, fmt: struct.Struct, mask: int, leafs: tuple[int, ...]
              ) -> None:
        out.add(table)
        if level == 1:
            return
        for e in entries(table, fmt):
            if e & _P and not (level in leafs and e & _PS):
                below(e & mask, level - 1, fmt, mask, leafs)

    if mode == "32-bit":
        pse = (2,) if controls.cr4 & _CR4_PSE else ()
        below(controls.cr3 & 0xFFFF_F000, 2, _U32, 0xFFFF_F000, pse)
    elif mode == "pae":
        pdpt = controls.cr3 & 0xFFFF_FFE0
        out.add(pdpt & ~0xFFF)
        try:
            pdptes = [e for (e,) in _U64.iter_unpack(read(pdpt, 32))]
        except (ValueError, LookupError, OSError):
            pdptes = []
        for e in pdptes:
            if e & _P:
                below(e & addr, 2, _U64, addr, (2,))
    else:
        below(controls.cr3 & addr, 5 if mode == "5-level" else 4, _U64, addr, (2, 3))
    return out


def walk_for_tlb(read: Read, write: Write, controls: Controls | Sregs, gva: int, *,
                 access: str, user: bool, ac: bool = False,
                 features: PagingFeatures = DEFAULT_FEATURES) -> TlbEntry:
    """A CPU's walk on a TLB miss for an `access` ("read", "write" or "fetch") to linear
    address `gva` by supervisor code, or `user` (CPL 3); `ac` is RFLAGS.AC (SMAP). Raises
    `PageFault` as `translate_gva` does. After a walk that succeeded, the accessed bit of
    every entry it used that lacks one and, for a write, the dirty bit of the leaf are set
    through `write(gpa, bytes)` — KVM's update_accessed_dirty_bits (PAE's PDPTEs have no
    such bits). Without paging the page is the gva's and grants everything."""
    if access not in ("read", "write", "fetch"):
        raise ValueError(f"access={access!r} is not read, write or fetch")
    w = _Walk(read, controls, ac, gva, access == "write", user, access == "fetch", features)
    gpa = w.run()
    if not w.path:
        return TlbEntry(gpa & ~0xFFF, True, True, True)
    last = len(w.path) - 1
    dirty = False
    for i, (at, entry, size) in enumerate(w.path):
        new = entry | _A
        if i == last:
            if access == "write":
                new |= _D
            dirty = bool(new & _D)
        if new != entry:
            write(at, new.to_bytes(size, "little"))
    return TlbEntry(gpa & ~0xFFF, not w.denied(False, False), dirty and not w.denied(True, False),
                    not w.denied(False, True))


class _Walk:
    """One walk. `fail` builds the error code the way KVM's walker does: P for protection or
    reserved-bit faults, then the access's W and U bits, and I/D only where NX or SMEP make
    fetches distinguishable."""

    def __init__(self, read: Read, sregs: Sregs | Controls, ac: bool, gva: int, write: bool,
                 user: bool, fetch: bool, features: PagingFeatures) -> None:
        self.read = read
        # the entries the walk used that have accessed bits: (gpa, value, size), the leaf last
        self.path: list[tuple[int, int, int]] = []
        self.granted = (False, False, False)  # the leaf's writable, user, no-execute
        self.sregs = sregs
        self.ac = ac
        self.gva = gva
        self.write = write
        self.user = user
        self.fetch = fetch
        self.f = features
        self.nxe = bool(sregs.efer & _EFER_NXE)
        self.pa_rsvd = _bits(features.maxphyaddr, 51)

    def fail(self, code: int, why: str) -> PageFault:
        if self.write:
            code |= PFERR_WRITE
        if self.user:
            code |= PFERR_USER
        if self.fetch and (self.nxe or self.sregs.cr4 & _CR4_SMEP):
            code |= PFERR_FETCH
        return PageFault(self.gva, code, why)

    def run(self) -> int:
        mode = paging_mode(self.sregs)
        if mode == "none":
            return self.gva  # KVM's nonpaging_gva_to_gpa: the address as given
        if mode == "32-bit":
            return self.legacy32()
        return self.long_or_pae(mode)

    # -- 32-bit paging: 2 levels of u32 entries, 4 MiB pages with CR4.PSE -----------------------
    def legacy32(self) -> int:
        gva = self.gva & 0xFFFF_FFFF
        pde_gpa = (self.sregs.cr3 & 0xFFFF_F000) | ((gva >> 22) << 2)
        pde = self.entry32(pde_gpa)
        if not pde & _P:
            raise self.fail(0, f"PDE at {pde_gpa:#x} not present")
        self.path.append((pde_gpa, pde, 4))
        if pde & _PS and self.sregs.cr4 & _CR4_PSE:
            # KVM models PSE-36 with 4 address bits (13..16 → 32..35); 17..21 are reserved
            if pde & _bits(17, 21):
                raise self.fail(PFERR_PRESENT | PFERR_RSVD, f"reserved bits in 4 MiB PDE "
                                f"{pde:#x} at {pde_gpa:#x}")
            gpa = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xF) << 32) | (gva & 0x3F_FFFF)
            return self.check(gpa, bool(pde & _RW), bool(pde & _US), False)
        pte_gpa = (pde & 0xFFFF_F000) | (((gva >> 12) & 0x3FF) << 2)
        pte = self.entry32(pte_gpa)
        if not pte & _P:
            raise self.fail(0, f"PTE at {pte_gpa:#x} not present")
        self.path.append((pte_gpa, pte, 4))
        return self.check((pte & 0xFFFF_F000) | (gva & 0xFFF), bool(pde & pte & _RW),
                          bool(pde & pte & _US), False)

    # -- PAE, 4-level and 5-level: u64 entries ---------------------------------------------------
    def long_or_pae(self, mode: str) -> int:
        gva = self.gva
        exb = 0 if self.nxe else _NX
        addr_mask = _bits(12, 51)
        writable = user = True
        nx = False
        if mode == "pae":
            gva &= 0xFFFF_FFFF
            pdpte_gpa = (self.sregs.cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8
            pdpte = self.entry64(pdpte_gpa)
            if not pdpte & _P:
                raise self.fail(0, f"PDPTE at {pdpte_gpa:#x} not present")
            rsvd = _bits(self.f.maxphyaddr, 63) | _bits(5, 8) | _bits(1, 2)
            if pdpte & rsvd:
                raise self.fail(PFERR_PRESENT | PFERR_RSVD, f"reserved bits in PDPTE "
                                f"{pdpte:#x} at {pdpte_gpa:#x}")
            table, level = pdpte & addr_mask, 2
            high = _bits(self.f.maxphyaddr, 62)  # PAE reserves 62..MAXPHYADDR
        else:
            level = 5 if mode == "5-level" else 4
            table = self.sregs.cr3 & addr_mask & ~self.pa_rsvd
            high = self.pa_rsvd  # 4/5-level: 51..MAXPHYADDR reserved, 62..52 ignored
        bit8 = _bits(8, 8) if self.f.amd else 0
        while True:
            shift = 12 + 9 * (level - 1)
            entry_gpa = table + ((gva >> shift) & 0x1FF) * 8
            entry = self.entry64(entry_gpa)
            if not entry & _P:
                raise self.fail(0, f"level-{level} entry at {entry_gpa:#x} not present")
            leaf = level == 1 or (level in (2, 3) and bool(entry & _PS))
            if level >= 4:
                rsvd = exb | bit8 | _PS | high
            elif level == 3:
                rsvd = exb | high | (0 if self.f.gbpages else _PS)
                rsvd |= _bits(13, 29) if leaf else 0
            elif level == 2:
                rsvd = exb | high | (_bits(13, 20) if leaf else 0)
            else:
                rsvd = exb | high
            if entry & rsvd:
                raise self.fail(PFERR_PRESENT | PFERR_RSVD, f"reserved bits "
                                f"{entry & rsvd:#x} in level-{level} entry {entry:#x} at "
                                f"{entry_gpa:#x}")
            self.path.append((entry_gpa, entry, 8))
            writable = writable and bool(entry & _RW)
            user = user and bool(entry & _US)
            nx = nx or (self.nxe and bool(entry & _NX))
            if leaf:
                offset = gva & ((1 << shift) - 1)
                return self.check((entry & addr_mask & ~((1 << shift) - 1)) | offset,
                                  writable, user, nx)
            table = entry & addr_mask
            level -= 1

    # -- the permission check at the end of a walk (KVM's update_permission_bitmask) -------------
    def check(self, gpa: int, writable: bool, user_page: bool, nx: bool) -> int:
        self.granted = (writable, user_page, nx)
        why = self.denied(self.write, self.fetch)
        if why:
            raise self.fail(PFERR_PRESENT, why)
        return gpa

    def denied(self, write: bool, fetch: bool) -> str:
        """Why the leaf's permissions (`granted`) refuse a data read, a `write` or a `fetch`
        by the walking CPL ("" if they allow it)."""
        writable, user_page, nx = self.granted
        cr0, cr4 = self.sregs.cr0, self.sregs.cr4
        # supervisor writes ignore R/W while CR0.WP is clear
        w_ok = writable or (not self.user and not cr0 & _CR0_WP)
        x_ok = not nx and not (cr4 & _CR4_SMEP and user_page and not self.user)
        smap = (bool(cr4 & _CR4_SMAP) and user_page and not self.user and not fetch
                and not self.ac)
        if fetch and not x_ok:
            return "fetch from a no-execute page" if nx else "SMEP: supervisor fetch from a " \
                                                            "user page"
        if self.user and not user_page:
            return "user access to a supervisor page"
        if write and not w_ok:
            return "write to a read-only page"
        if smap:
            return "SMAP: supervisor data access to a user page"
        return ""

    def entry32(self, gpa: int) -> int:
        return int(_U32.unpack(self.table_read(gpa, 4))[0])

    def entry64(self, gpa: int) -> int:
        return int(_U64.unpack(self.table_read(gpa, 8))[0])

    def table_read(self, gpa: int, size: int) -> bytes:
        try:
            return self.read(gpa, size)
        except (ValueError, LookupError, OSError) as e:
            # KVM's walker: a paging structure without memory behind it ends the walk
            # with the error code built so far (a not-present fault)
            raise self.fail(0, f"no memory at the paging structure at {gpa:#x} ({e})") from None
