"""Atomic batched slot updates: all or nothing, one publication, no hole for readers."""

from __future__ import annotations

import errno
import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import ChangeKind, KvmError, TransactionError

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[kvmem.HostMemory]:
    m = kvmem.HostMemory.anonymous(64 * MiB)
    yield m
    m.close()


def state(vm: kvmem.Vm) -> tuple[object, ...]:
    return tuple(
        (vm.generation(a), tuple((s.id, s.base_gfn, s.npages, s.hva, s.flags)
                                 for s in vm.slots(a)))
        for a in range(vm.address_spaces)
    )


def test_refused_change_names_its_index_and_applies_nothing(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    before = state(vm)
    with pytest.raises(TransactionError) as info, vm.transaction() as tx:
        tx.set_memory_region(1, 0, 8 * MiB, MiB, mem.hva)  # fine
        tx.set_memory_region((1 << 16) | 1, 0, 0, MiB, mem.hva)  # fine, other AS
        tx.set_memory_region(2, 0, 8 * MiB + 4096, MiB, mem.hva)  # overlaps change #0
    assert info.value.index == 2 and info.value.errno == errno.EEXIST
    assert "change #2" in str(info.value)
    assert isinstance(info.value.cause, KvmError)
    assert state(vm) == before


def test_changes_validate_against_the_batch_so_far(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    with vm.transaction() as tx:
        tx.delete(0)
        tx.set_memory_region(0, RO, 0, 2 * MiB, mem.hva)  # same id, new size and flags
        tx.set_memory_region(1, 0, 2 * MiB, 2 * MiB, mem.hva + 2 * MiB)
    assert [c.kind for c in tx.changes] == [ChangeKind.DELETE, ChangeKind.CREATE,
                                            ChangeKind.CREATE]
    assert [(s.id, s.npages, s.flags) for s in vm.slots()] == [(0, 512, RO), (1, 512, 0)]


def test_one_publication_across_address_spaces(mem: kvmem.HostMemory,
                                               monkeypatch: pytest.MonkeyPatch,
                                               make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(address_spaces=2)
    syncs: list[tuple[int, int]] = []
    real = vm.memslots.srcu.synchronize

    def spy() -> None:
        syncs.append((vm.generation(0), vm.generation(1)))
        real()

    monkeypatch.setattr(vm.memslots.srcu, "synchronize", spy)
    with vm.transaction() as tx:
        for i in range(10):
            tx.set_memory_region(i, 0, i * MiB, MiB, mem.hva + i * MiB)
            tx.set_memory_region((1 << 16) | i, 0, i * MiB, MiB, mem.hva)
    assert len(syncs) == 1  # one swap for 20 changes in two address spaces
    assert syncs[0][0] >> 63 and syncs[0][1] >> 63
    assert (vm.generation(0), vm.generation(1)) == (2, 3)


def test_split_merge_resize_readonly_replace(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(5, LOG, 0, 8 * MiB, mem.hva)
    vm.write(0x1000, b"a")
    vm.write(6 * MiB, b"b")
    with vm.transaction() as tx:
        pieces = tx.split(5, [2 * MiB, 6 * MiB])
    assert pieces == [5, 0, 1]
    got = [(s.id, s.gpa, s.size, s.hva - mem.hva) for s in vm.slots()]
    assert got == [(5, 0, 2 * MiB, 0), (0, 2 * MiB, 4 * MiB, 2 * MiB),
                   (1, 6 * MiB, 2 * MiB, 6 * MiB)]
    assert vm.read(6 * MiB, 1) == b"b"
    # unharvested dirty bits followed their pages into the pieces
    assert vm.get_dirty_log(5)[0] == 0b10 and vm.get_dirty_log(1)[0] == 0b1
    with vm.transaction() as tx:
        assert tx.merge([1, 5, 0]) == 5
    assert [(s.id, s.size) for s in vm.slots()] == [(5, 8 * MiB)]
    with vm.transaction() as tx:
        tx.resize(5, 4 * MiB)
        tx.set_readonly(5, True)
    assert [(s.id, s.size, s.flags) for s in vm.slots()] == [(5, 4 * MiB, LOG | RO)]
    with pytest.raises(KvmError) as info:
        vm.write(0, b"x")
    assert info.value.errno == errno.EFAULT
    with vm.transaction() as tx:
        tx.replace_layout(0, [(1, 0, 0, MiB, mem.hva), (2, LOG, 16 * MiB, MiB, mem.hva)])
    assert [(s.id, s.gpa) for s in vm.slots()] == [(1, 0), (2, 16 * MiB)]


def test_merge_refuses_non_contiguous_hva(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vm.set_memory_region(1, 0, MiB, MiB, mem.hva + 4 * MiB)
    before = state(vm)
    tx = vm.transaction()
    with pytest.raises(KvmError) as info:
        tx.merge([0, 1])
    assert info.value.errno == errno.EINVAL and "adjacent" in info.value.message
    assert state(vm) == before


def test_commit_once(mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    tx = vm.transaction()
    tx.set_memory_region(0, 0, 0, MiB, mem.hva)
    tx.commit()
    with pytest.raises(KvmError):
        tx.commit()
    with pytest.raises(KvmError):
        tx.set_memory_region(1, 0, MiB, MiB, mem.hva)


def test_exception_in_block_abandons_the_batch(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    with pytest.raises(RuntimeError), vm.transaction() as tx:
        tx.set_memory_region(0, 0, 0, MiB, mem.hva)
        raise RuntimeError("caller changed its mind")
    assert vm.slots() == []


def _hammer(vm: kvmem.Vm, mem: kvmem.HostMemory, rounds: int,
            atomic: bool) -> tuple[int, int, int]:
    """Readers resolve gpas over 8 MiB while a writer splits and merges the slot under
    them. Returns (rounds done, reads, holes seen)."""
    size = 8 * MiB
    stop = threading.Event()
    holes = [0]
    reads = [0]
    wrong = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            gpa = rng.randrange(0, size, 8)
            try:
                hva = vm.translate(gpa)
                if hva != mem.hva + gpa:
                    wrong.append((gpa, hva))
                vm.read(gpa, 8)
            except kvmem.GuestAccessError:
                holes[0] += 1
            reads[0] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    # an engine's slot ioctl gives up the GIL, and getting it back from two spinning
    # readers takes a whole switch interval: at the default 5 ms the writer's pace would be
    # the GIL's, not the VM's (the KVM engine: ~17 rounds/s instead of ~150)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    for t in threads:
        t.start()
    done = 0
    try:
        while done < rounds:
            cut = random.randrange(1, size // 4096) * 4096
            if atomic:
                with vm.transaction() as tx:
                    tx.split(0, [cut], ids=[1])
                with vm.transaction() as tx:
                    tx.merge([0, 1])
            else:
                vm.set_memory_region(0, 0, 0, 0, 0)
                vm.set_memory_region(0, 0, 0, cut, mem.hva)
                vm.set_memory_region(1, 0, cut, size - cut, mem.hva + cut)
                vm.set_memory_region(0, 0, 0, 0, 0)
                vm.set_memory_region(1, 0, 0, 0, 0)
                vm.set_memory_region(0, 0, 0, size, mem.hva)
            done += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    assert not wrong, wrong[:5]
    return done, reads[0], holes[0]


class _Probe(kvmem.SlotsListener):
    """Reads every 64 KiB of the 8 MiB after each published change: what a reader sees
    between two publications, deterministically (the threads of `_hammer` add real
    concurrency; this makes the between-publications view exact)."""

    def __init__(self) -> None:
        self.reads = 0
        self.holes = 0

    def slots_committed(self, vm: kvmem.Vm, changes: object) -> None:
        for gpa in range(0, 8 * MiB, 64 * 1024):
            self.reads += 1
            try:
                vm.read(gpa, 8)
            except kvmem.GuestAccessError:
                self.holes += 1


def test_readers_never_see_a_hole_during_split_merge(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 8 * MiB, mem.hva)
    probe = _Probe()
    vm.add_listener(probe)
    done, reads, holes = _hammer(vm, mem, rounds=300, atomic=True)
    assert done == 300
    assert probe.reads == 2 * 300 * 128  # two publications per round
    assert probe.holes == 0, f"{probe.holes} of {probe.reads} probes fell into a hole"
    assert holes == 0, f"{holes} of {reads} reads fell into a hole"
    assert [(s.id, s.size) for s in vm.slots()] == [(0, 8 * MiB)]


def test_naive_delete_then_create_does_show_holes(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    """The baseline the transactions fix: KVM's one-slot-at-a-time sequence. Every round
    publishes a layout with the whole range missing (after the first delete), so the probe
    sees holes in every round, whatever the threads' timing."""
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 8 * MiB, mem.hva)
    probe = _Probe()
    vm.add_listener(probe)
    done, _, _ = _hammer(vm, mem, rounds=20, atomic=False)
    assert done == 20
    assert probe.holes >= 20 * 128, (probe.holes, probe.reads)
