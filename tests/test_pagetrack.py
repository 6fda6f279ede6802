"""Page write tracking (kvm-semantics §6): counters, never-writable tracked gfns, the
tracked-write path, track_remove_region after a certain delete, MOVE refusal."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem.mmu import Spte

MiB = 1 << 20
PAGE = 4096


def mapped(vm: kvmem.Vm, gfn: int) -> Spte:
    """The spte mapping `gfn` in address space 0; the gfn must be mapped."""
    spte = vm.mmu.spte(0, gfn)
    assert spte is not None, f"gfn {gfn:#x} is not mapped"
    return spte


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.removed: list[tuple[int, int]] = []

    def track_write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))

    def track_remove_region(self, gfn: int, npages: int) -> None:
        self.removed.append((gfn, npages))


@pytest.fixture
def mem() -> Iterator[kvmem.HostMemory]:
    m = kvmem.HostMemory.anonymous(8 * MiB)
    yield m
    m.close()


@pytest.fixture
def vm(mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm]) -> kvmem.Vm:
    v = make_vm()
    v.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    return v


def test_add_gfn_without_a_slot_is_einval_and_changes_nothing(vm: kvmem.Vm) -> None:
    for gfn in (4 * MiB // PAGE, 1 << 40):
        with pytest.raises(kvmem.KvmError) as e:
            vm.page_track.add_gfn(gfn)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(kvmem.KvmError) as e:
        vm.page_track.add_gfn(-1)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        vm.page_track.add_gfn(1.0)  # type: ignore[arg-type]
    with pytest.raises(kvmem.KvmError) as e:
        vm.page_track.remove_gfn(3)  # has a slot, but is not tracked
    assert e.value.errno == errno.EINVAL
    assert vm.page_track.tracked_gfns() == []


def test_tracked_write_is_performed_dirty_logged_and_notified(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 4 * MiB, mem.hva)
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(5)
    vcpu = vm.create_vcpu(0)
    assert vcpu.guest_read(5 * PAGE, 4) == bytes(4)
    spte = vm.mmu.spte(0, 5)
    assert spte is not None and not spte.writable
    vm.get_dirty_log(0)  # clear what the read did not set anyway
    vcpu.guest_write(5 * PAGE + 8, b"tracked!")
    assert vm.read(5 * PAGE + 8, 8) == b"tracked!"
    assert rec.writes == [(5 * PAGE + 8, b"tracked!")]
    spte = vm.mmu.spte(0, 5)
    assert spte is None or not spte.writable  # still never writable
    assert vm.get_dirty_log(0)[0] == 1 << 5
    vm.write(5 * PAGE, b"host")  # host accessor writes do not notify, as in KVM
    assert len(rec.writes) == 1


def test_a_read_fault_maps_a_tracked_gfn_read_only(vm: kvmem.Vm) -> None:
    vm.page_track.add_gfn(6)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(6 * PAGE, 1)  # a read of a writable page would map it writable
    assert not mapped(vm, 6).writable
    vcpu.guest_read(7 * PAGE, 1)
    assert mapped(vm, 7).writable


def test_add_gfn_write_protects_a_writable_mapping(vm: kvmem.Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vm.set_memory_region(1, 0, 8 * MiB, PAGE, vm.slots()[0].hva + 4 * MiB)  # 4 KiB only
    vcpu.guest_write(8 * MiB, b"w")
    gfn = 8 * MiB // PAGE
    assert mapped(vm, gfn).writable
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(gfn)
    assert not mapped(vm, gfn).writable
    vcpu.guest_write(8 * MiB, b"x")
    assert rec.writes == [(8 * MiB, b"x")] and vm.read(8 * MiB, 1) == b"x"


def test_tracking_breaks_a_huge_mapping_up(vm: kvmem.Vm, mem: kvmem.HostMemory) -> None:
    if (mem.hva >> 12) % 512:
        pytest.skip("host memory is not 2 MiB aligned here")
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(0x1000, b"a")
    assert mapped(vm, 1).npages == 512
    vm.page_track.add_gfn(7)
    assert vm.mmu.stats["broken_huge"] == 1
    assert vm.mmu.mapped(0) == 512  # still mapped, now as 4 KiB pieces
    assert mapped(vm, 1).npages == 1 and mapped(vm, 1).writable
    assert not mapped(vm, 7).writable
    faults = vm.mmu.stats["faults"]
    vcpu.guest_write(0x3000, b"b")  # an untracked page of the block: no fault
    assert vm.mmu.stats["faults"] == faults
    # a new fault in the block (second 2 MiB is fresh) maps 4 KiB while 7 is tracked
    vm.mmu.zap_gfn_range(0, 0, 512)
    vcpu.guest_read(0x8000, 1)
    assert mapped(vm, 8).npages == 1
    vm.page_track.remove_gfn(7)
    vm.mmu.zap_gfn_range(0, 0, 512)
    vcpu.guest_read(0x8000, 1)
    assert mapped(vm, 8).npages == 512


def test_counters_nest(vm: kvmem.Vm) -> None:
    pt = vm.page_track
    pt.add_gfn(9)
    pt.add_gfn(9)
    pt.remove_gfn(9)
    assert pt.is_tracked(9) and pt.count(9) == 1
    pt.remove_gfn(9)
    assert not pt.is_tracked(9)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(9 * PAGE, b"z")  # untracked again: mapped writable by the fault
    assert mapped(vm, 9).writable


def test_counter_saturates_at_u16(vm: kvmem.Vm) -> None:
    pt = vm.page_track
    for _ in range(0xFFFF):
        pt.add_gfn(3)
    with pytest.raises(kvmem.KvmError) as e:
        pt.add_gfn(3)
    assert e.value.errno == errno.EINVAL and pt.count(3) == 0xFFFF


def test_remove_region_after_delete_only(vm: kvmem.Vm, mem: kvmem.HostMemory) -> None:
    rec = Recorder()
    vm.page_track.register(rec)
    vm.set_memory_region(1, 0, 8 * MiB, 2 * MiB, mem.hva + 4 * MiB)
    vm.page_track.add_gfn(8 * MiB // PAGE + 3)
    # a refused transaction that would delete the slot: nothing is said, nothing dropped
    with pytest.raises(kvmem.TransactionError), vm.transaction() as tx:
        tx.delete(1)
        tx.set_memory_region(5, 0, 0, 4 * MiB, mem.hva)  # overlaps slot 0: EEXIST
    assert rec.removed == [] and vm.page_track.is_tracked(8 * MiB // PAGE + 3)
    vm.set_memory_region(1, 0, 8 * MiB, 0, 0)
    assert rec.removed == [(8 * MiB // PAGE, 512)]
    vm.set_memory_region(1, 0, 8 * MiB, 2 * MiB, mem.hva + 4 * MiB)  # same place again
    assert not vm.page_track.is_tracked(8 * MiB // PAGE + 3)  # the counters went with it


def test_remove_region_sees_the_slot_gone(vm: kvmem.Vm, mem: kvmem.HostMemory) -> None:
    seen: list[object] = []

    class Checker(Recorder):
        def track_remove_region(self, gfn: int, npages: int) -> None:
            seen.append(vm.lookup(gfn))
            super().track_remove_region(gfn, npages)

    vm.page_track.register(Checker())
    vm.set_memory_region(0, 0, 0, 0, 0)
    assert seen == [None]


def test_move_is_refused_while_a_notifier_is_registered(vm: kvmem.Vm) -> None:
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(4)
    before = (vm.slots(), vm.generation())
    with pytest.raises(kvmem.KvmError) as e:
        vm.set_memory_region(0, 0, 16 * MiB, 4 * MiB, vm.slots()[0].hva)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(kvmem.TransactionError) as te, vm.transaction() as tx:
        tx.set_memory_region(0, 0, 16 * MiB, 4 * MiB, vm.slots()[0].hva)
    assert te.value.index == 0 and te.value.errno == errno.EINVAL
    assert (vm.slots(), vm.generation()) == before
    vm.page_track.unregister(rec)
    vm.set_memory_region(0, 0, 16 * MiB, 4 * MiB, vm.slots()[0].hva)  # now allowed
    assert vm.page_track.tracked_gfns() == []  # a moved slot starts with fresh tracking
    assert rec.removed == []


def test_split_keeps_tracking_and_a_delete_in_a_batch_reports(vm: kvmem.Vm) -> None:
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(100)
    vm.page_track.add_gfn(900)
    with vm.transaction() as tx:
        tx.split(0, [2 * MiB])
    assert vm.page_track.tracked_gfns() == [100, 900] and rec.removed == []
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(900 * PAGE, b"still")
    assert rec.writes == [(900 * PAGE, b"still")]
    upper = next(s.id for s in vm.slots() if s.base_gfn == 512)
    with vm.transaction() as tx:
        tx.delete(upper)
    assert rec.removed == [(512, 512)]
    assert vm.page_track.tracked_gfns() == [100]


def test_notifier_reads_tracking_state_under_the_lock(vm: kvmem.Vm) -> None:
    answers: list[bool] = []

    class Reader(Recorder):
        def track_write(self, gpa: int, data: bytes) -> None:
            answers.append(vm.page_track.is_tracked(gpa // PAGE))  # takes mmu.lock
            assert not vm.mmu.lock.held()

    vm.page_track.register(Reader())
    vm.page_track.add_gfn(2)
    vm.create_vcpu(0).guest_write(2 * PAGE, b"q")
    assert answers == [True]


def test_write_spanning_tracked_and_untracked_pages(vm: kvmem.Vm) -> None:
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(11)
    vcpu = vm.create_vcpu(0)
    data = bytes(range(256)) * 32  # 8 KiB from the middle of page 10 to page 12
    vcpu.guest_write(10 * PAGE + 2048, data)
    assert vm.read(10 * PAGE + 2048, len(data)) == data
    assert rec.writes == [(11 * PAGE, data[2048:2048 + PAGE])]


def test_register_rules(vm: kvmem.Vm) -> None:
    rec = Recorder()
    vm.page_track.register(rec)
    with pytest.raises(kvmem.KvmError) as e:
        vm.page_track.register(rec)
    assert e.value.errno == errno.EEXIST
    vm.page_track.unregister(rec)
    with pytest.raises(kvmem.KvmError) as e:
        vm.page_track.unregister(rec)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(TypeError):
        vm.page_track.register(object())  # type: ignore[arg-type]


def test_unregister_waits_for_a_callback_in_flight(vm: kvmem.Vm) -> None:
    entered, release = threading.Event(), threading.Event()

    class Slow(Recorder):
        def track_write(self, gpa: int, data: bytes) -> None:
            entered.set()
            release.wait(5)
            super().track_write(gpa, data)

    slow = Slow()
    vm.page_track.register(slow)
    vm.page_track.add_gfn(2)
    writer = threading.Thread(target=vm.create_vcpu(0).guest_write, args=(2 * PAGE, b"s"))
    writer.start()
    assert entered.wait(5)
    done = threading.Event()

    def unregister() -> None:
        vm.page_track.unregister(slow)
        done.set()

    un = threading.Thread(target=unregister)
    un.start()
    time.sleep(0.05)
    assert not done.is_set()
    release.set()
    un.join(5)
    writer.join(5)
    assert done.is_set() and slow.writes == [(2 * PAGE, b"s")]


def test_engines_hear_tracking_transitions(vm: kvmem.Vm) -> None:
    heard: list[tuple[int, int, bool]] = []

    class Engine(kvmem.SlotsListener):
        def track_changed(self, vm: kvmem.Vm, as_id: int, gfn: int, tracked: bool) -> None:
            heard.append((as_id, gfn, tracked))

    vm.add_listener(Engine())
    pt = vm.page_track
    pt.add_gfn(3)
    pt.add_gfn(3)
    pt.remove_gfn(3)
    pt.remove_gfn(3)
    assert heard == [(0, 3, True), (0, 3, False)]


def test_smram_tracking_is_per_address_space(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    vm.set_memory_region(1 << 16, 0, 0, 2 * MiB, mem.hva + 2 * MiB)
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(4, as_id=1)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(4 * PAGE, b"n")  # normal address space: not tracked
    vcpu.smm = True
    vcpu.guest_write(4 * PAGE, b"s")
    assert rec.writes == [(4 * PAGE, b"s")]
    assert vm.read(4 * PAGE, 1) == b"n" and vcpu.read(4 * PAGE, 1) == b"s"


def test_queries_refuse_a_missing_address_space(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(address_spaces=1)
    pt = vm.page_track
    for query in (pt.is_tracked, pt.count):
        with pytest.raises(kvmem.KvmError) as e:
            query(0, as_id=1)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(kvmem.KvmError):
        pt.tracked_gfns(as_id=1)


def test_tracked_guest_writes_are_performed_logged_and_notified(
        mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm],
        guest_writes: Callable[[kvmem.Vm, int, int], list[tuple[int, bytes]]]) -> None:
    """A running guest's stores (the walker on an engine; on kvmem alone the same stores
    through vcpu.guest_write): those to tracked pages are notified, in order, and all of
    them are performed and dirty-logged."""
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 4 * MiB, mem.hva)
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(0x20)
    vm.page_track.add_gfn(0x22)
    stores = guest_writes(vm, 0x20 * PAGE, 4)
    assert rec.writes == [stores[0], stores[2]]
    assert [vm.read(gpa, len(d)) for gpa, d in stores] == [d for _gpa, d in stores]
    bitmap = vm.get_dirty_log(0)
    dirty = {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}
    assert dirty == {1, 0x20, 0x21, 0x22, 0x23}  # gfn 1: the code, loaded by a host write
    vm.page_track.remove_gfn(0x20)
    rec.writes.clear()
    stores = guest_writes(vm, 0x20 * PAGE, 4)
    assert rec.writes == [stores[2]]
