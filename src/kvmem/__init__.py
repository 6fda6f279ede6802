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
from .gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd
from .host import HostMemory
from .memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE
from .mmu import MemoryFault, MmioExit, TrackedWrite
from .pagetrack import PageTrack, TrackNotifier
from .pfncache import PfnCache
from .slots import Change, ChangeKind, MemorySlot, SlotSet
from .uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SIZE,
)
from .vm import SlotsListener, Transaction, Vcpu, Vm

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_MEMSLOT_INVALID",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "PAGE_SIZE",
    "Change",
    "ChangeKind",
    "GuestAccessError",
    "GuestMemfd",
    "HostMemory",
    "KvmError",
    "MemoryFault",
    "MemorySlot",
    "MmioExit",
    "PageTrack",
    "PfnCache",
    "SlotSet",
    "SlotsListener",
    "TrackNotifier",
    "TrackedWrite",
    "Transaction",
    "TransactionError",
    "Vcpu",
    "Vm",
]

__version__ = "0.1.0"
