"""The MMU: notifier protocol, fault retry, stage-2 zaps, dirty logging from the vCPU path."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem.mmu import Spte
from kvmem.vm import MemoryFault, MmioExit

MiB = 1 << 20
PAGE = 4096


def mapped(vm: kvmem.Vm, gfn: int) -> Spte:
    """The spte mapping `gfn` in address space 0; the gfn must be mapped."""
    spte = vm.mmu.spte(0, gfn)
    assert spte is not None, f"gfn {gfn:#x} is not mapped"
    return spte


@pytest.fixture
def mem() -> Iterator[kvmem.HostMemory]:
    m = kvmem.HostMemory.anonymous(16 * MiB)
    yield m
    m.close()


def test_range_add_merges_min_max_until_all_end(make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    mmu = vm.mmu
    with mmu.lock:
        mmu.begin()
        mmu.range_add(100, 110)
        mmu.begin()  # an overlapping second invalidation
        mmu.range_add(10, 20)
        seq = mmu.seq.load()
        # faults retry over the merged range [10, 110), the gap between the two included
        assert [g for g in range(0, 200) if mmu.retry_gfn(seq, g)] == list(range(10, 110))
        assert not mmu.retry_gfn(seq, 200)  # outside: only seq decides
        mmu.end()
        assert mmu.retry_gfn(seq, 200)  # seq moved
        mmu.end()
        assert mmu.in_progress.load() == 0


def test_invalidation_without_slot_touches_nothing(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    seq = vm.mmu.seq.load()
    mem.discard(4 * MiB, MiB)  # no slot behind it
    assert vm.mmu.seq.load() == seq and vm.mmu.stats["invalidations"] == 0
    mem.discard(0, PAGE)
    assert vm.mmu.seq.load() == seq + 1 and vm.mmu.stats["invalidations"] == 1


def test_discard_zaps_and_guest_sees_new_page(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0x2000, b"abc")
    assert vm.mmu.spte(0, 2) is not None
    mem.discard(0x2000, PAGE)
    assert vm.mmu.spte(0, 2) is None
    assert vcpu.guest_read(0x2000, 3) == b"\0\0\0"
    assert vm.mmu.stale_sptes() == []


def test_fault_in_flight_during_invalidation_retries(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    mmu = vm.mmu
    seq = mmu.seq.load()
    mmu.invalidate_range_start(mem.hva, mem.hva + PAGE)  # in progress over gfn 0
    with mmu.lock:
        assert mmu.retry_gfn(seq, 0)
        assert not mmu.retry_gfn(seq, 5)  # unrelated gfn may proceed
    with vm.memslots.srcu.read():
        assert mmu.fault(vcpu.as_id, 0, False) is None  # RET_PF_RETRY
        assert mmu.fault(vcpu.as_id, 5 * PAGE, False) is not None
    mmu.invalidate_range_end(mem.hva, mem.hva + PAGE)
    with mmu.lock:
        assert mmu.retry_gfn(seq, 5)  # the snapshot predates the end


def test_memslot_update_waits_for_inflight_invalidation(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vm.mmu.invalidate_range_start(mem.hva, mem.hva + PAGE)
    done = threading.Event()

    def add_slot() -> None:
        vm.set_memory_region(1, 0, MiB, MiB, mem.hva)
        done.set()

    t = threading.Thread(target=add_slot)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()  # the swap waits for mn_active to reach zero
    vm.mmu.invalidate_range_end(mem.hva, mem.hva + PAGE)
    t.join(5)
    assert done.is_set()


def test_mmio_and_readonly_exits(mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, RO, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    mem.view()[0x10:0x14] = b"data"
    assert vcpu.guest_read(0x10, 4) == b"data"
    with pytest.raises(MmioExit) as info:
        vcpu.guest_write(0x10, b"\x55")
    assert (info.value.gpa, info.value.len, info.value.is_write, info.value.data) == (
        0x10, 1, True, b"\x55")
    assert mem.view()[0x10] == ord("d")
    with pytest.raises(MmioExit) as info:
        vcpu.guest_read(2 * MiB, 2)
    assert (info.value.gpa, info.value.len, info.value.is_write) == (2 * MiB, 2, False)


def test_page_unreachable_during_a_host_change_is_a_retry_not_a_fault(
        mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A remap keeps readers off its range while it replaces the pages (the table says
    PROT_NONE in between). A fault that took its sequence snapshot before the change began
    and looks the page up during it must retry, as a fault racing any invalidation does
    (Linux's GUP would wait for the mmap lock and see the new page): the page is fine."""
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    real = kvmem.host.resolve
    raced: list[int] = []

    def resolve_during_remap(hva: int, write: bool) -> kvmem.host.Frame | None:
        if not raced:
            raced.append(hva)
            vm.mmu.invalidate_range_start(mem.hva, mem.hva + PAGE)
            vm.mmu.invalidate_range_end(mem.hva, mem.hva + PAGE)
            return None  # what the change in flight made of the page
        return real(hva, write)

    monkeypatch.setattr(kvmem.host, "resolve", resolve_during_remap)
    vcpu.guest_write(0, b"x")
    assert raced == [mem.hva] and vm.read(0, 1) == b"x"


def test_protected_host_memory_is_a_memory_fault(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    mem.protect(0, PAGE, kvmem.host.PROT_READ)
    assert vcpu.guest_read(0, 1) == b"\0"
    with pytest.raises(MemoryFault):
        vcpu.guest_write(0, b"x")


def test_delete_and_move_zap_and_transactions_bracket(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0x1000, b"a")
    assert vm.mmu.mapped(0)
    vm.set_memory_region(0, 0, 8 * MiB, 4 * MiB, mem.hva)  # MOVE
    assert vm.mmu.mapped(0) == 0
    assert vcpu.guest_read(8 * MiB + 0x1000, 1) == b"a"
    seq = vm.mmu.seq.load()
    with vm.transaction() as tx:
        tx.split(0, [10 * MiB])
    assert vm.mmu.mapped(0) == 0 and vm.mmu.seq.load() == seq + 1
    assert vcpu.guest_read(8 * MiB + 0x1000, 1) == b"a"


def test_huge_mapping_when_aligned_not_when_logging(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)  # mem.hva is 2 MiB aligned? check
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(0x1000, 1)
    s = vm.mmu.spte(0, 1)
    assert s is not None
    aligned = (mem.hva >> 12) % 512 == 0
    assert s.npages == (512 if aligned else 1)
    vm.set_memory_region(1, LOG, 8 * MiB, 4 * MiB, mem.hva)
    vcpu.guest_read(8 * MiB, 1)
    assert mapped(vm, (8 * MiB) >> 12).npages == 1


@pytest.mark.parametrize("manual", [False, True])
def test_dirty_log_rounds_from_vcpu_writes(manual: bool, make_vm: Callable[..., kvmem.Vm]) -> None:
    """kvm-semantics §10 case 12: vCPU threads write the iteration number to random pages
    while the host harvests; a set bit means the value is iter or iter-1; a clear bit
    means value ≤ iter, and a value equal to iter must be dirty by the next round."""
    npages = 1024 + 16
    mem = kvmem.HostMemory.anonymous(npages * PAGE)
    vm = make_vm()
    if manual:
        vm.enable_manual_dirty_log_protect(initially_set=True)
    base = 1 << 30
    vm.set_memory_region(1, LOG, base, npages * PAGE, mem.hva)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    iteration = [1]
    seen = [0, 0]
    stop = threading.Event()
    ready = threading.Barrier(3)

    def guest(vcpu: kvmem.Vcpu, seed: int) -> None:
        rng = random.Random(seed)
        for p in range(vcpu.id, npages, 2):
            vcpu.guest_write(base + p * PAGE, (1).to_bytes(8, "little"))
        ready.wait()
        while not stop.is_set():
            it = iteration[0]
            p = rng.randrange(npages)
            vcpu.guest_write(base + p * PAGE, it.to_bytes(8, "little"))
            seen[vcpu.id] = it  # every write of an older value is done

    threads = [threading.Thread(target=guest, args=(v, i)) for i, v in enumerate(vcpus)]
    for t in threads:
        t.start()
    must_be_dirty: set[int] = set()
    checked = 0
    ready.wait()  # every page written once before the rounds start, as in the selftest
    try:
        for _ in range(15):
            time.sleep(0.02)
            it = iteration[0]
            bitmap = vm.get_dirty_log(1)
            if manual:
                vm.clear_dirty_log(1, 0, npages, bitmap)
            iteration[0] = it + 1
            # as the selftest's vCPU sync: no write of a value older than `it` may still
            # be in flight when the next round harvests (a descheduled thread could hold one)
            while min(seen) < it + 1 and not stop.is_set():
                time.sleep(0.0005)
            view = mem.view()
            for p in range(npages):
                value = int.from_bytes(view[p * PAGE:p * PAGE + 8], "little")
                dirty = bitmap[p >> 3] >> (p & 7) & 1
                if dirty:
                    must_be_dirty.discard(p)
                    assert value in (it, it - 1, it + 1), (p, value, it)
                else:
                    assert p not in must_be_dirty, (p, value, it)
                    assert value <= it + 1
                    if value == it:
                        must_be_dirty.add(p)
                checked += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert checked > 10 * npages
    assert vm.mmu.stale_sptes() == []


def test_no_huge_mapping_over_a_page_being_invalidated(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    """A host change of one 4 KiB page is in flight; a fault on another page of the same
    2 MiB block must not map the whole block (the changing page would go stale)."""
    if (mem.hva >> 12) % 512:
        pytest.skip("host memory is not 2 MiB aligned here")
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    changing = (mem.hva + 7 * PAGE, mem.hva + 8 * PAGE)
    vm.mmu.invalidate_range_start(*changing)
    vcpu.guest_read(3 * PAGE, 1)
    assert mapped(vm, 3).npages == 1 and vm.mmu.spte(0, 7) is None
    vm.mmu.invalidate_range_end(*changing)
    vm.mmu.zap_gfn_range(0, 0, 512)
    vcpu.guest_read(3 * PAGE, 1)
    assert mapped(vm, 7).npages == 512


def _writable(vm: kvmem.Vm, gfns: range) -> list[int]:
    return [g for g in gfns if (s := vm.mmu.spte(0, g)) is not None and s.writable]


def test_get_and_clear_reprotect_exactly_the_harvested_pages(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 1 * MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(9 * PAGE, 1)
    assert _writable(vm, range(16)) == []  # a read maps a logging page read-only
    for g in (1, 2, 3):
        vcpu.guest_write(g * PAGE, b"d")
    assert _writable(vm, range(16)) == [1, 2, 3]
    assert vm.get_dirty_log(0)[0] == 0b1110  # without manual protect: GET re-protects
    assert _writable(vm, range(16)) == []
    for g in (4, 5):
        vcpu.guest_write(g * PAGE, b"d")
    vm.enable_manual_dirty_log_protect()
    bitmap = vm.get_dirty_log(0)
    assert bitmap[0] == 0b110000 and _writable(vm, range(16)) == [4, 5]  # GET leaves them
    vm.clear_dirty_log(0, 0, 64, (0b100000).to_bytes(8, "little"))  # CLEAR page 5 only
    assert _writable(vm, range(16)) == [4]
    vcpu.guest_write(5 * PAGE, b"again")  # faults, marks dirty again
    assert vm.get_dirty_log(0)[0] == 0b110000


def test_a_write_after_a_harvest_is_made_writable_in_place(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    """KVM's fast page fault: a write to a page that only dirty logging write-protected
    makes its spte writable again over the same host page and marks the page dirty,
    without resolving the host page again. A tracked gfn still takes the full path (a
    tracked write; the spte stays read-only), and so does a read-only slot (an exit)."""
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, MiB, mem.hva)
    vm.set_memory_region(1, LOG | RO, MiB, MiB, mem.hva + MiB)
    vcpu = vm.create_vcpu(0)
    for g in (1, 2, 3):
        vcpu.guest_write(g * PAGE, b"a")
    vcpu.guest_read(MiB, 1)
    assert vm.get_dirty_log(0)[0] == 0b1110
    frames = [mapped(vm, g).frame for g in (1, 2, 3)]
    vm.page_track.add_gfn(3)
    fast = vm.mmu.stats["fast_faults"]
    vcpu.guest_write(1 * PAGE, b"b")
    vcpu.guest_write(2 * PAGE, b"c")
    assert vm.mmu.stats["fast_faults"] == fast + 2
    assert _writable(vm, range(4)) == [1, 2]
    assert [mapped(vm, g).frame for g in (1, 2)] == frames[:2]
    vcpu.guest_write(3 * PAGE, b"d")  # tracked
    with pytest.raises(MmioExit):
        vcpu.guest_write(MiB, b"e")  # read-only slot
    assert vm.mmu.stats["fast_faults"] == fast + 2
    assert _writable(vm, range(4)) == [1, 2] and mapped(vm, 3).frame == frames[2]
    assert vm.read(PAGE, 1) + vm.read(2 * PAGE, 1) + vm.read(3 * PAGE, 1) == b"bcd"
    assert vm.get_dirty_log(0)[0] == 0b1110


def test_mirrors_hear_of_a_harvest_once_per_run_of_pages(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    """A harvest write-protects pages by the thousand: a stage-2 mirror (the Unicorn
    engine) is told once per run of consecutive gfns, not once per gfn."""
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    for g in (1, 2, 3, 5, 6, 9):
        vcpu.guest_write(g * PAGE, b"w")
    heard: list[tuple[int, int, int]] = []

    class Mirror:
        def stage2_unmapped(self, as_id: int, start_gfn: int, end_gfn: int) -> None:
            heard.append((as_id, start_gfn, end_gfn))

    mirror = Mirror()
    vm.mmu.add_mirror(mirror)
    try:
        vm.get_dirty_log(0)
    finally:
        vm.mmu.remove_mirror(mirror)
    assert heard == [(0, 1, 4), (0, 5, 7), (0, 9, 10)]


def test_initially_set_protects_lazily(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, 0, 0, 1 * MiB, mem.hva + PAGE)  # 4 KiB mappings only
    vcpu = vm.create_vcpu(0)
    for g in range(8):
        vcpu.guest_write(g * PAGE, b"w")
    vm.set_memory_region(0, LOG, 0, 1 * MiB, mem.hva + PAGE)  # logging on: all bits set
    assert _writable(vm, range(8)) == list(range(8))  # nothing protected yet
    vm.clear_dirty_log(0, 0, 64, (0b1010).to_bytes(8, "little"))
    assert _writable(vm, range(8)) == [0, 2, 4, 5, 6, 7]  # only what CLEAR harvested
