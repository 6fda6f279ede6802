"""The scenarios `kvmem check` explores: kvmem's own protocols, run by the real code.

Rules of this room:
- A scenario calls only kvmem's public paths (`Vm`, `Vcpu`, `HostMemory`, transactions,
  pfn caches, page tracking) — never a re-implementation. Its threads are as short as
  the race needs: every scheduling point multiplies the schedules to run.
- Each thread asserts what DESIGN.md's invariants promise at the moment it can see them
  (a reader never sees a hole; nothing returns data written after a delete returned), and
  the final check asserts what must hold once every thread is done (no stage-2 or cache
  entry maps a page that a host change replaced).
- Bug variants (`bugs.py`) reuse these scenarios with one historic mistake patched into
  the code they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import GuestAccessError
from ..gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd
from ..host import HostMemory
from ..memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from ..mmu import MemoryFault, MmioExit
from ..uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES
from ..vm import Vm
from . import sched
from .explore import Instance, Scenario

__all__ = ["SCENARIOS", "close_memory", "label"]

PAGE = 4096


def label(obj: object, prefix: str) -> None:
    """Name the twin atomics of `obj` after their attributes, for readable traces."""
    for attr, v in vars(obj).items():
        if isinstance(v, sched.Atomic) and v.name == "atomic":
            v.name = f"{prefix}.{attr.lstrip('_')}"


def new_vm() -> Vm:
    vm = Vm(address_spaces=1)
    label(vm.memslots, "memslots")
    label(vm.mmu, "mmu")
    return vm


def close_memory(*mems: HostMemory) -> None:
    """Unmap scenario memory, even after an execution was cut short with locks held."""
    for mem in mems:
        try:
            mem.close()
        except Exception:
            mem.force_close()


def _check_stage2(vm: Vm) -> None:
    stale = vm.mmu.stale_sptes()
    assert not stale, f"stage-2 still maps replaced host pages at (as_id, gfn) {stale}"


def _memory(data: bytes, pages: int = 1) -> HostMemory:
    mem = HostMemory.anonymous(pages * PAGE)
    for i in range(pages):
        mem.view()[i * PAGE:i * PAGE + len(data)] = data
    return mem


# ---------------------------------------------------------------------------------------
# fault vs invalidation


def fault_vs_invalidation() -> Instance:
    """A vCPU faults a page in while the host discards it: whatever the order, no stale
    spte survives the invalidation and the guest reads the old or the new page."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    got: list[bytes] = []

    def guest() -> None:
        got.append(vcpu.guest_read(0, 8))

    def discard() -> None:
        mem.discard(0, PAGE)

    def check() -> None:
        _check_stage2(vm)
        assert got and got[0] in (b"original", bytes(8)), f"guest read {got}"

    return Instance([("vcpu0", guest), ("host", discard)], check, lambda: close_memory(mem))


def overlapping_invalidations() -> Instance:
    """Two invalidations overlap — the host discards gfn 0's page (an MMU notifier) while
    the vCPU zaps gfn 1 (kvm_zap_gfn_range, as an MTRR update does) — and then the vCPU
    faults gfn 0: the in-progress range must cover both invalidations until both end, so
    the fault cannot install the page being replaced."""
    mem = _memory(b"page 0..", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)

    def discard() -> None:
        mem.discard(0, PAGE)

    def zap_then_fault() -> None:
        vm.mmu.zap_gfn_range(0, 1, 2)
        vcpu.guest_read(0, 8)

    return Instance([("host", discard), ("vcpu0", zap_then_fault)],
                    lambda: _check_stage2(vm), lambda: close_memory(mem))


# ---------------------------------------------------------------------------------------
# slot updates


def transaction_vs_reader() -> Instance:
    """A transaction splits a two-page slot in two while a reader reads both pages: the
    reader sees the old layout or the new one, never a hole."""
    mem = _memory(b"contents", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, mem.hva)

    def split() -> None:
        with vm.transaction() as tx:
            tx.split(0, [PAGE])

    def reader() -> None:
        try:
            data = vm.read(0, 2 * PAGE)
        except GuestAccessError as e:
            raise AssertionError(f"reader saw a hole during a transaction: {e}") from None
        assert data[:8] == data[PAGE:PAGE + 8] == b"contents", "reader got wrong bytes"

    def check() -> None:
        assert [s.npages for s in vm.slots()] == [1, 1], vm.slots()

    return Instance([("vmm", split), ("reader", reader)], check, lambda: close_memory(mem))


POISON = b"REUSED!!"


def _delete_vs_reader(read: Callable[[Vm], Callable[[], bytes]], who: str) -> Instance:
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    read_8 = read(vm)

    def delete() -> None:
        vm.set_memory_region(0, 0, 0, 0, 0)
        mem.view()[:8] = POISON  # the slot is gone: its memory is the VMM's again

    def reader() -> None:
        with contextlib.suppress(GuestAccessError):
            data = read_8()
            assert data != POISON, f"{who} used the deleted slot's mapping after the " \
                                   "delete returned"
            assert data == b"original", f"reader got {data!r}"

    return Instance([("vmm", delete), ("reader", reader)], close=lambda: close_memory(mem))


def delete_vs_accessor() -> Instance:
    """A slot is deleted while a reader reads through it; once the delete returns, the VMM
    reuses the host memory. The reader must get the old bytes or EFAULT — never bytes
    written after the delete returned (that would be a use of the old mapping)."""
    return _delete_vs_reader(lambda vm: lambda: vm.read(0, 8), "reader")


def delete_vs_hva_cache() -> Instance:
    """`delete-vs-accessor` for a reader that goes through an hva cache
    (kvm_read_guest_cached): once the delete returns, nothing read through the cache may
    come from the deleted slot's memory."""
    def through_cache(vm: Vm) -> Callable[[], bytes]:
        cache = vm.hva_cache(0, 8)
        return lambda: cache.read(0, 8)

    return _delete_vs_reader(through_cache, "hva cache")


def move_vs_vcpu() -> Instance:
    """A slot is moved to another gpa while a vCPU reads the old gpa through the stage-2
    (mapped before): a read that starts after the move returned must exit for MMIO, and
    the moved slot is read at its new gpa."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(0, 8)  # mapped before the race starts
    moved = sync_atomic(False)
    moved.name = "moved"

    def move() -> None:
        vm.set_memory_region(0, 0, 16 * PAGE, PAGE, mem.hva)
        moved.store(True)

    def guest() -> None:
        after = moved.load()
        try:
            data = vcpu.guest_read(0, 8)
        except MmioExit:
            return
        assert not after, "vCPU read the old gpa of a slot after its move returned"
        assert data == b"original", f"vCPU read {data!r}"

    def check() -> None:
        assert vcpu.guest_read(16 * PAGE, 8) == b"original"
        _check_stage2(vm)

    return Instance([("vmm", move), ("vcpu0", guest)], check, lambda: close_memory(mem))


def transaction_vs_vcpu() -> Instance:
    """A transaction splits a two-page slot while a vCPU reads both pages through the
    stage-2 (faulting them in): the vCPU never exits for MMIO (no hole), and no spte
    outlives the mapping it was built on."""
    mem = _memory(b"contents", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)

    def split() -> None:
        with vm.transaction() as tx:
            tx.split(0, [PAGE])

    def guest() -> None:
        try:
            data = vcpu.guest_read(PAGE - 8, 16)
        except MmioExit as e:
            raise AssertionError(f"vCPU saw a hole during a transaction: {e}") from None
        assert data == bytes(8) + b"contents", f"vCPU read {data!r}"

    return Instance([("vmm", split), ("vcpu0", guest)], lambda: _check_stage2(vm),
                    lambda: close_memory(mem))


def delete_vs_vcpu() -> Instance:
    """A slot is deleted while a vCPU reads through the stage-2 (a page already mapped);
    once the delete returns the VMM reuses the memory. The vCPU gets the old bytes or an
    MMIO exit — never bytes written after the delete returned."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(0, 8)  # mapped before the race starts

    def delete() -> None:
        vm.set_memory_region(0, 0, 0, 0, 0)
        mem.view()[:8] = POISON

    def guest() -> None:
        with contextlib.suppress(MmioExit):
            data = vcpu.guest_read(0, 8)
            assert data != POISON, "vCPU used the deleted slot's mapping after the " \
                                   "delete returned"
            assert data == b"original", f"vCPU read {data!r}"

    def check() -> None:
        assert vm.mmu.mapped(0) == 0, "the deleted slot's pages are still mapped"

    return Instance([("vmm", delete), ("vcpu0", guest)], check, lambda: close_memory(mem))


def dirty_log_vs_guest_write() -> Instance:
    """A vCPU writes a page of a dirty-logging slot twice while the VMM harvests the log
    and copies what it reports (live migration): after one last harvest once all is
    quiet, the copy equals guest memory — no write escaped the log."""
    mem = _memory(b"initial.")
    vm = new_vm()
    vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0, b"first...")  # mapped writable and dirty before the race
    copy = [bytes(mem.view()[:8])]
    vm.get_dirty_log(0)  # round 0 harvested: the page is write-protected again

    def guest() -> None:
        vcpu.guest_write(0, b"second..")
        vcpu.guest_write(0, b"third...")

    def migrate() -> None:
        if vm.get_dirty_log(0)[0] & 1:
            copy.append(bytes(mem.view()[:8]))

    def check() -> None:
        if vm.get_dirty_log(0)[0] & 1:
            copy.append(bytes(mem.view()[:8]))
        assert copy[-1] == b"third...", f"migrated {copy[-1]!r}: a write escaped the log"

    return Instance([("vcpu0", guest), ("vmm", migrate)], check, lambda: close_memory(mem))


def ring_reset_vs_guest_write() -> Instance:
    """The same migration with a dirty ring: the VMM harvests the vCPU's ring, resets it
    (which write-protects the pages again), and only then copies what it harvested, while
    the vCPU writes the page twice: after one last round once all is quiet, the copy
    equals guest memory — no write escaped the ring."""
    mem = _memory(b"initial.")
    vm = new_vm()
    vm.enable_dirty_ring(PAGE)
    vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0, b"first...")  # mapped writable and logged before the race
    copy = [bytes(mem.view()[:8])]
    vcpu.dirty_ring.harvest()
    vm.reset_dirty_rings()  # round 0: the page is write-protected again

    def guest() -> None:
        vcpu.guest_write(0, b"second..")
        vcpu.guest_write(0, b"third...")

    def migrate() -> None:
        got = vcpu.dirty_ring.harvest()
        vm.reset_dirty_rings()
        if got:
            copy.append(bytes(mem.view()[:8]))

    def check() -> None:
        migrate()
        assert copy[-1] == b"third...", f"migrated {copy[-1]!r}: a write escaped the ring"

    return Instance([("vcpu0", guest), ("vmm", migrate)], check, lambda: close_memory(mem))


def split_vs_logged_write() -> Instance:
    """A vCPU writes a page of a dirty-logging slot while a transaction splits the slot:
    whichever slot the write lands in, the next dirty log of the piece that now maps the
    page reports it (dirty bits are carried across the split; nothing is lost)."""
    mem = _memory(b"initial.", pages=2)
    vm = new_vm()
    vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * PAGE, mem.hva)
    vcpu = vm.create_vcpu(0)
    vm.get_dirty_log(0)  # a clean start

    def guest() -> None:
        vcpu.guest_write(0, b"written!")

    def split() -> None:
        with vm.transaction() as tx:
            tx.split(0, [PAGE], ids=[1])

    def check() -> None:
        assert bytes(mem.view()[:8]) == b"written!", "the guest write was lost"
        assert vm.get_dirty_log(0)[0] & 1, "the write is missing from the dirty log"

    return Instance([("vcpu0", guest), ("vmm", split)], check, lambda: close_memory(mem))


# ---------------------------------------------------------------------------------------
# pfn caches


def gpc_refresh_vs_invalidation() -> Instance:
    """A pfn cache is activated (and so refreshed) and used while the host discards its
    page: once both are done, a valid cache maps the current page, and no use of the cache
    touched a replaced page."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    gpc = vm.pfn_cache()
    got: list[bytes] = []

    def use() -> None:
        gpc.activate(0, 8)
        with gpc.lock(8) as view:
            got.append(bytes(view))

    def discard() -> None:
        mem.discard(0, PAGE)

    def check() -> None:
        if gpc.valid:
            assert gpc.frame is not None and gpc.frame.current(), \
                "the pfn cache is valid but maps a page the host replaced"
        assert got and got[0] in (b"original", bytes(8)), f"cache read {got}"

    return Instance([("vcpu0", use), ("host", discard)], check, lambda: close_memory(mem))


# ---------------------------------------------------------------------------------------
# page tracking


class ShadowTracker:
    """A KVMGT-like page-track user: it shadows the guest pages it tracks (`shadow`, under
    `lock`), updates the shadow on every tracked write, and drops a page by removing it
    from the shadow, then from kvmem's tracking."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.lock = sync_mutex("tracker.lock")
        self.shadow: dict[int, bytearray] = {}
        self.unregistered = False

    def track(self, gfn: int) -> None:
        with self.lock:
            self.shadow[gfn] = bytearray(PAGE)
        self.vm.page_track.add_gfn(gfn)

    def untrack(self, gfn: int) -> None:
        with self.lock:
            del self.shadow[gfn]
        self.vm.page_track.remove_gfn(gfn)

    def track_write(self, gpa: int, data: bytes) -> None:
        assert not self.unregistered, "track_write ran after unregister returned"
        with self.lock:
            if gpa >> 12 in self.shadow:
                self.handle_write(gpa, data)

    def handle_write(self, gpa: int, data: bytes) -> None:
        """Update the shadow of a tracked page (`lock` held, the page in `shadow`)."""
        self.lock.assert_held()
        entry = self.shadow.get(gpa >> 12)
        assert entry is not None, "the tracker's write handler found its page gone"
        off = gpa & (PAGE - 1)
        entry[off:off + len(data)] = data

    def track_remove_region(self, gfn: int, npages: int) -> None:
        with self.lock:
            for g in range(gfn, gfn + npages):
                self.shadow.pop(g, None)


def sync_atomic(value: bool) -> sched.Atomic[bool]:
    """An atomic of the current `kvmem.sync` (the twin while a scenario runs)."""
    from .. import sync

    cell: sched.Atomic[bool] = sync.Atomic(value)  # type: ignore[assignment]
    return cell


def sync_mutex(name: str) -> sched.Mutex:
    """A mutex of the current `kvmem.sync` (the twin while a scenario runs)."""
    from .. import sync

    mutex: sched.Mutex = sync.Mutex(name)  # type: ignore[assignment]
    return mutex


def pagetrack_write_vs_removal() -> Instance:
    """A guest writes a tracked page while its tracker stops tracking it and unregisters:
    the write is performed, the tracker hears it only while registered, and a tracked gfn
    is never writable in the stage-2."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    label(vm.page_track, "page_track")
    vcpu = vm.create_vcpu(0)
    tracker = ShadowTracker(vm)
    vm.page_track.register(tracker)
    tracker.track(0)

    def guest() -> None:
        vcpu.guest_write(0, b"guest!!!")

    def remove() -> None:
        tracker.untrack(0)
        vm.page_track.unregister(tracker)
        tracker.unregistered = True

    def check() -> None:
        assert bytes(mem.view()[:8]) == b"guest!!!", "the guest write was lost"
        for gfn in vm.page_track.tracked_gfns():
            spte = vm.mmu.spte(0, gfn)
            assert spte is None or not spte.writable, f"tracked gfn {gfn} is writable"

    return Instance([("vcpu0", guest), ("tracker", remove)], check,
                    lambda: close_memory(mem))


def track_vs_write_fault() -> Instance:
    """A tracker starts write-tracking a page while a vCPU writes it through the stage-2:
    once tracking is on, the page is never writable in the stage-2, so every later guest
    write reaches the tracker."""
    mem = _memory(b"original")
    vm = new_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    label(vm.page_track, "page_track")
    vcpu = vm.create_vcpu(0)
    tracker = ShadowTracker(vm)
    vm.page_track.register(tracker)

    def guest() -> None:
        vcpu.guest_write(0, b"guest!!!")

    def track() -> None:
        tracker.track(0)

    def check() -> None:
        spte = vm.mmu.spte(0, 0)
        assert spte is None or not spte.writable, "a tracked gfn is writable in the stage-2"
        vcpu.guest_write(8, b"later...")  # after tracking began: the tracker must hear it
        assert bytes(tracker.shadow[0][8:16]) == b"later...", "a tracked write was not " \
                                                              "reported"

    return Instance([("vcpu0", guest), ("tracker", track)], check,
                    lambda: close_memory(mem))


# ---------------------------------------------------------------------------------------
# guest_memfd


def _close_file(f: GuestMemfd) -> None:
    """Release a scenario's guest_memfd, even after an execution was cut short (then its
    release may wait for a reader that will never leave; the file is left to the GC)."""
    with contextlib.suppress(Exception):
        f.close()


def gmem_punch_vs_faults() -> Instance:
    """One guest_memfd backs two slots (page 0 at gfn 0, page 1 at gfn 16) and a hole is
    punched over both pages while a vCPU faults a page of each slot in turn: the punch adds
    each binding's gfns to the in-progress range, so neither fault maps a page the punch
    frees, and each guest read gets the old bytes or zeros."""
    vm = new_vm()
    f = vm.create_guest_memfd(2 * PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    label(f, "gmem")
    for i in range(2):
        f.page_view(i)[:8] = b"original"
    vm.set_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, PAGE, 0, f, 0)
    vm.set_memory_region2(1, KVM_MEM_GUEST_MEMFD, 16 * PAGE, PAGE, 0, f, PAGE)
    vcpu = vm.create_vcpu(0)
    got: list[bytes] = []

    def guest() -> None:
        # one vCPU thread for both slots (a second thread would multiply the schedules
        # without a new interleaving of the punch's steps)
        got.append(vcpu.guest_read(0, 8))
        got.append(vcpu.guest_read(16 * PAGE, 8))

    def punch() -> None:
        f.punch_hole(0, 2 * PAGE)

    def check() -> None:
        _check_stage2(vm)
        assert len(got) == 2 and all(g in (b"original", bytes(8)) for g in got), \
            f"guest read {got}"

    return Instance([("punch", punch), ("vcpu0", guest)], check, lambda: _close_file(f))


def conversion_vs_fault() -> Instance:
    """On a sw_protected VM a vCPU reads gfn 0 while the VMM converts it to private: the
    fault maps the shared page (hva) or the private one (guest_memfd), never a page of the
    kind the gfn no longer has; a read that starts after the conversion returned reads the
    private page. A read that raced the conversion may exit with a memory fault (its kind
    went stale); the vCPU re-enters, as a VMM does."""
    mem = _memory(b"shared..")
    vm = Vm(vm_type="sw_protected")
    label(vm.memslots, "memslots")
    label(vm.mmu, "mmu")
    f = vm.create_guest_memfd(PAGE)
    f.page_view(0)[:8] = b"private."
    vm.set_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, PAGE, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    converted = sync_atomic(False)
    converted.name = "converted"

    def convert() -> None:
        vm.set_memory_attributes(0, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        converted.store(True)

    def guest() -> None:
        after = converted.load()
        for _ in range(3):
            try:
                data = vcpu.guest_read(0, 8)
                break
            except MemoryFault as e:
                assert not after and not e.private, f"unexpected memory fault: {e}"
        else:
            raise AssertionError("the vCPU kept exiting with memory faults")
        assert data == b"private." or (not after and data == b"shared.."), \
            f"vCPU read {data!r}" + (" after the conversion returned" if after else "")

    def check() -> None:
        _check_stage2(vm)
        assert vcpu.guest_read(0, 8) == b"private."

    def close() -> None:
        _close_file(f)
        close_memory(mem)

    return Instance([("vcpu0", guest), ("vmm", convert)], check, close)


def _scenarios(*items: tuple[str, Callable[[], Instance]]) -> dict[str, Scenario]:
    out = {}
    for name, build in items:
        doc = (build.__doc__ or "").split("\n\n")[0]
        out[name] = Scenario(name, " ".join(doc.split()), build)
    return out


SCENARIOS: dict[str, Scenario] = _scenarios(
    ("fault-vs-invalidation", fault_vs_invalidation),
    ("overlapping-invalidations", overlapping_invalidations),
    ("transaction-vs-reader", transaction_vs_reader),
    ("delete-vs-accessor", delete_vs_accessor),
    ("delete-vs-hva-cache", delete_vs_hva_cache),
    ("move-vs-vcpu", move_vs_vcpu),
    ("transaction-vs-vcpu", transaction_vs_vcpu),
    ("delete-vs-vcpu", delete_vs_vcpu),
    ("dirty-log-vs-guest-write", dirty_log_vs_guest_write),
    ("ring-reset-vs-guest-write", ring_reset_vs_guest_write),
    ("split-vs-logged-write", split_vs_logged_write),
    ("gpc-refresh-vs-invalidation", gpc_refresh_vs_invalidation),
    ("pagetrack-write-vs-removal", pagetrack_write_vs_removal),
    ("track-vs-write-fault", track_vs_write_fault),
    ("gmem-punch-vs-faults", gmem_punch_vs_faults),
    ("conversion-vs-fault", conversion_vs_fault),
)
