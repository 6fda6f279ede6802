"""Page write tracking (kvm-semantics §6, KVM's `arch/x86/kvm/mmu/page_track.c`).

A tracked gfn is never mapped writable in the stage-2; a guest write to it is performed by
kvmem (as KVM emulates the instruction), dirty-logged, and then reported to every
registered notifier with `track_write(gpa, new_bytes)`. Users are KVMGT-like: a device
model shadowing guest page tables, a fuzzer watching a page, a snapshotter.

Rules of this room:
- The per-gfn counters are the MMU's (stage-2 state under `mmu.lock`: `Mmu.track`); this
  module adds and removes references, reports the 0→1 and 1→0 transitions, owns the
  notifiers and performs tracked writes. `is_tracked` takes the MMU lock, so notifiers may
  call it.
- `_update` (a mutex) orders whole add/remove operations, including the transition report
  (`on_change`, given by the layer above: engines mirror tracking), so 0→1 and 1→0 are
  reported in the order they happened.
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
from collections.abc import Callable, Sequence
from typing import Protocol

from . import sync
from .access import GuestMemory
from .args import as_bytes, as_int, check_range
from .errors import KvmError
from .memslots import Memslots
from .mmu import Mmu
from .slots import Change, ChangeKind, SlotSet
from .uapi import PAGE_SHIFT, U64_MAX

__all__ = ["PageTrack", "TrackNotifier"]

# (as_id, gfn, tracked): a gfn's counter went 0→1 (True) or 1→0 (False)
TrackChanged = Callable[[int, int, bool], None]


class TrackNotifier(Protocol):
    """What a page-track user implements (KVM's `kvm_page_track_notifier_node`)."""

    def track_write(self, gpa: int, data: bytes) -> None:
        """A guest write of `data` at `gpa` to a tracked page has been performed."""

    def track_remove_region(self, gfn: int, npages: int) -> None:
        """The slot that mapped [gfn, gfn + npages) was deleted: forget those gfns."""


class PageTrack:
    """`vm.page_track`: write-tracking references, notifiers and the tracked-write path."""

    def __init__(self, memslots: Memslots, mmu: Mmu, memories: Sequence[GuestMemory],
                 on_change: TrackChanged) -> None:
        self._memslots = memslots
        self._mmu = mmu
        self._memories = memories  # the accessor path of each address space
        self._on_change = on_change
        self._notifiers: sync.Atomic[tuple[TrackNotifier, ...]] = sync.Atomic(())
        self._update = sync.Mutex("page_track.update")
        self.srcu = sync.Srcu("page_track.srcu")
        self.stats = {"tracked_writes": 0, "notified": 0}
        mmu.tracked_write = self.write

    # -- notifiers --------------------------------------------------------------------------
    def register(self, notifier: TrackNotifier) -> None:
        """kvm_page_track_register_notifier (ESRCH from another process, as KVM answers a
        caller whose mm is not the VM's)."""
        try:
            self._memslots.check_process()
        except KvmError:
            raise KvmError(errno.ESRCH, "page tracking registered from another "
                                        "process") from None
        _check_notifier(notifier)
        with self._mmu.lock:
            if notifier in self._notifiers.load():
                raise KvmError(errno.EEXIST, "notifier is already registered")
            self._notifiers.store((*self._notifiers.load(), notifier))

    def unregister(self, notifier: TrackNotifier) -> None:
        """Remove `notifier`; returns once no callback to it is running."""
        _check_notifier(notifier)
        with self._mmu.lock:
            current = self._notifiers.load()
            if notifier not in current:
                raise KvmError(errno.ENOENT, "notifier is not registered")
            self._notifiers.store(tuple(n for n in current if n is not notifier))
        self.srcu.synchronize()

    @property
    def notifiers(self) -> tuple[TrackNotifier, ...]:
        """The registered notifiers, in registration order."""
        return self._notifiers.load()

    def move_refused(self) -> str | None:
        """x86 prepare's check before a MOVE: refused while a notifier is registered
        (kvm_page_track_has_external_user)."""
        if self._notifiers.load():
            return "a page-track notifier is registered (tracking would not follow the slot)"
        return None

    # -- references -------------------------------------------------------------------------
    def add_gfn(self, gfn: int, as_id: int = 0) -> None:
        """kvm_write_track_add_gfn: one more reason to write-protect `gfn`. EINVAL if no
        slot maps it (or its counter is at 65535)."""
        self._change(gfn, as_id, +1)

    def remove_gfn(self, gfn: int, as_id: int = 0) -> None:
        """kvm_write_track_remove_gfn: one reason fewer. EINVAL if no slot maps `gfn` or
        it is not tracked. The page is made writable again by its next write fault."""
        self._change(gfn, as_id, -1)

    def _gfn(self, gfn: object) -> int:
        gfn = as_int("gfn", gfn)
        if not 0 <= gfn <= U64_MAX >> PAGE_SHIFT:
            raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is not a guest frame number")
        return gfn

    def _change(self, gfn: object, as_id: object, delta: int) -> None:
        ms = self._memslots
        ms.check_process()
        gfn = self._gfn(gfn)
        as_id = ms.address_space(as_id)
        with self._update:
            # the slot lookup and the counter change share one read section: a DELETE of
            # this slot cannot commit (and drop the counters) between them
            token = ms.srcu.read_lock()
            try:
                slot = ms.active.load()[as_id].search(gfn)
                if slot is None or slot.invalid:
                    raise KvmError(errno.EINVAL, f"gfn {gfn:#x} has no memory slot in "
                                                 f"address space {as_id}")
                with self._mmu.lock:
                    count = self._mmu.track(as_id, gfn, delta)
            finally:
                ms.srcu.read_unlock(token)
            if count == (1 if delta > 0 else 0):
                self._on_change(as_id, gfn, count > 0)

    def is_tracked(self, gfn: int, as_id: int = 0) -> bool:
        """Whether `gfn` is write-tracked now (takes the MMU lock: safe for notifiers)."""
        return self.count(gfn, as_id) > 0

    def count(self, gfn: int, as_id: int = 0) -> int:
        """How many references `gfn` is tracked with."""
        gfn = self._gfn(gfn)
        return self._mmu.track_count(self._memslots.address_space(as_id), gfn)

    def tracked_gfns(self, as_id: int = 0) -> list[int]:
        """Every tracked gfn of `as_id`, sorted (engines mirror these)."""
        return self._mmu.tracked_gfns(self._memslots.address_space(as_id))

    # -- the tracked-write path (DESIGN path 5) -----------------------------------------------
    def write(self, as_id: int, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Perform a guest write that hit a write-protected (tracked) page, as KVM's
        emulator does: through the accessor path (so it is dirty-logged), then
        `track_write(gpa, bytes)` to every notifier. Engines call this for the MMIO write
        exits of their read-only splits; the stage-2 calls it from the fault path."""
        as_id = self._memslots.address_space(as_id)
        src = as_bytes("data", data)
        check_range(gpa, src.nbytes)
        self._memories[as_id].write(gpa, src)
        self.stats["tracked_writes"] += 1
        self._notify_write(gpa, src.tobytes())

    def _notify_write(self, gpa: int, data: bytes) -> None:
        token = self.srcu.read_lock()
        try:
            for n in self._notifiers.load():
                n.track_write(gpa, data)
                self.stats["notified"] += 1
        finally:
            self.srcu.read_unlock(token)

    # -- slot updates (called by the update path, slots_lock held) ----------------------------
    def slots_committed(self, changes: Sequence[Change]) -> None:
        self._memslots.slots_lock.assert_held()
        root = self._memslots.active.load()
        removed: list[tuple[int, int, int]] = []  # (as_id, gfn, npages) no slot maps now
        with self._mmu.lock:
            for c in changes:
                old = c.old
                if old is None or not c.unmaps_old:
                    continue
                if c.kind is ChangeKind.MOVE:
                    self._mmu.untrack_range(old.as_id, old.base_gfn, old.end_gfn)  # afresh
                    continue
                for lo, hi in _uncovered(root[old.as_id], old.base_gfn, old.end_gfn):
                    self._mmu.untrack_range(old.as_id, lo, hi)
                    removed.append((old.as_id, lo, hi - lo))
        if not removed:
            return
        token = self.srcu.read_lock()
        try:
            for n in self._notifiers.load():
                for _, gfn, npages in removed:
                    n.track_remove_region(gfn, npages)
        finally:
            self.srcu.read_unlock(token)


def _check_notifier(notifier: object) -> None:
    for name in ("track_write", "track_remove_region"):
        if not callable(getattr(notifier, name, None)):
            raise TypeError(f"a page-track notifier needs a {name} method, "
                            f"{type(notifier).__name__} has none")


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
