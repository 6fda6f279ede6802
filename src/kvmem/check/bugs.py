"""Bug variants: kvmem's scenarios with one historic mistake each, patched into the real
code for the duration of an exploration. The checker must report each with a failing
schedule; that it does is the evidence the scenarios can fail.

Rules of this room:
- A variant changes exactly one step of one protocol, the way the mistake was made (in
  KVM's history or its reviews), and nothing else; production code paths are untouched
  outside `patch()`.
- A patch is a context manager that restores what it replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from .. import memslots as memslots_module
from ..access import HvaCache
from ..memslots import Memslots
from ..mmu import Mmu, Spte
from ..pfncache import PfnCache
from ..slots import Change, MemorySlot, Request
from ..vm import Vm
from .explore import Scenario
from .scenarios import SCENARIOS, ShadowTracker

__all__ = ["BUGS"]


@contextmanager
def _patched(owner: object, attr: str, value: object) -> Iterator[None]:
    old = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


def _range_add_last_only() -> AbstractContextManager[None]:
    """kvm_mmu_invalidate_range_add as first posted for gfn-based ranges: each call
    overwrote the range, so with two invalidations in flight only the last one's range
    made faults retry (found in review: "only the last range was recorded")."""

    def range_add(self: Mmu, start: int, end: int) -> None:
        self.lock.assert_held()
        if self.in_progress.load() <= 0:
            raise AssertionError("range_add outside an invalidation")
        self.range_start.store(start)
        self.range_end.store(end)

    return _patched(Mmu, "range_add", range_add)


def _batch_as_single_updates() -> AbstractContextManager[None]:
    """A VMM without atomic updates: a transaction's changes go to KVM one by one, delete
    then create (QEMU before 8.0; RHBZ 1979276)."""

    def apply_batch(self: Vm, requests: Sequence[Request]) -> list[Change]:
        for r in requests:
            self.set_memory_region(r.slot, r.flags, r.gpa, r.size, r.hva)
        return []

    return _patched(Vm, "_apply_batch", apply_batch)


def _no_grace_period() -> AbstractContextManager[None]:
    """A slot update that publishes the new slot set and returns without waiting for
    readers of the old one (synchronize_srcu left out of kvm_swap_active_memslots)."""

    def grace_period(self: Memslots) -> None:
        pass

    return _patched(Memslots, "grace_period", grace_period)


def _gpc_active_before_reachable() -> AbstractContextManager[None]:
    """kvm_gpc_activate with the order the KVM comment warns against: the cache is made
    active, and a refresh maps its page, before it is on the VM's gpc_list, so an
    invalidation in that window cannot reach it. (kvmem's activate holds refresh_lock, so
    the refresh in the window is the activate's own; in KVM before refresh_lock it could
    be any concurrent one.)"""

    def activate(self: PfnCache, gpa: int | None, uhva: int | None, length: int) -> None:
        self._memslots.check_process()
        with self.refresh_lock:
            if self.active:
                self._refresh(gpa, uhva, length)
                return
            with self.rwlock.write():
                self.active = True
            self._refresh(gpa, uhva, length)
            with self._mmu.gpc_lock:
                self._mmu.gpc_list.store((*self._mmu.gpc_list.load(), self))

    return _patched(PfnCache, "_activate", activate)


def _tracker_reads_table_unlocked() -> AbstractContextManager[None]:
    """A page-track user (KVMGT before 2023's "Protect gfn hash table with vgpu_lock")
    that looks its tracked-page table up without the lock protecting it, and takes the
    lock only to handle the write: the page may be dropped in between."""

    def track_write(self: ShadowTracker, gpa: int, data: bytes) -> None:
        assert not self.unregistered, "track_write ran after unregister returned"
        if gpa >> 12 in self.shadow:
            with self.lock:
                self.handle_write(gpa, data)

    return _patched(ShadowTracker, "track_write", track_write)


def _harvest_without_reprotect() -> AbstractContextManager[None]:
    """KVM_GET_DIRTY_LOG that clears the bits it returns but leaves the pages' sptes
    writable (the write-protect step of kvm_get_dirty_log_protect left out): the next
    writes go straight through and are never logged."""

    def dirty_log_reprotect(self: Mmu, slot: MemorySlot, first_page: int,
                            words: Sequence[int]) -> None:
        pass

    return _patched(Mmu, "dirty_log_reprotect", dirty_log_reprotect)


def _ring_reset_without_reprotect() -> AbstractContextManager[None]:
    """KVM_RESET_DIRTY_RINGS frees the harvested entries but leaves their pages writable
    (kvm_reset_dirty_gfn's write-protect left out): the next guest write to such a page
    pushes no entry."""

    def dirty_ring_reprotect(self: Mmu, batches: Sequence[tuple[MemorySlot, int, int]]
                             ) -> None:
        pass

    return _patched(Mmu, "dirty_ring_reprotect", dirty_ring_reprotect)


def _delete_without_zap() -> AbstractContextManager[None]:
    """A DELETE or MOVE that publishes the INVALID slot and the new set but never drops
    the stage-2 mappings of the old range (arch_flush_shadow_memslot left out)."""

    def slot_invalidated(self: Mmu, slot: MemorySlot) -> None:
        pass

    return _patched(Mmu, "slot_invalidated", slot_invalidated)


def _fault_reads_tracking_unlocked() -> AbstractContextManager[None]:
    """The fault path deciding whether a gfn is write-tracked from the tracking counters
    read before it takes the MMU lock, never re-checked under it: tracking that starts in
    between finds the page mapped writable, and the tracker misses later writes."""
    real = Mmu.__dict__["_fault_once"]

    def fault_once(self: Mmu, as_id: int, gpa: int, gfn: int, write: bool) -> Spte:
        early = gfn in self._track[as_id]  # read without the MMU lock

        def tracked(a: int, g: int) -> bool:
            return early if g == gfn else Mmu.tracked(self, a, g)

        self.tracked = tracked  # type: ignore[method-assign,assignment]
        try:
            spte: Spte = real(self, as_id, gpa, gfn, write)
            return spte
        finally:
            del self.tracked

    return _patched(Mmu, "_fault_once", fault_once)


def _hva_cache_outside_section() -> AbstractContextManager[None]:
    """The hva cache as it was before the checker found it: its reads ran outside the
    read section a slot update's grace period waits for, so a delete could return while
    a copy that had checked the old generation was still to come."""

    def read(self: HvaCache, offset: int, n: int) -> bytes:
        offset, slot = self._revalidate(offset, n)
        if slot is None:
            return self._memory._read_runs(self.gpa + offset, n)
        start = (self.hva & 0xFFF) + offset
        return bytes(self._page(offset, False)[start:start + n])

    return _patched(HvaCache, "read", read)


def _fault_skips_locked_recheck() -> AbstractContextManager[None]:
    """A fault that trusts its lockless pre-check: mmu_invalidate_retry_gfn under the MMU
    lock always says "no retry", so a page resolved before an invalidation is installed
    after it zapped."""

    def retry_gfn(self: Mmu, seq: int, gfn: int) -> bool:
        self.lock.assert_held()
        return False

    return _patched(Mmu, "retry_gfn", retry_gfn)


def _split_drops_dirty_bits() -> AbstractContextManager[None]:
    """A transaction that replaces a logging slot by new ones without carrying the old
    bitmap's unharvested bits over (what KVM's API would do to a DELETE + CREATE)."""

    def carry_dirty_bits(changes: Sequence[Change]) -> None:
        pass

    return _patched(memslots_module, "carry_dirty_bits", carry_dirty_bits)


def _conversion_without_bracket() -> AbstractContextManager[None]:
    """KVM_SET_MEMORY_ATTRIBUTES that stores the new attribute and zaps the range, but not
    inside an invalidation (no begin, range_add or end; the sequence never moves): a fault
    that resolved the page of the old kind before the change installs it after the zap."""

    def set_attributes(self: Mmu, start: int, end: int, value: int) -> bool:
        old = self.attributes.load()
        if old.has(start, end, ~0, value):
            return False
        with self.lock:
            self.attributes.store(old.with_range(start, end, value))
            for slots in self._memslots.active.load():
                for s in slots.overlapping(start, end):
                    self._zap(s.as_id, max(start, s.base_gfn), min(end, s.end_gfn))
            self.flush()
        return True

    return _patched(Mmu, "set_attributes", set_attributes)


def _variant(name: str, base: str, patch: Callable[[], AbstractContextManager[None]]
             ) -> tuple[str, Scenario]:
    scenario = SCENARIOS[base]
    doc = " ".join((patch.__doc__ or "").split())
    return name, Scenario(name, f"{base} with a historic mistake: {doc}", scenario.build,
                          patch, expect_failure=True)


BUGS: dict[str, Scenario] = dict([
    _variant("bug:fault-skips-locked-recheck", "fault-vs-invalidation",
             _fault_skips_locked_recheck),
    _variant("bug:range-add-keeps-last", "overlapping-invalidations", _range_add_last_only),
    _variant("bug:delete-then-create", "transaction-vs-reader", _batch_as_single_updates),
    _variant("bug:delete-then-create-vcpu", "transaction-vs-vcpu", _batch_as_single_updates),
    _variant("bug:split-drops-dirty-bits", "split-vs-logged-write", _split_drops_dirty_bits),
    _variant("bug:no-grace-period", "delete-vs-accessor", _no_grace_period),
    _variant("bug:gpc-active-before-listed", "gpc-refresh-vs-invalidation",
             _gpc_active_before_reachable),
    _variant("bug:tracker-unlocked-lookup", "pagetrack-write-vs-removal",
             _tracker_reads_table_unlocked),
    _variant("bug:harvest-without-reprotect", "dirty-log-vs-guest-write",
             _harvest_without_reprotect),
    _variant("bug:ring-reset-without-reprotect", "ring-reset-vs-guest-write",
             _ring_reset_without_reprotect),
    _variant("bug:delete-without-zap", "delete-vs-vcpu", _delete_without_zap),
    _variant("bug:move-without-zap", "move-vs-vcpu", _delete_without_zap),
    _variant("bug:hva-cache-outside-section", "delete-vs-hva-cache",
             _hva_cache_outside_section),
    _variant("bug:fault-reads-tracking-unlocked", "track-vs-write-fault",
             _fault_reads_tracking_unlocked),
    _variant("bug:gmem-range-add-keeps-last", "gmem-punch-vs-faults", _range_add_last_only),
    _variant("bug:conversion-without-bracket", "conversion-vs-fault",
             _conversion_without_bracket),
])
