"""The memslots layer: a VM's published slot sets and the protocol that changes them.

Defines `Memslots` — what KVM keeps in `struct kvm` for memslots: the published root of
slot sets (one per address space), `slots_lock`, the SRCU that readers enter, the limits a
request is checked against, `nr_memslot_pages`, the creator process, lookups (gfn → slot,
gpa → hva, hva → gfn ranges), the VM's `RestoreLog`, and the gate that keeps host
invalidations and slot swaps apart (`mn_active_invalidate_count`). And `carry_dirty_bits`,
the part of a transaction's commit that keeps unharvested dirty bits of a split or merged
slot.

Rules of this room:
- `slots_lock` serialises every change (the update path of `Vm`, the dirty-log ioctls).
  Readers never take it: they load `active` once and use that snapshot. The root is one
  tuple holding every address space's `SlotSet`, so a change to several address spaces
  is visible in one store.
- `publish` is KVM's `kvm_swap_active_memslots`: store the new root with the in-progress
  generation bit, *under `mn_lock` once no host invalidation is between its start and its
  end* (an invalidation must see one slot layout from start to end), then wait for a
  grace period, then finalise the generations. After `publish` returns, no reader uses
  the old sets: host memory only they mapped may go.
- The grace period covers both kinds of readers: `srcu` (the fault path, page tracking,
  pfn-cache translation: KVM's kvm->srcu) and the host guard (`host.guard`), inside which
  every accessor copy runs. `grace_period` is the one place that knows both.
- Nothing here knows about the MMU, caches or engines: layers above are given this
  object and read it; the update path above calls `publish`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence

from . import host, sync
from .args import as_int, as_u64
from .dirty import DirtyBitmap, RestoreLog
from .errors import GuestAccessError, KvmError, TransactionError
from .slots import (
    Change,
    ChangeKind,
    CheckBinding,
    GmemBinding,
    Limits,
    MemorySlot,
    Request,
    SlotSet,
    validate,
)
from .uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    PAGE_MASK,
    PAGE_SHIFT,
    U64_MAX,
)

__all__ = ["Memslots", "Root", "carry_dirty_bits"]

# this process's id, kept by a fork hook rather than asked of the kernel at every VM ioctl
# (getpid is a system call): a child forked by Python (os.fork, multiprocessing) sees its own
_process = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _process.__setitem__(0, os.getpid()))

Root = tuple[SlotSet, ...]
# kvm_gmem_bind's checks for a request of a batch, given the batch's changes before it
CheckBatchBinding = Callable[[MemorySlot, object, int, Sequence[Change]], GmemBinding]


class Memslots:
    """A VM's memslots: see the module notes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.slots_lock = sync.Mutex("slots_lock")
        self.srcu = sync.Srcu("vm.srcu")
        # the published root; hot paths read `active.value` (one attribute load)
        self.active: sync.Atomic[Root] = sync.Atomic(
            tuple(SlotSet(as_id, as_id) for as_id in range(limits.address_spaces)))
        self.nr_pages = 0  # nr_memslot_pages, all address spaces (slots_lock)
        # kvm->dirty_ring_size: bytes per vCPU ring, 0 without rings; set once, before any
        # vCPU exists. While rings are on, new logging slots get no bitmap.
        self.dirty_ring_size = 0
        self._pid = os.getpid()
        # host invalidations between start and end (KVM's mn_active_invalidate_count), and
        # their hva ranges; changed under mn_lock, read locklessly
        self.mn_lock = sync.Mutex("mn_invalidate_lock")
        self._mn_done = sync.Condition(self.mn_lock)
        self.mn_active: sync.Atomic[int] = sync.Atomic(0)
        self.mn_ranges: sync.Atomic[tuple[tuple[int, int], ...]] = sync.Atomic(())
        # what changed since a snapshot: marked by the accessors and the MMU below the Vm
        # (which arms it and takes it); here because every one of them is given this object
        self.restore_log = RestoreLog(limits.address_spaces)

    # -- checks at the door -----------------------------------------------------------------
    def check_process(self) -> None:
        """KVM answers EIO to every VM ioctl from a process other than the VM's creator
        (a fork child), before it looks at any argument."""
        if _process[0] != self._pid:
            raise KvmError(errno.EIO, "the VM was created by another process (fork)")

    def address_space(self, as_id: object) -> int:
        """`as_id` if this VM has that address space."""
        as_id = as_int("as_id", as_id)
        if not 0 <= as_id < self.limits.address_spaces:
            raise KvmError(errno.EINVAL, f"address space {as_id} does not exist "
                                         f"(this VM has {self.limits.address_spaces})")
        return as_id

    # -- reads --------------------------------------------------------------------------------
    def slot_set(self, as_id: int = 0) -> SlotSet:
        """The published set of `as_id` (a snapshot: it never changes)."""
        return self.active.load()[self.address_space(as_id)]

    def lookup(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot containing `gfn` in `as_id` (INVALID slots included), or None."""
        if type(gfn) is not int or not 0 <= gfn <= U64_MAX:
            gfn = as_u64("gfn", gfn)  # gfn_t
        return self.active.value[self.address_space(as_id)].search(gfn)

    def translate(self, gpa: int, as_id: int = 0) -> int:
        """gpa → hva (read intent); EFAULT where no usable slot maps the gpa."""
        if type(gpa) is not int or not 0 <= gpa <= U64_MAX:
            gpa = as_u64("gpa", gpa)  # gpa_t
        root = self.active.value
        if type(as_id) is not int or not 0 <= as_id < len(root):
            as_id = self.address_space(as_id)
        slots = root[as_id]
        d = slots.hva_delta(gpa >> PAGE_SHIFT)
        if d is None:
            raise GuestAccessError(errno.EFAULT, f"gpa {gpa:#x} has no memory slot in "
                                                 f"address space {as_id}", gpa, 0)
        return gpa + d

    def hva_to_gfn_ranges(self, start: int, end: int
                          ) -> Iterator[tuple[MemorySlot, int, int]]:
        """For an hva range [start, end): every (slot, first gfn, end gfn) it backs, in every
        address space — the walk of an MMU-notifier invalidation."""
        for slots in self.active.load():
            for s in slots.by_hva(start, end):
                lo = max(start, s.hva)
                hi = min(end, s.hva_end)
                yield s, s.gfn_of(lo), s.gfn_of(hi + PAGE_MASK)

    # -- the gate between host invalidations and slot swaps --------------------------------
    def invalidation_started(self, start: int, end: int) -> None:
        """A host invalidation of [start, end) begins: swaps wait until it ends."""
        with self.mn_lock:
            self.mn_active.add(1)
            self.mn_ranges.store((*self.mn_ranges.load(), (start, end)))

    def invalidation_ended(self, start: int, end: int) -> None:
        with self.mn_lock:
            ranges = list(self.mn_ranges.load())
            ranges.remove((start, end))
            self.mn_ranges.store(tuple(ranges))
            if self.mn_active.add(-1) == 0:
                self._mn_done.notify_all()

    def invalidating(self, hva: int) -> bool:
        """A host invalidation covering `hva` is between its start and its end."""
        return any(start <= hva < end for start, end in self.mn_ranges.load())

    # -- the update path (slots_lock held) ----------------------------------------------------
    def prepare(self, req: Request, working: Root | dict[int, SlotSet], pages: int,
                move_refused: Callable[[], str | None], initially_set: bool,
                check_binding: CheckBinding) -> Change:
        """`validate` against the address space's set in `working`, then KVM's dirty-bitmap
        decision (kvm_prepare_memory_region, table §1.4)."""
        as_id = req.as_id if req.as_id < self.limits.address_spaces else 0
        change = validate(req, working[as_id], self.limits, pages, move_refused,
                          check_binding)
        new = change.new
        if new is None or change.kind is ChangeKind.NONE:
            return change
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            bitmap = None
        elif change.old is not None and change.old.dirty_bitmap is not None:
            bitmap = change.old.dirty_bitmap
        elif self.dirty_ring_size == 0:  # kvm_use_dirty_bitmap
            bitmap = DirtyBitmap(new.npages, initially_set=initially_set)
        else:
            bitmap = None
        slot = MemorySlot(new.id, new.as_id, new.base_gfn, new.npages, new.hva, new.flags,
                          bitmap, new.gmem)
        return Change(change.kind, change.as_id, change.old, slot)

    def plan(self, requests: Sequence[Request], move_refused: Callable[[], str | None],
             initially_set: bool, check_binding: CheckBatchBinding
             ) -> tuple[list[Change], dict[int, SlotSet]]:
        """A batch: every request validated, in order, against the sets the batch has built
        so far (a binding against the files' bindings as the batch leaves them so far).
        Returns the changes and the new set of every address space they touch, or raises
        `TransactionError` naming the first refused request. Publishes nothing."""
        self.slots_lock.assert_held()
        working = dict(enumerate(self.active.load()))
        pages = self.nr_pages
        changes: list[Change] = []

        def check_in_batch(new: MemorySlot, file: object, offset: int) -> GmemBinding:
            return check_binding(new, file, offset, changes)

        for index, req in enumerate(requests):
            try:
                change = self.prepare(req, working, pages, move_refused, initially_set,
                                      check_in_batch)
            except KvmError as e:
                raise TransactionError(index, e) from None
            if change.kind is ChangeKind.NONE:
                continue
            working[change.as_id] = change.apply(working[change.as_id])
            pages += change.page_delta
            changes.append(change)
        touched = {c.as_id for c in changes}
        return changes, {as_id: working[as_id] for as_id in touched}

    def invalid_copy(self, old: MemorySlot) -> SlotSet:
        """The set of `old`'s address space with `old` marked INVALID (a single DELETE or
        MOVE publishes this first: new lookups miss, faults retry)."""
        inv = old.with_flags(old.flags | KVM_MEMSLOT_INVALID)
        return self.active.load()[old.as_id].replacing(old, inv)

    def publish(self, sets: dict[int, SlotSet]) -> None:
        """Publish `sets` (by address space) in one store, wait for a grace period, then
        finalise their generations (kvm_swap_active_memslots)."""
        self.slots_lock.assert_held()
        old_root = self.active.load()
        nr_as = len(old_root)
        root = list(old_root)
        for as_id, s in sets.items():
            root[as_id] = s.published(old_root[as_id].generation
                                      | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
        new_root = tuple(root)
        with self.mn_lock:
            # an invalidation between start and end must see one slot layout throughout
            self._mn_done.wait_until(lambda: self.mn_active.load() == 0)
            self.active.store(new_root)
        self.grace_period()
        for as_id in sets:
            new_root[as_id].generation = old_root[as_id].generation + nr_as

    def grace_period(self) -> None:
        """Return once no reader that may have loaded the old root is still inside: the
        VM's SRCU readers and every accessor copy (which runs inside the host guard)."""
        self.srcu.synchronize()
        host.guard.synchronize()

    def account(self, changes: Sequence[Change]) -> None:
        """nr_memslot_pages after `changes` (their commit)."""
        self.slots_lock.assert_held()
        for c in changes:
            self.nr_pages += c.page_delta


def carry_dirty_bits(changes: Sequence[Change]) -> None:
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
