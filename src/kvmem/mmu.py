"""The MMU: host invalidations (KVM's MMU notifier), the software stage-2, the fault path.

Rules of this room:
- Every stage-2 change happens under `lock` (KVM's mmu_lock). The invalidation state
  (`seq`, `in_progress`, range) changes only under it; the fault path reads `seq` before
  resolving a page without the lock and re-checks under it (`retry_gfn`), so a page
  resolved before or during an invalidation is never installed.
- A guest access through the stage-2 runs inside a `tlb` read section: a zap removes
  sptes, then `flush` waits for the section to drain — KVM's remote TLB flush. After a zap
  returns, no access still uses what it removed.
- `mn_active` counts invalidations between start and end; memslot swaps wait for it to be
  zero (see `Vm._swap`), so the start and end of one invalidation see the same slots.

Theory of the fault (DESIGN path 3): look the gfn up in the vCPU's address space; no slot
→ `MmioExit`; INVALID slot → retry; snapshot `seq`; resolve gfn → hva → frame without the
lock; lock; `retry_gfn(seq, gfn)` → retry; a write to a write-tracked gfn → `TrackedWrite`
(performed by page tracking, never mapped writable); install the spte (writable only for
a write, or a read of a writable page in a slot that does not log dirty pages, and never
for a tracked gfn; no 2 MiB mapping over a tracked gfn); mark dirty when installed
writable in a logging slot.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import host, sync
from .errors import KvmError
from .host import Frame
from .slots import Change, ChangeKind, MemorySlot
from .uapi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .vm import Vcpu, Vm

__all__ = ["MemoryFault", "MmioExit", "Mmu", "Spte", "TrackedWrite"]

HUGE_PAGES = 512  # 4 KiB pages in a 2 MiB mapping


class MmioExit(Exception):
    """The access would exit to userspace with KVM_EXIT_MMIO: no slot at `gpa` (read or
    write), or a write to a read-only slot. For a write `data` holds the bytes."""

    def __init__(self, gpa: int, length: int, is_write: bool, data: bytes = b"") -> None:
        kind = "write" if is_write else "read"
        super().__init__(f"MMIO {kind} of {length} bytes at gpa {gpa:#x}")
        self.gpa = gpa
        self.len = length
        self.is_write = is_write
        self.data = data


class TrackedWrite(Exception):
    """A guest write hit a write-tracked gfn: instead of mapping the page writable the
    caller performs the write with `vm.page_track.write` (as KVM emulates it)."""

    def __init__(self, gpa: int) -> None:
        super().__init__(f"write to write-tracked gpa {gpa:#x}")
        self.gpa = gpa


class MemoryFault(KvmError):
    """KVM_EXIT_MEMORY_FAULT (-EFAULT): the slot's host memory cannot be had."""

    def __init__(self, gpa: int, size: int, why: str) -> None:
        super().__init__(errno.EFAULT, f"memory fault at gpa {gpa:#x}: {why}")
        self.gpa = gpa
        self.size = size


@dataclass(frozen=True, slots=True)
class Spte:
    """A stage-2 mapping of `npages` gfns from `gfn` (1, or 512 for a 2 MiB mapping) to the
    host pages starting at `frame`."""

    gfn: int
    frame: Frame
    writable: bool
    npages: int = 1
    incarnations: bytes = b""  # 2 MiB mappings: each host page's incarnation at install

    def current(self, gfn: int) -> bool:
        """The host page this spte maps for `gfn` is still the one it was built on (the
        oracle of the stress tests: a stale use is a protocol bug)."""
        f = self.frame
        if self.npages == 1:
            return f.current()
        i = gfn - self.gfn
        return (not f.owner.closed and
                int(f.owner._frames[f.index + i]) ==
                int.from_bytes(self.incarnations[4 * i:4 * i + 4], "little"))


class _Retry(Exception):
    pass


class Stage2Mirror(Protocol):
    """An engine that maps what the stage-2 maps (Unicorn): told, under the MMU lock and
    before the flush, of every gfn range whose sptes were dropped or made read-only. It
    must stop using its own mappings of the range before it returns."""

    def stage2_unmapped(self, as_id: int, start_gfn: int, end_gfn: int) -> None: ...


class PfnCacheLike(Protocol):
    """What the invalidation path needs of a pfn cache (`kvmem.pfncache.PfnCache`)."""

    def invalidate_start(self, start: int, end: int) -> None: ...


class _Notifier:
    """Registered with `host.notifiers`; holds the MMU weakly so a VM can be collected."""

    def __init__(self, mmu: Mmu) -> None:
        self._mmu = weakref.ref(mmu)

    def invalidate_range_start(self, start: int, end: int) -> None:
        mmu = self._mmu()
        if mmu is None:
            host.notifiers.unregister(self)
        else:
            mmu.invalidate_range_start(start, end)

    def invalidate_range_end(self, start: int, end: int) -> None:
        mmu = self._mmu()
        if mmu is not None:
            mmu.invalidate_range_end(start, end)


class Mmu:
    def __init__(self, vm: Vm) -> None:
        self._vm = weakref.proxy(vm)
        self.lock = sync.Mutex("mmu_lock")
        self.tlb = sync.Srcu("mmu.tlb")
        self.seq: sync.Atomic[int] = sync.Atomic(0)
        self.in_progress: sync.Atomic[int] = sync.Atomic(0)
        self.range_start: sync.Atomic[int | None] = sync.Atomic(None)
        self.range_end: sync.Atomic[int | None] = sync.Atomic(None)
        self.mn_lock = sync.Mutex("mn_invalidate_lock")
        self.mn_done = sync.Condition(self.mn_lock)
        # invalidations between start and end; changed under mn_lock, read locklessly by
        # pfn-cache refreshes (which must not finish while one is in flight)
        self.mn_active: sync.Atomic[int] = sync.Atomic(0)
        # their hva ranges (for pfn-cache refreshes, which wait only for ones covering them)
        self.mn_ranges: sync.Atomic[tuple[tuple[int, int], ...]] = sync.Atomic(())
        # pfn caches that invalidations must reach (kvm->gpc_list), changed under gpc_lock
        self.gpc_lock = sync.Mutex("gpc_lock")
        self.gpc_list: sync.Atomic[tuple[PfnCacheLike, ...]] = sync.Atomic(())
        n = vm.limits.address_spaces
        self._small: list[dict[int, Spte]] = [{} for _ in range(n)]
        self._huge: list[dict[int, Spte]] = [{} for _ in range(n)]
        self._batch_open = False
        self.mirrors: list[Stage2Mirror] = []
        self.stats = {"faults": 0, "retries": 0, "installs": 0, "zapped": 0, "stale_uses": 0,
                      "invalidations": 0, "broken_huge": 0, "tracked_faults": 0}
        self._notifier = _Notifier(self)
        host.notifiers.register(self._notifier)

    # -- invalidation bookkeeping (kvm_mmu_invalidate_begin / range_add / end) -------------
    def begin(self) -> None:
        self.lock.assert_held()
        if self.in_progress.add(1) == 1:
            self.range_start.store(None)
            self.range_end.store(None)

    def range_add(self, start: int, end: int) -> None:
        self.lock.assert_held()
        if self.in_progress.load() <= 0:
            raise AssertionError("range_add outside an invalidation")
        lo, hi = self.range_start.load(), self.range_end.load()
        if lo is None or hi is None:
            self.range_start.store(start)
            self.range_end.store(end)
        else:
            # ranges of overlapping invalidations accumulate until all of them end
            self.range_start.store(min(lo, start))
            self.range_end.store(max(hi, end))

    def end(self) -> None:
        self.lock.assert_held()
        self.seq.add(1)  # before in_progress drops: a fault that saw the old seq retries
        if self.in_progress.add(-1) < 0:
            raise AssertionError("invalidation end without begin")

    def retry(self, seq: int) -> bool:
        return self.in_progress.load() != 0 or self.seq.load() != seq

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn: called with the lock held."""
        self.lock.assert_held()
        return self.retry_gfn_unsafe(seq, gfn)

    def _range_busy(self, start: int, end: int) -> bool:
        """An invalidation in progress covers part of [start, end) (lock held)."""
        self.lock.assert_held()
        if not self.in_progress.load():
            return False
        lo, hi = self.range_start.load(), self.range_end.load()
        return lo is None or hi is None or (lo < end and start < hi)

    def retry_gfn_unsafe(self, seq: int, gfn: int) -> bool:
        if self.in_progress.load():
            lo, hi = self.range_start.load(), self.range_end.load()
            if lo is None or hi is None or lo <= gfn < hi:
                return True
        return self.seq.load() != seq

    # -- host side --------------------------------------------------------------------------
    def invalidate_range_start(self, start: int, end: int) -> None:
        with self.mn_lock:
            self.mn_active.add(1)
            self.mn_ranges.store((*self.mn_ranges.load(), (start, end)))
        # pfn caches first, before in_progress rises and without filtering by slots: an
        # HVA-based cache may point at memory no slot maps
        for gpc in self.gpc_list.load():
            gpc.invalidate_start(start, end)
        hit = False
        try:
            for slot, lo, hi in self._vm.hva_to_gfn_ranges(start, end):
                if not hit:
                    self.lock.acquire()
                    self.begin()
                    hit = True
                self.range_add(lo, hi)
                self._zap(slot.as_id, lo, hi)
            if hit:
                self.stats["invalidations"] += 1
                self.flush()
        finally:
            if hit:
                self.lock.release()

    def invalidate_range_end(self, start: int, end: int) -> None:
        if any(True for _ in self._vm.hva_to_gfn_ranges(start, end)):
            with self.lock:
                self.end()
        with self.mn_lock:
            ranges = list(self.mn_ranges.load())
            ranges.remove((start, end))
            self.mn_ranges.store(tuple(ranges))
            if self.mn_active.add(-1) == 0:
                self.mn_done.notify_all()

    def invalidating(self, hva: int) -> bool:
        """A host invalidation covering `hva` is between its start and its end."""
        return any(start <= hva < end for start, end in self.mn_ranges.load())

    def wait_for_invalidations(self) -> None:
        """Called by a memslot swap with `mn_lock` held: no invalidation may be between
        its start and its end while the slots change under it."""
        self.mn_done.wait_until(lambda: self.mn_active.load() == 0)

    # -- stage-2 -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Remote TLB flush: wait until no guest access uses a removed spte."""
        self.tlb.synchronize()

    def _zap(self, as_id: int, start: int, end: int) -> int:
        self.lock.assert_held()
        small, huge = self._small[as_id], self._huge[as_id]
        gone = [g for g in (range(start, end) if end - start < len(small) else list(small))
                if start <= g < end and g in small]
        for g in gone:
            del small[g]
        hgone = [h for h in list(huge) if h * HUGE_PAGES < end and (h + 1) * HUGE_PAGES > start]
        for h in hgone:
            del huge[h]
        if self.mirrors and (gone or hgone):
            self._unmap_mirrors(as_id, start, end)
        self.stats["zapped"] += len(gone) + len(hgone)
        return len(gone) + len(hgone)

    def zap_gfn_range(self, as_id: int, start_gfn: int, end_gfn: int) -> int:
        """kvm_zap_gfn_range: drop the sptes of [start_gfn, end_gfn) in `as_id`, making
        concurrent faults in that range retry. Returns how many were dropped."""
        self._vm._as(as_id)
        if start_gfn >= end_gfn:
            return 0
        with self.lock:
            self.begin()
            try:
                self.range_add(start_gfn, end_gfn)
                n = self._zap(as_id, start_gfn, end_gfn)
                self.flush()
            finally:
                self.end()
        return n

    def write_protect(self, as_id: int, gfns: Sequence[int]) -> int:
        """Make the sptes of `gfns` read-only (huge mappings are dropped)."""
        with self.lock:
            n = self.write_protect_locked(as_id, gfns)
            if n:
                self.flush()
            return n

    def write_protect_locked(self, as_id: int, gfns: Sequence[int]) -> int:
        """`write_protect` for a caller that holds the lock and flushes (if this returns
        non-zero) before releasing it."""
        self.lock.assert_held()
        small, huge = self._small[as_id], self._huge[as_id]
        n = 0
        for g in gfns:
            s = small.get(g)
            if s is not None and s.writable:
                small[g] = Spte(g, s.frame, False)
                n += 1
                self._unmap_mirrors(as_id, g, g + 1)
            if g // HUGE_PAGES in huge:
                del huge[g // HUGE_PAGES]
                n += 1
                self._unmap_mirrors(as_id, g - g % HUGE_PAGES, g - g % HUGE_PAGES + HUGE_PAGES)
        return n

    def _unmap_mirrors(self, as_id: int, start: int, end: int) -> None:
        self.lock.assert_held()
        for mirror in self.mirrors:
            mirror.stage2_unmapped(as_id, start, end)

    def break_huge(self, as_id: int, block: int) -> bool:
        """Replace the 2 MiB mapping of `block` (if any) by the 512 4 KiB mappings it
        stands for, each still checked against its own host page. Lock held; the caller
        flushes if this returns True."""
        self.lock.assert_held()
        spte = self._huge[as_id].pop(block, None)
        if spte is None:
            return False
        f = spte.frame
        small = self._small[as_id]
        for i in range(HUGE_PAGES):
            inc = int.from_bytes(spte.incarnations[4 * i:4 * i + 4], "little")
            g = spte.gfn + i
            small[g] = Spte(g, Frame(f.owner, f.index + i, inc, f.writable), spte.writable)
        self.stats["broken_huge"] += 1
        return True

    def spte(self, as_id: int, gfn: int) -> Spte | None:
        s = self._small[as_id].get(gfn)
        if s is None:
            s = self._huge[as_id].get(gfn // HUGE_PAGES)
        return s

    def mapped(self, as_id: int) -> int:
        """Number of 4 KiB gfns mapped in `as_id`."""
        return len(self._small[as_id]) + HUGE_PAGES * len(self._huge[as_id])

    # -- the fault path ----------------------------------------------------------------------
    def fault(self, vcpu: Vcpu, gpa: int, write: bool) -> Spte | None:
        """Resolve a guest access that found no (or no writable) spte, inside the VM's SRCU
        read section. None means RET_PF_RETRY: the caller leaves the read section (as a
        vCPU re-entering the guest does, so a slot update can finish) and tries again.
        Raises `MmioExit` or `MemoryFault` where KVM would exit to userspace, and
        `TrackedWrite` for a write the caller must perform through page tracking."""
        self.stats["faults"] += 1
        try:
            return self._fault_once(vcpu, gpa, gpa >> PAGE_SHIFT, write)
        except _Retry:
            self.stats["retries"] += 1
            return None

    def _fault_once(self, vcpu: Vcpu, gpa: int, gfn: int, write: bool) -> Spte:
        slot = vcpu.lookup(gfn)
        if slot is None:
            raise MmioExit(gpa, 0, write)
        seq = self.seq.load()
        if slot.invalid:
            raise _Retry
        if write and slot.readonly:
            raise MmioExit(gpa, 0, True)
        if self.retry_gfn_unsafe(seq, gfn):
            raise _Retry
        huge = self._huge_base(slot, gfn, write)
        first = huge if huge is not None else gfn
        frame = host.resolve(slot.hva_of(first), write)
        if frame is None:
            raise MemoryFault(gpa, PAGE_SIZE, "host memory behind the slot is unmapped or "
                                              "protected against this access")
        writable = frame.writable and not slot.readonly and (
            write or slot.dirty_bitmap is None)
        if huge is not None and not self._huge_backed(frame):
            huge, first = None, gfn
            frame = host.resolve(slot.hva_of(gfn), write)
            if frame is None:
                raise MemoryFault(gpa, PAGE_SIZE, "host memory changed under the fault")
        with self.lock:
            if self.retry_gfn(seq, gfn):
                raise _Retry
            track = self._vm.page_track
            if huge is not None and (track.block_tracked(slot.as_id, huge // HUGE_PAGES)
                                     or self._range_busy(huge, huge + HUGE_PAGES)):
                # tracking began in this 2 MiB block, or an invalidation is changing
                # another page of it (kvmem's host changes a 4 KiB page without first
                # invalidating the whole 2 MiB, as a THP split would): map only this
                # gfn's page, which no invalidation has touched since `seq`
                idx = frame.index + gfn - huge
                frame = Frame(frame.owner, idx, int(frame.owner._frames[idx]), frame.writable)
                huge = None
            if track.tracked(slot.as_id, gfn):
                if write:
                    self.stats["tracked_faults"] += 1
                    raise TrackedWrite(gpa)
                writable = False  # a tracked gfn is never writable in the stage-2
            if huge is not None:
                inc = frame.owner._frames[frame.index:frame.index + HUGE_PAGES].tobytes()
                spte = Spte(first, frame, writable, HUGE_PAGES, inc)
                self._huge[slot.as_id][first // HUGE_PAGES] = spte
            else:
                spte = Spte(gfn, frame, writable)
                self._small[slot.as_id][gfn] = spte
            if writable and slot.dirty_bitmap is not None:
                slot.dirty_bitmap.mark(gfn - slot.base_gfn)
            self.stats["installs"] += 1
            return spte

    def _huge_base(self, slot: MemorySlot, gfn: int, write: bool) -> int | None:
        """The first gfn of a 2 MiB mapping for `gfn`, if the slot allows one: the 2 MiB
        range lies inside the slot, gpa and hva agree modulo 2 MiB, and the slot neither
        does not log dirty pages."""
        base = gfn - gfn % HUGE_PAGES
        if base < slot.base_gfn or base + HUGE_PAGES > slot.end_gfn:
            return None
        if (slot.hva_of(base) >> PAGE_SHIFT) % HUGE_PAGES or slot.dirty_bitmap is not None:
            return None
        return base

    @staticmethod
    def _huge_backed(frame: Frame) -> bool:
        """All 512 host pages from `frame` are one mapping's, unchanged and accessible."""
        owner = frame.owner
        end = frame.index + HUGE_PAGES
        if end > len(owner._frames):
            return False
        return host.accessible(frame.hva, HUGE_PAGES * PAGE_SIZE,
                               host.PROT_WRITE if frame.writable else host.PROT_READ
                               ) == HUGE_PAGES * PAGE_SIZE

    # -- slot updates ----------------------------------------------------------------------
    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None:
        self.zap_gfn_range(slot.as_id, slot.base_gfn, slot.end_gfn)

    def slots_updating(self, vm: Vm, changes: Sequence[Change]) -> None:
        """A transaction is about to publish: open an invalidation over every range whose
        mapping goes away or changes, and zap it; faults there retry until `committed`."""
        with self.lock:
            self.begin()
            for c in changes:
                if c.old is not None and c.kind is not ChangeKind.CREATE:
                    self.range_add(c.old.base_gfn, c.old.end_gfn)
                    self._zap(c.old.as_id, c.old.base_gfn, c.old.end_gfn)
            self.flush()
        self._batch_open = True

    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        if self._batch_open:
            self._batch_open = False
            with self.lock:
                self.end()
        for c in changes:
            new, old = c.new, c.old
            if new is None or c.kind is ChangeKind.CREATE:
                continue
            started = new.dirty_bitmap is not None and (old is None or old.dirty_bitmap is None)
            if c.kind is ChangeKind.FLAGS_ONLY and started and not vm._initially_set():
                self.write_protect(new.as_id, range(new.base_gfn, new.end_gfn))
            elif c.kind is ChangeKind.FLAGS_ONLY and started:
                self._drop_huge(new)

    def _drop_huge(self, slot: MemorySlot) -> None:
        with self.lock:
            huge = self._huge[slot.as_id]
            for h in [h for h in huge if h * HUGE_PAGES < slot.end_gfn
                      and (h + 1) * HUGE_PAGES > slot.base_gfn]:
                del huge[h]
                self._unmap_mirrors(slot.as_id, h * HUGE_PAGES, (h + 1) * HUGE_PAGES)
            self.flush()

    def dirty_log_reprotect(self, vm: Vm, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        gfns = [slot.base_gfn + first_page + 64 * i + b
                for i, w in enumerate(words) if w for b in range(64) if w >> b & 1]
        self.write_protect(slot.as_id, gfns)
