"""kvmem.cpu — the architectural state of an x86 vCPU, on both engines.

A `VcpuState` is everything that makes one vCPU what it is (KVM's struct and field names);
`kvm_state` and `uc_state` read and write it on a `/dev/kvm` vCPU and on a Unicorn CPU, so a
guest can stop on one engine and go on on the other. `modes` builds the states a VMM starts
guests in (real, 32-bit protected, 64-bit long, 64-bit user under a ring-0 stub) and the tables
they need; `paging` walks page tables as KVM does; `events` delivers what Unicorn does not
(exceptions, INT n, SYSCALL); `raw` runs one vCPU of either engine over a plain buffer.

Modules, lowest first (each imports only those before it):

    state    VcpuState and its parts, canonical form, serialised form
    paging   translate_gva, kvm_translate, PageFault, PagingFeatures
    events   deliver, deliver_pending, Interrupt, Syscall, TripleFault
    kvm_state / uc_state   get_state / set_state per engine (+ setup_cpuid; UcTrap)
    modes    real_mode, protected_mode, long_mode, user_mode, identity_map
    raw      GuestMemory, KvmCpu, UcCpu, RawExit

Rules: nothing here imports the rest of kvmem except `kvmapi` (self-contained) and `guests`
(data); the engines build on this package, never the reverse.
"""

from __future__ import annotations

from .events import Interrupt, Syscall, TripleFault, deliver, deliver_pending
from .paging import PageFault, PagingFeatures, kvm_translate, paging_mode, translate_gva
from .state import (
    CANONICAL_RULES,
    FORMAT_VERSION,
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

__all__ = [
    "CANONICAL_RULES",
    "FORMAT_VERSION",
    "SUPPORTED_MSRS",
    "DTable",
    "ExceptionEvent",
    "Fpu",
    "Interrupt",
    "InterruptEvent",
    "Msrs",
    "NmiEvent",
    "PageFault",
    "PagingFeatures",
    "Regs",
    "Segment",
    "SmiEvent",
    "Sregs",
    "Syscall",
    "TripleFault",
    "VcpuEvents",
    "VcpuState",
    "canonical",
    "deliver",
    "deliver_pending",
    "kvm_translate",
    "paging_mode",
    "translate_gva",
]
