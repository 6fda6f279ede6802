"""The VM: kvmem's public face — slot updates and transactions, accessors, vCPUs, caches,
page tracking and the dirty-log ioctls, over the layers below it.

Rules of this room:
- The `Vm` builds its layers bottom up and gives each what it needs: `Memslots` (slot
  sets, SRCU, slots_lock, limits), `Mmu(memslots)`, one `GuestMemory` per address space,
  `PageTrack(memslots, mmu, ...)`, pfn caches. None of them knows the `Vm`.
- Path of one update (DESIGN path 1): validate → (DELETE/MOVE, KVM-exact single updates)
  publish an INVALID copy, zap → publish the new sets → grace period → commit (page
  counts, then, in this order: the MMU, page tracking, listeners). A transaction
  validates the whole batch first, zaps the ranges it unmaps, and publishes once. A
  refused update publishes nothing and changes nothing. Which kinds of change do what is
  the table `slots.KIND_RULES`; nothing here dispatches on kinds.
- Listeners (engines, a VMM's own mirror) are `SlotsListener`s: they hear slot changes,
  dirty-log syncs and tracking transitions through its methods — all declared there,
  with no-op defaults — called with `slots_lock` held, after the layers below.
- Every public method checks its arguments (`kvmem.args`) before it takes a lock.
- guest_memfd files the VM creates are its own (`create_guest_memfd`: owner, invalidator
  = the MMU). Their bindings are the update path's alone: checked with the request (KVM's
  step 18, against the bindings the batch leaves so far), made in one step per file just
  before the publish that shows the new slots, dropped for deleted slots in that same step
  — after a single DELETE's INVALID window began, inside a transaction's invalidation.
  A refused request binds nothing. (A `GuestMemfd.bind` behind the VM's back breaks this.)
- Memory attributes exist on a VM of a private-memory type (`vm_type="sw_protected"`):
  `set_memory_attributes` checks as KVM does, then the MMU changes them inside its
  invalidation bracket under slots_lock. Host accessors and caches ignore them (§8.7).
- Dirty pages: every mark — accessors, caches, the MMU's write faults — goes through the
  VM's one `DirtyMarks` (the slot's bitmap, or the ring of the vCPU loaded on the thread).
  A `Vcpu`'s accessors and guest accesses are made with it loaded; engines load it while
  it runs. Rings are enabled once, before any vCPU (each vCPU gets its ring at creation);
  their reset holds `slots_lock`, walks the vCPUs in creation order and write-protects
  what it freed with one flush.

Deliberate difference from KVM: a MOVE that x86 `prepare` refuses (max gfn, external
write tracker) is refused before the INVALID copy is published, so the generation does
not move; KVM bumps it twice. kvmem's rule is that a refusal changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import operator
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from . import host, sync
from . import memslots as _memslots
from .access import DirtyMarks, GuestMemory, HvaCache
from .args import as_bool, as_bytes, as_int, as_u16, as_u32, as_u64, check_range, check_span
from .contract import EngineCapabilities, EngineError, Exit, Regs
from .cpu import PageFault, PagingFeatures, Sregs, VcpuState, canonical, translate_gva
from .cpu.paging import INVALID_GPA, table_pages
from .dirty import (
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    DirtyBitmap,
    DirtyRing,
    loaded,
)
from .errors import KvmError
from .gmem import GuestMemfd
from .memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE, VM_TYPES
from .memslots import Memslots
from .mmu import MemoryFault, MmioExit, Mmu, Spte, Stage2Access, TrackedWrite
from .pagetrack import PageTrack
from .pfncache import PfnCache
from .slots import (
    Change,
    ChangeKind,
    GmemBinding,
    GmemFile,
    Limits,
    MemorySlot,
    Request,
    SlotSet,
    make_request,
    make_request2,
)
from .snapshot import SlotRecord, Snapshot, VcpuRecord, image_spans
from .uapi import (
    DEFAULT_PHYS_BITS,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE_MAX,
    U16_MAX,
    U64_MAX,
)

__all__ = [
    "Engine",
    "EngineVcpu",
    "MemoryFault",
    "MmioExit",
    "SlotsListener",
    "TrackedWrite",
    "Transaction",
    "Vcpu",
    "Vm",
]


class SlotsListener:
    """What a layer above the Vm (an engine, a VMM's own mirror of the slots) hears. Every
    method may be called; each does nothing unless overridden. All are called with
    `slots_lock` held, after the MMU and page tracking have done their part."""

    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None:
        """A single DELETE/MOVE published the INVALID copy of `slot` and the MMU zapped
        it: drop everything derived from it (KVM's arch_flush_shadow_memslot)."""

    def slots_updating(self, vm: Vm, changes: Sequence[Change]) -> None:
        """A transaction is about to publish `changes`."""

    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        """`changes` are published and no reader uses the old sets any more."""

    def dirty_log_sync(self, vm: Vm, slot: MemorySlot) -> None:
        """A dirty log of `slot` is about to be read: fold the listener's own dirty bits
        into the slot's bitmap (kvm_arch_sync_dirty_log)."""

    def dirty_log_reprotect(self, vm: Vm, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        """Pages whose dirty bits were harvested or cleared were write-protected again: bit
        b of words[i] is page first_page + 64*i + b of `slot`."""

    def track_changed(self, vm: Vm, as_id: int, gfn: int, tracked: bool) -> None:
        """`gfn` became write-tracked (True) or stopped being tracked (False)."""

    def restore_log_armed(self, vm: Vm) -> None:
        """The VM's restore log was armed: from now on every slot is logged, and the
        listener hands the log every page guest code writes (`restore_log_sync`)."""

    def restore_log_sync(self, vm: Vm) -> None:
        """A snapshot or restore is about to read the restore log: fold the listener's own
        dirty bits of every slot into it (and into the slot's bitmap where it logs)."""
    def guest_tables_restored(self, vm: Vm) -> None:
        """A restore copied back pages that hold the guest's page tables (reachable from a
        vCPU's CR3 at the snapshot): drop every translation built from them — a CPU sees
        the guest's own writes to its tables, not a host copy (KVM keeps its shadow pages,
        a TLB its entries)."""

    def dirty_ring_enable(self, vm: Vm, nbytes: int, acq_rel: bool) -> None:
        """`vm.enable_dirty_ring(nbytes)` passed kvmem's checks: enable the listener's own
        rings (an engine's KVM_CAP_DIRTY_LOG_RING). Raising refuses the call; nothing is
        enabled then."""

    def dirty_rings_reset(self, vm: Vm) -> int:
        """`vm.reset_dirty_rings()`: free the harvested entries of the listener's own rings
        (and write-protect their pages again); return how many."""
        return 0


class EngineVcpu(Protocol):
    """The engine's half of a `Vcpu`: what runs its guest code. The `Vm` creates it with the
    `Vcpu` (`Engine.create_vcpu_backend`) and the `Vcpu` calls it — users never hold one.
    `run`, `complete`, the registers and the state belong to the thread that runs the vCPU;
    `kick` may come from any thread. It reaches kvmem only through the `Vcpu`'s and the
    `Vm`'s public interface."""

    def start(self, entry: int, regs: Regs | None = None) -> None:
        """Reset to 32-bit protected mode (flat segments, CPL 0, no paging) at `entry`."""

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None:
        """At any exit; at a read exit (IN, MMIO read) the read is dropped and the
        instruction runs again from the new registers."""

    def get_state(self) -> VcpuState:
        """The whole architectural state (`kvmem.cpu.VcpuState`), at any exit; at a read
        exit the instruction is finished first, with the answer given (zeros without one)."""

    def set_state(self, state: VcpuState) -> None:
        """Load a state taken on any engine; the next `run` goes on from it."""

    def run(self) -> Exit:
        """Run guest code until the next exit."""

    def complete(self, data: bytes) -> None:
        """The answer to the last reading exit (exactly `exit.answer_size` bytes),
        delivered when `run` resumes the guest."""

    def kick(self) -> None:
        """Make a running (or the next) `run` return `ExitKind.KICKED` promptly."""

    def paging_registers(self) -> tuple[Sregs, int]:
        """The segment/control registers and RFLAGS as they stand, changing nothing (unlike
        `get_state`, which finishes a pending read): what a page walk reads."""

    @property
    def paging_features(self) -> PagingFeatures:
        """The guest CPUID facts a page walk depends on (MAXPHYADDR, 1 GiB pages, vendor)."""

    def translate(self, gva: int) -> int | None:
        """The engine's own translation of `gva` as a supervisor read (KVM_TRANSLATE):
        the gpa, `kvmem.cpu.paging.INVALID_GPA` where it does not translate, or None where
        the engine has none (kvmem's walker answers)."""


class Engine(Protocol):
    """What runs guest code on a Vm (`kvmem.engines`: kvm, unicorn): a `SlotsListener`
    attached to one Vm that applies slot deltas in commit order, gives each `Vcpu` the
    backend that runs it, folds its dirty log into kvmem's, and reports its capabilities."""

    name: str
    stats: dict[str, int]

    @property
    def capabilities(self) -> EngineCapabilities: ...

    def attach(self, vm: Vm) -> None:
        """Mirror `vm`'s current slots and listen to it from now on (called by `Vm`)."""

    def create_vcpu_backend(self, vcpu: Vcpu) -> EngineVcpu:
        """The engine's half of `vcpu`, which `vm.create_vcpu` is creating (called by the
        `Vm`, with `slots_lock` held; a refusal leaves no trace in the engine)."""

    def create_guest_memfd(self, size: int, flags: int) -> int | None:
        """The fd of a file to hold the pages of a guest_memfd of the attached Vm that
        kvmem's checks accepted (it becomes the file's own), or None for kvmem's memfd.
        Called only where `capabilities.guest_memfd`; a refusal raises `KvmError`."""

    def close(self) -> None:
        """Stop listening, stop every vCPU, release the engine's resources."""

    def paused(self) -> AbstractContextManager[None]:
        """`with engine.paused():` — no vCPU runs guest code inside the block (each is held
        out of the guest, as a transaction holds them; a `run` in progress goes on after
        it, unaware). A vCPU's state may be read and set from any thread meanwhile."""


# Engines sit above the Vm: `kvmem.engines` registers its opener here on import, so
# `Vm(engine=...)` works without this module importing any engine.
_engine_opener: Callable[[str], Engine] | None = None


def register_engine_opener(opener: Callable[[str], Engine]) -> None:
    global _engine_opener
    _engine_opener = opener


class Vm:
    """A VM's guest memory: slots in address spaces, accessors, vCPUs and dirty logs.

    Defaults are x86 KVM with SMM: 2 address spaces, 32,764 user slots, read-only slots,
    52-bit guest physical addresses.
    """

    # the accessors of address space 0 (kvm_read_guest, kvm_write_guest, kvm_clear_guest),
    # bound in __init__ to the one accessor path, `GuestMemory`
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes | bytearray | memoryview], None]
    clear: Callable[[int, int], None]

    def __init__(
        self,
        address_spaces: int | None = None,
        max_slots: int = KVM_USER_MEM_SLOTS,
        *,
        readonly_mem: bool = True,
        phys_bits: int | None = None,
        user_va_end: int = TASK_SIZE_MAX,
        engine: str | None = None,
        vm_type: str = "default",
    ) -> None:
        """`engine`: None (kvmem alone), "kvm", "unicorn" or "auto" (see `kvmem.engines`);
        `address_spaces` defaults to 2, or to what the engine offers; `phys_bits` to 52, or
        to the engine's width where that is less. Asking an engine for more than it offers
        is EINVAL. `vm_type` (KVM_CREATE_VM's type): "default", or "sw_protected"
        (KVM_X86_SW_PROTECTED_VM: private memory, one address space, kvmem alone — no
        engine offers it, as this host's KVM does not); another name is EINVAL."""
        if address_spaces is not None:
            address_spaces = as_int("address_spaces", address_spaces)
            if not 1 <= address_spaces <= 2:
                raise KvmError(errno.EINVAL, f"address_spaces must be 1 or 2, not "
                                             f"{address_spaces}")
        max_slots = as_int("max_slots", max_slots)
        if not 1 <= max_slots <= KVM_USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, f"max_slots must be in [1, {KVM_USER_MEM_SLOTS}], "
                                         f"not {max_slots}")
        readonly_mem = as_bool("readonly_mem", readonly_mem)
        if phys_bits is not None:
            phys_bits = as_int("phys_bits", phys_bits)
            if not 13 <= phys_bits <= 64:
                raise KvmError(errno.EINVAL, f"phys_bits must be in [13, 64], not {phys_bits}")
        user_va_end = as_int("user_va_end", user_va_end)
        if not PAGE_SIZE <= user_va_end <= 1 << 64 or user_va_end & PAGE_MASK:
            raise KvmError(errno.EINVAL, f"user_va_end {user_va_end:#x} must be a page-aligned "
                                         "address in (0, 2^64]")
        if engine is not None and not isinstance(engine, str):
            raise TypeError(f"engine must be a str or None, not {type(engine).__name__}")
        if not isinstance(vm_type, str):
            raise TypeError(f"vm_type must be a str, not {type(vm_type).__name__}")
        if vm_type not in VM_TYPES:
            raise KvmError(errno.EINVAL, f"KVM_CREATE_VM: unknown vm_type {vm_type!r} "
                                         f"(known: {', '.join(VM_TYPES)})")
        private_memory = VM_TYPES[vm_type][1]
        if private_memory:
            # kvm_arch_has_private_mem: no SMM address space, and no engine runs it
            if engine is not None:
                raise KvmError(errno.EINVAL, f"KVM_CREATE_VM: engines offer only the default "
                                             f"vm_type, not {vm_type!r}")
            if address_spaces not in (None, 1):
                raise KvmError(errno.EINVAL, f"a vm_type {vm_type!r} VM has one address "
                                             f"space, not address_spaces={address_spaces}")
            address_spaces = 1
        # the engine is opened only once every argument of kvmem's own is known to be good,
        # so a refusal leaves no file descriptor behind
        opened: Engine | None = None
        if engine is not None:
            if _engine_opener is None:
                raise KvmError(errno.EINVAL, "no engines registered: import kvmem.engines")
            opened = _engine_opener(engine)
            caps = opened.capabilities
            if address_spaces is None:
                address_spaces = caps.address_spaces
            elif address_spaces > caps.address_spaces:
                opened.close()
                raise KvmError(errno.EINVAL, f"engine {opened.name} offers "
                                             f"{caps.address_spaces} address space(s), not "
                                             f"{address_spaces}")
            if phys_bits is None:
                phys_bits = min(DEFAULT_PHYS_BITS, caps.phys_bits)
            elif phys_bits > caps.phys_bits:
                opened.close()
                raise KvmError(errno.EINVAL, f"engine {opened.name} offers {caps.phys_bits}-bit "
                                             f"guest physical addresses, not {phys_bits}")
        if address_spaces is None:
            address_spaces = 2
        if phys_bits is None:
            phys_bits = DEFAULT_PHYS_BITS
        # guest_memfd slots only where the engine (if any) mirrors them
        self.limits = Limits(address_spaces, max_slots, readonly_mem, phys_bits, user_va_end,
                             guest_memfd=opened is None or opened.capabilities.guest_memfd,
                             dirty_ring_max_bytes=1 << 20 if opened is None
                             else opened.capabilities.dirty_ring_max_bytes)
        self.memslots = Memslots(self.limits)
        self.vm_type = vm_type
        self.mmu = Mmu(self.memslots, private_memory)
        # every mark of a dirty page goes through this one rule: bitmap, or a vCPU's ring
        self._marks = DirtyMarks(self.memslots)
        self.mmu.mark = self._marks
        self._memory = [GuestMemory(self.memslots, as_id, self._marks)
                        for as_id in range(address_spaces)]
        self.page_track = PageTrack(self.memslots, self.mmu, self._memory,
                                    self._track_changed)
        self._manual_dirty_log_protect = 0
        # some gfn was write-tracked once (set at its 0→1 report, never cleared): until
        # then a restore has no tracking to compare
        self._tracked_once = False
        self._vcpus: dict[int, Vcpu] = {}
        self._listeners: tuple[SlotsListener, ...] = ()
        self.read = self._memory[0].read
        self.write = self._memory[0].write
        self.clear = self._memory[0].clear
        self.engine: Engine | None = opened
        # snapshots this VM can be restored to (taken here, or made into it), and what
        # changed since each
        self._bound: dict[int, _Binding] = {}  # by id(snapshot), until it is collected
        self.host_memory: list[host.HostMemory] = []
        """Host memory the VM made itself (`from_snapshot`): the caller closes it."""
        if opened is not None:
            opened.attach(self)

    # -- state --------------------------------------------------------------------------------
    @property
    def address_spaces(self) -> int:
        return self.limits.address_spaces

    @property
    def slots_lock(self) -> sync.Mutex:
        """The mutex every slot change and dirty-log ioctl holds (`Memslots.slots_lock`)."""
        return self.memslots.slots_lock

    def slot_set(self, as_id: int = 0) -> SlotSet:
        """The published slot set of `as_id` (a snapshot: it never changes)."""
        return self.memslots.slot_set(as_id)

    def slots(self, as_id: int = 0) -> list[MemorySlot]:
        """The current slots of `as_id`, in gfn order."""
        return list(self.slot_set(as_id))

    def generation(self, as_id: int = 0) -> int:
        """The memslot generation of `as_id`; bit 63 is set while an update is in flight."""
        return self.slot_set(as_id).generation

    def lookup(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot containing `gfn` in `as_id` (`gfn_to_memslot`), or None."""
        return self.memslots.lookup(gfn, as_id)

    def translate(self, gpa: int) -> int:
        """gpa → hva in address space 0 (read intent); EFAULT where no usable slot is."""
        return self.memslots.translate(gpa, 0)

    def hva_to_gfn_ranges(self, start: int, end: int
                          ) -> Iterator[tuple[MemorySlot, int, int]]:
        """For an hva range [start, end): every (slot, first gfn, end gfn) it backs, in every
        address space — the walk of an MMU-notifier invalidation."""
        return self.memslots.hva_to_gfn_ranges(as_u64("start", start), as_u64("end", end))

    # -- listeners ----------------------------------------------------------------------------
    @staticmethod
    def _check_listener(listener: object) -> None:
        if not isinstance(listener, SlotsListener):
            raise TypeError(f"a listener must be a kvmem.SlotsListener, not "
                            f"{type(listener).__name__}")

    def add_listener(self, listener: SlotsListener) -> None:
        self._check_listener(listener)
        with self.memslots.slots_lock:
            if listener in self._listeners:
                raise KvmError(errno.EEXIST, "listener is already added")
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: SlotsListener) -> None:
        self._check_listener(listener)
        with self.memslots.slots_lock:
            if listener not in self._listeners:
                raise KvmError(errno.ENOENT, "listener was not added")
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    @property
    def listeners(self) -> tuple[SlotsListener, ...]:
        return self._listeners

    def _track_changed(self, as_id: int, gfn: int, tracked: bool) -> None:
        if tracked:
            self._tracked_once = True
        for listener in self._listeners:
            listener.track_changed(self, as_id, gfn, tracked)

    @property
    def private_memory(self) -> bool:
        """kvm_arch_has_private_mem: the VM type has private memory ("sw_protected")."""
        return self.mmu.private_memory

    @property
    def supported_memory_attributes(self) -> int:
        """KVM_CAP_MEMORY_ATTRIBUTES on this VM: PRIVATE for a private-memory VM, else 0."""
        return KVM_MEMORY_ATTRIBUTE_PRIVATE if self.private_memory else 0

    # -- guest_memfd ----------------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: a guest_memfd file of `size` bytes owned by this VM (flags:
        `gmem.GUEST_MEMFD_FLAG_MMAP`, `..._INIT_SHARED`), which `set_memory_region2` binds to
        slots; this VM's MMU hears its invalidations. KVM's checks (§8.2); ENOTTY on a VM
        whose engine does not mirror guest_memfd slots. The pages live in a memfd kvmem
        creates, or in the engine's own file (the KVM engine: a real guest_memfd of its VM,
        which KVM maps for the guest itself)."""
        self.memslots.check_process()
        if not self.limits.guest_memfd:
            raise KvmError(errno.ENOTTY, "KVM_CREATE_GUEST_MEMFD: this VM's engine does not "
                                         "mirror guest_memfd slots")
        engine = self.engine
        # INIT_SHARED only where no memory can be private
        return GuestMemfd.create(size, flags, self, private_memory=self.private_memory,
                                 invalidator=self.mmu,
                                 make_backing=None if engine is None
                                 else engine.create_guest_memfd)

    # -- memory attributes (§8.6) ----------------------------------------------------------------
    def set_memory_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0
                              ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES: give gfns [gpa, gpa + size) `attributes`
        (`KVM_MEMORY_ATTRIBUTE_PRIVATE`, or 0 for shared). All or nothing: the ioctl never
        writes its struct back, and a refusal changes nothing. Attributes belong to gfns,
        not slots (they may be set where no slot is, and outlive slot changes). Every slot
        mapping part of the range is invalidated around the change (its faults retry, its
        sptes go), unless every gfn has `attributes` already. ENOTTY on a VM type without
        private memory, for every input (this host's KVM has no such ioctl); else EINVAL
        for flags, attributes outside `supported_memory_attributes`, an empty or wrapping
        range, or an unaligned one, in that order."""
        self.memslots.check_process()
        gpa, size = as_u64("gpa", gpa), as_u64("size", size)
        attributes, flags = as_u64("attributes", attributes), as_u64("flags", flags)
        if not self.private_memory:
            raise KvmError(errno.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES: not available for a "
                                         f"{self.vm_type} VM")
        supported = self.supported_memory_attributes
        for refused, message in (
                (flags != 0, f"flags {flags:#x} must be 0"),
                (bool(attributes & ~supported),
                 f"attributes {attributes:#x} outside the supported {supported:#x}"),
                (size == 0 or gpa + size > U64_MAX, f"range {gpa:#x}+{size:#x} is empty or "
                                                    "wraps"),
                (bool((gpa | size) & PAGE_MASK), f"range {gpa:#x}+{size:#x} is not "
                                                 "page-aligned")):
            if refused:
                raise KvmError(errno.EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: {message}")
        with self.memslots.slots_lock:
            self.mmu.set_attributes(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, attributes)

    def get_memory_attributes(self, gpa: int) -> int:
        """kvm_get_memory_attributes: the attributes of the gfn of `gpa` (0 = shared)."""
        return self.mmu.attributes.value.get(as_u64("gpa", gpa) >> PAGE_SHIFT)

    # -- the update path ----------------------------------------------------------------------
    def set_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, delete (size 0), move or change flags of a
        slot; `slot` = (as_id << 16) | id. Refusals raise `KvmError` with KVM's errno."""
        self.memslots.check_process()
        self._update(make_request(slot, flags, gpa, size, hva))

    def set_memory_region2(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                           guest_memfd: GuestMemfd | host.HostMemory | None = None,
                           guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2: `set_memory_region`, and with KVM_MEM_GUEST_MEMFD a
        slot bound to pages of `guest_memfd` (a file of this VM) from byte
        `guest_memfd_offset`. Such a slot can only be deleted; it neither logs dirty pages nor
        is read-only. With an MMAP file it is gmem-only: guest code runs on the file's pages,
        host accessors still on `hva`. Without the flag the last two arguments are ignored.
        `guest_memfd` is judged after the overlap check, as KVM judges the fd: None or a
        closed file → EBADF, host memory that is not a guest_memfd → EINVAL."""
        self.memslots.check_process()
        _check_gmem_arg(guest_memfd)
        self._update(make_request2(slot, flags, gpa, size, hva, guest_memfd,
                                   guest_memfd_offset))

    def _update(self, req: Request) -> None:
        """One request, KVM-exact (DESIGN path 1)."""
        ms = self.memslots
        with ms.slots_lock:
            change = ms.prepare(req, ms.active.load(), ms.nr_pages,
                                self.page_track.move_refused, self._initially_set,
                                self._check_single_binding)
            if change.kind is ChangeKind.NONE:
                return
            old = change.old
            if change.unmaps_old:
                # KVM-exact: the slot is INVALID (faults retry, accessors miss) while its
                # mappings go
                assert old is not None
                ms.publish({old.as_id: ms.invalid_copy(old)})
                self.mmu.slot_invalidated(old)
                for listener in self._listeners:
                    listener.slots_invalidated(self, old)
            # a created slot is bound before it is visible; a deleted one is unbound once no
            # fault can reach its file (INVALID faults retry before they ask it)
            self._rebind([change])
            ms.publish({change.as_id: change.apply(ms.active.load()[change.as_id])})
            self._commit([change])

    def _check_single_binding(self, new: MemorySlot, file: object, offset: int
                              ) -> GmemBinding:
        return self._check_binding(new, file, offset, ())

    def _check_binding(self, new: MemorySlot, file: object, offset: int,
                       before: Sequence[Change]) -> GmemBinding:
        """KVM's step 18 (kvm_gmem_bind's checks) for the new slot `new` of a request naming
        `file` at `offset`, after the changes `before` of its batch: the binding, checked
        against the file's bindings as those changes leave them, or KVM's refusal."""
        if file is None or (isinstance(file, host.HostMemory) and file.closed):
            raise KvmError(errno.EBADF, "KVM_MEM_GUEST_MEMFD: no open guest_memfd given")
        if not isinstance(file, GuestMemfd):
            raise KvmError(errno.EINVAL, f"KVM_MEM_GUEST_MEMFD: {file!r} is not a guest_memfd")
        leaving, coming = _binding_moves(before).get(file, ((), ()))
        file.check_bind(new, offset, owner=self, leaving=leaving, coming=coming)
        return GmemBinding(file, offset)

    @staticmethod
    def _rebind(changes: Sequence[Change]) -> None:
        """Make the guest_memfd bindings of `changes` and drop those of the slots they
        delete, one step per file (slots_lock held; lock order slots_lock → the file's
        invalidate lock)."""
        for file, (leaving, coming) in _binding_moves(changes).items():
            assert isinstance(file, GuestMemfd)
            file.rebind(leaving, coming)

    def _commit(self, changes: Sequence[Change]) -> None:
        self.memslots.account(changes)
        self.mmu.slots_committed(changes, self._initially_set)
        self.page_track.slots_committed(changes)
        for listener in self._listeners:
            listener.slots_committed(self, changes)

    def transaction(self) -> Transaction:
        """A batch of slot changes published at once: `with vm.transaction() as tx: ...`."""
        return Transaction(self)

    def _apply_batch(self, requests: Sequence[Request]) -> list[Change]:
        """Validate every request in order against the sets the batch builds; publish them
        all in one swap, or nothing."""
        ms = self.memslots
        ms.check_process()  # KVM answers EIO before it looks at any argument
        with ms.slots_lock:
            changes, sets = ms.plan(requests, self.page_track.move_refused,
                                    self._initially_set, self._check_binding)
            if not changes:
                return []
            self.mmu.slots_updating(changes)
            for listener in self._listeners:
                listener.slots_updating(self, changes)
            # inside the batch's invalidation: a fault that asks a file for a deleted slot's
            # page after this retries (its gfn is in the range); a created slot is bound
            # before it is visible
            self._rebind(changes)
            ms.publish(sets)
            _memslots.carry_dirty_bits(changes)
            self._commit(changes)
            return changes

    # -- accessors ----------------------------------------------------------------------------
    def hva_cache(self, gpa: int, length: int) -> HvaCache:
        """A gfn_to_hva_cache over [gpa, gpa+length) of address space 0. EINVAL for a range
        past 2^64, as KVM answers when gpa + len - 1 wraps."""
        gpa, length = check_span(gpa, length)
        return HvaCache(self._memory[0], gpa, length)

    def pfn_cache(self) -> PfnCache:
        """A new, inactive gfn-to-pfn cache of this VM (`activate` or `activate_hva` it)."""
        return PfnCache(self.memslots, self.mmu, self._memory[0].mark_dirty)

    def invalidate_hva_range(self, start: int, end: int) -> None:
        """The VMM changed its own mapping of [start, end) behind kvmem's back (mmap over
        it, madvise...): run the MMU-notifier invalidation for it, begin and end."""
        start, end = as_u64("start", start), as_u64("end", end)
        if start >= end:
            raise KvmError(errno.EINVAL, f"empty hva range {start:#x}..{end:#x}")
        with host.changes_in_flight():
            self.mmu.invalidate_range_start(start, end)
            self.mmu.invalidate_range_end(start, end)

    # -- vCPUs ------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """The vCPU `vcpu_id` (KVM_CREATE_VCPU): kvmem's memory view of it and, with an
        engine, the CPU that runs its guest code. EEXIST for an id already created."""
        self.memslots.check_process()
        vcpu_id = as_u32("vcpu_id", vcpu_id)
        with self.memslots.slots_lock:
            if vcpu_id in self._vcpus:
                raise KvmError(errno.EEXIST, f"vCPU {vcpu_id} already exists")
            vcpu = Vcpu(self, vcpu_id)
            if self.engine is not None:
                vcpu._attach(self.engine.create_vcpu_backend(vcpu))
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    @property
    def vcpus(self) -> list[Vcpu]:
        return list(self._vcpus.values())

    # -- snapshots ------------------------------------------------------------------------------
    def _paused(self) -> AbstractContextManager[None]:
        return self.engine.paused() if self.engine is not None else contextlib.nullcontext()

    def _arm_restore_log(self) -> None:
        """Every slot is logged from now on (slots_lock held): page views cached before
        are not trusted after (the host epoch moves), no spte stays writable, engines
        mirror every slot with dirty logging on."""
        self.memslots.slots_lock.assert_held()
        log = self.memslots.restore_log
        if log.armed:
            return
        with host.changes_in_flight():
            log.armed = True
        self.mmu.log_all()
        for listener in self._listeners:
            listener.restore_log_armed(self)

    def _harvest(self) -> None:
        """Move what changed since the last harvest into every bound snapshot's account
        (slots_lock held, vCPUs held out of the guest)."""
        for listener in self._listeners:
            listener.restore_log_sync(self)
        pages, _gfns, ranges = self.mmu.take_restore_log()
        if pages or ranges:
            given = False
            for b in self._bound.values():
                if not b.pages and not given:
                    b.pages = pages  # the log's own set, taken: no copy (one binding's)
                    given = True
                else:
                    b.pages |= pages
                b.ranges += ranges

    def _bind(self, snap: Snapshot, b: _Binding) -> None:
        """Remember `snap` as one this VM restores to, until the snapshot is collected."""
        key = id(snap)
        self._bound[key] = b
        weakref.finalize(snap, self._bound.pop, key, None)
        b.generations = self._generations()

    def _generations(self) -> tuple[int, ...]:
        return tuple(map(_generation_of, self.memslots.active.value))

    def snapshot(self) -> Snapshot:
        """The whole VM at this point (`kvmem.Snapshot`): the layout of every address
        space, the memory behind it, every engine vCPU's `VcpuState` (and each vCPU's SMM
        flag), the dirty bitmaps and the dirty-log / tracking configuration. vCPUs are held
        out of the guest meanwhile. From now on the VM logs what changes, so `restore`
        copies back only that. Slots bound to guest_memfd files are refused (EOPNOTSUPP):
        their memory has no hva to copy."""
        self.memslots.check_process()
        with self._paused(), self.memslots.slots_lock:
            layout: list[SlotRecord] = []
            for as_id in range(self.address_spaces):
                for s in self.slot_set(as_id):
                    if s.gmem is not None:
                        raise KvmError(errno.EOPNOTSUPP, f"slot {as_id}:{s.id} is bound to a "
                                                         "guest_memfd: snapshots do not hold "
                                                         "guest_memfd memory")
                    layout.append(SlotRecord(as_id, s.id, s.flags & ~_INTERNAL_FLAGS, s.gpa,
                                             s.size, s.hva))
            self._arm_restore_log()
            self._harvest()
            images: list[tuple[int, bytearray]] = []
            token = host.guard.read_lock()
            try:
                for start, end in image_spans((r.hva, r.hva + r.size) for r in layout):
                    segs, ok = host.views(start, end - start, host.PROT_READ)
                    if ok != end - start:
                        raise KvmError(errno.EFAULT, f"host memory at {start + ok:#x} behind "
                                                     "a slot is unmapped or protected")
                    data = bytearray(end - start)
                    pos = 0
                    for seg in segs:
                        data[pos:pos + len(seg)] = seg
                        pos += len(seg)
                    images.append((start, data))
            finally:
                host.guard.read_unlock(token)
            dirty: dict[tuple[int, int], bytes] = {}
            for as_id in range(self.address_spaces):
                for s in self.slot_set(as_id):
                    if s.dirty_bitmap is not None:
                        for listener in self._listeners:
                            listener.dirty_log_sync(self, s)
                        dirty[(as_id, s.id)] = s.dirty_bitmap.snapshot()
            tracked = [(as_id, g, self.mmu.track_count(as_id, g))
                       for as_id in range(self.address_spaces)
                       for g in self.mmu.tracked_gfns(as_id)]
            vcpus = [VcpuRecord(v.id, v.smm, v.get_state()) for v in self._vcpus.values()]
            snap = Snapshot(address_spaces=self.address_spaces, layout=layout, images=images,
                            vcpus=vcpus, dirty=dirty,
                            manual_dirty_log_protect=self._manual_dirty_log_protect,
                            tracked=tracked,
                            engine=self.engine.name if self.engine is not None else None)
            self._bind(snap, _Binding(snap, {h: h for h, _ in images}))
        return snap

    def restore(self, snap: Snapshot) -> int:
        """Bring the VM back to `snap` (taken from this VM, or made into it by
        `from_snapshot`): the layout (one transaction, only if it changed), the memory —
        only the host pages changed since: guest writes, kvmem's own writes, host
        discards and remaps, and what `mark_dirty` reported — every vCPU's state, the dirty
        bitmaps and tracking. vCPUs are held out of the guest meanwhile. Checked before
        anything changes: a snapshot of another VM (EINVAL), a vCPU the snapshot has and
        the VM lacks (ENOENT), host memory no longer mapped read-write (EFAULT), a layout
        KVM would refuse (its errno); a refused restore changes nothing. Returns the
        number of pages copied back."""
        if not isinstance(snap, Snapshot):
            raise TypeError(f"snap must be a kvmem.Snapshot, not {type(snap).__name__}")
        self.memslots.check_process()
        binding = self._bound.get(id(snap))
        if binding is None:
            raise KvmError(errno.EINVAL, "the snapshot was not taken from this VM (make a VM "
                                         "from it with Vm.from_snapshot)")
        vcpus = self._vcpus
        if not binding.vcpus_checked:  # vCPUs are never destroyed: once true, always true
            for v in snap.vcpus:
                if v.id not in vcpus:
                    raise KvmError(errno.ENOENT, f"the snapshot has vCPU {v.id}, the VM has "
                                                 "not")
                if v.smm and self.address_spaces < 2:
                    raise KvmError(errno.EINVAL, "the snapshot has a vCPU in SMM, the VM has "
                                                 "no SMM address space")
            binding.vcpus_checked = True
        if binding.dst is None:  # else no host change since they were read-write
            for start, size, _src in binding.images:
                if host.accessible(start, size, host.PROT_RW) != size:
                    raise KvmError(errno.EFAULT, f"host memory [{start:#x}, "
                                                 f"{start + size:#x}) of the snapshot is no "
                                                 "longer mapped read-write")
        slots_lock = self.memslots.slots_lock
        with self._paused():
            with slots_lock:
                self._harvest()
                generations = self._generations()
                # none while no slot change was published since the layout was the snapshot's
                requests = [] if binding.generations == generations else \
                    self._layout_requests(binding, generations)
                if not requests:  # the layout is the snapshot's: the memory in the same hold
                    copied = self._restore_memory(snap, binding, generations)
            if requests:
                tx = self.transaction()
                tx._record(requests)
                tx.commit()  # validates the whole batch first: a refusal changes nothing
                generations = self._generations()
                with slots_lock:
                    copied = self._restore_memory(snap, binding, generations)
            if snap.tracked or (self._tracked_once and self.mmu.tracks_any()):
                self._restore_tracking(snap)
            for v in snap.vcpus:
                vcpu = vcpus[v.id]
                if vcpu._smm != v.smm:
                    vcpu.smm = v.smm
                if v.state is not None:  # a VcpuState (`Vcpu.set_state`'s check)
                    if vcpu._backend is not None:
                        vcpu._backend.set_state(v.state)
                    else:
                        vcpu.set_state(v.state)
            # guest page tables put back behind the CPU's back: translations made from what
            # they held since are stale (only pages copied can be tables that changed)
            if self._listeners and (binding.pages or binding.ranges):
                if binding.tables is None:
                    binding.tables = self._table_pages(snap)
                if binding.tables and (not binding.tables.isdisjoint(binding.pages) or any(
                        lo <= t << PAGE_SHIFT < hi for lo, hi in binding.ranges
                        for t in binding.tables)):
                    for listener in self._listeners:
                        listener.guest_tables_restored(self)
            # the pages put back now differ from what every other snapshot saw
            if len(self._bound) > 1:
                for other in self._bound.values():
                    if other is not binding:
                        other.pages |= binding.pages
                        other.ranges += binding.ranges
            binding.pages = set()
            binding.ranges = []
            binding.generations = generations
        return copied

    def _table_pages(self, snap: Snapshot) -> set[int]:
        """The host pages (hva >> PAGE_SHIFT) holding the page tables of the snapshot's
        vCPUs (reachable from their CR3), in the snapshot's memory and layout — as the VM
        has them right after a restore."""
        out: set[int] = set()
        for v in snap.vcpus:
            if v.state is None:
                continue
            as_id = 1 if v.smm else 0
            memory = self._memory[as_id]
            slots = self.slot_set(as_id)
            for gpa in table_pages(memory.read, v.state.sregs):
                s = slots.search(gpa >> PAGE_SHIFT)
                if s is not None:
                    out.add(s.hva_of(gpa >> PAGE_SHIFT) >> PAGE_SHIFT)
        return out

    def _restore_memory(self, snap: Snapshot, b: _Binding, generations: tuple[int, ...]
                        ) -> int:
        """The snapshot's memory and dirty logs, over its layout (slots_lock held, the slot
        sets at `generations`): the pages changed since copied back, every bitmap made the
        snapshot's. Returns the number of pages copied."""
        copied = self._copy_back(b)
        if b.bitmaps_at != generations:
            # which bitmaps to load with what: the same while the slot generations are (every
            # publish moves one, and a slot's bitmap is its own)
            dirty = snap.dirty
            b.bitmaps = [(s.dirty_bitmap, dirty.get((as_id, s.id), b""))
                         for as_id, slots in enumerate(self.memslots.active.value)
                         for s in slots if s.dirty_bitmap is not None]
            b.bitmaps_at = generations
        for bitmap, raw in b.bitmaps:
            bitmap.load(raw)
        self._manual_dirty_log_protect = snap.manual_dirty_log_protect
        return copied

    def _layout_requests(self, b: _Binding, generations: tuple[int, ...]) -> list[Request]:
        """The requests that turn the current layout (at slot `generations`) into the
        snapshot's: delete what differs, create what is missing (none when the layout is
        the same)."""
        if b.generations == generations:
            return []  # no slot change since the layout was the snapshot's
        want = {(r.as_id, r.id): r for r in b.layout}
        have: dict[tuple[int, int], SlotRecord] = {}
        for as_id in range(self.address_spaces):
            for s in self.slot_set(as_id):
                have[(as_id, s.id)] = SlotRecord(as_id, s.id, s.flags & ~_INTERNAL_FLAGS,
                                                 s.gpa, s.size, s.hva)
        if have == want:
            return []
        out = [make_request(r.slot, 0, 0, 0, 0) for k, r in have.items() if want.get(k) != r]
        out += [make_request(r.slot, r.flags, r.gpa, r.size, r.hva)
                for k, r in want.items() if have.get(k) != r]
        return out

    def _copy_back(self, b: _Binding) -> int:
        """Copy the saved bytes of every changed page of `b`'s snapshot back into host
        memory, one copy per run of adjacent pages (raw host copies: nothing logs them).
        Returns the number of pages copied."""
        pages = sorted(b.pages)
        for lo, hi in b.ranges:
            for start, size, _src in b.images:
                a, z = max(lo, start), min(hi, start + size)
                if a < z:
                    pages.extend(range(a >> PAGE_SHIFT, (z + PAGE_SIZE - 1) >> PAGE_SHIFT))
            pages.sort()
        if not pages:
            return 0
        n = len(pages)
        # the runs of adjacent pages: one when the pages are (a guest's sweep, usually; they
        # are distinct unless ranges added some)
        one_run = not b.ranges and pages[-1] - pages[0] == n - 1
        copied = 0
        section = host.guard.current  # a read section (`Srcu.read_lock`, inlined)
        section.append(None)
        try:
            dst = b.dst  # read inside the section: a change that empties it waits for us
            if dst is None:
                dst = self._image_views(b)
            starts = b.starts
            if one_run:  # the whole run in one image with a view: one copy, no walk
                hva, end = pages[0] << PAGE_SHIFT, (pages[-1] + 1) << PAGE_SHIFT
                k = bisect_right(starts, hva) - 1
                if k >= 0:
                    start, size, src = b.images[k]
                    view = dst[k]
                    if end <= start + size and view is not None:
                        view[hva - start:end - start] = src[hva - start:end - start]
                        return n
            i = 0
            while i < n:
                first = pages[i]
                j = n if one_run else i + 1
                while j < n and pages[j] <= pages[j - 1] + 1:
                    j += 1
                hva, end = first << PAGE_SHIFT, (pages[j - 1] + 1) << PAGE_SHIFT
                i = j
                k = bisect_right(starts, hva) - 1
                while k < len(starts) and hva < end:
                    if k < 0 or hva >= starts[k] + b.images[k][1]:
                        k += 1  # a page no image holds (memory of a slot made since)
                        if k < len(starts):
                            hva = max(hva, starts[k])
                        continue
                    start, size, src = b.images[k]
                    stop = min(end, start + size)
                    lo_off, hi_off = hva - start, stop - start
                    copied += (hi_off - lo_off) >> PAGE_SHIFT
                    view = dst[k]
                    if view is not None:
                        view[lo_off:hi_off] = src[lo_off:hi_off]
                    else:
                        segs, _ok = host.views(hva, stop - hva, host.PROT_WRITE)
                        pos = lo_off
                        for seg in segs:
                            seg[:] = src[pos:pos + len(seg)]
                            pos += len(seg)
                    hva = stop
                    k += 1
        finally:
            section.pop()
        return copied

    @staticmethod
    def _image_views(b: _Binding) -> list[memoryview | None]:
        """A view over each image's host memory where one mapping holds it all read-write
        (else None). Kept in `b.dst` when every image has one, until a host change
        empties it (`host.register_view_cache`). Inside a `host.guard` read section."""
        with host.views_lock:
            out: list[memoryview | None] = []
            for start, size, _src in b.images:
                segs, ok = host.views(start, size, host.PROT_RW)
                out.append(segs[0] if len(segs) == 1 and ok == size else None)
            if not host.changing.value and None not in out:
                host.register_view_cache(b)
                b.dst = out
        return out

    def _restore_tracking(self, snap: Snapshot) -> None:
        want = {(a, g): c for a, g, c in snap.tracked}
        have = {(a, g): self.mmu.track_count(a, g) for a in range(self.address_spaces)
                for g in self.mmu.tracked_gfns(a)}
        for (a, g) in set(want) | set(have):
            delta = want.get((a, g), 0) - have.get((a, g), 0)
            for _ in range(abs(delta)):
                if delta > 0:
                    self.page_track.add_gfn(g, a)
                else:
                    self.page_track.remove_gfn(g, a)

    def mark_dirty(self, gpa: int, n: int, as_id: int = 0) -> None:
        """Tell kvmem that [gpa, gpa + n) of `as_id` changed behind its back — written
        through a raw host view (`HostMemory.view()`, an hva, a pfn cache's view) — so the
        next `restore` copies those pages back. Writes through kvmem's accessors, vCPUs and
        host changes (discard, remap) need no call. Pages no slot maps are skipped."""
        gpa, n = check_span(gpa, n)
        as_id = self.memslots.address_space(as_id)
        log = self.memslots.restore_log
        if not log.armed or n == 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + n - 1) >> PAGE_SHIFT
        for s in self.slot_set(as_id).overlapping(first, last + 1):
            lo, hi = max(first, s.base_gfn), min(last + 1, s.end_gfn)
            log.mark_hva(s.hva_of(lo), s.hva_of(hi - 1) + PAGE_SIZE)

    @classmethod
    def from_snapshot(cls, snap: Snapshot, engine: str | None = None) -> Vm:
        """A new VM that is `snap`: new host memory (anonymous, `vm.host_memory`) holding
        the snapshot's memory, the same layout over it, vCPUs with the same ids and states
        (`vm.vcpus`), dirty bitmaps and tracking. `vm.restore
        (snap)` works on it from then on. A snapshot taken on one engine runs on another."""
        if not isinstance(snap, Snapshot):
            raise TypeError(f"snap must be a kvmem.Snapshot, not {type(snap).__name__}")
        vm = cls(address_spaces=snap.address_spaces, engine=engine)
        try:
            moved: dict[int, int] = {}
            for old, data in snap.images:
                mem = host.HostMemory.anonymous(len(data))
                vm.host_memory.append(mem)
                mem.view()[:] = data
                moved[old] = mem.hva
            b = _Binding(snap, moved)
            with vm.transaction() as tx:
                for r in b.layout:
                    tx.set_memory_region(r.slot, r.flags, r.gpa, r.size, r.hva)
            if snap.manual_dirty_log_protect:
                vm.enable_cap_manual_dirty_log_protect(snap.manual_dirty_log_protect)
            for (as_id, sid), raw in snap.dirty.items():
                s = vm.slot_set(as_id).by_id(sid)
                if s is not None and s.dirty_bitmap is not None:
                    s.dirty_bitmap.load(raw)
            vm._restore_tracking(snap)
            for v in snap.vcpus:
                cpu = vm.create_vcpu(v.id)
                cpu.smm = v.smm
                if v.state is not None:
                    cpu.set_state(v.state)
            with vm.memslots.slots_lock:
                vm._arm_restore_log()
                vm._harvest()
                vm._bind(snap, b)
                b.pages, b.ranges = set(), []
        except BaseException:
            if vm.engine is not None:
                vm.engine.close()
            for mem in vm.host_memory:
                mem.close()
            raise
        return vm

    # -- dirty log ioctls ----------------------------------------------------------------------
    def enable_manual_dirty_log_protect(self, initially_set: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GET leaves bits set and CLEAR
        takes them; with `initially_set`, new bitmaps start all set."""
        initially_set = as_bool("initially_set", initially_set)
        mask = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            mask |= KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap_manual_dirty_log_protect(mask)

    def disable_manual_dirty_log_protect(self) -> None:
        """The capability with args[0] = 0: GET harvests again."""
        self.enable_cap_manual_dirty_log_protect(0)

    def enable_cap_manual_dirty_log_protect(self, args0: int, flags: int = 0) -> None:
        """The raw capability: `args0` ∈ {0, 1, 3}, `flags` 0; anything else is EINVAL."""
        self.memslots.check_process()
        args0 = as_u64("args[0]", args0)
        flags = as_u32("flags", flags)
        allowed = self.limits.manual_dirty_log_protect
        if flags or args0 & ~allowed or args0 == KVM_DIRTY_LOG_INITIALLY_SET:
            raise KvmError(errno.EINVAL, f"manual dirty log protect: args[0] {args0:#x} "
                                         f"flags {flags:#x} (valid: 0, 1, 3 and flags 0)")
        with self.memslots.slots_lock:
            self._manual_dirty_log_protect = args0

    @property
    def manual_dirty_log_protect(self) -> int:
        return self._manual_dirty_log_protect

    @property
    def _initially_set(self) -> bool:
        return bool(self._manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    # -- dirty rings (§7.3) ------------------------------------------------------------------
    def enable_dirty_ring(self, size: int, *, acq_rel: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, or _ACQ_REL — the same on x86): every vCPU
        created from now on logs the pages it dirties in a ring of `size` bytes (16 per
        entry), harvested with `vcpu.dirty_ring.harvest()` and freed with
        `reset_dirty_rings()`; GET/CLEAR_DIRTY_LOG answer ENXIO from now on. KVM's checks,
        in KVM's order: no rings here → EINVAL; `size` (args[0], which KVM takes as a u32)
        0 or not a power of two → EINVAL; below a page (or the reserved entries) → EINVAL;
        above the maximum (1 MiB) → E2BIG; rings already on → EINVAL; a vCPU exists →
        EINVAL. Once on, rings stay on."""
        self.memslots.check_process()
        size = as_u64("size", size) & 0xFFFF_FFFF  # kvm_vm_ioctl_enable_dirty_log_ring(u32)
        acq_rel = as_bool("acq_rel", acq_rel)
        cap = "KVM_CAP_DIRTY_LOG_RING" + ("_ACQ_REL" if acq_rel else "")
        max_bytes = self.limits.dirty_ring_max_bytes
        if max_bytes == 0:
            raise KvmError(errno.EINVAL, f"{cap}: this VM's engine has no dirty rings")
        if size == 0 or size & (size - 1):
            raise KvmError(errno.EINVAL, f"{cap}: {size} bytes is not a power of two")
        if size < max(KVM_DIRTY_RING_RSVD_ENTRIES * KVM_DIRTY_GFN_SIZE, PAGE_SIZE):
            raise KvmError(errno.EINVAL, f"{cap}: {size} bytes is less than a page")
        if size > max_bytes:
            raise KvmError(errno.E2BIG, f"{cap}: {size} bytes is more than the "
                                        f"{max_bytes} a ring may have")
        if self.memslots.dirty_ring_size:
            raise KvmError(errno.EINVAL, f"{cap}: the dirty ring is already on "
                                         f"({self.memslots.dirty_ring_size} bytes)")
        with self.memslots.slots_lock:
            if self._vcpus:
                raise KvmError(errno.EINVAL, f"{cap}: the VM has vCPUs already; enable the "
                                             "ring before creating any")
            for listener in self._listeners:
                listener.dirty_ring_enable(self, size, acq_rel)
            self.memslots.dirty_ring_size = size

    @property
    def dirty_ring_size(self) -> int:
        """Bytes of each vCPU's dirty ring; 0 while the VM logs to bitmaps."""
        return self.memslots.dirty_ring_size

    @property
    def dirty_marks_dropped(self) -> int:
        """Pages a write dirtied that no log holds: marked with rings on but no vCPU loaded
        (a `vm.write`, a pfn or hva cache of the VM outside a vCPU's run), or by a vCPU of
        another VM. x86 KVM loses these too (and WARNs)."""
        return self._marks.dropped

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: in every vCPU's ring (in creation order), free the entries
        harvested since the last reset, in order up to the first one not harvested, and
        write-protect their pages again, so the next guest write to each is logged anew.
        Returns how many entries were freed (entries of slots deleted since are counted,
        and skipped). EINVAL without rings."""
        self.memslots.check_process()
        with self.memslots.slots_lock:
            if not self.memslots.dirty_ring_size:
                raise KvmError(errno.EINVAL, "KVM_RESET_DIRTY_RINGS: the dirty ring is off")
            total = 0
            found: list[tuple[MemorySlot, int, int]] = []
            for vcpu in self._vcpus.values():
                count, batches = vcpu.dirty_ring.reset()
                total += count
                found += self._dirty_gfns(batches)
            # one flush for all of them, as KVM flushes once after the walk
            self.mmu.dirty_ring_reprotect(found)
            for listener in self._listeners:
                for s, offset, mask in found:
                    listener.dirty_log_reprotect(self, s, offset, [mask])
                total += listener.dirty_rings_reset(self)
            return min(total, (1 << 31) - 1)

    def _dirty_gfns(self, batches: Sequence[tuple[int, int, int]]
                    ) -> list[tuple[MemorySlot, int, int]]:
        """kvm_reset_dirty_gfn's checks: the batches whose slot still exists and holds
        every page of the mask (bit b = page offset + b), with their slot; the others are
        skipped."""
        out = []
        root = self.memslots.active.load()
        for slot, offset, mask in batches:
            as_id, sid = slot >> 16, slot & U16_MAX
            if as_id >= self.limits.address_spaces or sid >= KVM_USER_MEM_SLOTS:
                continue
            s = root[as_id].by_id(sid)
            if s is not None and offset + mask.bit_length() - 1 < s.npages:
                out.append((s, offset, mask))
        return out

    def _check_bitmap_mode(self, ioctl: str) -> None:
        if self.memslots.dirty_ring_size:
            raise KvmError(errno.ENXIO, f"{ioctl}: the VM logs dirty pages to rings, not "
                                        "bitmaps")

    def _dirty_slot(self, slot: int) -> MemorySlot:
        self.memslots.slots_lock.assert_held()
        as_id, sid = slot >> 16, slot & U16_MAX
        if as_id >= self.limits.address_spaces or sid >= self.limits.max_slots:
            raise KvmError(errno.EINVAL, f"slot {as_id}:{sid} is not a user slot")
        s = self.memslots.active.load()[as_id].by_id(sid)
        if s is None or s.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"slot {as_id}:{sid} does not exist or does not "
                                         "log dirty pages")
        return s

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap (ALIGN(npages, 64)/8 bytes). Without manual
        protect the returned bits are cleared and their pages write-protected again."""
        self.memslots.check_process()
        slot = as_u32("slot", slot)
        with self.memslots.slots_lock:
            self._check_bitmap_mode("KVM_GET_DIRTY_LOG")
            s = self._dirty_slot(slot)
            bitmap = s.dirty_bitmap
            assert bitmap is not None
            for listener in self._listeners:
                # an engine's own log joins kvmem's first (kvm_arch_sync_dirty_log)
                listener.dirty_log_sync(self, s)
            if self._manual_dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                return bitmap.snapshot()
            out = bitmap.harvest()
            if out.count(0) != len(out):  # C speed, not any()
                words = [int.from_bytes(out[i:i + 8], "little") for i in range(0, len(out), 8)]
                self._reprotect(s, 0, words)
            return out

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes | bytearray | memoryview) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the bits of `bitmap` (bit i = page first_page + i)."""
        self.memslots.check_process()
        slot = as_u32("slot", slot)
        first_page = as_u64("first_page", first_page)
        num_pages = as_u32("num_pages", num_pages)
        data = as_bytes("bitmap", bitmap).tobytes()
        with self.memslots.slots_lock:
            self._check_bitmap_mode("KVM_CLEAR_DIRTY_LOG")
            as_id, sid = slot >> 16, slot & U16_MAX
            if as_id >= self.limits.address_spaces or sid >= self.limits.max_slots:
                raise KvmError(errno.EINVAL, f"slot {as_id}:{sid} is not a user slot")
            if first_page & 63:
                raise KvmError(errno.EINVAL, f"first_page {first_page} is not a multiple of 64")
            s = self._dirty_slot(slot)
            npages = s.npages
            if (first_page > npages or num_pages > npages - first_page
                    or (num_pages < npages - first_page and num_pages & 63)):
                raise KvmError(errno.EINVAL, f"pages {first_page}+{num_pages} do not fit slot "
                                             f"of {npages} pages in whole 64-page words")
            need = (num_pages + 63) // 64 * 8
            if len(data) < need:
                raise KvmError(errno.EFAULT, f"bitmap of {len(data)} bytes is shorter than "
                                             f"the {need} bytes num_pages needs")
            assert s.dirty_bitmap is not None
            cleared = s.dirty_bitmap.clear(first_page, num_pages, data)
            if cleared.any():
                self._reprotect(s, first_page, [int(w) for w in cleared])

    def _reprotect(self, slot: MemorySlot, first_page: int, words: Sequence[int]) -> None:
        self.mmu.dirty_log_reprotect(slot, first_page, words)
        for listener in self._listeners:
            listener.dirty_log_reprotect(self, slot, first_page, words)


# flags kvmem keeps on a slot for itself (KVM_MEMSLOT_INVALID): never part of a layout
_INTERNAL_FLAGS = ~0xFFFF
_generation_of = operator.attrgetter("generation")


class _Binding:
    """A snapshot as one VM sees it: its images at this VM's hvas (identical for a snapshot
    taken here; new memory for one made into it), its layout at those hvas, and what
    changed in this VM since (host pages, host ranges) — what a restore copies back."""

    def __init__(self, snap: Snapshot, moved: dict[int, int]) -> None:
        def at(hva: int) -> int:
            for old, data in snap.images:
                if old <= hva < old + len(data):
                    return moved[old] + (hva - old)
            raise AssertionError(f"hva {hva:#x} outside the snapshot's images")

        self.layout = [SlotRecord(r.as_id, r.id, r.flags, r.gpa, r.size, at(r.hva))
                       for r in snap.layout]
        self.images: list[tuple[int, int, memoryview]] = sorted(
            (moved[old], len(data), data) for old, data in snap.images)
        self.starts = [start for start, _, _ in self.images]
        self.pages: set[int] = set()
        self.ranges: list[tuple[int, int]] = []
        # the slot generations when the VM's layout was last known to be the snapshot's
        self.generations: tuple[int, ...] = ()
        self.vcpus_checked = False  # the VM has every vCPU of the snapshot
        # the slots' dirty bitmaps and the snapshot's bytes for each, at slot generations
        # `bitmaps_at`
        self.bitmaps: list[tuple[DirtyBitmap, bytes]] = []
        self.bitmaps_at: tuple[int, ...] = ()
        # the host pages holding its vCPUs' page tables (`Vm._table_pages`), once known
        self.tables: set[int] | None = None
        # a writable view of each image's host memory, while no host change happened since
        # (a `host.ViewCache`: every change empties it)
        self.dst: list[memoryview | None] | None = None

    def clear_views(self) -> None:
        self.dst = None


def _check_gmem_arg(guest_memfd: object) -> None:
    if guest_memfd is not None and not isinstance(guest_memfd, GuestMemfd | host.HostMemory):
        raise TypeError(f"guest_memfd must be a kvmem.gmem.GuestMemfd or None, not "
                        f"{type(guest_memfd).__name__}")


BindingMoves = tuple[Sequence[MemorySlot], Sequence[tuple[MemorySlot, int]]]


def _binding_moves(changes: Sequence[Change]) -> dict[GmemFile, BindingMoves]:
    """Per file: the slots whose bindings `changes` drop (deleted slots that existed before
    them) and the (slot, offset) bindings they make (slots they create and keep)."""
    born: dict[int, MemorySlot] = {}  # by identity: a batch deletes what it created by object
    gone: list[MemorySlot] = []
    for c in changes:
        if c.kind is ChangeKind.DELETE and c.old is not None and c.old.gmem is not None:
            if born.pop(id(c.old), None) is None:
                gone.append(c.old)
        elif c.kind is ChangeKind.CREATE and c.new is not None and c.new.gmem is not None:
            born[id(c.new)] = c.new
    leaving: dict[GmemFile, list[MemorySlot]] = {}
    coming: dict[GmemFile, list[tuple[MemorySlot, int]]] = {}
    for s in gone:
        assert s.gmem is not None
        leaving.setdefault(s.gmem.file, []).append(s)
    for s in born.values():
        assert s.gmem is not None
        coming.setdefault(s.gmem.file, []).append((s, s.gmem.offset))
    return {f: (leaving.get(f, []), coming.get(f, [])) for f in [*leaving, *coming]}


class Vcpu:
    """One vCPU: kvmem's per-vCPU view of guest memory and, where the Vm has an engine, the
    CPU that runs guest code — one object per vCPU id, made by `Vm.create_vcpu`.

    Memory view (every Vm): its address space (1 while in SMM), the accessors of that
    address space (kvm_vcpu_read_guest...), guest code's memory path through the stage-2
    (`guest_read` / `guest_write`, `fault_in`), and guest virtual memory through the vCPU's
    own page tables (`translate_gva`, `read_virt`, `write_virt`).

    CPU (with an engine): `start`, `run`, `complete`, `kick`, registers and the whole state,
    delegated to the engine's backend for this vCPU. Without an engine, `run`, `start`,
    `complete`, `kick`, `get_regs` and `set_regs` raise `EngineError(ENODEV)`; `get_state` /
    `set_state` hold a `VcpuState` (the reset state at first), which the page walks read.
    """

    # bound to the vCPU's address space (again whenever `smm` changes)
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes | bytearray | memoryview], None]
    clear: Callable[[int, int], None]
    guest_read: Callable[[int, int], bytes]
    """Read as guest code does: through the stage-2, faulting pages in. Raises `MmioExit`
    where KVM would exit with KVM_EXIT_MMIO (no slot at the page)."""
    guest_write: Callable[[int, bytes | bytearray | memoryview], None]
    """Write as guest code does: a missing or read-only spte faults (marking the page dirty
    in a logging slot); no slot or a read-only slot raises `MmioExit`; a tracked gfn is
    written by page tracking, which notifies."""

    dirty_ring: DirtyRing
    """This vCPU's dirty ring (`harvest()`); of 0 entries on a VM without rings."""

    # bound to the engine's backend when the Vm has an engine (see `EngineVcpu`)
    run: Callable[[], Exit]
    """Run guest code until the next exit (`kvmem.engines` lists them, with KVM's
    convention on every engine)."""
    complete: Callable[[bytes], None]
    """Answer the last read exit with exactly `exit.answer_size` bytes."""
    kick: Callable[[], None]
    """From any thread: make a running (or the next) `run` return `ExitKind.KICKED`."""
    get_regs: Callable[[], Regs]
    set_regs: Callable[[Regs], None]
    """At any exit; at a read exit (IN, MMIO read) the read is dropped and the instruction
    runs again from the registers set."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._smm = False
        self.dirty_ring = DirtyRing(vm.memslots.dirty_ring_size, vcpu_id, vm.memslots)
        # the vCPU's accesses are made with it loaded: its marks go to its ring
        mark = vm._marks.for_vcpu(self.dirty_ring)
        self._memory = [GuestMemory(vm.memslots, as_id, mark)
                        for as_id in range(vm.address_spaces)]
        self._stage2 = [Stage2Access(vm.mmu, as_id, self.dirty_ring)
                        for as_id in range(vm.address_spaces)]
        self._backend: EngineVcpu | None = None
        self._state = VcpuState()  # the state of a vCPU no engine runs
        self._bind()
        self.run = self.complete = self.kick = self._no_engine
        self.get_regs = self.set_regs = self._no_engine

    def _attach(self, backend: EngineVcpu) -> None:
        """The Vm gives the vCPU its engine's backend (once, before anyone else sees it)."""
        self._backend = backend
        self.run, self.complete, self.kick = backend.run, backend.complete, backend.kick
        self.get_regs, self.set_regs = backend.get_regs, backend.set_regs

    def _no_engine(self, *args: object, **kwargs: object) -> Any:
        raise EngineError(errno.ENODEV, f"vCPU {self.id} cannot run guest code: its Vm has "
                                        "no engine (create it with Vm(engine='kvm', "
                                        "'unicorn' or 'auto'))")

    def _bind(self) -> None:
        as_id = self.as_id
        memory = self._memory[as_id]
        self.read, self.write, self.clear = memory.read, memory.write, memory.clear
        stage2 = self._stage2[as_id]
        self.guest_read, self.guest_write = stage2.read, stage2.write

    @property
    def backend(self) -> EngineVcpu | None:
        """The engine's half of this vCPU (None without an engine): for engines and their
        tests; everything a VMM needs is on the `Vcpu` itself."""
        return self._backend

    def start(self, entry: int, regs: Regs | None = None) -> None:
        """Reset to 32-bit protected mode (flat 4 GiB segments, CPL 0, no paging) at `entry`,
        with the general registers of `regs` (the mode of the bundled 32-bit guests)."""
        if self._backend is None:
            self._no_engine()
        else:
            self._backend.start(entry, regs)

    # -- the whole state ----------------------------------------------------------------------
    def get_state(self) -> VcpuState:
        """The whole architectural state (canonical, `kvmem.cpu.canonical`). With an engine,
        at any exit (at a read exit the instruction is finished first, with the answer given,
        zeros without one); without, the state last set."""
        if self._backend is not None:
            return self._backend.get_state()
        return self._state

    def set_state(self, state: VcpuState) -> None:
        """Load `state` (taken on any engine, or built by `kvmem.cpu.modes`); the next `run`
        goes on from it."""
        if not isinstance(state, VcpuState):
            raise TypeError(f"state must be a kvmem.cpu.VcpuState, not {type(state).__name__}")
        if self._backend is not None:
            self._backend.set_state(state)
        else:
            self._state = canonical(state)  # what an engine's get_state would give back

    # -- memory view --------------------------------------------------------------------------
    @property
    def smm(self) -> bool:
        return self._smm

    @smm.setter
    def smm(self, value: bool) -> None:
        value = as_bool("smm", value)
        if value and self.vm.limits.address_spaces < 2:
            raise KvmError(errno.EINVAL, "this VM has no SMM address space")
        self._smm = value
        self._bind()

    @property
    def as_id(self) -> int:
        return 1 if self._smm else 0

    def slot_set(self) -> SlotSet:
        return self.vm.memslots.active.value[self.as_id]

    def lookup(self, gfn: int) -> MemorySlot | None:
        """The slot for `gfn` in the vCPU's address space (kvm_vcpu_gfn_to_memslot)."""
        return self.vm.memslots.lookup(gfn, self.as_id)

    def translate(self, gpa: int) -> int:
        """gpa → hva in the vCPU's address space; EFAULT where no usable slot is."""
        return self.vm.memslots.translate(gpa, self.as_id)

    def fault_in(self, gpa: int, write: bool, private: bool | None = None) -> Spte:
        """The stage-2 mapping for an access of guest code at `gpa`, faulted in if missing
        (the one fault-retry loop; engines that map sptes themselves use it). Raises
        `MmioExit`, `MemoryFault` or `TrackedWrite` where KVM would not map the page.
        `private`: the access's kind (None: private iff the gfn is PRIVATE, the
        SW_PROTECTED rule); one that is not the gfn's attribute is a `MemoryFault`."""
        gpa, _ = check_range(gpa, 0)
        write = as_bool("write", write)
        if private is not None:
            private = as_bool("private", private)
        with loaded(self.dirty_ring):
            return self.vm.mmu.fault_in(self.as_id, gpa, write, private)

    def loaded(self) -> loaded:
        """`with vcpu.loaded():` — this vCPU is the one loaded on the thread (KVM's
        vcpu_load): marks of writes made in the block (`vm.write`, caches, page tracking)
        go to its dirty ring. Engines hold it while the vCPU runs."""
        return loaded(self.dirty_ring)

    # -- guest virtual memory -----------------------------------------------------------------
    def _paging(self) -> tuple[Sregs, int, PagingFeatures]:
        if self._backend is not None:
            sregs, rflags = self._backend.paging_registers()
            return sregs, rflags, self._backend.paging_features
        state = self._state
        return state.sregs, state.regs.rflags, PagingFeatures(
            maxphyaddr=max(32, min(52, self.vm.limits.phys_bits)))

    def translate_gva(self, gva: int) -> int:
        """gva → gpa through the vCPU's page tables, as KVM_TRANSLATE walks them (a
        supervisor data read): KVM_TRANSLATE itself on the KVM engine, kvmem's walker
        (`kvmem.cpu.paging`, KVM's rules) otherwise. Without paging the gva is the gpa.
        Raises `kvmem.cpu.PageFault` (the gva and the error code a CPU would push) where the
        address does not translate."""
        gva = as_u64("gva", gva)
        gpa = None if self._backend is None else self._backend.translate(gva)
        if gpa is not None and gpa != INVALID_GPA:
            return gpa
        walked = self._walk(gva, False, False)  # no translation: the walker says why
        if gpa is not None:
            raise PageFault(gva, 0, f"KVM_TRANSLATE finds no translation; kvmem's walker "
                                    f"reaches gpa {walked:#x}")
        return walked

    def _walk(self, gva: int, write: bool, user: bool) -> int:
        sregs, rflags, features = self._paging()
        return translate_gva(self.read, sregs, gva, write=write, user=user,
                             features=features, rflags=rflags)

    def _virt_runs(self, gva: int, n: int, write: bool, user: bool) -> list[tuple[int, int]]:
        """(gpa, length) of each page piece of [gva, gva + n), every page translated first
        — so a fault on any page is raised before a byte is copied."""
        sregs, rflags, features = self._paging()
        runs = []
        pos, left = gva, n
        while left:
            k = min(left, PAGE_SIZE - (pos & PAGE_MASK))
            runs.append((translate_gva(self.read, sregs, pos, write=write, user=user,
                                       features=features, rflags=rflags), k))
            pos = (pos + k) & U64_MAX
            left -= k
        return runs

    def read_virt(self, gva: int, n: int, *, user: bool = False) -> bytes:
        """`n` bytes (a u32, as KVM's) at guest virtual address `gva`, through the vCPU's
        page tables, page by page (KVM's kvm_read_guest_virt): a supervisor read, or a CPL-3
        one with `user`.
        Raises `kvmem.cpu.PageFault` — the faulting gva and KVM's error-code bits (present,
        write, user, reserved...) — where a page does not translate or forbids the read."""
        gva, n, user = as_u64("gva", gva), as_u32("n", n), as_bool("user", user)
        return b"".join(self.read(gpa, k) for gpa, k in self._virt_runs(gva, n, False, user))

    def write_virt(self, gva: int, data: bytes | bytearray | memoryview, *,
                   user: bool = False) -> None:
        """Write `data` at guest virtual address `gva` through the vCPU's page tables
        (KVM's kvm_write_guest_virt_system; `user` checks as CPL 3 does), marking the pages
        dirty as the vCPU's accessors do. A page not present or not writable (CR0.WP
        decides for supervisor writes) raises `kvmem.cpu.PageFault` before anything is
        written — unlike KVM, which writes the pages before the faulting one."""
        gva, view, user = as_u64("gva", gva), as_bytes("data", data), as_bool("user", user)
        done = 0
        for gpa, k in self._virt_runs(gva, view.nbytes, True, user):
            self.write(gpa, view[done:done + k])
            done += k

    def __repr__(self) -> str:
        engine = "" if self.vm.engine is None else f", engine={self.vm.engine.name}"
        return f"Vcpu({self.id}, smm={self._smm}{engine})"


class Transaction:
    """Slot changes recorded in order and applied at once when the `with` block ends
    (or `commit()` is called). Every change is validated against the sets the batch has
    built so far; one refusal raises `TransactionError` naming its index, and nothing is
    applied. A transaction publishes no INVALID window: readers see the old layout or the
    new one, never a hole between them. A convenience that refuses its arguments records
    nothing."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._requests: list[Request] = []
        self._done = False
        self.changes: list[Change] = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._done = True

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def requests(self) -> tuple[Request, ...]:
        """What is recorded so far, in order."""
        return tuple(self._requests)

    def _check_open(self) -> None:
        if self._done:
            raise KvmError(errno.EINVAL, "transaction already committed or abandoned")

    def commit(self) -> list[Change]:
        self._check_open()
        self._done = True
        self.changes = self.vm._apply_batch(self._requests)
        return self.changes

    def _record(self, requests: Sequence[Request]) -> None:
        """Record `requests`, all built and checked already: all of them or none."""
        self._check_open()
        self._requests.extend(requests)

    # -- primitive ------------------------------------------------------------------------------
    def set_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int
                          ) -> Transaction:
        self._record([make_request(slot, flags, gpa, size, hva)])
        return self

    def set_memory_region2(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                           guest_memfd: GuestMemfd | host.HostMemory | None = None,
                           guest_memfd_offset: int = 0) -> Transaction:
        """`Vm.set_memory_region2`, recorded: the binding is checked against the file's
        bindings as the changes recorded before it leave them (a guest_memfd range a deleted
        slot of this batch had may be bound again), and made when the batch commits."""
        _check_gmem_arg(guest_memfd)
        self._record([make_request2(slot, flags, gpa, size, hva, guest_memfd,
                                    guest_memfd_offset)])
        return self

    def delete(self, slot: int) -> Transaction:
        return self.set_memory_region(slot, 0, 0, 0, 0)

    # -- conveniences KVM cannot do in one step -----------------------------------------------
    def _planned(self, slot: object) -> MemorySlot:
        """The slot as it stands after the requests recorded so far."""
        self._check_open()
        slot = as_u32("slot", slot)
        as_id, sid = slot >> 16, slot & U16_MAX
        current = self.vm.slot_set(as_id).by_id(sid)
        for r in self._requests:
            if r.as_id == as_id and r.id == sid:
                gmem = (GmemBinding(r.guest_memfd, r.guest_memfd_offset)
                        if r.guest_memfd_flag and isinstance(r.guest_memfd, GuestMemfd)
                        else None)
                current = None if r.size == 0 else MemorySlot(sid, as_id, r.base_gfn,
                                                              r.npages, r.hva, r.flags,
                                                              None, gmem)
        if current is None:
            raise KvmError(errno.EINVAL, f"slot {as_id}:{sid} does not exist")
        return current

    @staticmethod
    def _like(s: MemorySlot, slot: int, flags: int, gpa: int, size: int, hva: int
              ) -> Request:
        """A request for (part of) slot `s` laid out anew: a guest_memfd slot's piece keeps
        the file, at the offset of its first gfn."""
        if s.gmem is None:
            return make_request(slot, flags, gpa, size, hva)
        return make_request2(slot, flags, gpa, size, hva, s.gmem.file,
                             s.gmem.offset + (gpa - s.gpa))

    def _free_ids(self, as_id: int, count: int, taken: set[int]) -> list[int]:
        """The lowest ids free in the published set and not created by this batch."""
        created = {r.id for r in self._requests if r.as_id == as_id and r.size != 0}
        out: list[int] = []
        for i in self.vm.slot_set(as_id).free_ids():
            if i >= self.vm.limits.max_slots:
                break
            if i not in created and i not in taken:
                out.append(i)
                if len(out) == count:
                    return out
        raise KvmError(errno.ENOSPC, f"address space {as_id} has no {count} free slot ids")

    @staticmethod
    def _ids(name: str, ids: object) -> list[int]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise TypeError(f"{name} must be a sequence of ints, not {type(ids).__name__}")
        out = [as_u16(f"{name}[{i}]", v) for i, v in enumerate(ids)]
        if len(set(out)) != len(out):
            raise KvmError(errno.EINVAL, f"{name} {out} names a slot id twice")
        return out

    def split(self, slot: int, at: Sequence[int], ids: Sequence[int] | None = None
              ) -> list[int]:
        """Split `slot` at the gpas `at` (page-aligned, strictly inside, increasing) into
        len(at)+1 adjacent slots. The first piece keeps the slot's id; `ids` names the
        others (default: the lowest free ids). Pieces of a guest_memfd slot stay bound to the
        same pages (each from its own first gfn's offset). Returns the `slot` values of the
        pieces."""
        s = self._planned(slot)
        if isinstance(at, str | bytes) or not isinstance(at, Sequence):
            raise TypeError(f"at must be a sequence of gpas, not {type(at).__name__}")
        cuts = [as_u64(f"at[{i}]", g) for i, g in enumerate(at)]
        bounds = [s.gpa, *cuts, s.gpa + s.size]
        if not cuts or any(b & PAGE_MASK for b in cuts) or any(
                a >= b for a, b in itertools.pairwise(bounds)):
            raise KvmError(errno.EINVAL, f"split points {[hex(c) for c in cuts]} must be "
                                         f"page-aligned, increasing and inside slot "
                                         f"{s.as_id}:{s.id}")
        if ids is None:
            rest = self._free_ids(s.as_id, len(cuts), {s.id})
        else:
            rest = self._ids("ids", ids)
            if len(rest) != len(cuts):
                raise KvmError(errno.EINVAL, f"split into {len(cuts) + 1} pieces needs "
                                             f"{len(cuts)} new ids, got {len(rest)}")
            if s.id in rest:
                raise KvmError(errno.EINVAL, f"ids {rest} include the split slot's own id "
                                             f"{s.id}")
        requests = [make_request(s.slot, 0, 0, 0, 0)]
        out = []
        for pid, lo, hi in zip([s.id, *rest], bounds, bounds[1:], strict=False):
            slot_value = (s.as_id << 16) | pid
            requests.append(self._like(s, slot_value, s.flags, lo, hi - lo,
                                       s.hva + (lo - s.gpa)))
            out.append(slot_value)
        self._record(requests)
        return out

    def merge(self, slots: Sequence[int], slot_id: int | None = None) -> int:
        """Merge slots that are adjacent in gpa *and* hva (and, for guest_memfd slots, in
        one file's pages), with equal flags, into one (default id: the first's). Returns the
        merged slot's `slot` value."""
        if isinstance(slots, str | bytes) or not isinstance(slots, Sequence):
            raise TypeError(f"slots must be a sequence of slot values, not "
                            f"{type(slots).__name__}")
        parts = sorted((self._planned(x) for x in slots), key=lambda p: p.base_gfn)
        if len(parts) < 2:
            raise KvmError(errno.EINVAL, "merge needs at least two slots")
        if len({(p.as_id, p.id) for p in parts}) != len(parts):
            raise KvmError(errno.EINVAL, "merge names a slot twice")
        for a, b in itertools.pairwise(parts):
            if (a.as_id != b.as_id or a.end_gfn != b.base_gfn or a.hva_end != b.hva
                    or a.flags != b.flags):
                raise KvmError(errno.EINVAL, f"slots {a.as_id}:{a.id} and {b.as_id}:{b.id} "
                                             "are not adjacent in gpa and hva with equal flags")
            if a.gmem != b.gmem and (a.gmem is None or b.gmem is None
                                     or a.gmem.file is not b.gmem.file
                                     or a.gmem.offset + a.size != b.gmem.offset):
                raise KvmError(errno.EINVAL, f"slots {a.as_id}:{a.id} and {b.as_id}:{b.id} "
                                             "are not adjacent in one guest_memfd")
        first = parts[0]
        sid = first.id if slot_id is None else as_u16("slot_id", slot_id)
        total = sum(p.size for p in parts)
        merged = (first.as_id << 16) | sid
        requests = [make_request(p.slot, 0, 0, 0, 0) for p in parts]
        requests.append(self._like(first, merged, first.flags, first.gpa, total, first.hva))
        self._record(requests)
        return merged

    def resize(self, slot: int, size: int) -> Transaction:
        """Change a slot's size in place (same id, gpa and hva)."""
        s = self._planned(slot)
        size = as_u64("size", size)
        if size == 0:
            raise KvmError(errno.EINVAL, "resize to 0 bytes: use delete")
        self._record([make_request(s.slot, 0, 0, 0, 0),
                      self._like(s, s.slot, s.flags, s.gpa, size, s.hva)])
        return self

    def set_readonly(self, slot: int, readonly: bool) -> Transaction:
        """Toggle KVM_MEM_READONLY (which KVM can only do as delete + create)."""
        s = self._planned(slot)
        readonly = as_bool("readonly", readonly)
        flags = (s.flags | KVM_MEM_READONLY) if readonly else (s.flags & ~KVM_MEM_READONLY)
        self._record([make_request(s.slot, 0, 0, 0, 0),
                      self._like(s, s.slot, flags, s.gpa, s.size, s.hva)])
        return self

    def replace_layout(self, as_id: int, regions: Sequence[tuple[object, ...]]
                       ) -> Transaction:
        """Replace every slot of `as_id` by `regions`: (id, flags, gpa, size, hva) tuples
        without the address space, or (id, flags, gpa, size, hva, guest_memfd,
        guest_memfd_offset) for a REGION2 request (a KVM_MEM_GUEST_MEMFD slot); KVM's
        proposed KVM_SET_ALL_USER_MEMORY_REGIONS. A guest_memfd range an old slot bound may
        be bound again by a new one: the old slots are deleted first."""
        self._check_open()
        as_id = self.vm.memslots.address_space(as_id)
        if isinstance(regions, str | bytes) or not isinstance(regions, Sequence):
            raise TypeError(f"regions must be a sequence of (id, flags, gpa, size, hva) tuples, "
                            f"not {type(regions).__name__}")
        requests = [make_request(s.slot, 0, 0, 0, 0) for s in self.vm.slot_set(as_id)]
        seen: set[int] = set()
        for i, region in enumerate(regions):
            if not isinstance(region, tuple) or len(region) not in (5, 7):
                raise TypeError(f"regions[{i}] must be an (id, flags, gpa, size, hva) or an (id, "
                                f"flags, gpa, size, hva, guest_memfd, guest_memfd_offset) "
                                f"tuple, not {region!r:.60}")
            sid, flags, gpa, size, hva = region[:5]
            sid = as_u16(f"regions[{i}] id", sid)
            if sid in seen:
                raise KvmError(errno.EINVAL, f"regions name slot id {sid} twice")
            seen.add(sid)
            if len(region) == 5:
                requests.append(make_request((as_id << 16) | sid, flags, gpa, size, hva))
                continue
            file, offset = region[5:]
            _check_gmem_arg(file)
            assert file is None or isinstance(file, GuestMemfd | host.HostMemory)
            requests.append(make_request2((as_id << 16) | sid, flags, gpa, size, hva, file,
                                          offset))
        self._record(requests)
        return self
