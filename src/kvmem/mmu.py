"""The MMU: host invalidations (KVM's MMU notifier), the software stage-2 with its
write-tracking counters, the fault path, and what slot updates and dirty logging do to it.

Defines `Mmu` (one per VM, given the VM's `Memslots`), `Spte` (over host pages or a
guest_memfd page), `Stage2Access` (guest memory as a vCPU's code sees it, in one address
space), the exits a guest access can end in (`MmioExit`, `MemoryFault`, `TrackedWrite`)
and `Stage2Mirror`, what an engine that maps sptes itself (Unicorn) implements.

Rules of this room:
- Every stage-2 change happens under `lock` (KVM's mmu_lock). The invalidation state
  (`seq`, `in_progress`, range) changes only under it; the fault path reads `seq` before
  resolving a page without the lock and re-checks under it (`retry_gfn`), so a page
  resolved before or during an invalidation is never installed.
- A guest access through the stage-2 runs inside a `tlb` read section: a zap removes
  sptes, then `flush` waits for the section to drain — KVM's remote TLB flush. After a zap
  returns, no access still uses what it removed, so an access may copy through the view
  an spte holds without asking the host whether the page is still mapped: every host
  change that could unmap it is an invalidation, which zaps and flushes first.
- Write-tracking counters (per gfn, u16, KVM's gfn_write_track) are stage-2 state: they
  change, and are read, only under `lock`, so "tracked ⇒ never writable" holds at every
  instant; 0→1 write-protects the gfn (breaking a 2 MiB mapping over it).
- Host invalidations are counted in the memslots' gate (`Memslots.invalidation_started`)
  between their start and their end, so a memslot swap never falls between them.
- guest_memfd invalidations (a punch, a release) have no hva: the MMU is the
  `gmem.GmemInvalidator` of its VM's files and hears them by gfn — the same begin /
  range_add + zap + flush / end, outside the memslots' gate (KVM does not hold swaps
  back for them, §8.5).
- A slot is *logged* when it has a dirty bitmap or the VM's restore log is armed (every
  slot, then): nothing logged is mapped writable before a write fault, and that fault
  marks through `mark_dirty`, the accessors' one fan-out (`access.fan_out`). Arming
  (`log_all`) write-protects every spte, as turning dirty logging on does for one slot.
- Memory attributes (private/shared, `memattrs.AttributeMap`) are MMU state too: they
  change only inside the invalidation bracket (`set_attributes`: begin, range_add + zap of
  every slot they touch, store, end), so a fault that read the old attribute retries, and
  no spte of the wrong kind survives (`stale_sptes` checks the kind).
- Nothing here knows the `Vm`: slot updates reach the MMU as calls from the update path
  above (`slot_invalidated`, `slots_updating`, `slots_committed`, `dirty_log_reprotect`);
  the tracked-write performer (page tracking) registers itself in `tracked_write`.

Theory of the fault (DESIGN path 3): look the gfn up in the address space; the access's
kind (private iff the gfn is PRIVATE at entry on a private-memory VM, or as the caller
says); snapshot `seq`; a kind that is not the gfn's attribute → `MemoryFault`; no slot →
`MmioExit` (private: `MemoryFault`); INVALID slot → retry; resolve gfn → hva → frame
without the lock (a private access or a gmem-only slot: gfn → the file's page, `get_pfn`;
its refusal is a `MemoryFault` with the file's errno — or a retry while an invalidation
covers the gfn); lock;
`retry_gfn(seq, gfn)` → retry; a write to a write-tracked gfn → `TrackedWrite`
(performed by page tracking, never mapped writable); install the spte (writable only for
a write, or a read of a writable page in a slot that does not log dirty pages, and never
for a tracked gfn; no 2 MiB mapping over a tracked gfn); mark dirty when installed
writable in a logging slot (through `mark`, the VM's one rule: bitmap, or the ring of the
vCPU loaded on the faulting thread — a vCPU's `Stage2Access` loads its vCPU for a fault).
`fault_in` is the one retry loop around it: a retry leaves the SRCU read section first, as
a vCPU re-entering the guest does, so an update can end.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import host, sync
from .access import MarkDirty, fan_out, mark_bitmap
from .args import as_bytes, check_range
from .dirty import DirtyRing, RestoreLog, loaded
from .errors import KvmError
from .gmem import GmemFrame, GuestMemfd
from .host import Frame
from .memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, AttributeMap
from .memslots import Memslots
from .slots import Change, ChangeKind, MemorySlot
from .uapi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

__all__ = ["HUGE_PAGES", "MemoryFault", "MmioExit", "Mmu", "Spte", "Stage2Access",
           "Stage2Mirror", "TrackedWrite"]

HUGE_PAGES = 512  # 4 KiB pages in a 2 MiB mapping
MAX_TRACK_COUNT = 0xFFFF  # KVM's write-track counters are u16


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
    write is performed by page tracking (as KVM emulates it)."""

    def __init__(self, gpa: int) -> None:
        super().__init__(f"write to write-tracked gpa {gpa:#x}")
        self.gpa = gpa


class MemoryFault(KvmError):
    """KVM_EXIT_MEMORY_FAULT with `run->memory_fault`'s fields: `gpa` (page-aligned),
    `size` (4096) and `flags` (`KVM_MEMORY_EXIT_FLAG_PRIVATE` iff the *access* was private).
    KVM_RUN's errno: EFAULT (no memory for the access, or its kind is not the gfn's
    attribute — userspace converts and re-enters), or what guest_memfd answered (EIO: the
    gfn's page is not bound to the slot)."""

    def __init__(self, gpa: int, size: int, why: str, err: int = errno.EFAULT,
                 flags: int = 0) -> None:
        kind = "private" if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else "shared"
        super().__init__(err, f"memory fault on a {kind} access at gpa {gpa:#x}: {why}")
        self.gpa = gpa
        self.size = size
        self.flags = flags

    @property
    def private(self) -> bool:
        return bool(self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)


@dataclass(frozen=True, slots=True)
class Spte:
    """A stage-2 mapping of `npages` gfns from `gfn` (1, or 512 for a 2 MiB mapping) to the
    pages starting at `frame` — host pages, or one guest_memfd page (a `GmemFrame`, always
    4 KiB); `view` is a memoryview over those pages. `private`: installed by a private
    access (always a guest_memfd page); it must agree with the gfn's attribute."""

    gfn: int
    frame: Frame | GmemFrame
    writable: bool
    npages: int = 1
    incarnations: bytes = b""  # 2 MiB mappings: each host page's incarnation at install
    view: memoryview = field(default=memoryview(b""), compare=False, repr=False)
    private: bool = False

    def current(self, gfn: int) -> bool:
        """The host page this spte maps for `gfn` is still the one it was built on (a
        stale spte is a protocol bug; `Mmu.stale_sptes` is the tests' oracle)."""
        f = self.frame
        if self.npages == 1:
            return f.current()
        assert isinstance(f, Frame)  # 2 MiB mappings are of host memory only
        i = gfn - self.gfn
        return (not f.owner.closed and f.owner.incarnation(f.index + i) ==
                int.from_bytes(self.incarnations[4 * i:4 * i + 4], "little"))


def _spte(gfn: int, frame: Frame, writable: bool, npages: int = 1,
          incarnations: bytes = b"") -> Spte:
    return Spte(gfn, frame, writable, npages, incarnations, frame.view(npages))


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


# the tracked-write performer: (as_id, gpa, bytes) — page tracking registers it
TrackedWriteHandler = Callable[[int, int, memoryview], None]


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
    """A VM's MMU: see the module notes."""

    def __init__(self, memslots: Memslots, private_memory: bool = False) -> None:
        self._memslots = memslots
        # a VM type with private memory (KVM_X86_SW_PROTECTED_VM): a gfn whose attribute is
        # PRIVATE is faulted from its slot's guest_memfd; others never have private accesses
        self.private_memory = private_memory
        self.attributes: sync.Atomic[AttributeMap] = sync.Atomic(AttributeMap())
        self.lock = sync.Mutex("mmu_lock")
        self.tlb = sync.Srcu("mmu.tlb")
        self.seq: sync.Atomic[int] = sync.Atomic(0)
        self.in_progress: sync.Atomic[int] = sync.Atomic(0)
        self.range_start: sync.Atomic[int | None] = sync.Atomic(None)
        self.range_end: sync.Atomic[int | None] = sync.Atomic(None)
        # pfn caches of this VM (gfn_to_pfn_cache list), told of host invalidations first
        self.gpc_lock = sync.Mutex("gpc_list")
        self.gpc_list: sync.Atomic[tuple[PfnCacheLike, ...]] = sync.Atomic(())
        n = memslots.limits.address_spaces
        self._small: list[dict[int, Spte]] = [{} for _ in range(n)]  # gfn → 4 KiB spte
        self._huge: list[dict[int, Spte]] = [{} for _ in range(n)]  # 2 MiB block → spte
        self._track: list[dict[int, int]] = [{} for _ in range(n)]  # gfn → counter
        self._track_blocks: list[dict[int, int]] = [{} for _ in range(n)]  # block → count
        self._mirrors: list[Stage2Mirror] = []
        self._batch_open = False
        self.tracked_write: TrackedWriteHandler | None = None
        self._log = memslots.restore_log
        self.mark = mark_bitmap
        self.access = [Stage2Access(self, as_id) for as_id in range(n)]
        self.stats = {"faults": 0, "fast_faults": 0, "retries": 0, "installs": 0, "zapped": 0,
                      "invalidations": 0, "broken_huge": 0, "tracked_faults": 0}
        self._notifier = _Notifier(self)
        host.notifiers.register(self._notifier)

    @property
    def restore_log(self) -> RestoreLog:
        """The VM's restore log (its `Memslots`'): what faults mark while it is armed."""
        return self._log

    @property
    def mark(self) -> MarkDirty:
        """mark_page_dirty_in_slot for pages installed writable in logging slots (the VM
        gives its `DirtyMarks`: the bitmap, or the ring of the vCPU loaded here). Faults
        mark through `mark_dirty`: this, and the restore log while it is armed."""
        return self._mark

    @mark.setter
    def mark(self, mark: MarkDirty) -> None:
        self._mark = mark
        self.mark_dirty = fan_out(mark, self._log)

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

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn: called with the lock held."""
        self.lock.assert_held()
        return self.retry_gfn_unsafe(seq, gfn)

    def retry_gfn_unsafe(self, seq: int, gfn: int) -> bool:
        if self.in_progress.load():
            lo, hi = self.range_start.load(), self.range_end.load()
            if lo is None or hi is None or lo <= gfn < hi:
                return True
        return self.seq.load() != seq

    def _range_busy(self, start: int, end: int) -> bool:
        """An invalidation in progress covers part of [start, end) (lock held)."""
        self.lock.assert_held()
        if not self.in_progress.load():
            return False
        lo, hi = self.range_start.load(), self.range_end.load()
        return lo is None or hi is None or (lo < end and start < hi)

    # -- host side --------------------------------------------------------------------------
    def invalidate_range_start(self, start: int, end: int) -> None:
        self._memslots.invalidation_started(start, end)
        # host pages are about to change under any slot over them: a restore copies them back
        self._log.invalidate_range_start(start, end)
        # pfn caches first, before in_progress rises and without filtering by slots: an
        # HVA-based cache may point at memory no slot maps
        for gpc in self.gpc_list.load():
            gpc.invalidate_start(start, end)
        hit = False
        try:
            for slot, lo, hi in self._memslots.hva_to_gfn_ranges(start, end):
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
        if any(True for _ in self._memslots.hva_to_gfn_ranges(start, end)):
            with self.lock:
                self.end()
        self._memslots.invalidation_ended(start, end)

    # -- guest_memfd side (gmem.GmemInvalidator: invalidations by gfn, no hva) ----------------
    def gmem_invalidate_begin(self) -> None:
        with self.lock:
            self.begin()
            self.stats["invalidations"] += 1

    def gmem_invalidate_range(self, as_id: int, gfn_start: int, gfn_end: int) -> None:
        with self.lock:
            self.range_add(gfn_start, gfn_end)
            if self._zap(as_id, gfn_start, gfn_end):
                # the file frees the pages after the last range: no access may still use them
                self.flush()

    def gmem_invalidate_end(self) -> None:
        with self.lock:
            self.end()

    # -- memory attributes (KVM_SET_MEMORY_ATTRIBUTES, §8.6 steps 8-10) ------------------------
    def mem_is_private(self, gfn: int) -> bool:
        """kvm_mem_is_private: the gfn's stored attribute has PRIVATE (lockless)."""
        return bool(self.attributes.value.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def set_attributes(self, start: int, end: int, value: int) -> bool:
        """Store `value` for gfns [start, end) inside the invalidation bracket (the caller
        holds slots_lock and checked the request): every address space's slots that
        intersect get their clipped range added and zapped before the store, so a fault
        that read the old attribute retries; end after it. No intersecting slot → no
        begin and no end. False (nothing done, seq unchanged) when every gfn has `value`
        already."""
        old = self.attributes.load()
        if old.has(start, end, ~0, value):
            return False
        hits = [(s, max(start, s.base_gfn), min(end, s.end_gfn))
                for slots in self._memslots.active.load()
                for s in slots.overlapping(start, end)]
        with self.lock:
            if hits:
                self.begin()
            try:
                for slot, lo, hi in hits:
                    self.range_add(lo, hi)
                    # x86 pre: a 2 MiB page straddling either end, wholly in the slot and
                    # not mixed, may be mapped whole: its gfns retry too (fix 9129633d)
                    for block in {lo - lo % HUGE_PAGES, (hi - 1) - (hi - 1) % HUGE_PAGES}:
                        if (slot.base_gfn <= block and block + HUGE_PAGES <= slot.end_gfn
                                and old.uniform(block, block + HUGE_PAGES)):
                            self.range_add(block, block + HUGE_PAGES)
                    self._zap(slot.as_id, lo, hi)
                if hits:
                    self.flush()
                self.attributes.store(old.with_range(start, end, value))
            finally:
                if hits:
                    self.end()
        return True

    # -- stage-2 -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Remote TLB flush: wait until no guest access uses a removed spte."""
        self.tlb.synchronize()

    def add_mirror(self, mirror: Stage2Mirror) -> None:
        with self.lock:
            self._mirrors.append(mirror)

    def remove_mirror(self, mirror: Stage2Mirror) -> None:
        with self.lock:
            if mirror in self._mirrors:
                self._mirrors.remove(mirror)

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
        if gone or hgone:
            self._unmap_mirrors(as_id, start, end)
        self.stats["zapped"] += len(gone) + len(hgone)
        return len(gone) + len(hgone)

    def zap_gfn_range(self, as_id: int, start_gfn: int, end_gfn: int) -> int:
        """kvm_zap_gfn_range: drop the sptes of [start_gfn, end_gfn) in `as_id`, making
        concurrent faults in that range retry. Returns how many were dropped."""
        as_id = self._memslots.address_space(as_id)
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

    def write_protect(self, as_id: int, gfns: Iterable[int]) -> int:
        """Make the sptes of `gfns` read-only (huge mappings are dropped)."""
        with self.lock:
            n = self._write_protect(as_id, gfns)
            if n:
                self.flush()
            return n

    def _write_protect(self, as_id: int, gfns: Iterable[int]) -> int:
        """`write_protect` for a caller that holds the lock and flushes (if this returns
        non-zero) before releasing it."""
        self.lock.assert_held()
        small, huge = self._small[as_id], self._huge[as_id]
        n = 0
        # mirrors hear of each run of consecutive gfns once (a harvest protects thousands)
        run_start = run_end = -1
        for g in gfns:
            s = small.get(g)
            if s is not None and s.writable:
                small[g] = Spte(g, s.frame, False, 1, b"", s.view, s.private)
                n += 1
                if g != run_end:
                    if run_end > run_start:
                        self._unmap_mirrors(as_id, run_start, run_end)
                    run_start = g
                run_end = g + 1
            if g // HUGE_PAGES in huge:
                del huge[g // HUGE_PAGES]
                n += 1
                self._unmap_mirrors(as_id, g - g % HUGE_PAGES, g - g % HUGE_PAGES + HUGE_PAGES)
        if run_end > run_start:
            self._unmap_mirrors(as_id, run_start, run_end)
        return n

    def _unmap_mirrors(self, as_id: int, start: int, end: int) -> None:
        self.lock.assert_held()
        for mirror in self._mirrors:
            mirror.stage2_unmapped(as_id, start, end)

    def _break_huge(self, as_id: int, block: int) -> bool:
        """Replace the 2 MiB mapping of `block` (if any) by the 512 4 KiB mappings it
        stands for, each still checked against its own host page. Lock held; the caller
        flushes if this returns True."""
        self.lock.assert_held()
        spte = self._huge[as_id].pop(block, None)
        if spte is None:
            return False
        f = spte.frame
        assert isinstance(f, Frame)  # 2 MiB mappings are of host memory only
        small = self._small[as_id]
        for i in range(HUGE_PAGES):
            inc = int.from_bytes(spte.incarnations[4 * i:4 * i + 4], "little")
            g = spte.gfn + i
            small[g] = _spte(g, Frame(f.owner, f.index + i, inc, f.writable), spte.writable)
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

    def stale_sptes(self) -> list[tuple[int, int]]:
        """(as_id, gfn) of every spte whose host page was replaced since it was installed,
        or whose kind (private or shared) is no longer the gfn's attribute. Always empty
        when the protocol holds (an invalidation zaps before the host changes a page or an
        attribute, and no fault installs what it resolved before the change): the oracle
        of the stress tests and the concurrency checker."""
        with self.lock:
            out = []
            private = self.mem_is_private
            for as_id, (small, huge) in enumerate(zip(self._small, self._huge, strict=True)):
                out += [(as_id, g) for g, s in small.items()
                        if not s.current(g) or s.private != private(g)]
                out += [(as_id, s.gfn + i) for s in huge.values()
                        for i in range(HUGE_PAGES)
                        if not s.current(s.gfn + i) or private(s.gfn + i)]
            return out

    # -- write tracking (the counters of page tracking) ---------------------------------------
    def track(self, as_id: int, gfn: int, delta: int) -> int:
        """Move the write-track counter of `gfn` by `delta` (lock held); returns the new
        count. EINVAL past 0 or 65535, changing nothing. 0→1 write-protects the gfn."""
        self.lock.assert_held()
        counts = self._track[as_id]
        was = counts.get(gfn, 0)
        count = was + delta
        if count < 0:
            raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is not write-tracked")
        if count > MAX_TRACK_COUNT:
            raise KvmError(errno.EINVAL, f"gfn {gfn:#x} is tracked {MAX_TRACK_COUNT} "
                                         f"times already")
        self._set_track(as_id, gfn, was, count)
        return count

    def _set_track(self, as_id: int, gfn: int, was: int, count: int) -> None:
        counts, blocks = self._track[as_id], self._track_blocks[as_id]
        block = gfn // HUGE_PAGES
        if count:
            counts[gfn] = count
        else:
            counts.pop(gfn, None)
        if was == 0 and count > 0:
            blocks[block] = blocks.get(block, 0) + 1
            if self._break_huge(as_id, block) | self._write_protect(as_id, [gfn]):
                self.flush()
        elif was > 0 and count == 0:
            if blocks[block] == 1:
                del blocks[block]
            else:
                blocks[block] -= 1

    def untrack_range(self, as_id: int, lo: int, hi: int) -> None:
        """Drop every counter in [lo, hi) (the slot that mapped it went away; lock held)."""
        self.lock.assert_held()
        counts = self._track[as_id]
        gone = [g for g in counts if lo <= g < hi] if len(counts) < hi - lo else \
            [g for g in range(lo, hi) if g in counts]
        for g in gone:
            self._set_track(as_id, g, counts[g], 0)

    def tracked(self, as_id: int, gfn: int) -> bool:
        """kvm_gfn_is_write_tracked (lock held)."""
        self.lock.assert_held()
        return gfn in self._track[as_id]

    def track_count(self, as_id: int, gfn: int) -> int:
        with self.lock:
            return self._track[as_id].get(gfn, 0)

    def tracks_any(self) -> bool:
        """Some gfn of some address space is write-tracked."""
        with self.lock:
            return any(self._track)

    def tracked_gfns(self, as_id: int) -> list[int]:
        """Every tracked gfn of `as_id`, sorted."""
        with self.lock:
            return sorted(self._track[as_id])

    # -- the fault path ----------------------------------------------------------------------
    def fault(self, as_id: int, gpa: int, write: bool, private: bool | None = None
              ) -> Spte | None:
        """Resolve a guest access that found no (or no writable) spte, inside the VM's SRCU
        read section. None means RET_PF_RETRY: the caller leaves the read section and tries
        again (`fault_in` does). Raises `MmioExit` or `MemoryFault` where KVM would exit to
        userspace, and `TrackedWrite` for a write page tracking must perform. `private`:
        the access's kind as the hardware says it (SNP's C-bit, TDX's shared bit); None is
        the SW_PROTECTED rule — private iff the gfn is PRIVATE at fault entry (never on a
        VM without private memory)."""
        self.stats["faults"] += 1
        try:
            return self._fault_once(as_id, gpa, gpa >> PAGE_SHIFT, write, private)
        except _Retry:
            self.stats["retries"] += 1
            return None

    def fault_in(self, as_id: int, gpa: int, write: bool, private: bool | None = None
                 ) -> Spte:
        """The spte for a guest access at `gpa`: the one there, or one faulted in, retrying
        as a vCPU re-entering the guest does. Raises what `fault` raises. An access of a
        given kind (`private` not None) always takes the fault path, which checks the kind."""
        srcu = self._memslots.srcu
        gfn = gpa >> PAGE_SHIFT
        while True:
            token = srcu.read_lock()
            try:
                spte = self.spte(as_id, gfn)
                if spte is None or (write and not spte.writable) or (
                        private is not None and spte.private != private):
                    spte = self.fault(as_id, gpa, write, private)
            finally:
                srcu.read_unlock(token)
            if spte is not None:
                return spte
            sync.pause()  # out of the read section: an update may be waiting for it

    def _fault_once(self, as_id: int, gpa: int, gfn: int, write: bool,
                    private: bool | None) -> Spte:
        slot = self._memslots.active.value[as_id].search(gfn)
        if private is None:  # SW_PROTECTED: the access is what the gfn is at fault entry
            private = self.private_memory and self.mem_is_private(gfn)
        flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        seq = self.seq.load()
        # kvm_mmu_faultin_pfn: after the seq snapshot (a conversion since then bumps seq,
        # so a stale answer here is caught under the lock), before any slot test
        if private != self.mem_is_private(gfn):
            raise MemoryFault(gpa & ~PAGE_MASK, PAGE_SIZE, "the access's kind is not the "
                              "gfn's memory attribute", flags=flags)
        if slot is None:
            if private:
                raise MemoryFault(gpa & ~PAGE_MASK, PAGE_SIZE, "no slot for a private access",
                                  flags=flags)
            raise MmioExit(gpa, 0, write)
        if slot.invalid:
            raise _Retry
        if self.retry_gfn_unsafe(seq, gfn):
            raise _Retry
        if private or slot.gmem_only:
            return self._gmem_fault(as_id, slot, gpa, gfn, write, seq, flags)
        if write and slot.readonly:
            raise MmioExit(gpa, 0, True)
        if write:
            spte = self._fast_write_fault(as_id, slot, gfn, seq)
            if spte is not None:
                return spte
        huge = self._huge_base(slot, gfn)
        if huge is not None and self.private_memory and \
                not self.attributes.value.uniform(huge, huge + HUGE_PAGES):
            huge = None  # KVM_LPAGE_MIXED_FLAG: no 2 MiB mapping over mixed attributes
        first = huge if huge is not None else gfn
        frame = host.resolve(slot.hva_of(first), write)
        if frame is None:
            if self.retry_gfn_unsafe(seq, gfn):
                # a host change began since `seq` (kvmem's remap/protect keep readers off
                # the range while they replace it, where Linux's GUP would wait on the
                # mmap lock): its answer, not this one, is the page's
                raise _Retry
            raise MemoryFault(gpa & ~PAGE_MASK, PAGE_SIZE, "host memory behind the slot is "
                                                           "unmapped or protected against "
                                                           "this access")
        if huge is not None and not self._huge_backed(frame):
            huge, first = None, gfn
            frame = host.resolve(slot.hva_of(gfn), write)
            if frame is None:
                if self.retry_gfn_unsafe(seq, gfn):
                    raise _Retry
                raise MemoryFault(gpa & ~PAGE_MASK, PAGE_SIZE, "host memory changed under "
                                                               "the fault")
        with self.lock:
            if self.retry_gfn(seq, gfn):
                raise _Retry
            # judged under the lock: `log_all` (arming the restore log) write-protects
            # under it, so no spte made writable without a mark can outlive the arming
            logged = slot.dirty_logging or self._log.armed
            writable = frame.writable and not slot.readonly and (write or not logged)
            if huge is not None and (huge // HUGE_PAGES in self._track_blocks[as_id]
                                     or self._range_busy(huge, huge + HUGE_PAGES)
                                     or logged):
                # tracking began in this 2 MiB block, or an invalidation is changing
                # another page of it (kvmem's host changes a 4 KiB page without first
                # invalidating the whole 2 MiB, as a THP split would): map only this
                # gfn's page, which no invalidation has touched since `seq`
                idx = frame.index + gfn - huge
                frame = Frame(frame.owner, idx, frame.owner.incarnation(idx), frame.writable)
                huge = None
            if self.tracked(as_id, gfn):
                if write:
                    self.stats["tracked_faults"] += 1
                    raise TrackedWrite(gpa)
                writable = False  # a tracked gfn is never writable in the stage-2
            if huge is not None:
                inc = frame.owner.incarnations(frame.index, HUGE_PAGES)
                spte = _spte(first, frame, writable, HUGE_PAGES, inc)
                self._huge[as_id][first // HUGE_PAGES] = spte
            else:
                spte = _spte(gfn, frame, writable)
                self._small[as_id][gfn] = spte
            if writable and logged:
                self.mark_dirty(slot, gfn - slot.base_gfn, 1)
            self.stats["installs"] += 1
            return spte

    def _fast_write_fault(self, as_id: int, slot: MemorySlot, gfn: int, seq: int
                          ) -> Spte | None:
        """KVM's fast_page_fault: a write to a present 4 KiB spte that is read-only only
        because dirty logging (or tracking, since ended) protected it — its host page is
        writable and current, the slot writable, the gfn untracked — is made writable in
        place and the page marked dirty, without resolving the host page again. None: take
        the full path."""
        with self.lock:
            small = self._small[as_id]
            s = small.get(gfn)
            if (s is None or s.writable or not isinstance(s.frame, Frame)
                    or not s.frame.writable or self.retry_gfn(seq, gfn)
                    or self.tracked(as_id, gfn) or not s.frame.current()):
                return None
            spte = Spte(gfn, s.frame, True, 1, b"", s.view)
            small[gfn] = spte
            if slot.dirty_logging or self._log.armed:  # as the full path: the restore log too
                self.mark_dirty(slot, gfn - slot.base_gfn, 1)
            self.stats["fast_faults"] += 1
            return spte

    def _gmem_fault(self, as_id: int, slot: MemorySlot, gpa: int, gfn: int, write: bool,
                    seq: int, flags: int) -> Spte:
        """The rest of a private fault, or of any fault on a gmem-only slot: the page comes
        from the file (kvm_gmem_get_pfn), never from the hva, and is mapped 4 KiB."""
        private = bool(flags)
        page = gpa & ~PAGE_MASK
        if slot.gmem is None:  # kvm_mmu_faultin_pfn_private: a private access needs a file
            raise MemoryFault(page, PAGE_SIZE, f"slot {slot.as_id}:{slot.id} has no "
                              "guest_memfd for a private access", flags=flags)
        file = slot.gmem.file
        assert isinstance(file, GuestMemfd)
        try:
            frame = file.get_pfn(slot, gfn)
            view = frame.view()
        except KvmError as e:
            # an answer given while an invalidation covers the gfn (a transaction moving the
            # file's bindings, a punch, a release) is retried, like a page resolved then
            if self.retry_gfn_unsafe(seq, gfn):
                raise _Retry from None
            raise MemoryFault(page, PAGE_SIZE, f"guest_memfd: {e.message}",
                              e.errno or errno.EFAULT, flags) from None
        with self.lock:
            if self.retry_gfn(seq, gfn):
                raise _Retry
            writable = True
            if self.tracked(as_id, gfn):
                if write:
                    if private:  # private memory cannot be emulated
                        raise MemoryFault(page, PAGE_SIZE, "a private write to a "
                                          "write-tracked gfn needs emulation", flags=flags)
                    self.stats["tracked_faults"] += 1
                    raise TrackedWrite(gpa)
                writable = False
            spte = Spte(gfn, frame, writable, 1, b"", view, private)
            self._small[as_id][gfn] = spte
            self.stats["installs"] += 1
            return spte

    def _huge_base(self, slot: MemorySlot, gfn: int) -> int | None:
        """The first gfn of a 2 MiB mapping for `gfn`, if the slot allows one: the 2 MiB
        range lies inside the slot, gpa and hva agree modulo 2 MiB, and the slot is not
        logged."""
        base = gfn - gfn % HUGE_PAGES
        if base < slot.base_gfn or base + HUGE_PAGES > slot.end_gfn:
            return None
        if ((slot.hva_of(base) >> PAGE_SHIFT) % HUGE_PAGES or slot.dirty_logging
                or self._log.armed):
            return None
        return base

    @staticmethod
    def _huge_backed(frame: Frame) -> bool:
        """All 512 host pages from `frame` are one mapping's, unchanged and accessible."""
        owner = frame.owner
        if frame.index + HUGE_PAGES > owner.size >> PAGE_SHIFT:
            return False
        return host.accessible(frame.hva, HUGE_PAGES * PAGE_SIZE,
                               host.PROT_WRITE if frame.writable else host.PROT_READ
                               ) == HUGE_PAGES * PAGE_SIZE

    # -- slot updates (called by the update path, slots_lock held) ------------------------------
    def slot_invalidated(self, slot: MemorySlot) -> None:
        """A single DELETE/MOVE published the INVALID copy of `slot`: drop its sptes
        (KVM's arch_flush_shadow_memslot)."""
        self.zap_gfn_range(slot.as_id, slot.base_gfn, slot.end_gfn)

    def slots_updating(self, changes: Sequence[Change]) -> None:
        """A transaction is about to publish: open an invalidation over every range whose
        mapping goes away, and zap it; faults there retry until `slots_committed`."""
        with self.lock:
            self.begin()
            for c in changes:
                if c.unmaps_old:
                    assert c.old is not None
                    self.range_add(c.old.base_gfn, c.old.end_gfn)
                    self._zap(c.old.as_id, c.old.base_gfn, c.old.end_gfn)
            self.flush()
        self._batch_open = True

    def slots_committed(self, changes: Sequence[Change], initially_set: bool) -> None:
        """`changes` are published: close a transaction's invalidation; a FLAGS_ONLY change
        that turns dirty logging on write-protects the slot (lazily with INITIALLY_SET,
        where only 2 MiB mappings go)."""
        if self._batch_open:
            self._batch_open = False
            with self.lock:
                self.end()
        for c in changes:
            new, old = c.new, c.old
            if c.kind is not ChangeKind.FLAGS_ONLY or new is None or old is None:
                continue
            if not new.dirty_logging or old.dirty_logging:
                continue
            if initially_set:
                self._drop_huge(new)
            else:
                self.write_protect(new.as_id, range(new.base_gfn, new.end_gfn))

    def log_all(self) -> None:
        """The restore log was armed: every slot is logged from now on, so no spte stays
        writable (2 MiB mappings go; 4 KiB ones become read-only and fault on a write)."""
        with self.lock:
            n = 0
            for as_id, small in enumerate(self._small):
                n += self._write_protect(as_id, [g for g, s in small.items() if s.writable])
                for h in list(self._huge[as_id]):
                    del self._huge[as_id][h]
                    self._unmap_mirrors(as_id, h * HUGE_PAGES, (h + 1) * HUGE_PAGES)
                    n += 1
            if n:
                self.flush()

    def take_restore_log(self) -> tuple[set[int], list[set[int]], list[tuple[int, int]]]:
        """Everything the restore log holds (host pages, gfns per address space, host
        ranges), leaving it empty, with every taken gfn write-protected again — so each
        later guest write faults and is logged anew. The swap and the protection happen
        under the lock the fault path marks under; accessors mark inside `host.guard`
        read sections, so a grace period of it lets a mark made on the old sets finish
        before they are read."""
        with self.lock:
            pages, gfns, ranges = self._log.take()
            n = 0
            for as_id, taken in enumerate(gfns):
                # nothing mapped in kvmem's stage-2 (an engine's guest): nothing to protect
                if taken and (self._small[as_id] or self._huge[as_id]):
                    n += self._write_protect(as_id, taken)
            if n:
                self.flush()
        host.guard.synchronize()
        return pages, gfns, ranges

    def _drop_huge(self, slot: MemorySlot) -> None:
        with self.lock:
            huge = self._huge[slot.as_id]
            for h in [h for h in huge if h * HUGE_PAGES < slot.end_gfn
                      and (h + 1) * HUGE_PAGES > slot.base_gfn]:
                del huge[h]
                self._unmap_mirrors(slot.as_id, h * HUGE_PAGES, (h + 1) * HUGE_PAGES)
            self.flush()

    def dirty_log_reprotect(self, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        """Pages whose dirty bits were harvested or cleared are write-protected again: bit
        b of words[i] is page first_page + 64*i + b of `slot`."""
        lo = slot.base_gfn + first_page
        hi = lo + 64 * len(words)
        small, huge = self._small[slot.as_id], self._huge[slot.as_id]
        if len(small) + len(huge) < sum(w.bit_count() for w in words):
            # fewer mappings than harvested pages (a fully dirty 4 GiB slot, say): look at
            # what is mapped, not at a million bits
            def dirty(g: int) -> bool:
                return bool(words[(g - lo) >> 6] >> ((g - lo) & 63) & 1)

            gfns = [g for g in list(small) if lo <= g < hi and dirty(g)]
            for h in list(huge):  # one dirty gfn drops a whole 2 MiB mapping
                span = range(max(lo, h * HUGE_PAGES), min(hi, (h + 1) * HUGE_PAGES))
                gfns += next(([g] for g in span if dirty(g)), [])
        else:
            gfns = [lo + 64 * i + b
                    for i, w in enumerate(words) if w for b in range(64) if w >> b & 1]
        self.write_protect(slot.as_id, gfns)

    def dirty_ring_reprotect(self, batches: Sequence[tuple[MemorySlot, int, int]]) -> None:
        """KVM_RESET_DIRTY_RINGS' write-protection: for each (slot, offset, mask), pages
        offset + b (bit b of mask) of the slot; one lock and one flush for them all."""
        by_as: dict[int, list[int]] = {}
        for slot, offset, mask in batches:
            gfns = by_as.setdefault(slot.as_id, [])
            base = slot.base_gfn + offset
            while mask:
                low = mask & -mask
                gfns.append(base + low.bit_length() - 1)
                mask ^= low
        with self.lock:
            n = 0
            for as_id, gfns in by_as.items():
                n += self._write_protect(as_id, gfns)
            if n:
                self.flush()


class Stage2Access:
    """Guest memory as guest code sees it in one address space: reads and writes through
    the stage-2, faulting pages in (path 3). Where KVM would exit, it raises `MmioExit`
    (no slot, or a write to a read-only slot; earlier pages stay written) or
    `MemoryFault`; a write to a tracked gfn is performed by page tracking (path 5).

    Hits inline the `tlb` read section (`kvmem.sync.Srcu`'s protocol) and use literals
    for the page geometry (4096, and 512 pages in a 2 MiB mapping)."""

    __slots__ = ("_huge", "_mmu", "_ring", "_small", "_tlb", "as_id")

    def __init__(self, mmu: Mmu, as_id: int, ring: DirtyRing | None = None) -> None:
        self._mmu = mmu
        self.as_id = as_id
        self._ring = ring  # a vCPU's own: its vCPU is loaded while a fault is handled
        self._small = mmu._small[as_id]
        self._huge = mmu._huge[as_id]
        self._tlb = mmu.tlb

    def read(self, gpa: int, n: int) -> bytes:
        if gpa.__class__ is int and n.__class__ is int and 0 <= n <= 4096 - (gpa & 4095):
            gfn = gpa >> 12
            r = self._tlb.current
            r.append(None)
            try:
                s = self._small.get(gfn)
                if s is not None:  # a 4 KiB mapping of this very gfn
                    off = gpa & 4095
                    return bytes(s.view[off:off + n])
                s = self._huge.get(gfn >> 9)
                if s is not None:
                    off = ((gfn - s.gfn) << 12) + (gpa & 4095)
                    return bytes(s.view[off:off + n])
            finally:
                r.pop()
        gpa, n = check_range(gpa, n)
        parts: list[bytes] = []
        pos = 0
        while pos < n:
            cur = gpa + pos
            k = min(n - pos, PAGE_SIZE - (cur & PAGE_MASK))
            parts.append(self._page(cur, k, None))
            pos += k
        return b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        if gpa.__class__ is int:
            gfn = gpa >> 12
            r = self._tlb.current
            r.append(None)
            try:
                s = self._small.get(gfn)
                if s is not None:  # a 4 KiB mapping of this very gfn
                    off = gpa & 4095
                else:
                    s = self._huge.get(gfn >> 9)
                    off = 0 if s is None else ((gfn - s.gfn) << 12) + (gpa & 4095)
                if s is not None and s.writable:
                    # one slice store, for flat unsigned-byte data that fits the mapping;
                    # anything else (past its end, not bytes-like, another format or
                    # shape) raises before a byte is written, and the page walk below
                    # takes it
                    s.view[off:off + len(data)] = data
                    return
            except (TypeError, ValueError):
                pass
            finally:
                r.pop()
        gpa, _ = check_range(gpa, 0)
        src = as_bytes("data", data)
        n = src.nbytes
        pos = 0
        while pos < n:
            cur = gpa + pos
            k = min(n - pos, PAGE_SIZE - (cur & PAGE_MASK))
            self._page(cur, k, src[pos:pos + k])
            pos += k

    def _page(self, gpa: int, k: int, src: memoryview | None) -> bytes:
        """Read (src None) or write `k` bytes within one page, faulting it in."""
        gfn = gpa >> PAGE_SHIFT
        write = src is not None
        while True:
            token = self._tlb.read_lock()
            try:
                s = self._small.get(gfn)
                if s is None:
                    s = self._huge.get(gfn // HUGE_PAGES)
                if s is not None and (s.writable or not write):
                    off = ((gfn - s.gfn) << PAGE_SHIFT) + (gpa & PAGE_MASK)
                    if src is None:
                        return bytes(s.view[off:off + k])
                    s.view[off:off + k] = src
                    return b""
            finally:
                self._tlb.read_unlock(token)
            ring = self._ring
            if ring is None:
                if self._fault(gpa, k, src):
                    return b""
            else:
                with loaded(ring):
                    if self._fault(gpa, k, src):
                        return b""

    def _fault(self, gpa: int, k: int, src: memoryview | None) -> bool:
        """Fault the page of `gpa` in; True when the write was performed instead (a tracked
        gfn: page tracking wrote it)."""
        write = src is not None
        try:
            self._mmu.fault_in(self.as_id, gpa, write)
        except MmioExit:
            raise MmioExit(gpa, k, write, b"" if src is None else src.tobytes()) from None
        except TrackedWrite:
            assert src is not None
            handler = self._mmu.tracked_write
            if handler is None:
                raise
            handler(self.as_id, gpa, src)
            return True
        return False
