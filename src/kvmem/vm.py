"""The VM: address spaces of slot sets, the slot-update path, vCPUs, dirty-log ioctls.

Rules of this room:
- `slots_lock` serialises every slot change and dirty-log ioctl (as in KVM). Readers never
  take it: they enter `srcu`, load the published root once, and use that snapshot.
- The published root is one tuple holding every address space's `SlotSet`, so a
  transaction that touches several address spaces becomes visible in one store.
- Path of one update (DESIGN path 1): validate → (DELETE/MOVE only, KVM-exact single
  updates) publish an INVALID copy and wait → publish the new sets with the in-progress
  generation bit → grace period → finalise generations → commit (page counts, listeners).
  A refused update publishes nothing and changes nothing.
- Listeners (the MMU, page tracking, engines of later layers) hear about changes only
  through the `SlotsListener` methods, called with `slots_lock` held, in a fixed order.

Deliberate difference from KVM: a MOVE that x86 `prepare` refuses (max gfn, external
write tracker) is refused before the INVALID copy is published, so the generation does
not move; KVM bumps it twice. kvmem's rule is that a refusal changes nothing.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from . import access, host, sync
from .dirty import DirtyBitmap
from .errors import GuestAccessError, KvmError, TransactionError
from .mmu import MemoryFault, MmioExit, Mmu, TrackedWrite
from .pagetrack import PageTrack
from .pfncache import PfnCache
from .slots import (
    Change,
    ChangeKind,
    Limits,
    MemorySlot,
    Request,
    SlotSet,
    make_request,
    validate,
)
from .uapi import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_USER_MEM_SLOTS,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE_MAX,
    U16_MAX,
)

__all__ = ["MemoryFault", "MmioExit", "SlotsListener", "Transaction", "Vcpu", "Vm"]

if TYPE_CHECKING:
    from .engines import Engine

Root = tuple[SlotSet, ...]

# Engines sit above the Vm: `kvmem.engines` registers its opener here on import, so
# `Vm(engine=...)` works without this module importing any engine.
_engine_opener: Callable[[str], Engine] | None = None


def register_engine_opener(opener: Callable[[str], Engine]) -> None:
    global _engine_opener
    _engine_opener = opener


class SlotsListener(Protocol):
    """What later layers (MMU, page tracking, engines) hear of slot updates."""

    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None:
        """A DELETE/MOVE published the INVALID copy of `slot` and the grace period passed:
        drop everything derived from it (KVM's arch_flush_shadow_memslot)."""

    def slots_updating(self, vm: Vm, changes: Sequence[Change]) -> None:
        """A transaction is about to publish `changes` (optional method)."""

    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        """`changes` are published and no reader uses the old sets any more."""

    def dirty_log_reprotect(self, vm: Vm, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        """Pages whose dirty bits were harvested or cleared must be write-protected again:
        bit b of words[i] is page first_page + 64*i + b of `slot`."""


def _check_u(name: str, v: object, bits: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < 0 or v >> bits:
        raise KvmError(errno.EINVAL, f"{name} {v} does not fit the ioctl's {bits}-bit field")
    return v


@dataclass(frozen=True, slots=True)
class VmCapabilities:
    address_spaces: int
    max_slots: int
    readonly_mem: bool
    phys_bits: int
    manual_dirty_log_protect: int = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                     | KVM_DIRTY_LOG_INITIALLY_SET)


class Vm:
    """A VM's guest memory: slots in address spaces, accessors, vCPUs and dirty logs.

    Defaults are x86 KVM with SMM: 2 address spaces, 32,764 user slots, read-only slots,
    52-bit guest physical addresses.
    """

    def __init__(
        self,
        address_spaces: int | None = None,
        max_slots: int = KVM_USER_MEM_SLOTS,
        *,
        readonly_mem: bool = True,
        phys_bits: int = 52,
        user_va_end: int = TASK_SIZE_MAX,
        engine: str | None = None,
    ) -> None:
        """`engine`: None (kvmem alone), "kvm", "unicorn" or "auto" (see `kvmem.engines`);
        `address_spaces` defaults to 2, or to what the engine offers."""
        for name, v in (("address_spaces", address_spaces), ("max_slots", max_slots),
                        ("phys_bits", phys_bits), ("user_va_end", user_va_end)):
            if (not isinstance(v, int) or isinstance(v, bool)) and \
                    not (name == "address_spaces" and v is None):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if address_spaces is not None and not 1 <= address_spaces <= 2:
            raise KvmError(errno.EINVAL, f"address_spaces must be 1 or 2, not {address_spaces}")
        if not 1 <= max_slots <= KVM_USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, f"max_slots must be in [1, {KVM_USER_MEM_SLOTS}]")
        if not 13 <= phys_bits <= 64:
            raise KvmError(errno.EINVAL, f"phys_bits must be in [13, 64], not {phys_bits}")
        # the engine is opened only once every argument of kvmem's own is known to be good,
        # so a refusal leaves no file descriptor behind
        opened: Engine | None = None
        if engine is not None:
            if _engine_opener is None:
                raise KvmError(errno.EINVAL, "no engines registered: import kvmem.engines")
            opened = _engine_opener(engine)
            offered = opened.capabilities.address_spaces
            if address_spaces is None:
                address_spaces = offered
            elif address_spaces > offered:
                opened.close()
                raise KvmError(errno.EINVAL, f"engine {opened.name} offers {offered} "
                                             f"address space(s), not {address_spaces}")
        if address_spaces is None:
            address_spaces = 2
        self.limits = Limits(address_spaces, max_slots, bool(readonly_mem), phys_bits,
                             user_va_end)
        self.slots_lock = sync.Mutex("slots_lock")
        self.srcu = sync.Srcu("vm.srcu")
        self._memslots: sync.Atomic[Root] = sync.Atomic(
            tuple(SlotSet(as_id, as_id) for as_id in range(address_spaces))
        )
        self._nr_memslot_pages = 0
        self._manual_dirty_log_protect = 0
        self._vcpus: dict[int, Vcpu] = {}
        self._pid = os.getpid()
        self.mmu = Mmu(self)
        self.page_track = PageTrack(self)
        # the MMU hears first: stage-2 zaps precede everything derived from slots; then
        # page tracking (track_remove_region), then whatever is added (engines)
        self._listeners: list[SlotsListener] = [self.mmu, self.page_track]
        self.engine: Engine | None = opened
        if opened is not None:
            opened.attach(self)

    # -- capabilities and state -------------------------------------------------------------
    @property
    def capabilities(self) -> VmCapabilities:
        lim = self.limits
        return VmCapabilities(lim.address_spaces, lim.max_slots, lim.readonly_mem,
                              lim.phys_bits)

    @property
    def address_spaces(self) -> int:
        return self.limits.address_spaces

    def slot_set(self, as_id: int = 0) -> SlotSet:
        """The published slot set of `as_id` (a snapshot: it never changes)."""
        return self._memslots.load()[self._as(as_id)]

    def slots(self, as_id: int = 0) -> list[MemorySlot]:
        """The current slots of `as_id`, in gfn order."""
        return list(self.slot_set(as_id))

    def generation(self, as_id: int = 0) -> int:
        """The memslot generation of `as_id`; bit 63 is set while an update is in flight."""
        return self.slot_set(as_id).generation

    def _as(self, as_id: object) -> int:
        if not isinstance(as_id, int) or isinstance(as_id, bool):
            raise TypeError(f"as_id must be an int, not {type(as_id).__name__}")
        if not 0 <= as_id < self.limits.address_spaces:
            raise KvmError(errno.EINVAL, f"address space {as_id} does not exist "
                                         f"(this VM has {self.limits.address_spaces})")
        return as_id

    def add_listener(self, listener: SlotsListener) -> None:
        with self.slots_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: SlotsListener) -> None:
        with self.slots_lock:
            self._listeners.remove(listener)

    # -- the update path ----------------------------------------------------------------------
    def set_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, delete (size 0), move or change flags of a
        slot; `slot` = (as_id << 16) | id. Refusals raise `KvmError` with KVM's errno."""
        self._check_process()
        req = make_request(slot, flags, gpa, size, hva)
        with self.slots_lock:
            root = self._memslots.load()
            as_id = req.as_id if req.as_id < len(root) else 0
            change = validate(req, root[as_id], self.limits, self._nr_memslot_pages,
                              self._move_refused)
            if change.kind is ChangeKind.NONE:
                return
            self._apply_single(change)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise KvmError(errno.EIO, "the VM was created by another process (fork)")

    def _move_refused(self) -> str | None:
        for listener in self._listeners:
            refuse = getattr(listener, "move_refused", None)
            if refuse is not None:
                reason: str | None = refuse()
                if reason is not None:
                    return reason
        return None

    def _attach_bitmap(self, change: Change) -> Change:
        """kvm_prepare_memory_region's dirty-bitmap decision (table §1.4)."""
        new = change.new
        if new is None or change.kind is ChangeKind.NONE:
            return change
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            bitmap = None
        elif change.old is not None and change.old.dirty_bitmap is not None:
            bitmap = change.old.dirty_bitmap
        else:
            initially = (self._manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET) != 0
            bitmap = DirtyBitmap(new.npages, initially_set=initially)
        slot = MemorySlot(new.id, new.as_id, new.base_gfn, new.npages, new.hva, new.flags,
                          bitmap)
        return Change(change.kind, change.as_id, change.old, slot)

    def _swap(self, sets: dict[int, SlotSet]) -> None:
        """Publish `sets` (by address space) in one store, wait for a grace period, then
        finalise their generations (kvm_swap_active_memslots)."""
        self.slots_lock.assert_held()
        old_root = self._memslots.load()
        nr_as = len(old_root)
        root = list(old_root)
        for as_id, s in sets.items():
            root[as_id] = s.published(old_root[as_id].generation
                                      | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
        new_root = tuple(root)
        with self.mmu.mn_lock:
            # an invalidation between start and end must see one slot layout throughout
            self.mmu.wait_for_invalidations()
            self._memslots.store(new_root)
        # after this no reader holds the old sets: host memory behind them may go
        self.srcu.synchronize()
        for as_id in sets:
            new_root[as_id].generation = old_root[as_id].generation + nr_as

    def _apply_single(self, change: Change) -> None:
        """One KVM-exact update: DELETE/MOVE first publish the slot as INVALID."""
        self.slots_lock.assert_held()
        change = self._attach_bitmap(change)
        as_id = change.as_id
        current = self._memslots.load()[as_id]
        old, new = change.old, change.new
        if change.kind in (ChangeKind.DELETE, ChangeKind.MOVE):
            assert old is not None
            inv = old.with_flags(old.flags | KVM_MEMSLOT_INVALID)
            current = current.replacing(old, inv)
            self._swap({as_id: current})
            for listener in self._listeners:
                listener.slots_invalidated(self, old)
            old = inv
        if change.kind is ChangeKind.CREATE:
            assert new is not None
            final = current.with_slot(new)
        elif change.kind is ChangeKind.DELETE:
            assert old is not None
            final = current.without(old)
        else:
            assert old is not None and new is not None
            final = current.replacing(old, new)
        self._swap({as_id: final})
        self._commit([change])

    def _commit(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if c.kind is ChangeKind.CREATE:
                assert c.new is not None
                self._nr_memslot_pages += c.new.npages
            elif c.kind is ChangeKind.DELETE:
                assert c.old is not None
                self._nr_memslot_pages -= c.old.npages
        for listener in self._listeners:
            listener.slots_committed(self, changes)

    def transaction(self) -> Transaction:
        """A batch of slot changes published at once: `with vm.transaction() as tx: ...`."""
        return Transaction(self)

    def _apply_batch(self, requests: Sequence[Request]) -> list[Change]:
        """Validate every request in order against the sets the batch builds; publish them
        all in one swap, or nothing."""
        self._check_process()  # KVM answers EIO before it looks at any argument
        with self.slots_lock:
            root = self._memslots.load()
            working = dict(enumerate(root))
            pages = self._nr_memslot_pages
            changes: list[Change] = []
            for index, req in enumerate(requests):
                as_id = req.as_id if req.as_id < len(root) else 0
                try:
                    change = validate(req, working[as_id], self.limits, pages,
                                      self._move_refused)
                except KvmError as e:
                    raise TransactionError(index, e) from None
                if change.kind is ChangeKind.NONE:
                    continue
                change = self._attach_bitmap(change)
                s = working[as_id]
                if change.kind is ChangeKind.CREATE:
                    assert change.new is not None
                    working[as_id] = s.with_slot(change.new)
                    pages += change.new.npages
                elif change.kind is ChangeKind.DELETE:
                    assert change.old is not None
                    working[as_id] = s.without(change.old)
                    pages -= change.old.npages
                else:
                    assert change.old is not None and change.new is not None
                    working[as_id] = s.replacing(change.old, change.new)
                changes.append(change)
            if not changes:
                return []
            touched = {c.as_id for c in changes}
            for listener in self._listeners:
                updating = getattr(listener, "slots_updating", None)
                if updating is not None:
                    updating(self, changes)
            self._swap({as_id: working[as_id] for as_id in touched})
            _carry_dirty_bits(changes)
            self._commit(changes)
            return changes

    # -- lookups --------------------------------------------------------------------------------
    def lookup(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot containing `gfn` in `as_id` (`gfn_to_memslot`), or None."""
        return self._memslots.value[as_id].lookup(gfn)

    def translate(self, gpa: int) -> int:
        """gpa → hva in address space 0 (read intent); EFAULT where no usable slot is."""
        slots = self._memslots.value[0]
        d = slots._deltas.get(gpa >> PAGE_SHIFT)
        if d is None:
            d = slots.hva_delta(gpa >> PAGE_SHIFT)
            if d is None:
                raise GuestAccessError(errno.EFAULT, f"gpa {gpa:#x} has no memory slot",
                                       gpa, 0)
        return gpa + d

    def hva_to_gfn_ranges(self, start: int, end: int
                          ) -> Iterator[tuple[MemorySlot, int, int]]:
        """For an hva range [start, end): every (slot, first gfn, end gfn) it backs, in every
        address space — the walk of an MMU-notifier invalidation."""
        for slots in self._memslots.load():
            for s in slots.by_hva(start, end):
                lo = max(start, s.hva)
                hi = min(end, s.hva_end)
                yield s, s.gfn_of(lo), s.gfn_of(hi + PAGE_MASK)

    # -- accessors (address space 0) ------------------------------------------------------------
    def read(self, gpa: int, n: int) -> bytes:
        """Read guest memory (kvm_read_guest)."""
        access.check_range(gpa, n)
        self.srcu.read_lock()
        try:
            return access.read(self._memslots.value[0].lookup, gpa, n)
        finally:
            self.srcu.read_unlock()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (kvm_write_guest); marks dirty pages of logging slots."""
        access.check_range(gpa, 0)
        self.srcu.read_lock()
        try:
            access.write(self._memslots.value[0].lookup, gpa, access.byte_view(data))
        finally:
            self.srcu.read_unlock()

    def clear(self, gpa: int, n: int) -> None:
        """Zero guest memory (kvm_clear_guest)."""
        access.check_range(gpa, n)
        self.srcu.read_lock()
        try:
            access.clear(self._memslots.value[0].lookup, gpa, n)
        finally:
            self.srcu.read_unlock()

    def hva_cache(self, gpa: int, length: int) -> access.HvaCache:
        """A gfn_to_hva_cache over [gpa, gpa+length) of address space 0."""
        access.check_range(gpa, length)
        return access.HvaCache(lambda: self._memslots.value[0], gpa, length, self.srcu)

    # -- vCPUs ------------------------------------------------------------------------------------
    def pfn_cache(self) -> PfnCache:
        """A new, inactive gfn-to-pfn cache of this VM (`activate` or `activate_hva` it)."""
        return PfnCache(self)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        self._check_process()
        _check_u("vcpu_id", vcpu_id, 32)
        with self.slots_lock:
            if vcpu_id in self._vcpus:
                raise KvmError(errno.EEXIST, f"vCPU {vcpu_id} already exists")
            vcpu = Vcpu(self, vcpu_id)
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    @property
    def vcpus(self) -> list[Vcpu]:
        return list(self._vcpus.values())

    # -- dirty log ioctls ----------------------------------------------------------------------
    def enable_manual_dirty_log_protect(self, initially_set: bool = False,
                                        enable: bool = True) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        mask = 0
        if enable:
            mask = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if initially_set:
                mask |= KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap_manual_dirty_log_protect(mask)

    def enable_cap_manual_dirty_log_protect(self, args0: int, flags: int = 0) -> None:
        """The raw capability: `args0` ∈ {0, 1, 3}, `flags` 0; anything else is EINVAL."""
        self._check_process()
        _check_u("args[0]", args0, 64)
        _check_u("flags", flags, 32)
        allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
        if flags or args0 & ~allowed or args0 == KVM_DIRTY_LOG_INITIALLY_SET:
            raise KvmError(errno.EINVAL, f"manual dirty log protect: args[0] {args0:#x} "
                                         f"flags {flags:#x} (valid: 0, 1, 3 and flags 0)")
        with self.slots_lock:
            self._manual_dirty_log_protect = args0

    def _initially_set(self) -> bool:
        return bool(self._manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def invalidate_hva_range(self, start: int, end: int) -> None:
        """The VMM changed its own mapping of [start, end) behind kvmem's back (mmap over
        it, madvise...): run the MMU-notifier invalidation for it, begin and end."""
        _check_u("start", start, 64)
        _check_u("end", end, 64)
        if start >= end:
            raise KvmError(errno.EINVAL, f"empty hva range {start:#x}..{end:#x}")
        self.mmu.invalidate_range_start(start, end)
        self.mmu.invalidate_range_end(start, end)

    @property
    def manual_dirty_log_protect(self) -> int:
        return self._manual_dirty_log_protect

    def _dirty_slot(self, slot: int) -> MemorySlot:
        self.slots_lock.assert_held()
        as_id, sid = slot >> 16, slot & U16_MAX
        if as_id >= self.limits.address_spaces or sid >= self.limits.max_slots:
            raise KvmError(errno.EINVAL, f"slot {as_id}:{sid} is not a user slot")
        s = self._memslots.load()[as_id].by_id(sid)
        if s is None or s.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"slot {as_id}:{sid} does not exist or does not "
                                         "log dirty pages")
        return s

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap (ALIGN(npages, 64)/8 bytes). Without manual
        protect the returned bits are cleared and their pages write-protected again."""
        self._check_process()
        _check_u("slot", slot, 32)
        with self.slots_lock:
            s = self._dirty_slot(slot)
            bitmap = s.dirty_bitmap
            assert bitmap is not None
            for listener in self._listeners:
                # an engine's own log joins kvmem's first (kvm_arch_sync_dirty_log)
                sync_log = getattr(listener, "dirty_log_sync", None)
                if sync_log is not None:
                    sync_log(self, s)
            if self._manual_dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                return bitmap.snapshot()
            out = bitmap.harvest()
            if self._listeners and out.count(0) != len(out):  # C speed, not any()
                words = [int.from_bytes(out[i:i + 8], "little") for i in range(0, len(out), 8)]
                for listener in self._listeners:
                    listener.dirty_log_reprotect(self, s, 0, words)
            return out

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes | bytearray | memoryview) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the bits of `bitmap` (bit i = page first_page + i)."""
        self._check_process()
        _check_u("slot", slot, 32)
        _check_u("first_page", first_page, 64)
        _check_u("num_pages", num_pages, 32)
        data = access.byte_view(bitmap).tobytes()
        with self.slots_lock:
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
            if self._listeners and cleared.any():
                words = [int(w) for w in cleared]
                for listener in self._listeners:
                    listener.dirty_log_reprotect(self, s, first_page, words)


def _carry_dirty_bits(changes: Sequence[Change]) -> None:
    """Within one transaction, a page that a deleted logging slot mapped and a new logging
    slot maps again (same gfn, same hva) keeps its unharvested dirty bit: split, merge,
    resize and read-only toggles lose nothing. Runs after the grace period, under
    slots_lock, so no writer still marks the old bitmap and no GET sees the gap."""
    gone = [c.old for c in changes if c.kind is ChangeKind.DELETE and c.old is not None
            and c.old.dirty_bitmap is not None]
    if not gone:
        return
    born = [c.new for c in changes if c.kind is ChangeKind.CREATE and c.new is not None
            and c.new.dirty_bitmap is not None]
    for old in gone:
        assert old.dirty_bitmap is not None
        for new in born:
            same_mapping = (new.hva - (new.base_gfn << PAGE_SHIFT)
                            == old.hva - (old.base_gfn << PAGE_SHIFT))
            lo, hi = max(old.base_gfn, new.base_gfn), min(old.end_gfn, new.end_gfn)
            if new.as_id != old.as_id or not same_mapping or lo >= hi:
                continue
            assert new.dirty_bitmap is not None
            new.dirty_bitmap.merge_from(old.dirty_bitmap, lo - old.base_gfn,
                                        lo - new.base_gfn, hi - lo)


class Vcpu:
    """A vCPU's view of guest memory: its address space (1 while in SMM) and its own
    last-used-slot cache (kvm_vcpu_gfn_to_memslot)."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._smm = False
        self._last_used: MemorySlot | None = None
        self._last_gen = -1

    @property
    def smm(self) -> bool:
        return self._smm

    @smm.setter
    def smm(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"smm must be a bool, not {type(value).__name__}")
        if value and self.vm.limits.address_spaces < 2:
            raise KvmError(errno.EINVAL, "this VM has no SMM address space")
        self._smm = value

    @property
    def as_id(self) -> int:
        return 1 if self._smm else 0

    def slot_set(self) -> SlotSet:
        return self.vm._memslots.value[1 if self._smm else 0]

    def lookup(self, gfn: int) -> MemorySlot | None:
        """The vCPU's slot for `gfn`: its own last-used slot first (reset when the
        generation moves); does not touch the VM-wide hint."""
        slots = self.vm._memslots.value[1 if self._smm else 0]
        if slots.generation != self._last_gen:
            self._last_gen = slots.generation
            self._last_used = None
        s = self._last_used
        if s is not None and s.base_gfn <= gfn < s.end_gfn and s.as_id == slots.as_id:
            return s
        s = slots.search(gfn)
        if s is not None:
            self._last_used = s
        return s

    def translate(self, gpa: int) -> int:
        slots = self.vm._memslots.value[1 if self._smm else 0]
        d = slots._deltas.get(gpa >> PAGE_SHIFT)
        if d is None:
            d = slots.hva_delta(gpa >> PAGE_SHIFT)
            if d is None:
                raise GuestAccessError(errno.EFAULT, f"gpa {gpa:#x} has no memory slot "
                                              f"in address space {self.as_id}", gpa, 0)
        return gpa + d

    def read(self, gpa: int, n: int) -> bytes:
        access.check_range(gpa, n)
        self.vm.srcu.read_lock()
        try:
            return access.read(self.lookup, gpa, n)
        finally:
            self.vm.srcu.read_unlock()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        access.check_range(gpa, 0)
        self.vm.srcu.read_lock()
        try:
            access.write(self.lookup, gpa, access.byte_view(data))
        finally:
            self.vm.srcu.read_unlock()

    def clear(self, gpa: int, n: int) -> None:
        access.check_range(gpa, n)
        self.vm.srcu.read_lock()
        try:
            access.clear(self.lookup, gpa, n)
        finally:
            self.vm.srcu.read_unlock()

    # -- the memory path of a running vCPU: stage-2, faulting on a miss -------------------
    def guest_read(self, gpa: int, n: int) -> bytes:
        """Read as guest code does: through the stage-2, faulting pages in. Raises
        `MmioExit` where KVM would exit with KVM_EXIT_MMIO (no slot at the page)."""
        access.check_range(gpa, n)
        parts: list[bytes] = []
        self._guest_access(gpa, n, None, parts)
        return b"".join(parts)

    def guest_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write as guest code does: a missing or read-only spte faults (marking the page
        dirty in a logging slot); no slot or a read-only slot raises `MmioExit`."""
        access.check_range(gpa, 0)
        src = access.byte_view(data)
        self._guest_access(gpa, src.nbytes, src, [])

    def _guest_access(self, gpa: int, n: int, src: memoryview | None,
                      parts: list[bytes]) -> None:
        vm = self.vm
        mmu = vm.mmu
        write = src is not None
        prot = host.PROT_WRITE if write else host.PROT_READ
        pos = 0
        vm.srcu.read_lock()
        try:
            while pos < n:
                cur = gpa + pos
                gfn = cur >> PAGE_SHIFT
                k = min(n - pos, PAGE_SIZE - (cur & PAGE_MASK))
                done = False
                mmu.tlb.read_lock()
                try:
                    spte = mmu.spte(self.as_id, gfn)
                    if spte is not None and (spte.writable or not write):
                        if not spte.current(gfn):
                            mmu.stats["stale_uses"] += 1
                        hva = spte.frame.hva + ((gfn - spte.gfn) << PAGE_SHIFT) + (cur & PAGE_MASK)
                        segs, ok = host.views(hva, k, prot)
                        if ok == k:
                            if src is None:
                                parts.append(bytes(segs[0]))
                            else:
                                segs[0][:] = src[pos:pos + k]
                            done = True
                finally:
                    mmu.tlb.read_unlock()
                if done:
                    pos += k
                    continue
                try:
                    spte = mmu.fault(self, cur, write)
                except MmioExit:
                    data = b"" if src is None else src[pos:pos + k].tobytes()
                    raise MmioExit(cur, k, write, data) from None
                except TrackedWrite:
                    assert src is not None
                    vm.page_track.write(self.as_id, cur, src[pos:pos + k])
                    pos += k
                    continue
                if spte is None:  # retry outside the read section: an update may be waiting
                    vm.srcu.read_unlock()
                    sync.pause()
                    vm.srcu.read_lock()
        finally:
            vm.srcu.read_unlock()

    def __repr__(self) -> str:
        return f"Vcpu({self.id}, smm={self._smm})"


class Transaction:
    """Slot changes recorded in order and applied at once when the `with` block ends
    (or `commit()` is called). Every change is validated against the sets the batch has
    built so far; one refusal raises `TransactionError` naming its index, and nothing is
    applied. A transaction publishes no INVALID window: readers see the old layout or the
    new one, never a hole between them."""

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

    def _check_open(self) -> None:
        if self._done:
            raise KvmError(errno.EINVAL, "transaction already committed or abandoned")

    def commit(self) -> list[Change]:
        self._check_open()
        self._done = True
        self.changes = self.vm._apply_batch(self._requests)
        return self.changes

    # -- primitive ------------------------------------------------------------------------------
    def set_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int
                          ) -> Transaction:
        self._check_open()
        self._requests.append(make_request(slot, flags, gpa, size, hva))
        return self

    def delete(self, slot: int) -> Transaction:
        return self.set_memory_region(slot, 0, 0, 0, 0)

    # -- conveniences KVM cannot do in one step -----------------------------------------------
    def _planned(self, slot: int) -> MemorySlot:
        """The slot as it stands after the requests recorded so far."""
        _check_u("slot", slot, 32)
        as_id, sid = slot >> 16, slot & U16_MAX
        current = self.vm.slot_set(as_id).by_id(sid)
        for r in self._requests:
            if r.as_id == as_id and r.id == sid:
                current = None if r.size == 0 else MemorySlot(sid, as_id, r.base_gfn,
                                                              r.npages, r.hva, r.flags)
        if current is None:
            raise KvmError(errno.EINVAL, f"slot {as_id}:{sid} does not exist")
        return current

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

    def split(self, slot: int, at: Sequence[int], ids: Sequence[int] | None = None
              ) -> list[int]:
        """Split `slot` at the gpas `at` (page-aligned, strictly inside, increasing) into
        len(at)+1 adjacent slots. The first piece keeps the slot's id; `ids` names the
        others (default: the lowest free ids). Returns the `slot` values of the pieces."""
        s = self._planned(slot)
        cuts = [_check_u("split gpa", g, 64) for g in at]
        bounds = [s.gpa, *cuts, s.gpa + s.size]
        if not cuts or any(b & PAGE_MASK for b in cuts) or any(
                a >= b for a, b in itertools.pairwise(bounds)):
            raise KvmError(errno.EINVAL, f"split points {[hex(c) for c in cuts]} must be "
                                         f"page-aligned, increasing and inside slot "
                                         f"{s.as_id}:{s.id}")
        rest = list(ids) if ids is not None else self._free_ids(s.as_id, len(cuts), {s.id})
        if len(rest) != len(cuts):
            raise KvmError(errno.EINVAL, f"split into {len(cuts) + 1} pieces needs "
                                         f"{len(cuts)} new ids, got {len(rest)}")
        piece_ids = [s.id, *rest]
        self.delete(s.slot)
        out = []
        for pid, lo, hi in zip(piece_ids, bounds, bounds[1:], strict=False):
            slot_value = (s.as_id << 16) | _check_u("slot id", pid, 16)
            self.set_memory_region(slot_value, s.flags, lo, hi - lo, s.hva + (lo - s.gpa))
            out.append(slot_value)
        return out

    def merge(self, slots: Sequence[int], slot_id: int | None = None) -> int:
        """Merge slots that are adjacent in gpa *and* hva, with equal flags, into one
        (default id: the first's). Returns the merged slot's `slot` value."""
        parts = sorted((self._planned(x) for x in slots), key=lambda p: p.base_gfn)
        if len(parts) < 2:
            raise KvmError(errno.EINVAL, "merge needs at least two slots")
        for a, b in itertools.pairwise(parts):
            if (a.as_id != b.as_id or a.end_gfn != b.base_gfn or a.hva_end != b.hva
                    or a.flags != b.flags):
                raise KvmError(errno.EINVAL, f"slots {a.as_id}:{a.id} and {b.as_id}:{b.id} "
                                             "are not adjacent in gpa and hva with equal flags")
        first = parts[0]
        sid = first.id if slot_id is None else _check_u("slot id", slot_id, 16)
        for p in parts:
            self.delete(p.slot)
        total = sum(p.size for p in parts)
        merged = (first.as_id << 16) | sid
        self.set_memory_region(merged, first.flags, first.gpa, total, first.hva)
        return merged

    def resize(self, slot: int, size: int) -> Transaction:
        """Change a slot's size in place (same id, gpa and hva)."""
        s = self._planned(slot)
        _check_u("size", size, 64)
        if size == 0:
            raise KvmError(errno.EINVAL, "resize to 0 bytes: use delete")
        self.delete(s.slot)
        return self.set_memory_region(s.slot, s.flags, s.gpa, size, s.hva)

    def set_readonly(self, slot: int, readonly: bool) -> Transaction:
        """Toggle KVM_MEM_READONLY (which KVM can only do as delete + create)."""
        from .uapi import KVM_MEM_READONLY

        s = self._planned(slot)
        flags = (s.flags | KVM_MEM_READONLY) if readonly else (s.flags & ~KVM_MEM_READONLY)
        self.delete(s.slot)
        return self.set_memory_region(s.slot, flags, s.gpa, s.size, s.hva)

    def replace_layout(self, as_id: int, regions: Sequence[tuple[int, int, int, int]]
                       ) -> Transaction:
        """Replace every slot of `as_id` by `regions`: (id, flags, gpa, size, hva) tuples
        without the address space; KVM's proposed KVM_SET_ALL_USER_MEMORY_REGIONS."""
        self.vm._as(as_id)
        for s in list(self.vm.slot_set(as_id)):
            self.delete(s.slot)
        for region in regions:
            sid, flags, gpa, size, hva = region  # type: ignore[misc]
            self.set_memory_region((as_id << 16) | _check_u("slot id", sid, 16), flags, gpa,
                                   size, hva)
        return self



