"""Page write tracking (kvm-semantics §6, KVM's `arch/x86/kvm/mmu/page_track.c`).

A tracked gfn is never mapped writable in the stage-2; a guest write to it is performed by
kvmem (as KVM emulates the instruction), dirty-logged, and then reported to every
registered notifier with `track_write(gpa, new_bytes)`. Users are KVMGT-like: a device
model shadowing guest page tables, a fuzzer watching a page, a snapshotter.

Rules of this room:
- The per-gfn counters are stage-2 state: they change, and are read, only under the MMU
  lock (`mmu.lock`), so "tracked ⇒ not writable" holds at every instant. Notifiers that
  want to know whether a gfn is tracked call `is_tracked`, which takes that lock.
- `_update` (a mutex) orders whole add/remove operations, including what engines hear
  (`track_changed`), so an engine sees 0→1 and 1→0 transitions in the order they happened.
- Notifier callbacks run inside `srcu` read sections; `unregister` waits for them to end.
  They run with no kvmem lock held, except `track_remove_region`, which runs during a slot
  commit under `slots_lock` (as in KVM): it must not change slots.

Tracking belongs to guest frames, not to slot objects. A single DELETE drops the counters
of its range and calls `track_remove_region(base_gfn, npages)` once the deletion is
certain; a MOVE starts its range afresh (KVM allocates new arrays) and is refused with
EINVAL while a notifier is registered. A transaction — kvmem's own — keeps the counters of
every gfn that a slot still maps after the commit (a split or a flags change does not lose
tracking), except the old range of a moved slot, and reports each range no slot maps any
more with `track_remove_region`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from . import access, sync
from .errors import KvmError
from .mmu import HUGE_PAGES
from .slots import Change, ChangeKind, MemorySlot, SlotSet
from .uapi import PAGE_SHIFT, U64_MAX

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["PageTrack", "TrackNotifier"]

MAX_COUNT = 0xFFFF  # KVM's counters are u16


class TrackNotifier(Protocol):
    """What a page-track user implements (KVM's `kvm_page_track_notifier_node`)."""

    def track_write(self, gpa: int, data: bytes) -> None:
        """A guest write of `data` at `gpa` to a tracked page has been performed."""

    def track_remove_region(self, gfn: int, npages: int) -> None:
        """The slot that mapped [gfn, gfn + npages) was deleted: forget those gfns."""


class PageTrack:
    """`vm.page_track`: per-gfn write-tracking counters, notifiers and the tracked-write
    path. Also a listener of the VM's slot updates (after the MMU)."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._mmu = vm.mmu
        n = vm.limits.address_spaces
        self._counts: list[dict[int, int]] = [{} for _ in range(n)]  # gfn → counter
        self._blocks: list[dict[int, int]] = [{} for _ in range(n)]  # 2 MiB block → tracked
        self._notifiers: sync.Atomic[tuple[TrackNotifier, ...]] = sync.Atomic(())
        self._update = sync.Mutex("page_track.update")
        self.srcu = sync.Srcu("page_track.srcu")
        self.stats = {"tracked_writes": 0, "notified": 0}

    # -- notifiers --------------------------------------------------------------------------
    def register(self, notifier: TrackNotifier) -> None:
        """kvm_page_track_register_notifier (ESRCH from another process, as KVM answers a
        caller whose mm is not the VM's)."""
        if os.getpid() != self._vm._pid:
            raise KvmError(errno.ESRCH, "page tracking registered from another process")
        for name in ("track_write", "track_remove_region"):
            if not callable(getattr(notifier, name, None)):
                raise TypeError(f"a page-track notifier needs a {name} method")
        with self._mmu.lock:
            if notifier in self._notifiers.load():
                raise KvmError(errno.EEXIST, "notifier is already registered")
            self._notifiers.store((*self._notifiers.load(), notifier))

    def unregister(self, notifier: TrackNotifier) -> None:
        """Remove `notifier`; returns once no callback to it is running."""
        with self._mmu.lock:
            current = self._notifiers.load()
            if notifier not in current:
                raise KvmError(errno.ENOENT, "notifier is not registered")
            self._notifiers.store(tuple(n for n in current if n is not notifier))
        self.srcu.synchronize()

    @property
    def has_external_user(self) -> bool:
        """kvm_page_track_has_external_user: a notifier is registered."""
        return bool(self._notifiers.load())

    def move_refused(self) -> str | None:
        """Asked by the slot-update path before a MOVE (x86 prepare)."""
        if self._notifiers.load():
            return "a page-track notifier is registered (tracking would not follow the slot)"
        return None

    # -- counters ---------------------------------------------------------------------------
    def add_gfn(self, gfn: int, as_id: int = 0) -> None:
        """kvm_write_track_add_gfn: one more reason to write-protect `gfn`. EINVAL if no
        slot maps it (or its counter is at 65535)."""
        self._change(gfn, as_id, +1)

    def remove_gfn(self, gfn: int, as_id: int = 0) -> None:
        """kvm_write_track_remove_gfn: one reason fewer. EINVAL if no slot maps `gfn` or
        it is not tracked. The page is made writable again by its next write fault."""
        self._change(gfn, as_id, -1)

    def _change(self, gfn: int, as_id: int, delta: int) -> None:
        vm = self._vm
        vm._check_process()
        if not isinstance(gfn, int) or isinstance(gfn, bool):
            raise TypeError(f"gfn must be an int, not {type(gfn).__name__}")
        as_id = vm._as(as_id)
        if not 0 <= gfn <= U64_MAX >> PAGE_SHIFT:
            raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is not a guest frame number")
        with self._update:
            # the slot lookup and the counter change share one read section: a DELETE of
            # this slot cannot commit (and drop the counters) between them
            vm.srcu.read_lock()
            try:
                slot = vm._memslots.load()[as_id].search(gfn)
                if slot is None or slot.invalid:
                    raise KvmError(errno.EINVAL, f"gfn {gfn:#x} has no memory slot in "
                                                 f"address space {as_id}")
                with self._mmu.lock:
                    count = self._counts[as_id].get(gfn, 0) + delta
                    if count < 0:
                        raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is not write-tracked")
                    if count > MAX_COUNT:
                        raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is tracked {MAX_COUNT} "
                                                     f"times already")
                    self._set(as_id, gfn, count)
            finally:
                vm.srcu.read_unlock()
            if count == (1 if delta > 0 else 0):
                for listener in list(vm._listeners):
                    changed = getattr(listener, "track_changed", None)
                    if changed is not None:
                        changed(vm, as_id, gfn, count > 0)

    def _set(self, as_id: int, gfn: int, count: int) -> None:
        """Store a counter; on 0→1 write-protect the gfn in the stage-2 (a 2 MiB mapping
        covering it is broken into 4 KiB ones)."""
        mmu = self._mmu
        mmu.lock.assert_held()
        counts, blocks = self._counts[as_id], self._blocks[as_id]
        block = gfn // HUGE_PAGES
        was = counts.get(gfn, 0)
        if count:
            counts[gfn] = count
        else:
            counts.pop(gfn, None)
        if was == 0 and count > 0:
            blocks[block] = blocks.get(block, 0) + 1
            if mmu.break_huge(as_id, block) | mmu.write_protect_locked(as_id, [gfn]):
                mmu.flush()
        elif was > 0 and count == 0:
            if blocks[block] == 1:
                del blocks[block]
            else:
                blocks[block] -= 1

    def tracked(self, as_id: int, gfn: int) -> bool:
        """kvm_gfn_is_write_tracked, for the stage-2 (MMU lock held)."""
        self._mmu.lock.assert_held()
        return gfn in self._counts[as_id]

    def block_tracked(self, as_id: int, block: int) -> bool:
        """Some gfn of 2 MiB block `block` is tracked: no huge mapping there."""
        self._mmu.lock.assert_held()
        return block in self._blocks[as_id]

    def is_tracked(self, gfn: int, as_id: int = 0) -> bool:
        """Whether `gfn` is write-tracked now (takes the MMU lock: safe for notifiers)."""
        as_id = self._vm._as(as_id)
        with self._mmu.lock:
            return gfn in self._counts[as_id]

    def count(self, gfn: int, as_id: int = 0) -> int:
        as_id = self._vm._as(as_id)
        with self._mmu.lock:
            return self._counts[as_id].get(gfn, 0)

    def tracked_gfns(self, as_id: int = 0) -> list[int]:
        """Every tracked gfn of `as_id`, sorted (engines mirror these)."""
        as_id = self._vm._as(as_id)
        with self._mmu.lock:
            return sorted(self._counts[as_id])

    # -- the tracked-write path (DESIGN path 5) -----------------------------------------------
    def write(self, as_id: int, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Perform a guest write that hit a write-protected (tracked) page, as KVM's
        emulator does: through the accessor path (so it is dirty-logged), then
        `track_write(gpa, bytes)` to every notifier. Engines call this for the MMIO write
        exits of their read-only splits; `vcpu.guest_write` calls it from the fault path."""
        vm = self._vm
        src = access.byte_view(data)
        access.check_range(gpa, src.nbytes)
        vm.srcu.read_lock()
        try:
            access.write(vm._memslots.load()[vm._as(as_id)].lookup, gpa, src)
        finally:
            vm.srcu.read_unlock()
        self.stats["tracked_writes"] += 1
        self._notify_write(gpa, src.tobytes())

    def _notify_write(self, gpa: int, data: bytes) -> None:
        self.srcu.read_lock()
        try:
            for n in self._notifiers.load():
                n.track_write(gpa, data)
                self.stats["notified"] += 1
        finally:
            self.srcu.read_unlock()

    # -- slot updates (a Vm listener) ---------------------------------------------------------
    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None:
        pass

    def slots_updating(self, vm: Vm, changes: Sequence[Change]) -> None:
        pass

    def dirty_log_reprotect(self, vm: Vm, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        pass

    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        vm.slots_lock.assert_held()
        root = vm._memslots.load()
        removed: list[tuple[int, int, int]] = []  # (as_id, gfn, npages) no slot maps now
        with self._mmu.lock:
            for c in changes:
                old = c.old
                if old is None or c.kind not in (ChangeKind.DELETE, ChangeKind.MOVE):
                    continue
                if c.kind is ChangeKind.MOVE:
                    self._drop(old.as_id, old.base_gfn, old.end_gfn)  # fresh tracking
                    continue
                for lo, hi in _uncovered(root[old.as_id], old.base_gfn, old.end_gfn):
                    self._drop(old.as_id, lo, hi)
                    removed.append((old.as_id, lo, hi - lo))
        if not removed:
            return
        self.srcu.read_lock()
        try:
            for n in self._notifiers.load():
                for _, gfn, npages in removed:
                    n.track_remove_region(gfn, npages)
        finally:
            self.srcu.read_unlock()

    def _drop(self, as_id: int, lo: int, hi: int) -> None:
        counts = self._counts[as_id]
        gone = [g for g in counts if lo <= g < hi] if len(counts) < hi - lo else \
            [g for g in range(lo, hi) if g in counts]
        for g in gone:
            self._set(as_id, g, 0)


def _uncovered(slots: SlotSet, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) that no slot of `slots` maps."""
    out: list[tuple[int, int]] = []
    pos = lo
    for s in slots.overlapping(lo, hi):
        if s.base_gfn > pos:
            out.append((pos, s.base_gfn))
        pos = max(pos, s.end_gfn)
    if pos < hi:
        out.append((pos, hi))
    return out

