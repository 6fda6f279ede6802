"""Guest code on guest_memfd slots, and invalidations without an hva (kvm-semantics §5, §8.5, §8.7,
§8.9).

A VMM relies on: a slot bound to an MMAP file (gmem-only) runs guest code on the file's pages —
never on its hva — while host accessors still use the hva; a slot bound to a file without MMAP
runs from its hva, as on this host; a punched page reads zero to the guest afterwards; a punch or
release runs KVM's bracket on the MMU (begin, one range per intersecting binding — zapped and
flushed —, end; nothing without a binding) and the ranges accumulate min/max until the end, so
a fault that resolved a page before or during the punch retries instead of mapping it; a
released file turns the slot's guest accesses into memory faults (EFAULT); a transaction that
rebinds a file (split, merge) makes racing faults retry, never fail; `Mmu.stale_sptes` sees a
guest_memfd mapping whose page went behind the MMU's back.
"""

from __future__ import annotations

import ctypes
import errno
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from kvmem import HostMemory, MemoryFault, Vm
from kvmem.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GmemFrame, GuestMemfd
from kvmem.mmu import Mmu
from kvmem.uapi import KVM_MEM_GUEST_MEMFD

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
GMEM = KVM_MEM_GUEST_MEMFD
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
GPA = GiB


@pytest.fixture
def vm() -> Vm:
    return Vm()


@pytest.fixture
def mem() -> Iterator[HostMemory]:
    m = HostMemory.anonymous(4 * MiB)
    yield m
    m.close()


@pytest.fixture
def files() -> Iterator[list[GuestMemfd]]:
    made: list[GuestMemfd] = []
    yield made
    for f in made:
        f.close()


@pytest.fixture
def gmem(vm: Vm, files: list[GuestMemfd]) -> Callable[..., GuestMemfd]:
    def make(size: int = MiB, flags: int = MMAP | SHARED) -> GuestMemfd:
        f = vm.create_guest_memfd(size, flags)
        files.append(f)
        return f
    return make


def state(mmu: Mmu) -> tuple[int, int]:
    return mmu.seq.load(), mmu.in_progress.load()


# -- where guest code runs ---------------------------------------------------------------------
def test_gmem_only_slot_runs_on_the_file_and_accessors_on_the_hva(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 16 * PAGE, mem.hva, f, 4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA + 2 * PAGE + 8, b"guest")
    assert bytes(f.page_view(6)[8:13]) == b"guest"
    assert vm.read(GPA + 2 * PAGE + 8, 5) == bytes(5)  # the hva's page: untouched
    vm.write(GPA + 3 * PAGE, b"host")                   # lands at the hva...
    assert bytes(mem.view()[3 * PAGE:3 * PAGE + 4]) == b"host"
    assert vcpu.guest_read(GPA + 3 * PAGE, 4) == bytes(4)  # ...which guest code never sees
    spte = vm.mmu.spte(0, (GPA >> 12) + 2)
    assert spte is not None and spte.writable and isinstance(spte.frame, GmemFrame)
    assert (spte.frame.file, spte.frame.index) == (f, 6)


def test_gmem_only_slot_needs_no_memory_at_its_hva(vm: Vm,
                                                   gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"no hva")
    assert vcpu.guest_read(GPA, 6) == b"no hva"


@pytest.mark.parametrize("flags", [0, SHARED])
def test_a_slot_on_a_file_without_mmap_runs_from_its_hva(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd], flags: int) -> None:
    f = gmem(MiB, flags)
    vm.set_memory_region2(1, GMEM, GPA, 16 * PAGE, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA + PAGE, b"shared")
    assert bytes(mem.view()[PAGE:PAGE + 6]) == b"shared" == vm.read(GPA + PAGE, 6)
    assert bytes(f.page_view(1)[:6]) == bytes(6)
    f.punch_hole(0, MiB)  # the file's invalidation still zaps the slot's gfns...
    assert vm.mmu.spte(0, (GPA >> 12) + 1) is None
    assert vcpu.guest_read(GPA + PAGE, 6) == b"shared"  # ...but the hva's page is unchanged


def test_the_frame_address_is_the_direct_map_page(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 8 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA + PAGE, b"addr")
    spte = vm.mmu.spte(0, (GPA >> 12) + 1)
    assert spte is not None
    assert ctypes.string_at(spte.frame.hva, 4) == b"addr"


# -- punching holes ----------------------------------------------------------------------------
def test_a_punched_page_reads_zero_to_the_guest(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, 1 << 40, f, 0)
    vcpu = vm.create_vcpu(0)
    for i in range(8):
        vcpu.guest_write(GPA + i * PAGE, b"page%d" % i)
    seq, _ = state(vm.mmu)
    f.punch_hole(2 * PAGE, 3 * PAGE)
    assert state(vm.mmu) == (seq + 1, 0)
    assert [vm.mmu.spte(0, (GPA >> 12) + i) is None for i in range(8)] == \
        [False, False, True, True, True, False, False, False]
    assert [vcpu.guest_read(GPA + i * PAGE, 5) for i in range(8)] == \
        [b"page0", b"page1", bytes(5), bytes(5), bytes(5), b"page5", b"page6", b"page7"]
    assert vm.mmu.stale_sptes() == []


def test_a_punch_no_binding_meets_leaves_the_mmu_alone(vm: Vm,
                                                      gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, 1 << 40, f, 16 * PAGE)
    vm.create_vcpu(0).guest_write(GPA, b"x")
    before = (state(vm.mmu), vm.mmu.stats["invalidations"], vm.mmu.mapped(0))
    f.punch_hole(0, 16 * PAGE)
    f.punch_hole(24 * PAGE, MiB)  # past the end of the file too
    assert (state(vm.mmu), vm.mmu.stats["invalidations"], vm.mmu.mapped(0)) == before


def test_the_bracket_accumulates_every_binding_and_faults_inside_retry(
        vm: Vm, gmem: Callable[..., GuestMemfd], monkeypatch: pytest.MonkeyPatch) -> None:
    """§8.5's example: 8 MiB file, slot A = pages 0-1023 at 1 GiB, slot B = pages 1024-2047 at
    16 GiB; punching bytes [3, 5) MiB adds [1G+3M, 1G+4M) and [16G, 16G+1M): until the end every
    fault with a gfn in [gfn(1G+3M), gfn(16G+1M)) retries — a third slot's gfn in between too
    (the min/max rule) —, and faults elsewhere map."""
    f = gmem(8 * MiB)
    other = gmem(2 * MiB)
    vm.set_memory_region2(1, GMEM, GiB, 4 * MiB, 1 << 40, f, 0)
    vm.set_memory_region2(2, GMEM, 16 * GiB, 4 * MiB, 1 << 40, f, 4 * MiB)
    vm.set_memory_region2(3, GMEM, 8 * GiB, MiB, 1 << 40, other, 0)
    vm.set_memory_region2(4, GMEM, 32 * GiB, MiB, 1 << 40, other, MiB)
    mmu = vm.mmu
    seen: list[object] = []
    real_end = mmu.gmem_invalidate_end

    def end() -> None:
        seen.append((mmu.in_progress.load(), mmu.range_start.load(), mmu.range_end.load()))
        seen.append([mmu.fault(0, gpa, True) is None
                     for gpa in (GiB + 3 * MiB, 16 * GiB + MiB - PAGE, 8 * GiB,
                                 GiB + 2 * MiB, 16 * GiB + MiB, 32 * GiB)])
        real_end()

    monkeypatch.setattr(mmu, "gmem_invalidate_end", end)
    f.punch_hole(3 * MiB, 2 * MiB)
    assert seen == [(1, (GiB + 3 * MiB) >> 12, (16 * GiB + MiB) >> 12),
                    [True, True, True, False, False, False]]
    assert state(mmu)[1] == 0


def test_a_fault_that_resolved_before_the_punch_retries(
        vm: Vm, gmem: Callable[..., GuestMemfd], monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the sequence count closes: get_pfn returned the old page, then the punch ran,
    then the fault takes the lock — it must not map the old page."""
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 0)
    f.page_view(1)[:3] = b"old"
    real = f.get_pfn
    punched: list[GmemFrame] = []

    def get_pfn(slot: object, gfn: int) -> GmemFrame:
        frame = real(slot, gfn)  # type: ignore[arg-type]
        if not punched:
            punched.append(frame)
            f.punch_hole(PAGE, PAGE)
        return frame

    monkeypatch.setattr(f, "get_pfn", get_pfn)
    assert vm.mmu.fault(0, GPA + PAGE, False) is None  # retry
    assert not punched[0].current()
    assert vm.create_vcpu(0).guest_read(GPA + PAGE, 3) == bytes(3)
    assert vm.mmu.stale_sptes() == []


def test_stale_sptes_sees_a_gmem_page_punched_behind_the_mmu(
        vm: Vm, gmem: Callable[..., GuestMemfd], monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle can fail: an MMU that forgets to zap on a gmem range keeps a mapping of the
    punched page, and stale_sptes names it."""
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 0)
    vcpu = vm.create_vcpu(0)
    for i in range(4):
        vcpu.guest_read(GPA + i * PAGE, 1)
    monkeypatch.setattr(vm.mmu, "gmem_invalidate_range", lambda as_id, lo, hi: None)
    f.punch_hole(2 * PAGE, PAGE)
    assert vm.mmu.stale_sptes() == [(0, (GPA >> 12) + 2)]


# -- release ----------------------------------------------------------------------------------
def test_release_turns_guest_accesses_into_memory_faults(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    plain = gmem(MiB, 0)
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 0)
    vm.set_memory_region2(2, GMEM, 2 * GPA, 4 * PAGE, mem.hva, plain, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"gone soon")
    vcpu.guest_write(2 * GPA, b"stays")
    seq, _ = state(vm.mmu)
    f.close()
    plain.close()
    assert state(vm.mmu) == (seq + 2, 0) and vm.mmu.mapped(0) == 0
    with pytest.raises(MemoryFault) as info:
        vcpu.guest_read(GPA, 4)
    assert info.value.errno == errno.EFAULT and info.value.gpa == GPA
    assert "released" in info.value.message
    assert vcpu.guest_read(2 * GPA, 5) == b"stays"  # not gmem-only: the hva serves it
    vm.set_memory_region(1, 0, 0, 0, 0)


# -- slot changes ---------------------------------------------------------------------------
def test_a_fault_racing_a_split_retries_instead_of_failing(
        vm: Vm, gmem: Callable[..., GuestMemfd], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault holding the old slot asks the file after a transaction moved its bindings to the
    pieces: the file refuses (the old slot is not bound any more), and the fault retries,
    because the sequence moved — then finds the piece and its data."""
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, 1 << 40, f, 0)
    f.page_view(5)[:4] = b"data"
    real = f.get_pfn
    calls: list[int] = []

    def get_pfn(slot: object, gfn: int) -> GmemFrame:
        calls.append(gfn)
        if len(calls) == 1:
            with vm.transaction() as tx:
                tx.split(1, [GPA + 4 * PAGE])
        return real(slot, gfn)  # type: ignore[arg-type]

    monkeypatch.setattr(f, "get_pfn", get_pfn)
    assert vm.mmu.fault(0, GPA + 5 * PAGE, False) is None
    assert vm.create_vcpu(0).guest_read(GPA + 5 * PAGE, 4) == b"data"


def test_delete_zaps_and_a_recreated_slot_maps_the_new_binding(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    f.page_view(0)[:1] = b"a"
    f.page_view(8)[:1] = b"b"
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 0)
    vcpu = vm.create_vcpu(0)
    assert vcpu.guest_read(GPA, 1) == b"a"
    vm.set_memory_region2(1, GMEM, 0, 0, 0, None, 0)
    assert vm.mmu.spte(0, GPA >> 12) is None
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, 1 << 40, f, 8 * PAGE)
    assert vcpu.guest_read(GPA, 1) == b"b"


def test_tracked_writes_on_a_gmem_only_slot_take_the_accessor_path(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    """KVM emulates a write to a tracked gfn through the host accessors, which use the hva
    even in a gmem-only slot (§8.7, confirmed on this host): the file's page keeps its data and
    is never mapped writable while tracked."""
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"file")
    vm.page_track.add_gfn(GPA >> 12)
    spte = vm.mmu.spte(0, GPA >> 12)
    assert spte is not None and not spte.writable
    vcpu.guest_write(GPA, b"emul")
    assert vcpu.guest_read(GPA, 4) == b"file" and bytes(mem.view()[:4]) == b"emul"
    assert vm.page_track.stats["tracked_writes"] == 1


# -- concurrency -------------------------------------------------------------------------------
def test_punches_and_rebinding_race_guest_accesses_safely(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    """A vCPU thread writes and reads back its pages while the main thread punches random pages
    and splits and merges the slot: the vCPU never gets a memory fault, reads only what it wrote
    or zero, and no stale mapping is ever left."""
    f = gmem(64 * PAGE)
    vm.set_memory_region2(1, GMEM, GPA, 64 * PAGE, 1 << 40, f, 0)
    vcpu = vm.create_vcpu(0)
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def guest() -> None:
        rng = random.Random(1)
        try:
            while not stop.is_set():
                page = rng.randrange(64)
                value = bytes([rng.randrange(1, 256)]) * 8
                vcpu.guest_write(GPA + page * PAGE, value)
                got = vcpu.guest_read(GPA + page * PAGE, 8)
                if got not in (value, bytes(8)):  # a punch zeroes whole pages
                    raise AssertionError(f"page {page}: wrote {value!r}, read {got!r}")
                rounds[0] += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=guest)
    t.start()
    rng = random.Random(2)
    try:
        for i in range(150):
            if i % 3 == 2:
                with vm.transaction() as tx:
                    pieces = tx.split(1, [GPA + rng.randrange(1, 64) * PAGE])
                    tx.merge(pieces)
            else:
                f.punch_hole(rng.randrange(64) * PAGE, rng.randint(1, 8) * PAGE)
            assert vm.mmu.stale_sptes() == []
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert rounds[0] > 0
    assert [(b.pgoff, b.npages) for b in f.bindings] == [(0, 64)]
