"""How every other feature meets guest_memfd, rule by rule (kvm-semantics §8.5, §8.7, §8.8).

A VMM relies on: a guest_memfd slot has no dirty log (GET/CLEAR_DIRTY_LOG → ENOENT) and never
becomes read-only or logging (EINVAL); a default VM may bind guest_memfd slots in the SMM
address space and a vCPU in SMM runs on the file's pages there, while a private-memory VM has
no such address space; pfn caches and the hva cache are hva-based and attribute-blind, and a
punch does not invalidate a cache that maps no page of the file; page tracking is gfn-based
(tracking a gfn of a guest_memfd slot works, and is dropped with the slot); a transaction's
`replace_layout` takes REGION2 regions and may rebind the ranges the old layout bound; split
and merge keep a slot's pages contiguous.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest
from expect import refused

from kvmem import HostMemory, KvmError, Vm
from kvmem.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd
from kvmem.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

PAGE = 4096
MiB = 1 << 20
GMEM, LOG, RO = KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
GPA = 1 << 30
AS1 = 1 << 16


@pytest.fixture
def vm() -> Vm:
    return Vm()


@pytest.fixture
def mem() -> Iterator[HostMemory]:
    m = HostMemory.anonymous(4 * MiB)
    yield m
    m.close()


@pytest.fixture
def gmem(vm: Vm) -> Iterator[Callable[..., GuestMemfd]]:
    made: list[GuestMemfd] = []

    def make(size: int = MiB, flags: int = MMAP | SHARED) -> GuestMemfd:
        f = vm.create_guest_memfd(size, flags)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


# -- dirty logging and read-only ----------------------------------------------------------------
def test_a_gmem_slot_has_no_dirty_log(vm: Vm, mem: HostMemory,
                                      gmem: Callable[..., GuestMemfd]) -> None:
    """§8.8: LOG_DIRTY never (create or flags-only), so GET/CLEAR find no log: ENOENT; a
    guest write to the slot is in no log."""
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, MiB, mem.hva, f, 0)
    vm.create_vcpu(0).guest_write(GPA, b"x")
    refused(errno.ENOENT, vm.get_dirty_log, 0)
    refused(errno.ENOENT, vm.clear_dirty_log, 0, 0, 64, bytes(8))
    refused(errno.EINVAL, vm.set_memory_region2, 0, GMEM | LOG, GPA, MiB, mem.hva, f, 0)
    refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM | RO, 2 * GPA, MiB, mem.hva, f, MiB)
    with pytest.raises(KvmError), vm.transaction() as tx:
        tx.set_readonly(0, True)
    assert [s.flags for s in vm.slots()] == [GMEM]


# -- address spaces -------------------------------------------------------------------------------
def test_a_default_vm_binds_in_the_smm_address_space(vm: Vm, mem: HostMemory,
                                                      gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, PAGE, mem.hva, f, 0)
    vm.set_memory_region2(AS1 | 0, GMEM, GPA, PAGE, mem.hva, f, PAGE)
    assert [(b.slot.as_id, b.pgoff) for b in f.bindings] == [(0, 0), (1, 1)]
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"normal")
    vcpu.smm = True
    vcpu.guest_write(GPA, b"smram!")
    assert bytes(f.page_view(0)[:6]) == b"normal" and bytes(f.page_view(1)[:6]) == b"smram!"
    f.punch_hole(PAGE, PAGE)  # only the SMM binding: only address space 1's gfn goes
    assert vm.mmu.spte(1, GPA >> 12) is None and vm.mmu.spte(0, GPA >> 12) is not None
    assert vcpu.guest_read(GPA, 6) == bytes(6)


def test_a_private_memory_vm_has_no_smm_address_space(mem: HostMemory) -> None:
    pvm = Vm(vm_type="sw_protected")
    f = pvm.create_guest_memfd(MiB)
    try:
        refused(errno.EINVAL, pvm.set_memory_region2, AS1 | 0, GMEM, GPA, PAGE, mem.hva, f, 0)
        assert f.bindings == ()
    finally:
        f.close()


# -- caches and accessors --------------------------------------------------------------------------
def test_pfn_and_hva_caches_are_hva_based(vm: Vm, mem: HostMemory,
                                          gmem: Callable[..., GuestMemfd]) -> None:
    """§8.7 and §8.5: a cache over a gmem-only slot maps the hva (not the file), and a punch
    of the file — which invalidates no pfn cache — leaves it valid and its bytes as they
    were, while the guest sees the punched page."""
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, MiB, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"in the file")
    mem.view()[:6] = b"at hva"
    gpc = vm.pfn_cache()
    gpc.activate(GPA, 8)
    hvc = vm.hva_cache(GPA, 8)
    with gpc.lock(6) as view:
        assert bytes(view) == b"at hva"
    assert hvc.read(0, 6) == b"at hva"
    f.punch_hole(0, PAGE)
    assert gpc.valid and vcpu.guest_read(GPA, 6) == bytes(6)
    with gpc.lock(6) as view:
        assert bytes(view) == b"at hva"
    gpc.deactivate()


def test_a_cache_over_the_files_own_mapping_is_invalidated_by_a_punch(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    """The slot's hva is the file's own mmap: truncation unmaps it (the hva notifier runs
    inside the gmem bracket), so a pfn cache there is invalidated and refreshes to zeros."""
    f = gmem()
    m = f.mmap()
    try:
        vm.set_memory_region2(0, GMEM, GPA, MiB, m.hva, f, 0)
        m.view()[:4] = b"file"
        gpc = vm.pfn_cache()
        gpc.activate(GPA, 4)
        with gpc.lock(4) as view:
            assert bytes(view) == b"file"
        f.punch_hole(0, PAGE)
        assert not gpc.valid
        with gpc.lock(4) as view:
            assert bytes(view) == bytes(4)
        gpc.deactivate()
        vm.set_memory_region(0, 0, 0, 0, 0)
    finally:
        m.close()


# -- page tracking ---------------------------------------------------------------------------------
def test_page_tracking_is_gfn_based(vm: Vm, mem: HostMemory,
                                    gmem: Callable[..., GuestMemfd]) -> None:
    """Tracking a gfn of a guest_memfd slot works (the slot's page never mapped writable),
    and deleting the slot drops its counters and tells the notifier."""
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, 4 * PAGE, mem.hva, f, 0)
    removed: list[tuple[int, int]] = []

    class Tracker:
        def track_write(self, gpa: int, data: bytes) -> None:
            pass

        def track_remove_region(self, gfn: int, npages: int) -> None:
            removed.append((gfn, npages))

    vm.page_track.register(Tracker())
    vm.page_track.add_gfn((GPA >> 12) + 1)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(GPA + PAGE, 1)
    spte = vm.mmu.spte(0, (GPA >> 12) + 1)
    assert spte is not None and not spte.writable
    vm.set_memory_region(0, 0, 0, 0, 0)
    assert removed == [(GPA >> 12, 4)] and vm.page_track.tracked_gfns() == []


# -- transactions ---------------------------------------------------------------------------------
def test_replace_layout_takes_region2_and_rebinds(vm: Vm, mem: HostMemory,
                                                  gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA + 2 * PAGE, b"page 2")
    with vm.transaction() as tx:
        # the same pages in two slots, the second half first: bound again in one batch
        tx.replace_layout(0, [(2, GMEM, GPA, 2 * PAGE, mem.hva, f, 0),
                              (3, GMEM, 2 * GPA, 2 * PAGE, mem.hva, f, 2 * PAGE),
                              (4, 0, 0, PAGE, mem.hva)])
    assert [(b.slot.id, b.pgoff, b.npages) for b in f.bindings] == [(2, 0, 2), (3, 2, 2)]
    assert vcpu.guest_read(2 * GPA, 6) == b"page 2"
    with pytest.raises(TypeError):
        vm.transaction().replace_layout(0, [(2, GMEM, GPA, PAGE, mem.hva, f)])
    with pytest.raises(TypeError):
        vm.transaction().replace_layout(0, [(2, GMEM, GPA, PAGE, mem.hva, "f", 0)])


def test_a_refused_replace_layout_binds_nothing(vm: Vm, mem: HostMemory,
                                                gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, mem.hva, f, 0)
    before = [(b.slot.id, b.pgoff) for b in f.bindings]
    # the two new slots overlap in the file: EINVAL
    with pytest.raises(KvmError), vm.transaction() as tx:
        tx.replace_layout(0, [(2, GMEM, GPA, 2 * PAGE, mem.hva, f, 0),
                              (3, GMEM, 2 * GPA, 2 * PAGE, mem.hva, f, PAGE)])
    assert [(b.slot.id, b.pgoff) for b in f.bindings] == before


def test_split_and_merge_keep_the_pages_contiguous(vm: Vm, mem: HostMemory,
                                                   gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, 8 * PAGE, mem.hva, f, PAGE)
    vcpu = vm.create_vcpu(0)
    for i in range(8):
        vcpu.guest_write(GPA + i * PAGE, bytes([i]) * 4)
    with vm.transaction() as tx:
        pieces = tx.split(0, [GPA + 3 * PAGE, GPA + 5 * PAGE])
    assert [(b.pgoff, b.npages) for b in f.bindings] == [(1, 3), (4, 2), (6, 3)]
    with vm.transaction() as tx:
        tx.merge(pieces)
    assert [(b.pgoff, b.npages) for b in f.bindings] == [(1, 8)]
    assert [vcpu.guest_read(GPA + i * PAGE, 4) for i in range(8)] == \
        [bytes([i]) * 4 for i in range(8)]
