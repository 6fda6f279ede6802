"""KVM's user-visible constants for guest memory, with the values of the kernel's uapi.

Only numbers live here: the rules that use them are in `slots` (validation table) and
`dirty` (dirty-log ioctls).
"""

from __future__ import annotations

from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = PAGE_SIZE - 1

# slot flags (uapi)
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
# kernel-private: bits 16..31 of flags
KVM_MEMSLOT_INVALID: Final = 1 << 16
KVM_SET_USER_MEMORY_REGION_V1_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

KVM_MEM_SLOTS_NUM: Final = 32767  # SHRT_MAX: ids 0..32766 exist internally
KVM_INTERNAL_MEM_SLOTS: Final = 3  # x86: TSS, APIC access page, identity page table
KVM_USER_MEM_SLOTS: Final = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS  # 32764
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1

KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS: Final = 1 << 63

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0]
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1

U16_MAX: Final = (1 << 16) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1

# x86-64 user address space (4-level paging): access_ok() accepts [0, TASK_SIZE_MAX)
TASK_SIZE_MAX: Final = (1 << 47) - PAGE_SIZE
# shadow paging max gfn (52-bit physical addresses); TDP hosts use MAXPHYADDR
DEFAULT_PHYS_BITS: Final = 52
