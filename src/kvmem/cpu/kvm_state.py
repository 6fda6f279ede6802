"""`VcpuState` ↔ a `/dev/kvm` vCPU (`kvmapi.KvmVcpu`).

Defines:
- `setup_cpuid(kvm, vcpu)` — give the vCPU every CPUID leaf KVM supports
  (KVM_GET_SUPPORTED_CPUID → KVM_SET_CPUID2). Call it once, before the vCPU first runs: KVM
  refuses EFER.LME (and so long mode) while the guest CPUID lacks long mode, EFER.NXE without
  NX, EFER.SCE without SYSCALL — and a vCPU starts with an empty CPUID;
- `paging_features(cpuid)` — the `PagingFeatures` of a vCPU with that CPUID;
- `settle(vcpu)` — finish the instruction of the last exit (see below);
- `get_sregs(vcpu)` — the segment and control registers alone, changing nothing;
- `get_state(vcpu)` / `set_state(vcpu, state)` — the whole state, through KVM_GET/SET_REGS,
  _SREGS, _XSAVE, _MSRS, _VCPU_EVENTS and _MP_STATE.

Rules:
- An exit is not an instruction boundary. After KVM_EXIT_IO or KVM_EXIT_MMIO, KVM finishes the
  instruction (stores the IN data, advances RIP) on the next KVM_RUN; until then the registers
  read are mid-instruction (Documentation/virt/kvm/api.rst, "KVM_RUN": "userspace should ensure
  that the operation is completed before performing a live migration"). `get_state` and
  `set_state` therefore `settle` first: one KVM_RUN with `immediate_exit` set, which completes
  the pending operation and returns EINTR without running guest code. After an IN or MMIO read,
  put the answer in the run page (`vcpu.set_io_data` / `set_mmio_data`) before either.
- `get_state` returns `canonical` states; `set_state` writes whatever it is given, in the order
  below (`load` leaves out KVM_SET_SREGS where KVM holds those very registers, and
  KVM_SET_MP_STATE of RUNNABLE, which a vCPU without an in-kernel irqchip always is: see
  there).
  What KVM does not take is an `OSError(EINVAL)` naming it: an MSR it refuses, and a paging
  mode it silently drops (kvm_pvm accepts CR0.PG without EFER.LME and keeps it clear).
- The x87/SSE registers go through the XSAVE image (as QEMU does), not KVM_GET/SET_FPU:
  KVM_GET_FPU does not report MXCSR, and KVM_SET_FPU writes the FXSAVE area without marking
  x87/SSE in XSTATE_BV, so the next XRSTOR puts them back in their init state (on the host
  kvmem is tested on, a guest saw XMM1 = 0 and FCW = 0x37f after KVM_SET_FPU set others).
  `set_state` rewrites the legacy region of the current image and sets XSTATE_BV bits 0-1;
  AVX upper halves and the rest of the image are kept.
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from typing import Final

from .. import kvmapi
from ..kvmapi import Kvm, KvmCpuidEntry, KvmSegment, KvmSregs, KvmVcpu, KvmVcpuEvents
from .paging import PagingFeatures
from .state import (
    MSR_IA32_TSC,
    SUPPORTED_MSRS,
    DTable,
    ExceptionEvent,
    Fpu,
    InterruptEvent,
    Msrs,
    NmiEvent,
    Regs,
    Segment,
    SmiEvent,
    Sregs,
    VcpuEvents,
    VcpuState,
    canonical,
)

__all__ = ["Prepared", "get_sregs", "get_state", "load", "paging_features", "prepare",
           "set_state", "settle", "setup_cpuid"]

# the exits whose instruction KVM completes on the next KVM_RUN
_UNFINISHED_EXITS: Final = frozenset({kvmapi.KVM_EXIT_IO, kvmapi.KVM_EXIT_MMIO})
# KVM_SET_VCPU_EVENTS reads these optional fields only when told to
_EVENT_FLAGS: Final = (kvmapi.KVM_VCPUEVENT_VALID_NMI_PENDING
                       | kvmapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                       | kvmapi.KVM_VCPUEVENT_VALID_SHADOW
                       | kvmapi.KVM_VCPUEVENT_VALID_SMM)
# the legacy (FXSAVE) region of an XSAVE image: fcw fsw ftw(abridged) pad fop fip fdp mxcsr
# mxcsr_mask, st0-7 (16 bytes each), xmm0-15; then the XSAVE header with XSTATE_BV
_FXSAVE: Final = struct.Struct("<HHBxHQQII128s256s")
_XSTATE_BV: Final = struct.Struct("<Q")
_XSTATE_BV_OFFSET: Final = 512
_XFEATURE_X87_SSE: Final = 0x3
# the control-register bits that choose the CPU mode and paging mode
_CR0_MODE: Final = (1 << 0) | (1 << 16) | (1 << 31)  # PE, WP, PG
_CR4_MODE: Final = (1 << 4) | (1 << 5) | (1 << 12) | (1 << 20) | (1 << 21)  # PSE PAE LA57 SMEP SMAP
_EFER_MODE: Final = (1 << 8) | (1 << 10) | (1 << 11)  # LME, LMA, NXE
_CR0_PG: Final = 1 << 31
_CR4_PAE: Final = 1 << 5
_EFER_LMA: Final = 1 << 10
_VENDOR_AMD: Final = frozenset({0x6874_7541, 0x6F67_7948})  # "Auth"enticAMD, "Hygo"nGenuine


def setup_cpuid(kvm: Kvm, vcpu: KvmVcpu) -> list[KvmCpuidEntry]:
    """Set the vCPU's CPUID to everything KVM supports here; returns what was set."""
    entries = kvm.get_supported_cpuid()
    vcpu.set_cpuid2(entries)
    return entries


def paging_features(cpuid: list[KvmCpuidEntry]) -> PagingFeatures:
    """What KVM's page walker takes from this CPUID (cpuid_maxphyaddr, gbpages, vendor)."""
    leaves = {(e.function, e.index): e for e in cpuid}
    top = leaves.get((0x8000_0008, 0))
    ext = leaves.get((0x8000_0001, 0))
    vendor = leaves.get((0, 0))
    return PagingFeatures(
        maxphyaddr=(top.eax & 0xFF) if top is not None else 36,
        gbpages=ext is not None and bool(ext.edx & (1 << 26)),
        amd=vendor is not None and vendor.ebx in _VENDOR_AMD,
    )


def settle(vcpu: KvmVcpu) -> None:
    """Complete the instruction of the last exit if KVM still owes it (IO, MMIO)."""
    if vcpu.exit_reason not in _UNFINISHED_EXITS:
        return
    vcpu.immediate_exit = True
    try:
        reason = vcpu.run()
    except OSError as e:
        if e.errno == errno.EINTR:
            return
        raise
    finally:
        vcpu.immediate_exit = False
    raise OSError(errno.EAGAIN, f"completing the last exit made another exit ({reason}); "
                                "answer it and settle again")


def get_sregs(vcpu: KvmVcpu) -> Sregs:
    """KVM_GET_SREGS as `Sregs`, as the registers stand (no `settle`: a read only)."""
    s = vcpu.get_sregs()
    return Sregs(**{n: Segment(**vars(getattr(s, n))) for n in Sregs.SEGMENTS},
                 gdt=DTable(*s.gdt), idt=DTable(*s.idt), cr0=s.cr0, cr2=s.cr2, cr3=s.cr3,
                 cr4=s.cr4, cr8=s.cr8, efer=s.efer, apic_base=s.apic_base)


def get_state(vcpu: KvmVcpu) -> VcpuState:
    settle(vcpu)
    r = vcpu.get_regs()
    sregs = get_sregs(vcpu)
    fpu = _fpu_from_xsave(vcpu.get_xsave())
    values = vcpu.get_msrs(SUPPORTED_MSRS)
    if len(values) != len(SUPPORTED_MSRS):
        missing = SUPPORTED_MSRS[len(values)]
        raise OSError(errno.EINVAL, f"KVM_GET_MSRS: KVM does not read MSR {missing:#x}")
    e = vcpu.get_vcpu_events()
    state = VcpuState(
        regs=Regs(**vars(r)),
        sregs=sregs,
        fpu=fpu,
        msrs=Msrs(values),
        events=VcpuEvents(
            ExceptionEvent(e.exception_injected, e.exception_nr, e.exception_has_error_code,
                           e.exception_pending, e.exception_error_code),
            InterruptEvent(e.interrupt_injected, e.interrupt_nr, e.interrupt_soft,
                           e.interrupt_shadow),
            NmiEvent(e.nmi_injected, e.nmi_pending, e.nmi_masked),
            e.sipi_vector,
            SmiEvent(e.smi_smm, e.smi_pending, e.smi_smm_inside_nmi, e.smi_latched_init)),
        mp_state=vcpu.get_mp_state(),
    )
    return canonical(state)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A state packed for one vCPU: the ioctl arguments `load` gives KVM, in order. A VMM
    that loads the same state again and again (a snapshot restored per fuzz input) packs
    it once. The XSAVE image keeps the components beyond the legacy area as they were at
    `prepare` (the state does not hold them). The arguments are bytearrays the ioctls take
    as they are (KVM only reads them): no copy per load."""

    state: VcpuState
    sregs: bytearray
    regs: bytearray
    xsave: bytearray
    msrs: bytearray
    nmsrs: int
    mp_state: bytearray
    events: bytearray
    # PAE paging: KVM_SET_SREGS also loads the PDPTRs from guest memory, which the guest may
    # have changed since; setting the same registers again is then not a no-op
    pdptrs: bool = False


def prepare(vcpu: KvmVcpu, state: VcpuState) -> Prepared:
    s = state.sregs
    segs = {n: KvmSegment(**_segment_fields(getattr(s, n))) for n in Sregs.SEGMENTS}
    sregs = KvmSregs(
        cs=segs["cs"], ds=segs["ds"], es=segs["es"], fs=segs["fs"], gs=segs["gs"],
        ss=segs["ss"], tr=segs["tr"], ldt=segs["ldt"], gdt=(s.gdt.base, s.gdt.limit),
        idt=(s.idt.base, s.idt.limit), cr0=s.cr0, cr2=s.cr2,
        cr3=s.cr3, cr4=s.cr4, cr8=s.cr8, efer=s.efer, apic_base=s.apic_base,
        interrupt_bitmap=(0, 0, 0, 0)).pack()
    r = state.regs
    regs = kvmapi.KvmRegs(*(getattr(r, n) for n in Regs.NAMES)).pack()
    # the TSC goes last of the MSRs so it drifts least before the run
    entries = sorted(state.msrs.items(), key=lambda kv: kv[0] == MSR_IA32_TSC)
    e = state.events
    events = KvmVcpuEvents(
        exception_injected=e.exception.injected, exception_nr=e.exception.nr,
        exception_has_error_code=e.exception.has_error_code,
        exception_pending=e.exception.pending, exception_error_code=e.exception.error_code,
        interrupt_injected=e.interrupt.injected, interrupt_nr=e.interrupt.nr,
        interrupt_soft=e.interrupt.soft, interrupt_shadow=e.interrupt.shadow,
        nmi_injected=e.nmi.injected, nmi_pending=e.nmi.pending, nmi_masked=e.nmi.masked,
        sipi_vector=e.sipi_vector, flags=_EVENT_FLAGS, smi_smm=e.smi.smm,
        smi_pending=e.smi.pending, smi_smm_inside_nmi=e.smi.smm_inside_nmi,
        smi_latched_init=e.smi.latched_init).pack()
    pae = bool(s.cr0 & _CR0_PG and s.cr4 & _CR4_PAE and not s.efer & _EFER_LMA)
    return Prepared(state, bytearray(sregs), bytearray(regs),
                    bytearray(_fpu_into_xsave(vcpu.get_xsave(), state.fpu)),
                    bytearray(kvmapi.pack_msrs(entries)), len(entries),
                    bytearray(kvmapi.pack_mp_state(state.mp_state)), bytearray(events), pae)


def load(vcpu: KvmVcpu, p: Prepared, *, checked: bool = False) -> None:
    """Load a prepared state. `checked`: this state was loaded on this vCPU before, and
    KVM took its mode then (it takes the same mode again)."""
    # an exit still owed would finish on the *new* state at the next KVM_RUN (an IN would land
    # in the new RAX): complete it on the old one first
    settle(vcpu)
    # segment and control registers KVM holds already (a reset's, most often: guests seldom
    # change them) are not set again: KVM_SET_SREGS of exactly what KVM_GET_SREGS reads
    # changes nothing (no MMU reset; no interrupt queued, or the bitmaps would differ) but
    # for PAE paging's PDPTR load from memory. Where they differ they are set here, before
    # the MSRs, as always
    if p.pdptrs or not vcpu.sregs_are(p.sregs):
        vcpu.call("KVM_SET_SREGS", kvmapi.KVM_SET_SREGS, p.sregs)
        if not checked:
            _check_mode_taken(vcpu, p.state.sregs)
    # a state loaded before (a snapshot's, once per reset): the registers and the events
    # go into kvm_run's sync area for the next KVM_RUN instead of two ioctls (applied
    # there regs then events, after the MSRs and the mp_state: the general registers
    # depend on neither); any other ioctl of the vCPU loads them first (`KvmVcpu.stage`)
    staged = checked and vcpu.sync_regs != 0
    if not staged:
        vcpu.call("KVM_SET_REGS", kvmapi.KVM_SET_REGS, p.regs)
    vcpu.set_xsave(p.xsave)
    # after KVM_SET_SREGS: FS_BASE / GS_BASE equal the bases just set, and EFER (which gates
    # some MSRs) is in place
    written = vcpu.call("KVM_SET_MSRS", kvmapi.KVM_SET_MSRS, p.msrs)
    if written != p.nmsrs:
        index, value = sorted(p.state.msrs.items(), key=lambda kv: kv[0] == MSR_IA32_TSC
                              )[written]
        raise OSError(errno.EINVAL, f"KVM_SET_MSRS refused MSR {index:#x} = {value:#x}")
    # without an in-kernel irqchip (kvmem creates none) a vCPU is RUNNABLE for good: KVM
    # refuses any other mp_state (EINVAL) and a HLT exits to userspace instead of halting,
    # so setting RUNNABLE again changes nothing; another mp_state still goes to KVM
    if p.state.mp_state != kvmapi.KVM_MP_STATE_RUNNABLE:
        vcpu.call("KVM_SET_MP_STATE", kvmapi.KVM_SET_MP_STATE, p.mp_state)
    # events last (as QEMU does): an INIT latched in them may change the mp_state just set
    if not (staged and vcpu.stage(p.regs, p.events)):
        if staged:
            vcpu.call("KVM_SET_REGS", kvmapi.KVM_SET_REGS, p.regs)
        vcpu.call("KVM_SET_VCPU_EVENTS", kvmapi.KVM_SET_VCPU_EVENTS, p.events)


def set_state(vcpu: KvmVcpu, state: VcpuState) -> None:
    load(vcpu, prepare(vcpu, state))


def _check_mode_taken(vcpu: KvmVcpu, s: Sregs) -> None:
    """KVM_SET_SREGS may succeed and still not take the paging mode asked for (kvm_pvm keeps
    CR0.PG clear unless EFER.LME is set: it runs 4/5-level paging only). A state that is not
    the one loaded is refused here, in the caller's terms, rather than run."""
    got = vcpu.get_sregs()
    asked = (s.cr0 & _CR0_MODE, s.cr3, s.cr4 & _CR4_MODE, s.efer & _EFER_MODE)
    kept = (got.cr0 & _CR0_MODE, got.cr3, got.cr4 & _CR4_MODE, got.efer & _EFER_MODE)
    if kept != asked:
        names = ("CR0", "CR3", "CR4", "EFER")
        diff = ", ".join(f"{n} {a:#x} kept as {k:#x}" for n, a, k in zip(names, asked, kept,
                                                                          strict=True)
                         if a != k)
        raise OSError(errno.EINVAL, f"KVM_SET_SREGS: this KVM did not take the mode asked for "
                                    f"({diff})")


def _fpu_from_xsave(image: bytes) -> Fpu:
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _mask, st, xmm = _FXSAVE.unpack_from(image)
    return Fpu(tuple(st[i:i + 16] for i in range(0, 128, 16)), fcw, fsw, ftw, fop, fip, fdp,
               tuple(xmm[i:i + 16] for i in range(0, 256, 16)), mxcsr)


def _fpu_into_xsave(image: bytes, f: Fpu) -> bytes:
    out = bytearray(image)
    mask = _FXSAVE.unpack_from(image)[7]
    _FXSAVE.pack_into(out, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp,
                      f.mxcsr, mask, b"".join(f.fpr), b"".join(f.xmm))
    # mark x87 and SSE as not in their init state, or XRSTOR would ignore what was written
    bv = _XSTATE_BV.unpack_from(out, _XSTATE_BV_OFFSET)[0] | _XFEATURE_X87_SSE
    _XSTATE_BV.pack_into(out, _XSTATE_BV_OFFSET, bv)
    return bytes(out)


def _segment_fields(seg: Segment) -> dict[str, int]:
    return {f.name: getattr(seg, f.name) for f in dataclasses.fields(seg)}
