"""A thin, typed wrapper over the real Linux `/dev/kvm` API (x86-64), in pure Python.

Defines:
- the ioctl numbers, built with `_IO`/`_IOR`/`_IOW`/`_IOWR` from the uapi structs' sizes, and
  the capability, slot-flag, dirty-log and exit-reason numbers of `include/uapi/linux/kvm.h`;
- `kvm_available()` — None where KVM works, else why not (tests skip with that reason);
- `Kvm` (the `/dev/kvm` fd), `KvmVm` (a VM fd), `KvmVcpu` (a vCPU fd and its `kvm_run` page):
  each owns exactly one fd, closed by `close()` or by leaving its `with` block;
- the vCPU state ioctls, one method each, with the uapi structs as dataclasses: KVM_GET/SET_REGS
  (`KvmRegs`), _SREGS (`KvmSregs`, `KvmSegment`), _FPU (`KvmFpu`), _XSAVE (raw image), _MSRS
  (and KVM_GET_MSR_INDEX_LIST), _VCPU_EVENTS (`KvmVcpuEvents`), _MP_STATE, KVM_TRANSLATE
  (`KvmTranslation`), KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 (`KvmCpuidEntry`);
- `KvmCaps` — the capabilities kvmem's model has to agree with, read once.

Why: this is the oracle of kvmem's differential tests — the same sequence of calls goes to the
model and to the kernel, and every errno must match — and the base of the KVM engine.

Rules:
- Self-contained: nothing here imports the rest of kvmem, so a wrong constant in the model cannot
  leak into the oracle that is meant to catch it. The numbers are the uapi's, written out again.
- Every ioctl argument is an unsigned field of fixed width (u32 slot and flags, u64 addresses and
  sizes). An int that does not fit is a `ValueError` raised before any ioctl: the kernel never
  sees a silently truncated value. Whatever the kernel refuses is an `OSError` whose `errno` is
  the kernel's, and whose message names the ioctl and its arguments.
- Only mechanism, no policy: no check the kernel would make is made here first, so the kernel
  answers every request that reaches it. The one exception protects this process: the kernel
  writes `KVM_GET_DIRTY_LOG`'s bitmap through a raw pointer, as long as the *slot's* bitmap, so
  `KvmVm` remembers the page count of each slot it installed and refuses a disagreeing `npages`
  instead of letting the kernel write past the buffer; likewise each `KvmVcpu` knows its VM's
  XSAVE size (KVM_CAP_XSAVE2), which KVM_GET/SET_XSAVE read and write whatever the ioctl
  number says. Calls that report partial success return it rather than raise (KVM_GET_MSRS /
  KVM_SET_MSRS: how many MSRs were done).
- `fcntl.ioctl` releases the GIL, so `KvmVcpu.run()` blocks only its own thread; a signal that
  interrupts `KVM_RUN` surfaces as `OSError(EINTR)`.
- kvm_run's sync area (KVM_CAP_SYNC_REGS) works both ways: `KvmVcpu.stage` writes registers
  the next KVM_RUN loads, and KVM stores the segment/control registers there whenever KVM_RUN
  returns (kvm_valid_regs = KVM_SYNC_X86_SREGS, set at creation). `KvmVcpu.sregs_are` trusts
  that copy only until the vCPU's next ioctl that is not a pure read (`_READS`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

__all__ = [
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_CAP_CHECK_EXTENSION_VM",
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_CAP_MULTI_ADDRESS_SPACE",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_SYNC_MMU",
    "KVM_CAP_USER_MEMORY2",
    "KVM_CAP_VM_TYPES",
    "KVM_CAP_X86_SMM",
    "KVM_CAP_XSAVE2",
    "KVM_CHECK_EXTENSION",
    "KVM_CLEAR_DIRTY_LOG",
    "KVM_CREATE_GUEST_MEMFD",
    "KVM_CREATE_VCPU",
    "KVM_CREATE_VM",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_DIRTY_LOG_PAGE_OFFSET",
    "KVM_ENABLE_CAP",
    "KVM_EXIT_DIRTY_RING_FULL",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_HLT",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_INTR",
    "KVM_EXIT_IO",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_SHUTDOWN",
    "KVM_GET_API_VERSION",
    "KVM_GET_DIRTY_LOG",
    "KVM_GET_FPU",
    "KVM_GET_MP_STATE",
    "KVM_GET_MSRS",
    "KVM_GET_MSR_INDEX_LIST",
    "KVM_GET_REGS",
    "KVM_GET_SREGS",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_VCPU_EVENTS",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_XSAVE",
    "KVM_GET_XSAVE2",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MP_STATE_RUNNABLE",
    "KVM_RESET_DIRTY_RINGS",
    "KVM_RUN",
    "KVM_SET_CPUID2",
    "KVM_SET_FPU",
    "KVM_SET_MP_STATE",
    "KVM_SET_MSRS",
    "KVM_SET_REGS",
    "KVM_SET_SREGS",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_USER_MEMORY_REGION2",
    "KVM_SET_VCPU_EVENTS",
    "KVM_SET_XSAVE",
    "KVM_TRANSLATE",
    "KVM_VCPUEVENT_VALID_NMI_PENDING",
    "KVM_VCPUEVENT_VALID_SHADOW",
    "KVM_VCPUEVENT_VALID_SIPI_VECTOR",
    "KVM_VCPUEVENT_VALID_SMM",
    "Kvm",
    "KvmCaps",
    "KvmCpuidEntry",
    "KvmFpu",
    "KvmIo",
    "KvmMmio",
    "KvmRegs",
    "KvmSegment",
    "KvmSregs",
    "KvmTranslation",
    "KvmVcpu",
    "KvmVcpuEvents",
    "KvmVm",
    "dirty_bitmap_bytes",
    "kvm_available",
    "last_accepted",
    "probe_phys_bits",
    "probe_user_va_end",
]

KVM_PATH: Final = "/dev/kvm"
KVM_API_VERSION: Final = 12

# ---------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h, which x86 uses): dir(2) | size(14) | type(8) | nr(8)

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


# ---------------------------------------------------------------------------------------------
# uapi structs, as `struct` layouts ("=" : native byte order, no implicit padding)

# kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
_REGION: Final = struct.Struct("=IIQQQ")
# kvm_userspace_memory_region2: the five above, guest_memfd_offset u64, guest_memfd u32,
# pad1 u32, pad2[14] u64 (pads always zero here)
_REGION2: Final = struct.Struct("=IIQQQQI4x112x")
# kvm_dirty_log: slot u32, padding1 u32, dirty_bitmap pointer (union with u64)
_DIRTY_LOG: Final = struct.Struct("=I4xQ")
# kvm_clear_dirty_log: slot u32, num_pages u32, first_page u64, dirty_bitmap pointer
_CLEAR_DIRTY_LOG: Final = struct.Struct("=IIQQ")
# kvm_enable_cap: cap u32, flags u32, args[4] u64, pad[64] u8
_ENABLE_CAP: Final = struct.Struct("=II4Q64x")
# kvm_create_guest_memfd: size u64, flags u64, reserved[6] u64
_CREATE_GUEST_MEMFD: Final = struct.Struct("=QQ48x")
# sizes only: the register structs are not wrapped (yet) but their ioctl numbers depend on them
_KVM_REGS_SIZE: Final = 18 * 8  # 16 GPRs, rip, rflags
_KVM_SREGS_SIZE: Final = 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8  # segs, dtables, crs/efer/apic, irq bmp
# kvm_run: request_interrupt_window u8, immediate_exit u8, padding1[6], exit_reason u32, ...
_EXIT_REASON: Final = struct.Struct("=I")
_EXIT_REASON_OFFSET: Final = 8
_IMMEDIATE_EXIT_OFFSET: Final = 1
_RUN_UNION_OFFSET: Final = 32  # after ready_for_interrupt_injection, if_flag, flags, cr8, apic_base
# kvm_run after its 256-byte exit union: kvm_valid_regs u64, kvm_dirty_regs u64, then the
# sync area `s` (x86: struct kvm_sync_regs {kvm_regs regs; kvm_sregs sregs;
# kvm_vcpu_events events}), which KVM_RUN loads for every bit set in kvm_dirty_regs before
# it enters the guest (KVM_CAP_SYNC_REGS)
_DIRTY_REGS: Final = struct.Struct("=Q")
_VALID_REGS_OFFSET: Final = _RUN_UNION_OFFSET + 256
_DIRTY_REGS_OFFSET: Final = _RUN_UNION_OFFSET + 256 + 8
_SYNC_REGS_OFFSET: Final = _RUN_UNION_OFFSET + 256 + 16
_SYNC_SREGS_OFFSET: Final = _SYNC_REGS_OFFSET + _KVM_REGS_SIZE
_SYNC_EVENTS_OFFSET: Final = _SYNC_REGS_OFFSET + _KVM_REGS_SIZE + _KVM_SREGS_SIZE
KVM_SYNC_X86_REGS: Final = 1 << 0
KVM_SYNC_X86_SREGS: Final = 1 << 1
KVM_SYNC_X86_EVENTS: Final = 1 << 2
# kvm_run.io: direction u8 (0 in, 1 out), size u8, port u16, count u32, data_offset u64
_RUN_IO: Final = struct.Struct("=BBHIQ")
# kvm_run.mmio: phys_addr u64, data[8], len u32, is_write u8
_RUN_MMIO: Final = struct.Struct("=Q8sIB")
_RUN_MMIO_DATA_OFFSET: Final = _RUN_UNION_OFFSET + 8
# kvm_run.internal: suberror u32, ndata u32, data[16] u64
_RUN_INTERNAL: Final = struct.Struct("=II16Q")
# kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
_REGS: Final = struct.Struct("=18Q")
# kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l, g, avl,
# unusable, padding (u8 each)
_SEGMENT: Final = struct.Struct("=QIH10B")
# kvm_dtable: base u64, limit u16, padding[3] u16
_DTABLE: Final = struct.Struct("=QH6x")
# kvm_sregs: cs ds es fs gs ss tr ldt, gdt idt, cr0 cr2 cr3 cr4 cr8 efer apic_base,
# interrupt_bitmap[4] u64
_SREGS_TAIL: Final = struct.Struct("=7Q4Q")

# kvm_fpu: fpr[8][16], fcw u16, fsw u16, ftwx u8, pad1 u8, last_opcode u16, last_ip u64,
# last_dp u64, xmm[16][16], mxcsr u32, pad2 u32
_FPU: Final = struct.Struct("=128sHHBxHQQ256sI4x")
# kvm_msrs / kvm_cpuid2 header: nmsrs (nent) u32, pad u32; then the entries
_NENT: Final = struct.Struct("=I4x")
# kvm_msr_entry: index u32, reserved u32, data u64
_MSR_ENTRY: Final = struct.Struct("=I4xQ")
# kvm_msr_list header: nmsrs u32; then u32 indices
_MSR_LIST: Final = struct.Struct("=I")
# kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx (u32 each), padding[3] u32
_CPUID_ENTRY2: Final = struct.Struct("=7I12x")
# kvm_vcpu_events: exception {injected, nr, has_error_code, pending u8; error_code u32},
# interrupt {injected, nr, soft, shadow u8}, nmi {injected, pending, masked, pad u8},
# sipi_vector u32, flags u32, smi {smm, pending, smm_inside_nmi, latched_init u8},
# triple_fault {pending u8}, reserved[26], exception_has_payload u8, exception_payload u64
_VCPU_EVENTS: Final = struct.Struct("=4BI4B3BxII4BB26xBQ")
# kvm_xsave: region[1024] u32 — the 4 KiB the ioctl numbers encode; with KVM_CAP_XSAVE2 the
# kernel reads and writes as many bytes as that capability says (at least these)
_XSAVE_SIZE: Final = 4096
# kvm_mp_state: mp_state u32
_MP_STATE: Final = struct.Struct("=I")
# kvm_translation: linear_address u64 (in); physical_address u64, valid, writeable, usermode u8,
# pad[5] (out)
_TRANSLATION: Final = struct.Struct("=QQBBB5x")

KVMIO: Final = 0xAE

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)  # also a VM ioctl with KVM_CAP_CHECK_EXTENSION_VM
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
KVM_GET_MSR_INDEX_LIST: Final = _IOWR(KVMIO, 0x02, _MSR_LIST.size)
KVM_GET_SUPPORTED_CPUID: Final = _IOWR(KVMIO, 0x05, _NENT.size)
# VM ioctls
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG: Final = _IOW(KVMIO, 0x42, _DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, _REGION.size)
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(KVMIO, 0x49, _REGION2.size)
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, _ENABLE_CAP.size)
KVM_CLEAR_DIRTY_LOG: Final = _IOWR(KVMIO, 0xC0, _CLEAR_DIRTY_LOG.size)
KVM_RESET_DIRTY_RINGS: Final = _IO(KVMIO, 0xC7)
KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, _CREATE_GUEST_MEMFD.size)
# vCPU ioctls
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, _KVM_REGS_SIZE)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, _KVM_REGS_SIZE)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, _KVM_SREGS_SIZE)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, _KVM_SREGS_SIZE)
KVM_TRANSLATE: Final = _IOWR(KVMIO, 0x85, _TRANSLATION.size)
KVM_GET_MSRS: Final = _IOWR(KVMIO, 0x88, _NENT.size)
KVM_SET_MSRS: Final = _IOW(KVMIO, 0x89, _NENT.size)
KVM_GET_FPU: Final = _IOR(KVMIO, 0x8C, _FPU.size)
KVM_SET_FPU: Final = _IOW(KVMIO, 0x8D, _FPU.size)
KVM_SET_CPUID2: Final = _IOW(KVMIO, 0x90, _NENT.size)
KVM_GET_MP_STATE: Final = _IOR(KVMIO, 0x98, _MP_STATE.size)
KVM_SET_MP_STATE: Final = _IOW(KVMIO, 0x99, _MP_STATE.size)
KVM_GET_VCPU_EVENTS: Final = _IOR(KVMIO, 0x9F, _VCPU_EVENTS.size)
KVM_SET_VCPU_EVENTS: Final = _IOW(KVMIO, 0xA0, _VCPU_EVENTS.size)
KVM_GET_XSAVE: Final = _IOR(KVMIO, 0xA4, _XSAVE_SIZE)
KVM_SET_XSAVE: Final = _IOW(KVMIO, 0xA5, _XSAVE_SIZE)
KVM_GET_XSAVE2: Final = _IOR(KVMIO, 0xCF, _XSAVE_SIZE)

# capabilities
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_X86_SMM: Final = 117
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL: Final = 223
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: Final = 225
# the dirty ring's pages in a vCPU fd's mmap space (x86, arm64), in pages
KVM_DIRTY_LOG_PAGE_OFFSET: Final = 64
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_SYNC_REGS: Final = 74
KVM_CAP_XSAVE2: Final = 208

# kvm_userspace_memory_region(2).flags
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0]
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1

# kvm_run.exit_reason (the ones kvmem's engine meets)
KVM_EXIT_IO: Final = 2
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_DIRTY_RING_FULL: Final = 31

# kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS takes from the struct
KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW: Final = 1 << 2
KVM_VCPUEVENT_VALID_SMM: Final = 1 << 3

# kvm_mp_state.mp_state (the one a vCPU without an in-kernel irqchip can be in)
KVM_MP_STATE_RUNNABLE: Final = 0

# the kernel answers E2BIG (and the count it needs) to a too-small KVM_GET_SUPPORTED_CPUID or
# KVM_GET_MSR_INDEX_LIST; these bound the retries
_MAX_CPUID_ENTRIES: Final = 1 << 12
_MAX_MSR_INDICES: Final = 1 << 14

_PAGE_SHIFT: Final = 12
_INT_MAX: Final = (1 << 31) - 1


def dirty_bitmap_bytes(npages: int) -> int:
    """Bytes of a slot's dirty bitmap: one bit per page, in whole 64-bit words."""
    return ((npages + 63) // 64) * 8


def _fit(name: str, value: int, bits: int) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name}={value:#x} does not fit the kernel's u{bits} field")
    return value


def _int_arg(name: str, value: int) -> int:
    # An ioctl taking its argument by value gets it through fcntl's C `int`; keep it
    # non-negative so the kernel's `unsigned long` sees the same number the caller wrote.
    if not 0 <= value <= _INT_MAX:
        raise ValueError(f"{name}={value:#x} does not fit the ioctl's argument (0..{_INT_MAX:#x})")
    return value


class _FdOwner:
    """Owns one fd: `fd` while open, `close()` once (later calls do nothing), `with` support,
    and `_ioctl`, which turns the kernel's refusal into an `OSError` naming the call."""

    _kind = "fd"

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self._kind} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ioctl(self, name: str, request: int, arg: int | bytearray = 0, **fields: int) -> int:
        fd = self.fd
        try:
            if isinstance(arg, bytearray):
                # mutate_flag=True: the kernel's return value comes back, and any struct
                # fields it wrote are copied back into `arg`
                return int(fcntl.ioctl(fd, request, arg, True))
            return fcntl.ioctl(fd, request, arg)
        except OSError as e:
            args = " ".join(f"{k}={v:#x}" for k, v in fields.items())
            raise OSError(e.errno, f"{name}({args}): {e.strerror}") from None


@dataclass
class KvmRegs:
    """struct kvm_regs (x86-64 general registers)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2

    def pack(self) -> bytes:
        return _REGS.pack(*(_fit(k, v, 64) for k, v in vars(self).items()))

    @classmethod
    def unpack(cls, raw: bytes) -> KvmRegs:
        return cls(*_REGS.unpack(raw))


@dataclass
class KvmSegment:
    """struct kvm_segment."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the uapi's name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def pack(self) -> bytes:
        f = vars(self)
        return _SEGMENT.pack(
            _fit("base", f["base"], 64),
            _fit("limit", f["limit"], 32),
            _fit("selector", f["selector"], 16),
            *(_fit(k, f[k], 8) for k in _SEGMENT_U8_FIELDS),
            0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> KvmSegment:
        return cls(*_SEGMENT.unpack(raw)[:-1])


_SEGMENT_NAMES: Final = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SREGS_U64_FIELDS: Final = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_SEGMENT_U8_FIELDS: Final = ("type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")


@dataclass
class KvmSregs:
    """struct kvm_sregs: segments and descriptor tables as (base, limit), control registers,
    and the raw pending-interrupt bitmap."""

    cs: KvmSegment
    ds: KvmSegment
    es: KvmSegment
    fs: KvmSegment
    gs: KvmSegment
    ss: KvmSegment
    tr: KvmSegment
    ldt: KvmSegment
    gdt: tuple[int, int]
    idt: tuple[int, int]
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, int, int, int]

    def pack(self) -> bytes:
        segs = b"".join(getattr(self, n).pack() for n in _SEGMENT_NAMES)
        tables = b"".join(
            _DTABLE.pack(_fit(f"{n}.base", base, 64), _fit(f"{n}.limit", limit, 16))
            for n, (base, limit) in (("gdt", self.gdt), ("idt", self.idt))
        )
        tail = _SREGS_TAIL.pack(
            *(_fit(n, getattr(self, n), 64) for n in _SREGS_U64_FIELDS),
            *(_fit(f"interrupt_bitmap[{i}]", w, 64) for i, w in enumerate(self.interrupt_bitmap)),
        )
        return segs + tables + tail

    @classmethod
    def unpack(cls, raw: bytes) -> KvmSregs:
        n = _SEGMENT.size
        segs = [KvmSegment.unpack(raw[i * n:(i + 1) * n]) for i in range(8)]
        off = 8 * n
        gdt = _DTABLE.unpack_from(raw, off)
        idt = _DTABLE.unpack_from(raw, off + _DTABLE.size)
        tail = _SREGS_TAIL.unpack_from(raw, off + 2 * _DTABLE.size)
        cs, ds, es, fs, gs, ss, tr, ldt = segs
        return cls(cs, ds, es, fs, gs, ss, tr, ldt, (gdt[0], gdt[1]), (idt[0], idt[1]),
                   tail[0], tail[1], tail[2], tail[3], tail[4], tail[5], tail[6],
                   (tail[7], tail[8], tail[9], tail[10]))


def _fit_bytes(name: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {value!r:.40}")
    return bytes(value)


@dataclass
class KvmFpu:
    """struct kvm_fpu: the x87 stack in FXSAVE order (`fpr[i]` is ST(i), 10 significant bytes
    of 16), the abridged tag word `ftwx` (bit i: physical register i is not empty), and the SSE
    registers."""

    fpr: tuple[bytes, ...] = (bytes(16),) * 8
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: tuple[bytes, ...] = (bytes(16),) * 16
    mxcsr: int = 0x1F80

    def pack(self) -> bytes:
        if len(self.fpr) != 8 or len(self.xmm) != 16:
            raise ValueError(f"kvm_fpu has 8 fpr and 16 xmm, got {len(self.fpr)} and "
                             f"{len(self.xmm)}")
        fpr = b"".join(_fit_bytes(f"fpr[{i}]", v, 16) for i, v in enumerate(self.fpr))
        xmm = b"".join(_fit_bytes(f"xmm[{i}]", v, 16) for i, v in enumerate(self.xmm))
        return _FPU.pack(fpr, _fit("fcw", self.fcw, 16), _fit("fsw", self.fsw, 16),
                         _fit("ftwx", self.ftwx, 8), _fit("last_opcode", self.last_opcode, 16),
                         _fit("last_ip", self.last_ip, 64), _fit("last_dp", self.last_dp, 64),
                         xmm, _fit("mxcsr", self.mxcsr, 32))

    @classmethod
    def unpack(cls, raw: bytes) -> KvmFpu:
        fpr, fcw, fsw, ftwx, fop, fip, fdp, xmm, mxcsr = _FPU.unpack(raw)
        return cls(tuple(fpr[i:i + 16] for i in range(0, 128, 16)), fcw, fsw, ftwx, fop, fip,
                   fdp, tuple(xmm[i:i + 16] for i in range(0, 256, 16)), mxcsr)


@dataclass(frozen=True)
class KvmCpuidEntry:
    """struct kvm_cpuid_entry2: CPUID leaf `function`, subleaf `index`, KVM_CPUID_FLAG_*."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def pack(self) -> bytes:
        return _CPUID_ENTRY2.pack(*(_fit(k, v, 32) for k, v in vars(self).items()))

    @classmethod
    def unpack(cls, raw: bytes) -> KvmCpuidEntry:
        return cls(*_CPUID_ENTRY2.unpack(raw))


@dataclass
class KvmVcpuEvents:
    """struct kvm_vcpu_events, flattened: `<group>_<field>` for the uapi's nested structs.
    On KVM_SET_VCPU_EVENTS the kernel reads nmi_pending, sipi_vector, interrupt_shadow and the
    smi fields only where `flags` has the matching KVM_VCPUEVENT_VALID_* bit."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_smm_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    _WIDTHS = (8, 8, 8, 8, 32, 8, 8, 8, 8, 8, 8, 8, 32, 32, 8, 8, 8, 8, 8, 8, 64)

    def pack(self) -> bytes:
        return _VCPU_EVENTS.pack(*(_fit(k, v, bits) for (k, v), bits in
                                   zip(vars(self).items(), self._WIDTHS, strict=True)))

    @classmethod
    def unpack(cls, raw: bytes) -> KvmVcpuEvents:
        return cls(*_VCPU_EVENTS.unpack(raw))


@dataclass(frozen=True)
class KvmTranslation:
    """What KVM_TRANSLATE reports for one linear address, with the vCPU's current paging."""

    linear_address: int
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


@dataclass(frozen=True)
class KvmIo:
    """kvm_run.io of a KVM_EXIT_IO: `count` transfers of `size` bytes at `data_offset` of the
    run page."""

    is_write: bool
    size: int
    port: int
    count: int
    data_offset: int


@dataclass(frozen=True)
class KvmMmio:
    """kvm_run.mmio of a KVM_EXIT_MMIO."""

    phys_addr: int
    data: bytes
    len: int
    is_write: bool


@dataclass(frozen=True)
class KvmCaps:
    """What this kernel offers a default VM, for the parts kvmem models."""

    nr_memslots: int  # user slot ids are 0 .. nr_memslots-1
    address_spaces: int  # memslot address spaces of a VM (as_id < this); 1 without SMM
    readonly_mem: bool
    manual_dirty_log_protect: int  # mask of KVM_DIRTY_LOG_* bits the kernel accepts
    dirty_ring_max_bytes: int  # 0: no dirty ring
    user_memory2: bool
    guest_memfd: bool
    smm: bool
    # on /dev/kvm: the attributes KVM_SET_MEMORY_ATTRIBUTES could take (0: no such ioctl),
    # the x86 VM types KVM_CREATE_VM takes (bit n = type n) and the guest_memfd flags
    memory_attributes: int = 0
    vm_types: int = 1
    guest_memfd_flags: int = 0


class Kvm(_FdOwner):
    """The `/dev/kvm` fd: system ioctls and VM creation."""

    _kind = "/dev/kvm fd"

    def __init__(self, path: str = KVM_PATH) -> None:
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def api_version(self) -> int:
        return self._ioctl("KVM_GET_API_VERSION", KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self._ioctl(
            "KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, _int_arg("cap", cap), cap=cap
        )

    def vcpu_mmap_size(self) -> int:
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, type: int = 0) -> KvmVm:
        vcpu_mmap_size = self.vcpu_mmap_size()
        fd = self._ioctl("KVM_CREATE_VM", KVM_CREATE_VM, _int_arg("type", type), type=type)
        return KvmVm(fd, vcpu_mmap_size)

    def get_supported_cpuid(self) -> list[KvmCpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can give a guest (a start for
        KVM_SET_CPUID2)."""
        nent = 256
        while True:
            arg = bytearray(_NENT.pack(nent) + bytes(nent * _CPUID_ENTRY2.size))
            try:
                self._ioctl("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID, arg, nent=nent)
            except OSError as e:
                if e.errno != errno.E2BIG or nent >= _MAX_CPUID_ENTRIES:
                    raise
                nent *= 2
                continue
            n = _NENT.unpack_from(arg)[0]
            size = _CPUID_ENTRY2.size
            return [KvmCpuidEntry.unpack(bytes(arg[_NENT.size + i * size:
                                                   _NENT.size + (i + 1) * size]))
                    for i in range(n)]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM_GET_MSRS / KVM_SET_MSRS save and restore."""
        n = 256
        while True:
            arg = bytearray(_MSR_LIST.pack(n) + bytes(4 * n))
            try:
                self._ioctl("KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST, arg, nmsrs=n)
            except OSError as e:
                if e.errno != errno.E2BIG or n >= _MAX_MSR_INDICES:
                    raise
                n *= 2
                continue
            count = _MSR_LIST.unpack_from(arg)[0]
            return list(struct.unpack_from(f"={count}I", arg, _MSR_LIST.size))

    def caps(self) -> KvmCaps:
        """Read the capabilities. Values that depend on the VM (address spaces, memslots,
        guest_memfd, ...) come from a throwaway default VM's fd where the kernel answers
        KVM_CHECK_EXTENSION there, else from /dev/kvm."""
        with self.create_vm() as vm:
            vm_answers = self.check_extension(KVM_CAP_CHECK_EXTENSION_VM) > 0
            check = vm.check_extension if vm_answers else self.check_extension
            return KvmCaps(
                nr_memslots=check(KVM_CAP_NR_MEMSLOTS),
                address_spaces=max(1, check(KVM_CAP_MULTI_ADDRESS_SPACE)),
                readonly_mem=check(KVM_CAP_READONLY_MEM) > 0,
                manual_dirty_log_protect=check(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
                dirty_ring_max_bytes=check(KVM_CAP_DIRTY_LOG_RING),
                user_memory2=check(KVM_CAP_USER_MEMORY2) > 0,
                guest_memfd=check(KVM_CAP_GUEST_MEMFD) > 0,
                smm=check(KVM_CAP_X86_SMM) > 0,
                memory_attributes=self.check_extension(KVM_CAP_MEMORY_ATTRIBUTES),
                vm_types=self.check_extension(KVM_CAP_VM_TYPES),
                guest_memfd_flags=self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS),
            )


class KvmVm(_FdOwner):
    """A VM fd (made by `Kvm.create_vm`): memslots, dirty logging, capabilities, vCPUs.

    Guest memory passed as `hva` belongs to the caller, who keeps it mapped while the VM may
    use it. `slot` is always the uapi's u32: `(as_id << 16) | id`."""

    _kind = "KVM VM fd"

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size
        # pages of every slot installed through this object, keyed by the u32 `slot`:
        # the size of the bitmap the kernel will write for KVM_GET_DIRTY_LOG
        self._npages: dict[int, int] = {}

    def check_extension(self, cap: int) -> int:
        return self._ioctl(
            "KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, _int_arg("cap", cap), cap=cap
        )

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        arg = bytearray(
            _REGION.pack(
                _fit("slot", slot, 32),
                _fit("flags", flags, 32),
                _fit("gpa", gpa, 64),
                _fit("size", size, 64),
                _fit("hva", hva, 64),
            )
        )
        self._ioctl(
            "KVM_SET_USER_MEMORY_REGION",
            KVM_SET_USER_MEMORY_REGION,
            arg,
            slot=slot,
            flags=flags,
            gpa=gpa,
            size=size,
            hva=hva,
        )
        self._installed(slot, size)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        arg = bytearray(
            _REGION2.pack(
                _fit("slot", slot, 32),
                _fit("flags", flags, 32),
                _fit("gpa", gpa, 64),
                _fit("size", size, 64),
                _fit("hva", hva, 64),
                _fit("guest_memfd_offset", guest_memfd_offset, 64),
                _fit("guest_memfd", guest_memfd, 32),
            )
        )
        self._ioctl(
            "KVM_SET_USER_MEMORY_REGION2",
            KVM_SET_USER_MEMORY_REGION2,
            arg,
            slot=slot,
            flags=flags,
            gpa=gpa,
            size=size,
            hva=hva,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
        )
        self._installed(slot, size)

    def _installed(self, slot: int, size: int) -> None:
        # Called only after the kernel accepted the request, so this mirrors its slot sizes:
        # size 0 deleted the slot; anything else created it or kept its size (MOVE/FLAGS_ONLY).
        if size == 0:
            self._npages.pop(slot, None)
        else:
            self._npages[slot] = size >> _PAGE_SHIFT

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap, `dirty_bitmap_bytes(npages)` bytes, bit i
        (little-endian within each byte) = page i of the slot."""
        _fit("slot", slot, 32)
        known = self._npages.get(slot)
        if known is not None and npages != known:
            raise ValueError(
                f"slot {slot:#x} has {known} pages, not {npages}: the kernel writes a bitmap "
                "as long as the slot's"
            )
        if npages < 0:
            raise ValueError(f"npages={npages} is negative")
        bitmap = ctypes.create_string_buffer(dirty_bitmap_bytes(npages))
        arg = bytearray(_DIRTY_LOG.pack(slot, ctypes.addressof(bitmap)))
        self._ioctl("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, arg, slot=slot)
        return bitmap.raw

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear (and re-protect) the pages whose bit is set in `bitmap`,
        bit 0 being `first_page`. The kernel reads `dirty_bitmap_bytes(num_pages)` bytes."""
        needed = dirty_bitmap_bytes(_fit("num_pages", num_pages, 32))
        if len(bitmap) < needed:
            raise ValueError(
                f"bitmap has {len(bitmap)} bytes; the kernel reads {needed} for {num_pages} pages"
            )
        buffer = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
        arg = bytearray(
            _CLEAR_DIRTY_LOG.pack(
                _fit("slot", slot, 32),
                num_pages,
                _fit("first_page", first_page, 64),
                ctypes.addressof(buffer),
            )
        )
        self._ioctl(
            "KVM_CLEAR_DIRTY_LOG",
            KVM_CLEAR_DIRTY_LOG,
            arg,
            slot=slot,
            first_page=first_page,
            num_pages=num_pages,
        )

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        if len(args) > 4:
            raise ValueError(f"kvm_enable_cap has 4 args, got {len(args)}")
        values = [_fit(f"args[{i}]", a, 64) for i, a in enumerate(args)]
        values += [0] * (4 - len(values))
        arg = bytearray(_ENABLE_CAP.pack(_fit("cap", cap, 32), _fit("flags", flags, 32), *values))
        fields = {f"args{i}": a for i, a in enumerate(args)}
        return self._ioctl("KVM_ENABLE_CAP", KVM_ENABLE_CAP, arg, cap=cap, flags=flags, **fields)

    def enable_manual_dirty_log_protect(self, initially_set: bool) -> None:
        mode = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            mode |= KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, mode)

    def enable_dirty_ring(self, nbytes: int, acq_rel: bool = False) -> None:
        """Switch the VM to the dirty ring: `nbytes` per vCPU (power of two, before any vCPU);
        `acq_rel` names KVM_CAP_DIRTY_LOG_RING_ACQ_REL instead."""
        self.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else KVM_CAP_DIRTY_LOG_RING,
                        nbytes)

    def reset_dirty_rings(self) -> int:
        """Recycle harvested ring entries of every vCPU; returns how many were reset."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS", KVM_RESET_DIRTY_RINGS)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """A new guest_memfd of `size` bytes; the caller owns (and closes) the returned fd."""
        arg = bytearray(_CREATE_GUEST_MEMFD.pack(_fit("size", size, 64), _fit("flags", flags, 64)))
        return self._ioctl(
            "KVM_CREATE_GUEST_MEMFD", KVM_CREATE_GUEST_MEMFD, arg, size=size, flags=flags
        )

    def create_vcpu(self, id: int) -> KvmVcpu:
        # the size of this VM's XSAVE image: KVM_SET_XSAVE reads that many bytes
        xsave_size = max(_XSAVE_SIZE, self.check_extension(KVM_CAP_XSAVE2))
        fd = self._ioctl("KVM_CREATE_VCPU", KVM_CREATE_VCPU, _int_arg("id", id), id=id)
        sync = self.check_extension(KVM_CAP_SYNC_REGS)
        try:
            return KvmVcpu(fd, self._vcpu_mmap_size, xsave_size, sync)
        except BaseException:
            os.close(fd)
            raise


# vCPU ioctls that change nothing KVM_GET_SREGS reads (KVM_GET_VCPU_EVENTS may: it delivers
# a pending #PF's payload into CR2; KVM_GET_MP_STATE accepts APIC events)
_READS: Final = frozenset({KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_FPU, KVM_GET_XSAVE,
                           KVM_GET_XSAVE2, KVM_GET_MSRS, KVM_TRANSLATE})


def pack_msrs(entries: Sequence[tuple[int, int]]) -> bytes:
    """struct kvm_msrs with `entries` (index, value): KVM_SET_MSRS' argument."""
    return _NENT.pack(_fit("nmsrs", len(entries), 32)) + b"".join(
        _MSR_ENTRY.pack(_fit(f"entries[{i}].index", m, 32), _fit(f"entries[{i}].data", v, 64))
        for i, (m, v) in enumerate(entries))


def pack_mp_state(mp_state: int) -> bytes:
    """struct kvm_mp_state: KVM_SET_MP_STATE's argument."""
    return _MP_STATE.pack(_fit("mp_state", mp_state, 32))


class KvmVcpu(_FdOwner):
    """A vCPU fd (made by `KvmVm.create_vcpu`) and its shared `kvm_run` mapping."""

    _kind = "KVM vCPU fd"

    def __init__(self, fd: int, mmap_size: int, xsave_size: int = _XSAVE_SIZE,
                 sync_regs: int = 0) -> None:
        self.kvm_run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        super().__init__(fd)
        self.xsave_size = xsave_size
        # the KVM_SYNC_X86_* sets KVM_RUN can load from kvm_run (KVM_CAP_SYNC_REGS)
        self.sync_regs = sync_regs
        self._rings: list[mmap.mmap] = []
        # KVM stores the vCPU's kvm_sregs in kvm_run at the end of every KVM_RUN (store_regs,
        # for kvm_valid_regs): what they are until another ioctl of the vCPU may change them
        self._sregs_current = False
        if sync_regs & KVM_SYNC_X86_SREGS:
            _DIRTY_REGS.pack_into(self.kvm_run, _VALID_REGS_OFFSET, KVM_SYNC_X86_SREGS)

    # -- staged registers (KVM_CAP_SYNC_REGS) ----------------------------------------------
    # `stage` puts packed kvm_regs / kvm_vcpu_events into kvm_run's sync area and sets their
    # kvm_dirty_regs bits: the next KVM_RUN loads them (regs, then events, as KVM_SET_REGS
    # then KVM_SET_VCPU_EVENTS would) with no ioctl of their own. Every other ioctl of this
    # vCPU first loads what is still staged by those very ioctls (`flush`), so a read sees
    # the staged state and a write lands after it: staging is invisible but for its cost.
    def stage(self, regs: bytes | bytearray, events: bytes | bytearray) -> bool:
        """Stage `regs` (packed kvm_regs) and `events` (packed kvm_vcpu_events) for the
        next KVM_RUN; False (nothing staged) where KVM cannot sync them."""
        want = KVM_SYNC_X86_REGS | KVM_SYNC_X86_EVENTS
        if self.sync_regs & want != want:
            return False
        run = self.kvm_run
        run[_SYNC_REGS_OFFSET:_SYNC_REGS_OFFSET + _KVM_REGS_SIZE] = regs
        run[_SYNC_EVENTS_OFFSET:_SYNC_EVENTS_OFFSET + _VCPU_EVENTS.size] = events
        _DIRTY_REGS.pack_into(run, _DIRTY_REGS_OFFSET,
                              _DIRTY_REGS.unpack_from(run, _DIRTY_REGS_OFFSET)[0] | want)
        return True

    @property
    def staged(self) -> int:
        """The KVM_SYNC_X86_* sets staged and not yet loaded (kvm_dirty_regs)."""
        return int(_DIRTY_REGS.unpack_from(self.kvm_run, _DIRTY_REGS_OFFSET)[0])

    def flush(self) -> None:
        """Load what is staged now, by KVM_SET_REGS / KVM_SET_VCPU_EVENTS (in KVM_RUN's
        order), and clear it."""
        run = self.kvm_run
        dirty = _DIRTY_REGS.unpack_from(run, _DIRTY_REGS_OFFSET)[0]
        if not dirty:
            return
        if dirty & KVM_SYNC_X86_REGS:
            self._ioctl_now("KVM_SET_REGS", KVM_SET_REGS, bytearray(
                run[_SYNC_REGS_OFFSET:_SYNC_REGS_OFFSET + _KVM_REGS_SIZE]))
            dirty &= ~KVM_SYNC_X86_REGS
            _DIRTY_REGS.pack_into(run, _DIRTY_REGS_OFFSET, dirty)
        if dirty & KVM_SYNC_X86_EVENTS:
            self._ioctl_now("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, bytearray(
                run[_SYNC_EVENTS_OFFSET:_SYNC_EVENTS_OFFSET + _VCPU_EVENTS.size]))
            dirty &= ~KVM_SYNC_X86_EVENTS
            _DIRTY_REGS.pack_into(run, _DIRTY_REGS_OFFSET, dirty)

    def _ioctl(self, name: str, request: int, arg: int | bytearray = 0, **fields: int) -> int:
        if request != KVM_RUN and not self.closed and \
                _DIRTY_REGS.unpack_from(self.kvm_run, _DIRTY_REGS_OFFSET)[0]:
            self.flush()
        return self._ioctl_now(name, request, arg, **fields)

    def _ioctl_now(self, name: str, request: int, arg: int | bytearray = 0,
                   **fields: int) -> int:
        if request != KVM_RUN:
            if request not in _READS:
                # before the call: one that fails half-way may have changed them already
                self._sregs_current = False
            return super()._ioctl(name, request, arg, **fields)
        self._sregs_current = False
        try:
            r = super()._ioctl(name, request, arg, **fields)
        except OSError as e:
            # KVM_RUN stores them on its way out (x86's `out:` label), also when a signal or
            # immediate_exit ends it (EINTR); the errors it returns before are EIO/EINVAL
            if e.errno == errno.EINTR:
                self._sregs_current = True
            raise
        self._sregs_current = True
        return r

    def sregs_are(self, sregs: bytes | bytearray) -> bool:
        """The vCPU's segment and control registers are exactly `sregs` (packed kvm_sregs),
        as KVM stored them in kvm_run when the last KVM_RUN returned, no ioctl since having
        been one that may change them — known without an ioctl. False where unknown."""
        if not self._sregs_current:
            return False
        return self.kvm_run[_SYNC_SREGS_OFFSET:_SYNC_SREGS_OFFSET + _KVM_SREGS_SIZE] == sregs

    def map_dirty_ring(self, nbytes: int, flags: int = mmap.MAP_SHARED,
                       prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> mmap.mmap:
        """mmap the vCPU's dirty ring: `nbytes` (the VM's ring size) from page
        KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU fd, an array of 16-byte `struct
        kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}`. Unmapped by `close`."""
        ring = mmap.mmap(self.fd, nbytes, flags, prot,
                         offset=KVM_DIRTY_LOG_PAGE_OFFSET << _PAGE_SHIFT)
        self._rings.append(ring)
        return ring

    @property
    def exit_reason(self) -> int:
        return int(_EXIT_REASON.unpack_from(self.kvm_run, _EXIT_REASON_OFFSET)[0])

    def run(self) -> int:
        """KVM_RUN until the next exit to userspace; returns `kvm_run.exit_reason`."""
        self._ioctl("KVM_RUN", KVM_RUN)
        return self.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run[_IMMEDIATE_EXIT_OFFSET])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        # KVM_RUN returns EINTR at once while this is set (KVM_CAP_IMMEDIATE_EXIT)
        self.kvm_run[_IMMEDIATE_EXIT_OFFSET] = 1 if value else 0

    def get_regs(self) -> KvmRegs:
        arg = bytearray(_REGS.size)
        self._ioctl("KVM_GET_REGS", KVM_GET_REGS, arg)
        return KvmRegs.unpack(bytes(arg))

    def set_regs(self, regs: KvmRegs) -> None:
        self._ioctl("KVM_SET_REGS", KVM_SET_REGS, bytearray(regs.pack()))

    def get_sregs(self) -> KvmSregs:
        arg = bytearray(_KVM_SREGS_SIZE)
        self._ioctl("KVM_GET_SREGS", KVM_GET_SREGS, arg)
        return KvmSregs.unpack(bytes(arg))

    def set_sregs(self, sregs: KvmSregs) -> None:
        self._ioctl("KVM_SET_SREGS", KVM_SET_SREGS, bytearray(sregs.pack()))

    def get_fpu(self) -> KvmFpu:
        arg = bytearray(_FPU.size)
        self._ioctl("KVM_GET_FPU", KVM_GET_FPU, arg)
        return KvmFpu.unpack(bytes(arg))

    def set_fpu(self, fpu: KvmFpu) -> None:
        self._ioctl("KVM_SET_FPU", KVM_SET_FPU, bytearray(fpu.pack()))

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE (KVM_GET_XSAVE2 where the image is larger than 4 KiB): the vCPU's
        x87/SSE/AVX... state in the standard XSAVE layout, `xsave_size` bytes — the legacy
        FXSAVE region (512 bytes), the XSAVE header (XSTATE_BV at 512), the components."""
        arg = bytearray(self.xsave_size)
        if self.xsave_size > _XSAVE_SIZE:
            self._ioctl("KVM_GET_XSAVE2", KVM_GET_XSAVE2, arg)
        else:
            self._ioctl("KVM_GET_XSAVE", KVM_GET_XSAVE, arg)
        return bytes(arg)

    def set_xsave(self, image: bytes | bytearray) -> None:
        """KVM_SET_XSAVE: the kernel reads `xsave_size` bytes, so exactly that many are
        required here. A bytearray is handed to the kernel as it is (it only reads it)."""
        if len(image) != self.xsave_size:
            raise ValueError(f"this VM's XSAVE image is {self.xsave_size} bytes, got "
                             f"{len(image)}: KVM_SET_XSAVE would read past the buffer")
        self._ioctl("KVM_SET_XSAVE", KVM_SET_XSAVE,
                    image if type(image) is bytearray else bytearray(image))

    def set_cpuid2(self, entries: Sequence[KvmCpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID the guest sees (and what KVM lets it enable, e.g. EFER.LME
        only with long mode in leaf 0x80000001)."""
        arg = bytearray(_NENT.pack(_fit("nent", len(entries), 32))
                        + b"".join(e.pack() for e in entries))
        self._ioctl("KVM_SET_CPUID2", KVM_SET_CPUID2, arg, nent=len(entries))

    def get_msrs(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: (index, value) of the MSRs read, in order. The kernel stops at the first
        MSR it cannot read, so a shorter answer than `indices` names that one by its absence."""
        arg = bytearray(_NENT.pack(_fit("nmsrs", len(indices), 32)) + b"".join(
            _MSR_ENTRY.pack(_fit(f"indices[{i}]", m, 32), 0) for i, m in enumerate(indices)))
        n = self._ioctl("KVM_GET_MSRS", KVM_GET_MSRS, arg, nmsrs=len(indices))
        return [_MSR_ENTRY.unpack_from(arg, _NENT.size + i * _MSR_ENTRY.size) for i in range(n)]

    def set_msrs(self, entries: Sequence[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: how many of `entries` (index, value) were written; the kernel stops at
        the first one it refuses."""
        return self._ioctl("KVM_SET_MSRS", KVM_SET_MSRS, bytearray(pack_msrs(entries)),
                           nmsrs=len(entries))

    def call(self, name: str, request: int, payload: bytes | bytearray) -> int:
        """Issue the vCPU ioctl `request` (called `name` in errors) on `payload`, packed
        already — for a caller that loads the same state many times and packs it once
        (`kvm_state.Prepared`). Returns the kernel's value (KVM_SET_MSRS: MSRs written).
        A bytearray is handed to the kernel as it is, not copied: for the KVM_SET_* ioctls
        this is for, the kernel only reads it."""
        return self._ioctl(name, request,
                           payload if type(payload) is bytearray else bytearray(payload))

    def get_vcpu_events(self) -> KvmVcpuEvents:
        arg = bytearray(_VCPU_EVENTS.size)
        self._ioctl("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, arg)
        return KvmVcpuEvents.unpack(bytes(arg))

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        self._ioctl("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, bytearray(events.pack()),
                    flags=events.flags)

    def get_mp_state(self) -> int:
        arg = bytearray(_MP_STATE.size)
        self._ioctl("KVM_GET_MP_STATE", KVM_GET_MP_STATE, arg)
        return int(_MP_STATE.unpack(arg)[0])

    def set_mp_state(self, mp_state: int) -> None:
        arg = bytearray(pack_mp_state(mp_state))
        self._ioctl("KVM_SET_MP_STATE", KVM_SET_MP_STATE, arg, mp_state=mp_state)

    def translate(self, linear_address: int) -> KvmTranslation:
        """KVM_TRANSLATE: the vCPU's page tables applied to `linear_address`."""
        arg = bytearray(_TRANSLATION.pack(_fit("linear_address", linear_address, 64), 0, 0, 0, 0))
        self._ioctl("KVM_TRANSLATE", KVM_TRANSLATE, arg, linear_address=linear_address)
        la, pa, valid, writeable, usermode = _TRANSLATION.unpack(arg)
        return KvmTranslation(la, pa, bool(valid), bool(writeable), bool(usermode))

    def io(self) -> KvmIo:
        """The port I/O of the last KVM_EXIT_IO."""
        d, size, port, count, off = _RUN_IO.unpack_from(self.kvm_run, _RUN_UNION_OFFSET)
        return KvmIo(d == 1, size, port, count, off)

    def io_data(self, io: KvmIo) -> bytes:
        return bytes(self.kvm_run[io.data_offset:io.data_offset + io.size * io.count])

    def set_io_data(self, io: KvmIo, data: bytes) -> None:
        """Answer an IN: the bytes KVM delivers to the guest on the next KVM_RUN."""
        n = io.size * io.count
        if len(data) != n:
            raise ValueError(f"an IN of {io.count}x{io.size} bytes needs {n} bytes, "
                             f"got {len(data)}")
        self.kvm_run[io.data_offset:io.data_offset + n] = data

    def mmio(self) -> KvmMmio:
        """The access of the last KVM_EXIT_MMIO."""
        addr, data, n, w = _RUN_MMIO.unpack_from(self.kvm_run, _RUN_UNION_OFFSET)
        return KvmMmio(addr, data[:n], n, bool(w))

    def set_mmio_data(self, data: bytes) -> None:
        """Answer an MMIO read: up to 8 bytes KVM delivers on the next KVM_RUN."""
        if len(data) > 8:
            raise ValueError(f"kvm_run.mmio.data holds 8 bytes, got {len(data)}")
        self.kvm_run[_RUN_MMIO_DATA_OFFSET:_RUN_MMIO_DATA_OFFSET + len(data)] = data

    def internal_error(self) -> tuple[int, tuple[int, ...]]:
        """kvm_run.internal of a KVM_EXIT_INTERNAL_ERROR: (suberror, data[:ndata])."""
        sub, ndata, *data = _RUN_INTERNAL.unpack_from(self.kvm_run, _RUN_UNION_OFFSET)
        return sub, tuple(data[:min(ndata, 16)])

    def close(self) -> None:
        # unmap first: the mappings keep the vCPU file alive even after its fd is closed
        self.kvm_run.close()
        for ring in self._rings:
            ring.close()
        super().close()


def _accepts(vm: KvmVm, slot: int, gpa: int, hva: int) -> bool:
    """Whether KVM installs a one-page slot at `gpa` backed at `hva`; removes it again."""
    try:
        vm.set_user_memory_region(slot, 0, gpa, 1 << _PAGE_SHIFT, hva)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    vm.set_user_memory_region(slot, 0, gpa, 0, hva)
    return True


def last_accepted(vm: KvmVm, what: str, accepts: Callable[[int], bool], lo: int,
                  hi: int) -> int:
    """The largest x in [lo, hi) the kernel accepts, by bisection, given that it accepts
    `lo`, refuses `hi` and refuses exactly the values above some limit."""
    if not accepts(lo) or accepts(hi):
        raise RuntimeError(f"cannot measure {what}: the kernel does not refuse exactly the "
                           f"values above a limit between {lo:#x} and {hi:#x}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if accepts(mid):
            lo = mid
        else:
            hi = mid
    return lo


_GFN_LIMIT: Final = 1 << (64 - _PAGE_SHIFT)  # a gpa is a u64; the last page's gfn wraps
_LOW_HVA: Final = 0x10000  # any user address: the kernel looks for no mapping behind it


def probe_phys_bits(vm: KvmVm, slot: int = 0) -> int:
    """The guest physical address width `vm` accepts slots in (KVM's max gfn + 1, as a
    power of two), measured with one-page slots at id `slot` (which must be free) — about
    forty ioctls. A measurement, not a check: the kernel answers every request."""
    max_gfn = last_accepted(vm, "the largest gfn",
                            lambda gfn: _accepts(vm, slot, gfn << _PAGE_SHIFT, _LOW_HVA),
                            0, _GFN_LIMIT - 1)
    if max_gfn == _GFN_LIMIT - 2:
        return 64  # every gfn a u64 gpa can start a page at, but the wrapping one
    bits = (max_gfn + 1).bit_length() - 1
    if max_gfn + 1 != 1 << bits:
        raise RuntimeError(f"largest accepted gfn {max_gfn:#x} is not 2^n - 1")
    return bits + _PAGE_SHIFT


def probe_user_va_end(vm: KvmVm, slot: int = 0) -> int:
    """The end of the user address range `vm` accepts slot memory in (access_ok's limit)."""
    last_page = last_accepted(vm, "the end of user VA",
                              lambda page: _accepts(vm, slot, 0, page << _PAGE_SHIFT),
                              _LOW_HVA >> _PAGE_SHIFT, _GFN_LIMIT - 1)
    return (last_page + 1) << _PAGE_SHIFT


def kvm_available(path: str = KVM_PATH) -> str | None:
    """None if `path` opens, speaks API version 12 and creates a VM; else the reason why not."""
    try:
        with Kvm(path) as kvm:
            version = kvm.api_version()
            if version != KVM_API_VERSION:
                return f"{path}: KVM_GET_API_VERSION is {version}, expected {KVM_API_VERSION}"
            kvm.create_vm().close()
    except OSError as e:
        return f"{path} is not usable: {e}"
    return None
