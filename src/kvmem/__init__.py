"""kvmem — KVM's guest-memory subsystem in Python.

Memory slots in address spaces with KVM's exact rules and errno, atomic batched updates,
guest accessors, per-vCPU views, the gfn→hva cache, dirty bitmaps, and host memory whose
changes are reported as MMU-notifier invalidations.

    import kvmem
    mem = kvmem.HostMemory.anonymous(64 << 20)
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0x0, mem.size, mem.hva)
    vm.write(0x1000, b"hello")
"""

from . import engines as engines  # registers the opener behind Vm(engine=...)
from .errors import GuestAccessError, KvmError, TransactionError
from .host import HostMemory
from .mmu import MemoryFault, MmioExit, TrackedWrite
from .pagetrack import PageTrack, TrackNotifier
from .pfncache import PfnCache
from .slots import Change, ChangeKind, MemorySlot, SlotSet
from .snapshot import Snapshot, SnapshotFormatError
from .uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SIZE,
)
from .vm import SlotsListener, Transaction, Vcpu, Vm

__all__ = [
    "KVM_MEMSLOT_INVALID",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "PAGE_SIZE",
    "Change",
    "ChangeKind",
    "GuestAccessError",
    "HostMemory",
    "KvmError",
    "MemoryFault",
    "MemorySlot",
    "MmioExit",
    "PageTrack",
    "PfnCache",
    "SlotSet",
    "SlotsListener",
    "Snapshot",
    "SnapshotFormatError",
    "TrackNotifier",
    "TrackedWrite",
    "Transaction",
    "TransactionError",
    "Vcpu",
    "Vm",
]

__version__ = "0.1.0"
