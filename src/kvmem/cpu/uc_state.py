"""`VcpuState` ↔ a Unicorn x86 CPU (`Uc(UC_ARCH_X86, UC_MODE_64)`).

Defines:
- `get_state(uc)` / `set_state(uc, state)` — the whole state. One Uc created in UC_MODE_64 runs
  real-mode, 16/32-bit protected-mode and 64-bit code, whichever the state written says;
- `mmu_reset_needed(uc, sregs)` — whether loading `sregs` drops the TLB (KVM's rule; the
  two loaders follow it);
- `configure(uc)`, `resume(uc)`, `resume_blockwise(uc)` — how to run a Uc whose state
  `set_state` wrote;
- `UcTrap` — hooks that turn what Unicorn does not deliver (exceptions, INT n, SYSCALL) into a
  recorded `events.Event` and a stop, for the caller to deliver (`events.deliver` /
  `events.syscall`) and resume.

Theory of operation. Unicorn's register API (reg_read/reg_write, msr_read/msr_write) reaches
the general, control, x87/SSE and descriptor-table registers, but in UC_MODE_64 a write of CS,
DS, ES or SS sets only the selector (FS/GS reload from the GDT), and nothing reaches the hidden
part of a segment register — base, limit, attributes — nor QEMU's `hflags`, the mode bits the
translator keys on (CPL, 16/32/64-bit code and stack, long mode active, ...). Those live in
QEMU's `CPUX86State`, which `uc_context_save` copies out and `uc_context_restore` copies back
byte for byte. So `set_state` writes everything the API reaches through the API, then saves a
context, writes the segment caches, EFER and the hflags bits that follow from them into it, and
restores it; `get_state` reads the caches back the same way. The offsets into `CPUX86State`
(QEMU 5.0 as bundled by Unicorn 2.1) are not trusted but *found*, once per process, on a private
Uc: each field is located by writing distinctive values through the API and seeing where they
land, then checked by running a few instructions (a #GP with a known error code, RDTSC with a
known offset). A Unicorn whose layout differs fails there, with a message, before any state is
written.

What Unicorn cannot hold, and what is done about it:
- interrupts, NMI, SMI, the interrupt shadow: Unicorn has no interrupt controller, no SMM, and
  delivers no event itself. `get_state` reports `VcpuEvents()` (nothing pending, no shadow) and
  mp_state RUNNABLE; `set_state` refuses a state with an event in flight or another mp_state
  (deliver it first with `events.deliver_pending`).
- IA32_APIC_BASE: no local APIC. `get_state` reports `APIC_BASE_DEFAULT` (KVM's value for a
  vCPU without an in-kernel APIC); `set_state` ignores the field.
- IA32_TSC: QEMU's RDTSC returns the host TSC plus a `tsc_offset` that no MSR reaches;
  `set_state` sets that offset so RDTSC continues from `msrs[MSR_IA32_TSC]`, `get_state` reads
  the host TSC (RDTSC on the private Uc) and adds it.
- CR8: stored and reported, but a guest MOV to/from CR8 goes to QEMU's (absent) APIC TPR.
- x87 last_opcode / last_ip / last_dp: stored and reported; QEMU's TCG never updates them.
- the segment `unusable` flag: QEMU has none; a segment is unusable when not present (the rule
  of QEMU's own KVM glue, and of `canonical`).
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from unicorn import unicorn_const as UC
from unicorn import x86_const as X
from unicorn.unicorn_py3 import Uc, UcContext, UcError

from .events import Event, Interrupt, Syscall
from .paging import PagingFeatures
from .state import (
    MP_STATE_RUNNABLE,
    MSR_CSTAR,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    DTable,
    Fpu,
    Msrs,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
    VcpuState,
    canonical,
)

__all__ = [
    "APIC_BASE_DEFAULT",
    "PAGING_FEATURES",
    "UcTrap",
    "code_bits",
    "configure",
    "fault_address",
    "get_state",
    "load_context",
    "resume",
    "resume_blockwise",
    "set_state",
]

APIC_BASE_DEFAULT: Final = 0xFEE0_0900  # base 0xfee00000, enabled, BSP
MSR_EFER: Final = 0xC000_0080

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_SEG_CACHE = struct.Struct("<I4xQII")  # QEMU SegmentCache: selector, base, limit, flags

# QEMU's segment register numbers (R_ES .. R_GS) → kvm_sregs names
_QEMU_SEGS: Final = ("es", "cs", "ss", "ds", "fs", "gs")

# QEMU's hflags bits (target/i386/cpu.h) that follow from segments, CR0, CR4 and EFER
_HF_CPL: Final = 3
_HF_INHIBIT_IRQ: Final = 1 << 3
_HF_CS32: Final = 1 << 4
_HF_SS32: Final = 1 << 5
_HF_ADDSEG: Final = 1 << 6
_HF_PE: Final = 1 << 7
_HF_MP: Final = 1 << 9
_HF_EM: Final = 1 << 10
_HF_TS: Final = 1 << 11
_HF_LMA: Final = 1 << 14
_HF_CS64: Final = 1 << 15
_HF_SMM: Final = 1 << 19
_HF_SVME: Final = 1 << 20
_HF_OSFXSR: Final = 1 << 22
_HF_SMAP: Final = 1 << 23
_HF_OWNED: Final = (_HF_CPL | _HF_INHIBIT_IRQ | _HF_CS32 | _HF_SS32 | _HF_ADDSEG | _HF_PE
                    | _HF_MP | _HF_EM | _HF_TS | _HF_LMA | _HF_CS64 | _HF_SMM | _HF_SVME
                    | _HF_OSFXSR | _HF_SMAP)

_CR0_PE: Final = 1 << 0
_CR0_PG: Final = 1 << 31
_CR4_PAE: Final = 1 << 5
_CR4_OSFXSR: Final = 1 << 9
_CR4_SMAP: Final = 1 << 21
_EFER_SCE: Final = 1 << 0
_EFER_LME: Final = 1 << 8
_EFER_LMA: Final = 1 << 10
_EFER_NXE: Final = 1 << 11
_EFER_SVME: Final = 1 << 12
_RFLAGS_VM: Final = 1 << 17

# exceptions that push an error code (SDM vol. 3 table 6-1)
PAGING_FEATURES: Final = PagingFeatures(maxphyaddr=40, gbpages=False, amd=False)
"""What Unicorn's CPU (QEMU's "qemu64") tells a page walk."""
_HAS_ERROR_CODE: Final = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

_GPRS: Final = (
    ("rax", X.UC_X86_REG_RAX), ("rbx", X.UC_X86_REG_RBX), ("rcx", X.UC_X86_REG_RCX),
    ("rdx", X.UC_X86_REG_RDX), ("rsi", X.UC_X86_REG_RSI), ("rdi", X.UC_X86_REG_RDI),
    ("rsp", X.UC_X86_REG_RSP), ("rbp", X.UC_X86_REG_RBP), ("r8", X.UC_X86_REG_R8),
    ("r9", X.UC_X86_REG_R9), ("r10", X.UC_X86_REG_R10), ("r11", X.UC_X86_REG_R11),
    ("r12", X.UC_X86_REG_R12), ("r13", X.UC_X86_REG_R13), ("r14", X.UC_X86_REG_R14),
    ("r15", X.UC_X86_REG_R15), ("rip", X.UC_X86_REG_RIP), ("rflags", X.UC_X86_REG_RFLAGS))
# MSRs that go through Unicorn's WRMSR/RDMSR (FS/GS base are the segment caches, TSC the offset)
_API_MSRS: Final = (MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
                    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_KERNEL_GS_BASE)
_UNTIL: Final = 1 << 63  # non-canonical: the private probe's emu_start never stops on it
_NO_LIMIT: Final = 1 << 62  # an instruction count never reached


# ---------------------------------------------------------------------------------------------
# CPUX86State through a saved context


@dataclass(frozen=True, slots=True)
class _Layout:
    """Offsets into QEMU's CPUX86State (as copied into a uc_context after its header)."""

    hflags: int
    segs: int
    cr: int
    efer: int
    error_code: int
    exception_is_int: int
    old_exception: int
    tsc_offset: int


class _Env:
    """One saved context of `uc`, whose CPUX86State fields can be read and written; `restore`
    puts it back. Keep the object alive while its buffer is in use."""

    def __init__(self, uc: Uc, layout: _Layout) -> None:
        self.layout = layout
        self.ctx: UcContext = uc.context_save()
        addr = self.ctx.context.value
        self.buf = (ctypes.c_char * self.ctx.size).from_address(addr)
        # struct uc_context { size_t context_size; ...; char data[]; }: data ends the struct
        self.base = self.ctx.size - _U64.unpack_from(self.buf, 0)[0]

    def get(self, layout: struct.Struct, off: int) -> Any:
        return layout.unpack_from(self.buf, self.base + off)[0]

    def put(self, layout: struct.Struct, off: int, value: int) -> None:
        layout.pack_into(self.buf, self.base + off, value)

    def seg(self, index: int) -> tuple[int, int, int, int]:
        sel, base, limit, flags = _SEG_CACHE.unpack_from(
            self.buf, self.base + self.layout.segs + index * _SEG_CACHE.size)
        return sel, base, limit, flags

    def put_seg(self, index: int, sel: int, base: int, limit: int, flags: int) -> None:
        _SEG_CACHE.pack_into(self.buf, self.base + self.layout.segs + index * _SEG_CACHE.size,
                             sel, base, limit, flags)

    def raw(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self.buf) + self.base,
                                self.ctx.size - self.base)

    def restore(self, uc: Uc) -> None:
        uc.context_restore(self.ctx)


class _Probe:
    """A private Uc: finds the CPUX86State layout once, then reads the host TSC on demand."""

    _RDTSC_HLT: Final = b"\x0f\x31\xf4"
    _GP_INT: Final = (b"\x66\xb8\x34\x12"  # mov $0x1234, %ax
                      b"\x8e\xd8")  # mov %ax, %ds (GDT limit 0: #GP(0x1234))

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
        self.uc.mem_map(0, 0x1000, UC.UC_PROT_ALL)
        self.uc.mem_write(0, self._RDTSC_HLT)
        self.layout = self._find_layout()
        self._check_layout()

    def _diff(self, write: Callable[[int], None], a: int, b: int) -> list[int]:
        """u64 offsets whose value is `a` after write(a) and `b` after write(b)."""
        snaps = []
        for value in (a, b):
            write(value)
            snaps.append(_Env(self.uc, _NO_LAYOUT).raw())
        return [off for off in range(0, len(snaps[0]) - 7, 8)
                if _U64.unpack_from(snaps[0], off)[0] == a
                and _U64.unpack_from(snaps[1], off)[0] == b]

    def _flip(self, write: Callable[[int], None], a: int, b: int, bit: int) -> list[int]:
        """u32 offsets where exactly `bit` changes between write(a) and write(b)."""
        snaps = []
        for value in (a, b):
            write(value)
            snaps.append(_Env(self.uc, _NO_LAYOUT).raw())
        return [off for off in range(0, len(snaps[0]) - 3, 4)
                if _U32.unpack_from(snaps[0], off)[0] ^ _U32.unpack_from(snaps[1], off)[0]
                == bit]

    def _one(self, what: str, offsets: list[int]) -> int:
        if len(offsets) != 1:
            raise RuntimeError(f"kvmem.cpu.uc_state: cannot locate {what} in this Unicorn's "
                               f"CPUX86State (candidates {offsets}); its layout is not the "
                               "one kvmem knows (QEMU 5.0, Unicorn 2.1)")
        return offsets[0]

    def _find_layout(self) -> _Layout:
        uc = self.uc
        fs = self._one("segs[R_FS].base", self._diff(
            lambda v: uc.reg_write(X.UC_X86_REG_FS_BASE, v),
            0x5A5A_1111_2222_3333, 0x5A5A_4444_5555_6666))
        segs = fs - 8 - 4 * _SEG_CACHE.size
        cr = self._one("cr[2]", self._diff(
            lambda v: uc.reg_write(X.UC_X86_REG_CR2, v),
            0x3C3C_1111_0000_2000, 0x3C3C_2222_0000_4000)) - 2 * 8
        efer = self._one("efer", self._diff(
            lambda v: uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, v)),
            _EFER_SCE | _EFER_LME | _EFER_LMA,
            _EFER_SCE | _EFER_NXE | _EFER_LME | _EFER_LMA))
        hflags = self._one("hflags", self._flip(
            lambda v: uc.reg_write(X.UC_X86_REG_CR4, v), 0, _CR4_OSFXSR, _HF_OSFXSR))
        dr = self._one("dr[0]", self._diff(
            lambda v: uc.reg_write(X.UC_X86_REG_DR0, v),
            0xD0D0_1111_2222_3333, 0xD0D0_4444_5555_6666))
        uc.reg_write(X.UC_X86_REG_CR2, 0)
        uc.reg_write(X.UC_X86_REG_DR0, 0)
        # after dr[8] and the breakpoint/watchpoint pointer union come old_exception, vm_vmcb
        # and tsc_offset; before dr, exception_next_eip, exception_is_int and error_code
        return _Layout(hflags=hflags, segs=segs, cr=cr, efer=efer, error_code=dr - 16,
                       exception_is_int=dr - 12, old_exception=dr + 96, tsc_offset=dr + 112)

    def _check_layout(self) -> None:
        uc, lay = self.uc, self.layout
        if lay.hflags != lay.segs - 8:
            raise RuntimeError(f"kvmem.cpu.uc_state: hflags at {lay.hflags}, segs at "
                               f"{lay.segs}: not QEMU 5.0's CPUX86State")
        seen: list[tuple[int, int, int]] = []

        def on_intr(uc: Uc, intno: int, _: object) -> None:
            env = _Env(uc, lay)
            seen.append((intno, env.get(_I32, lay.error_code), env.get(_I32, lay.old_exception)))
            uc.emu_stop()

        hook = uc.hook_add(UC.UC_HOOK_INTR, on_intr)
        try:
            uc.mem_write(0x100, self._GP_INT)
            uc.emu_start(0x100, _UNTIL, count=4)
        finally:
            uc.hook_del(hook)
        if seen != [(13, 0x1234, 13)]:
            raise RuntimeError(f"kvmem.cpu.uc_state: a #GP(0x1234) read back as {seen}: this "
                               "Unicorn's exception fields are not where kvmem expects them")
        env = _Env(uc, lay)
        env.put(_I32, lay.old_exception, -1)
        env.put(_U64, lay.tsc_offset, 1 << 62)
        env.restore(uc)
        if self.ticks() < 1 << 62:
            raise RuntimeError("kvmem.cpu.uc_state: RDTSC ignores the tsc_offset kvmem wrote: "
                               "not the CPUX86State layout kvmem knows")
        env = _Env(uc, lay)
        env.put(_U64, lay.tsc_offset, 0)
        env.restore(uc)

    def ticks(self) -> int:
        """RDTSC on the private Uc: the host TSC plus its tsc_offset (kept at 0)."""
        with self.lock:
            self.uc.emu_start(0, _UNTIL, count=2)
            lo = int(self.uc.reg_read(X.UC_X86_REG_RAX)) & 0xFFFF_FFFF
            hi = int(self.uc.reg_read(X.UC_X86_REG_RDX)) & 0xFFFF_FFFF
        return (hi << 32) | lo


def _find_invalid_addr() -> int:
    """The offset of `invalid_addr` in Unicorn's `struct uc_struct`: where a TLB fill that
    the virtual-TLB hook refused leaves the whole faulting address (the hook is told only
    its page). Found as the one u64 holding two different refused addresses, in two
    private Ucs."""
    found: list[set[int]] = []
    for addr in (0x7A5A_1234_5678, 0x3C3C_8765_4AB8):
        uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
        uc.ctl_set_tlb_mode(UC.UC_TLB_VIRTUAL)

        def fill(uc: Uc, vaddr: int, access: int, entry: Any, data: Any,
                 page: int = addr & ~0xFFF) -> bool:
            if vaddr == page:
                return False
            entry.paddr, entry.perms = vaddr, UC.UC_PROT_ALL
            return True

        uc.hook_add(UC.UC_HOOK_TLB_FILL, fill)
        uc.mem_map(0, 0x2000, UC.UC_PROT_ALL)
        uc.mem_write(0x1000, b"\x48\x8b\x00\xf4")  # mov (%rax), %rax; hlt
        uc.reg_write(X.UC_X86_REG_RAX, addr)
        with contextlib.suppress(UcError):
            uc.emu_start(0x1000, 0x1004)
        raw = ctypes.string_at(_handle(uc), _UC_STRUCT_SCAN)
        found.append({off for off in range(0, _UC_STRUCT_SCAN - 7, 8)
                      if _U64.unpack_from(raw, off)[0] == addr})
    both = found[0] & found[1]
    if len(both) != 1:
        raise RuntimeError(f"kvmem.cpu.uc_state: cannot locate uc_struct.invalid_addr "
                           f"(candidates {sorted(both)}): not the Unicorn 2.1 kvmem knows")
    return both.pop()


_UC_STRUCT_SCAN: Final = 2048  # bytes of uc_struct searched (invalid_addr is well inside)
_invalid_addr_at: int | None = None


def fault_address(uc: Uc) -> int:
    """The whole linear address of the last TLB fill `uc`'s virtual-TLB hook refused
    (the access that raised UC_ERR_EXCEPTION) — what a #PF puts in CR2."""
    global _invalid_addr_at
    with _probe_lock:
        if _invalid_addr_at is None:
            _invalid_addr_at = _find_invalid_addr()
        at = _invalid_addr_at
    return int(ctypes.c_uint64.from_address(_handle(uc) + at).value)


def _handle(uc: Uc) -> int:
    """The address of `uc`'s `struct uc_struct`."""
    handle = uc._uch.value
    if handle is None:
        raise ValueError("the Uc is closed")
    return int(handle)


_NO_LAYOUT: Final = _Layout(0, 0, 0, 0, 0, 0, 0, 0)
_probe_lock = threading.Lock()
_probe: _Probe | None = None


def _the_probe() -> _Probe:
    global _probe
    with _probe_lock:
        if _probe is None:
            _probe = _Probe()
        return _probe


# ---------------------------------------------------------------------------------------------
# segments: kvm_segment fields ↔ QEMU's descriptor-format flags


def _seg_flags(s: Segment) -> int:
    return ((s.type << 8) | (s.s << 12) | (s.dpl << 13) | (int(s.usable) << 15)
            | (s.avl << 20) | (s.l << 21) | (s.db << 22) | (s.g << 23))


def _segment(sel: int, base: int, limit: int, flags: int) -> Segment:
    present = (flags >> 15) & 1
    return Segment(base=base, limit=limit, selector=sel & 0xFFFF, type=(flags >> 8) & 15,
                   present=present, dpl=(flags >> 13) & 3, db=(flags >> 22) & 1,
                   s=(flags >> 12) & 1, l=(flags >> 21) & 1, g=(flags >> 23) & 1,
                   avl=(flags >> 20) & 1, unusable=1 - present)


def _hflags(old: int, s: Sregs, rflags: int) -> int:
    """The hflags bits QEMU derives from this state (what its cpu_x86_load_seg_cache,
    cpu_x86_update_cr0/cr4 and cpu_load_efer would have computed), over `old`'s other bits."""
    pe = bool(s.cr0 & _CR0_PE)
    vm86 = pe and bool(rflags & _RFLAGS_VM)
    lma = bool(s.efer & _EFER_LMA)
    hf = old & ~_HF_OWNED
    hf |= 0 if not pe else 3 if vm86 else s.ss.dpl
    if lma and s.cs.l:
        hf |= _HF_CS32 | _HF_CS64
    elif s.cs.db:
        hf |= _HF_CS32
    if s.ss.db:
        hf |= _HF_SS32
    if hf & _HF_CS64:
        pass  # 64-bit code: DS/ES/SS bases are 0 by definition
    elif not pe or vm86 or not hf & _HF_CS32:
        hf |= _HF_ADDSEG  # QEMU adds segment bases unconditionally in 16-bit modes
    elif s.ds.base | s.es.base | s.ss.base:
        hf |= _HF_ADDSEG
    hf |= _HF_PE if pe else 0
    hf |= ((s.cr0 >> 1) & 7) << 9  # CR0.MP/EM/TS → HF_MP/EM/TS
    hf |= _HF_LMA if lma else 0
    hf |= _HF_SVME if s.efer & _EFER_SVME else 0
    hf |= _HF_OSFXSR if s.cr4 & _CR4_OSFXSR else 0
    hf |= _HF_SMAP if s.cr4 & _CR4_SMAP else 0
    return hf


# ---------------------------------------------------------------------------------------------
# the state


def get_state(uc: Uc) -> VcpuState:
    layout = _the_probe().layout
    values = uc.reg_read_batch([reg for _, reg in _GPRS])
    regs = Regs(**{name: int(v) & (1 << 64) - 1 for (name, _), v in zip(_GPRS, values,
                                                                         strict=True)})
    env = _Env(uc, layout)
    segs: dict[str, Segment] = {name: _segment(*env.seg(i)) for i, name in enumerate(_QEMU_SEGS)}
    for name, reg in (("tr", X.UC_X86_REG_TR), ("ldt", X.UC_X86_REG_LDTR)):
        segs[name] = _segment(*uc.reg_read(reg))
    _, gdt_base, gdt_limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
    _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
    sregs = Sregs(
        **segs, gdt=DTable(gdt_base, gdt_limit & 0xFFFF), idt=DTable(idt_base, idt_limit & 0xFFFF),
        cr0=env.get(_U64, layout.cr), cr2=env.get(_U64, layout.cr + 16),
        cr3=env.get(_U64, layout.cr + 24), cr4=env.get(_U64, layout.cr + 32),
        cr8=int(uc.reg_read(X.UC_X86_REG_CR8)), efer=env.get(_U64, layout.efer),
        apic_base=APIC_BASE_DEFAULT)
    tsc = (_the_probe().ticks() + env.get(_U64, layout.tsc_offset)) & (1 << 64) - 1
    msrs = Msrs({m: int(uc.reg_read(X.UC_X86_REG_MSR, m)) for m in _API_MSRS}
                | {MSR_FS_BASE: sregs.fs.base, MSR_GS_BASE: sregs.gs.base, MSR_IA32_TSC: tsc})
    return canonical(VcpuState(regs=regs, sregs=sregs, fpu=_get_fpu(uc), msrs=msrs,
                               events=VcpuEvents(), mp_state=MP_STATE_RUNNABLE))


def code_bits(uc: Uc) -> int:
    """16, 32 or 64: the default address size of the code `uc` runs now (CS.L, CS.D) — one
    segment read, not a whole `get_state`."""
    cs = _segment(*_Env(uc, _the_probe().layout).seg(_QEMU_SEGS.index("cs")))
    return 64 if cs.l else 32 if cs.db else 16


def set_state(uc: Uc, state: VcpuState) -> None:
    """Load `state` into `uc`. Translated code is not flushed (TBs are keyed by the mode bits
    written here); call `uc.ctl_flush_tb()` after rewriting guest code."""
    _check_settable(state)
    layout = _the_probe().layout
    s = state.sregs
    reset = mmu_reset_needed(uc, s)
    if reset:
        # CR4 before CR0: QEMU's CR0 write consults CR4.PAE; its long-mode transitions are
        # then overwritten below, where EFER and hflags are written as the state says. (The
        # same values again would only flush the TLB, which KVM does not: see below.)
        uc.reg_write(X.UC_X86_REG_CR4, s.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, s.cr3)
        uc.reg_write(X.UC_X86_REG_CR0, s.cr0)
    uc.reg_write(X.UC_X86_REG_CR2, s.cr2)
    uc.reg_write(X.UC_X86_REG_CR8, s.cr8)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
    for name, reg in (("tr", X.UC_X86_REG_TR), ("ldt", X.UC_X86_REG_LDTR)):
        seg: Segment = getattr(s, name)
        uc.reg_write(reg, (seg.selector, seg.base, seg.limit, _seg_flags(seg)))
    uc.reg_write_batch([(reg, getattr(state.regs, name)) for name, reg in _GPRS])
    _set_fpu(uc, state.fpu)
    for m in _API_MSRS:
        uc.reg_write(X.UC_X86_REG_MSR, (m, state.msrs[m]))
    # what the API cannot reach goes in through a context; it must come last, as it
    # overwrites CPUX86State wholesale with what was saved here
    env = _Env(uc, layout)
    for i, name in enumerate(_QEMU_SEGS):
        seg = getattr(s, name)
        env.put_seg(i, seg.selector, seg.base, seg.limit, _seg_flags(seg))
    for i, cr in ((0, s.cr0), (3, s.cr3), (4, s.cr4)):
        env.put(_U64, layout.cr + 8 * i, cr)
    env.put(_U64, layout.efer, s.efer)
    env.put(_U32, layout.hflags, _hflags(env.get(_U32, layout.hflags), s, state.regs.rflags))
    # QEMU forgets the exception in flight only when it delivers one itself, which under
    # Unicorn it never does: a stale one would turn the next fault into a double fault
    env.put(_I32, layout.old_exception, -1)
    env.put(_U64, layout.tsc_offset,
            (state.msrs[MSR_IA32_TSC] - _the_probe().ticks()) & (1 << 64) - 1)
    env.restore(uc)
    if reset:
        uc.ctl(UC.UC_CTL_TLB_FLUSH, UC.UC_CTL_IO_WRITE)


def mmu_reset_needed(uc: Uc, s: Sregs) -> bool:
    """Whether loading `s` into `uc` drops the TLB: KVM's rule for KVM_SET_SREGS (its
    `__set_sregs`: `mmu_reset_needed`, then kvm_mmu_reset_context and a guest TLB flush) —
    CR0, CR3, CR4 or EFER differ from the vCPU's, or the state pages in PAE mode (whose
    PDPTEs KVM loads anew). Loading the same mode again (a `start`, a fuzz loop's restore of
    one snapshot) keeps every translation, as on KVM: with shadow pages or hardware TLB
    entries a host write to a page table is not seen, nor an accessed bit cleared by the host
    set again, until the guest flushes. (QEMU's TLB is split by privilege — kernel, user,
    SMAP — so a CPL change needs no flush.)"""
    env = _Env(uc, _the_probe().layout)
    lay = env.layout
    if (env.get(_U64, lay.cr), env.get(_U64, lay.cr + 24), env.get(_U64, lay.cr + 32),
            env.get(_U64, lay.efer)) != (s.cr0, s.cr3, s.cr4, s.efer):
        return True
    return bool(s.cr0 & _CR0_PG) and bool(s.cr4 & _CR4_PAE) and not s.efer & _EFER_LMA


def load_context(uc: Uc, context: Any, state: VcpuState) -> None:
    """Load `state` again from `context`, Unicorn's CPU context saved right after a
    `set_state(uc, state)`: one copy instead of the register writes (a snapshot restored per
    fuzz input). The TSC offset is set anew, so the TSC reads `state`'s value from now. The
    TLB is dropped as `set_state` drops it (`mmu_reset_needed`)."""
    reset = mmu_reset_needed(uc, state.sregs)
    uc.context_restore(context)
    env = _Env(uc, _the_probe().layout)
    env.put(_U64, _the_probe().layout.tsc_offset,
            (state.msrs[MSR_IA32_TSC] - _the_probe().ticks()) & (1 << 64) - 1)
    env.restore(uc)
    if reset:
        uc.ctl(UC.UC_CTL_TLB_FLUSH, UC.UC_CTL_IO_WRITE)


def _check_settable(state: VcpuState) -> None:
    if not state.events.quiet:
        raise ValueError(f"Unicorn cannot hold events in flight ({state.events}); deliver "
                         "them first (kvmem.cpu.events.deliver_pending)")
    if state.mp_state != MP_STATE_RUNNABLE:
        raise ValueError(f"Unicorn has only mp_state RUNNABLE (0), not {state.mp_state}")
    s = state.sregs
    long_mode = bool(s.efer & _EFER_LME) and bool(s.cr0 & (1 << 31))
    if bool(s.efer & _EFER_LMA) != long_mode or (long_mode and not s.cr4 & (1 << 5)):
        raise ValueError(f"inconsistent long mode: EFER={s.efer:#x} CR0={s.cr0:#x} "
                         f"CR4={s.cr4:#x} (EFER.LMA must be EFER.LME and CR0.PG, with CR4.PAE)")


# ---------------------------------------------------------------------------------------------
# x87 / SSE: Unicorn names physical registers FP0-7; kvm_fpu holds ST(i) = FP[(TOP + i) & 7]


def _get_fpu(uc: Uc) -> Fpu:
    fsw = int(uc.reg_read(X.UC_X86_REG_FPSW)) & 0xFFFF
    top = (fsw >> 11) & 7
    tags = int(uc.reg_read(X.UC_X86_REG_FPTAG)) & 0xFFFF
    phys = []
    for i in range(8):
        mantissa, exponent = uc.reg_read(X.UC_X86_REG_FP0 + i)
        phys.append(_U64.pack(mantissa & (1 << 64) - 1) + struct.pack("<H", exponent & 0xFFFF)
                    + bytes(6))
    ftwx = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
    xmm = tuple((int(uc.reg_read(X.UC_X86_REG_XMM0 + i)) & (1 << 128) - 1).to_bytes(16, "little")
                for i in range(16))
    return Fpu(fpr=tuple(phys[(top + i) & 7] for i in range(8)),
               fcw=int(uc.reg_read(X.UC_X86_REG_FPCW)) & 0xFFFF, fsw=fsw, ftwx=ftwx,
               last_opcode=int(uc.reg_read(X.UC_X86_REG_FOP)) & 0xFFFF,
               last_ip=int(uc.reg_read(X.UC_X86_REG_FIP)) & (1 << 64) - 1,
               last_dp=int(uc.reg_read(X.UC_X86_REG_FDP)) & (1 << 64) - 1, xmm=xmm,
               mxcsr=int(uc.reg_read(X.UC_X86_REG_MXCSR)) & 0xFFFF_FFFF)


def _set_fpu(uc: Uc, f: Fpu) -> None:
    uc.reg_write(X.UC_X86_REG_FPCW, f.fcw)
    uc.reg_write(X.UC_X86_REG_FPSW, f.fsw)  # also sets TOP
    top = (f.fsw >> 11) & 7
    for i in range(8):
        value = f.fpr[i]
        phys = (top + i) & 7
        uc.reg_write(X.UC_X86_REG_FP0 + phys, (_U64.unpack_from(value)[0],
                                               struct.unpack_from("<H", value, 8)[0]))
    # the full tag word only distinguishes empty (3) from not; QEMU keeps just that bit
    uc.reg_write(X.UC_X86_REG_FPTAG, sum(3 << (2 * i) for i in range(8)
                                         if not f.ftwx & (1 << i)))
    uc.reg_write(X.UC_X86_REG_FOP, f.last_opcode)
    uc.reg_write(X.UC_X86_REG_FIP, f.last_ip)
    uc.reg_write(X.UC_X86_REG_FDP, f.last_dp)
    for i in range(16):
        uc.reg_write(X.UC_X86_REG_XMM0 + i, int.from_bytes(f.xmm[i], "little"))
    uc.reg_write(X.UC_X86_REG_MXCSR, f.mxcsr)


# ---------------------------------------------------------------------------------------------
# running


def configure(uc: Uc) -> None:
    """Set `uc` up to run guests whose state comes from `set_state`; once, before `resume`.

    Unicorn's `emu_start(begin, until)` looks `until` up through the guest's page tables
    before it runs (to drop a translated block ending there). With paging on, that lookup
    faults inside QEMU, which ignores the fault but keeps it as the "exception in flight" —
    the guest's next real exception then becomes a double fault — and, for a canonical
    unmapped `until`, writes CR2. Exits mode (UC_CTL_UC_USE_EXITS) with no exit address
    makes Unicorn ignore `until`, so nothing is looked up."""
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])


def resume(uc: Uc) -> None:
    """Run from the current RIP until a hook stops the emulation, HLT, or an error (raised as
    `UcError`), stopping *exactly* where a hook asked. An instruction count is given, though
    never reached: with one, Unicorn checks for a stop after every instruction, so a hook's
    `emu_stop` takes effect right after the instruction that called it (an OUT, say), and
    the state read then is the state after that instruction — what an exit must leave to be
    moved to another engine. The check costs: ~4x on a tight loop here (bench_cpu.py).
    Unicorn compiles the check into the blocks it translates while a count is set; blocks
    translated by an `emu_start` without one lack it — call `uc.ctl_flush_tb()` after running
    the Uc any other way (`resume_blockwise` does)."""
    uc.emu_start(int(uc.reg_read(X.UC_X86_REG_RIP)), 0, count=_NO_LIMIT)


def resume_blockwise(uc: Uc) -> None:
    """`resume` without the per-instruction check: a hook's `emu_stop` takes effect only when
    the current translated block ends, after more guest instructions may have run. For hooks
    that never stop the emulation (they block until the VMM answers, as the Unicorn engine's
    port and MMIO hooks do) and for measuring. Its blocks lack `resume`'s check, so they are
    dropped on the way out (Unicorn drops the others on the way in)."""
    try:
        uc.emu_start(int(uc.reg_read(X.UC_X86_REG_RIP)), 0)
    finally:
        uc.ctl_flush_tb()


# ---------------------------------------------------------------------------------------------
# events Unicorn does not deliver


class UcTrap:
    """Hooks on a Uc that record the next exception, INT n or SYSCALL as an `events.Event` and
    stop the emulation, instead of Unicorn's defaults (stop with UC_ERR_EXCEPTION; SYSCALL as a
    no-op). After `emu_start` returns, `take()` gives the event (or None); RIP is then where
    the event leaves it: at the faulting instruction for a fault, after INT n / SYSCALL.
    An invalid opcode is not a hook in Unicorn: `emu_start` raises UC_ERR_INSN_INVALID with RIP
    at the instruction; `invalid_opcode()` is the #UD event to deliver then."""

    def __init__(self, uc: Uc) -> None:
        self._layout = _the_probe().layout
        self._event: Event | None = None
        self._hooks = [uc.hook_add(UC.UC_HOOK_INTR, self._on_intr),
                       uc.hook_add(UC.UC_HOOK_INSN, self._on_syscall, None, 1, 0,
                                   X.UC_X86_INS_SYSCALL)]

    def _on_intr(self, uc: Uc, intno: int, _: object) -> None:
        if self._event is not None:
            # QEMU may retry the faulting instruction before the stop lands and report the
            # retry's fault (as a double fault): the first event is the real one
            return
        env = _Env(uc, self._layout)
        software = env.get(_I32, self._layout.exception_is_int) != 0
        code = None
        if not software and intno in _HAS_ERROR_CODE:
            code = env.get(_U32, self._layout.error_code)
        self._event = Interrupt(intno, code, software=software)
        uc.emu_stop()

    def _on_syscall(self, uc: Uc, _: object) -> None:
        if self._event is not None:
            return
        self._event = Syscall()
        uc.emu_stop()

    def take(self) -> Event | None:
        event, self._event = self._event, None
        return event

    def retry(self, uc: Uc, cr2: int) -> None:
        """Forget the fault just taken, which the caller does not deliver (the instruction
        runs again): CR2 back to `cr2`, and no exception in flight in QEMU — which would
        make the next fault a double fault."""
        uc.reg_write(X.UC_X86_REG_CR2, cr2)
        env = _Env(uc, self._layout)
        env.put(_I32, self._layout.old_exception, -1)
        env.restore(uc)

    @staticmethod
    def invalid_opcode() -> Event:
        return Interrupt(6)

    def remove(self, uc: Uc) -> None:
        for h in self._hooks:
            uc.hook_del(h)
        self._hooks = []
