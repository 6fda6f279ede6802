"""Slot rules, change kinds, generations and the INVALID window (kvm-semantics §1, §2)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from expect import refused

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import ChangeKind
from kvmem.uapi import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS as IN_PROGRESS

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[kvmem.HostMemory]:
    m = kvmem.HostMemory.anonymous(16 * MiB)
    yield m
    m.close()


def layout(vm: kvmem.Vm, as_id: int = 0) -> list[tuple[int, int, int, int, int]]:
    return [(s.id, s.base_gfn, s.npages, s.hva, s.flags) for s in vm.slots(as_id)]


def test_rules_in_kvm_order(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm()
    h = mem.hva
    # V1 flag bits beyond LOG|RO win over everything else, even a bad slot id
    refused(errno.EINVAL, vm.set_memory_region, 40000, 4, 1, 1, 1)
    refused(errno.EINVAL, vm.set_memory_region, 32764, 0, 0, 4096, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 1 << 16, 0, 4096, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 0, 4097, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 1, 4096, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 0, 4096, h + 1)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 0, 4096, 0xFFFF800000000000)
    refused(errno.EINVAL, vm.set_memory_region, 2 << 16, 0, 0, 4096, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, (1 << 64) - 4096, 8192, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 0, 1 << 43, h)
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 0, 0, h)  # delete of nothing
    # an unmapped user hva is accepted (KVM does no VMA check)
    vm.set_memory_region(0, 0, 0, 4096, 0x100000000000)
    # delete ignores flags/gpa/hva values but not their alignment
    refused(errno.EINVAL, vm.set_memory_region, 0, 0, 1, 0, 0)
    vm.set_memory_region(0, RO, 0x5000, 0, 0)
    assert vm.slots() == []


def test_change_kinds(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm()
    h = mem.hva
    vm.set_memory_region(1, 0, 0x100000, MiB, h)
    refused(errno.EEXIST, vm.set_memory_region, 2, 0, 0x1FF000, 8192, h)
    vm.set_memory_region(2, 0, 0x200000, MiB, h)  # adjacent, aliasing the same hva
    refused(errno.EINVAL, vm.set_memory_region, 1, 0, 0x100000, 2 * MiB, h)  # size
    refused(errno.EINVAL, vm.set_memory_region, 1, 0, 0x100000, MiB, h + 4096)  # hva
    refused(errno.EINVAL, vm.set_memory_region, 1, RO, 0x100000, MiB, h)  # RO toggle
    refused(errno.EEXIST, vm.set_memory_region, 1, 0, 0x180000, MiB, h)  # move onto 2
    before = vm.generation()
    vm.set_memory_region(1, 0, 0x100000, MiB, h)  # identical: no-op
    assert vm.generation() == before
    vm.set_memory_region(1, LOG, 0x100000, MiB, h)  # flags only: one swap
    assert vm.generation() == before + 2
    vm.set_memory_region(1, LOG, 0x80000, MiB, h)  # move over its own old range: two swaps
    assert vm.generation() == before + 2 + 4
    assert layout(vm) == [(1, 0x80, 256, h, LOG), (2, 0x200, 256, h, 0)]


def test_address_spaces_are_independent(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vm.set_memory_region((1 << 16) | 0, 0, 0, MiB, mem.hva + MiB)  # same id, same gpa
    assert vm.generation(0) == 2 and vm.generation(1) == 3  # AS0 even, AS1 odd
    assert layout(vm, 1) == [(0, 0, 256, mem.hva + MiB, 0)]
    vm.set_memory_region(0, 0, 0, 0, 0)
    assert vm.slots(0) == [] and len(vm.slots(1)) == 1
    one = kvmem.Vm(address_spaces=1)
    refused(errno.EINVAL, one.set_memory_region, 1 << 16, 0, 0, MiB, mem.hva)


def test_max_slots_and_max_gfn(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm(max_slots=8, phys_bits=40)
    for i in range(8):
        vm.set_memory_region(i, 0, i * 4096, 4096, mem.hva)
    refused(errno.EINVAL, vm.set_memory_region, 8, 0, 0x100000, 4096, mem.hva)
    max_gfn = (1 << 28) - 1
    vm.set_memory_region(7, 0, 7 * 4096, 0, 0)
    vm.set_memory_region(7, 0, max_gfn << 12, 4096, mem.hva)  # ends exactly at max gfn
    vm.set_memory_region(7, 0, 7 * 4096, 0, 0)
    e = refused(errno.EINVAL, vm.set_memory_region, 7, 0, (max_gfn + 1) << 12, 4096, mem.hva)
    assert "maximum gfn" in e.message


def test_generation_in_progress_visible_during_update(mem: kvmem.HostMemory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    vm = kvmem.Vm()
    seen: list[int] = []
    real = vm.memslots.srcu.synchronize

    def spy() -> None:
        seen.append(vm.generation(0))
        real()

    monkeypatch.setattr(vm.memslots.srcu, "synchronize", spy)
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)  # CREATE: one swap
    vm.set_memory_region(0, 0, 2 * MiB, 0, 0)  # DELETE: two swaps
    assert seen == [0 | IN_PROGRESS, 2 | IN_PROGRESS, 4 | IN_PROGRESS]
    assert vm.generation(0) == 6 and vm.generation(1) == 1


class InvalidSpy(kvmem.SlotsListener):
    """Looks at what readers see while a DELETE/MOVE has published the INVALID copy."""

    def __init__(self, probe_gpa: int) -> None:
        self.probe_gpa = probe_gpa
        self.during: list[tuple[bool, int | None]] = []

    def slots_invalidated(self, vm: kvmem.Vm, slot: kvmem.MemorySlot) -> None:
        s = vm.lookup(self.probe_gpa >> 12)
        try:
            vm.read(self.probe_gpa, 1)
            err = None
        except kvmem.GuestAccessError as e:
            err = e.errno
        self.during.append((s is not None and s.invalid, err))


@pytest.mark.parametrize("op", ["delete", "move"])
def test_delete_and_move_publish_invalid_copy_first(mem: kvmem.HostMemory, op: str) -> None:
    vm = kvmem.Vm()
    vm.set_memory_region(3, 0, 0x100000, MiB, mem.hva)
    spy = InvalidSpy(0x100000)
    vm.add_listener(spy)
    if op == "delete":
        vm.set_memory_region(3, 0, 0, 0, 0)
        assert vm.lookup(0x100) is None
    else:
        vm.set_memory_region(3, 0, 0x400000, MiB, mem.hva)
        moved = vm.lookup(0x400)
        assert moved is not None and moved.base_gfn == 0x400 and vm.lookup(0x100) is None
    # during the update the old range resolved to the INVALID slot and accessors missed
    assert spy.during == [(True, errno.EFAULT)]


def test_transaction_publishes_no_invalid_window(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm()
    vm.set_memory_region(3, 0, 0x100000, MiB, mem.hva)
    spy = InvalidSpy(0x100000)
    vm.add_listener(spy)
    with vm.transaction() as tx:
        tx.set_memory_region(3, 0, 0x400000, MiB, mem.hva)
    assert spy.during == []
    assert [c.kind for c in tx.changes] == [ChangeKind.MOVE]


def test_refused_update_changes_nothing(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm(phys_bits=36)
    vm.set_memory_region(0, LOG, 0, MiB, mem.hva)
    vm.write(0x3000, b"x")
    before = (layout(vm), vm.generation(0), vm.generation(1))
    # a MOVE refused by x86 prepare (beyond max gfn) publishes nothing (see vm.py docstring)
    refused(errno.EINVAL, vm.set_memory_region, 0, LOG, 1 << 36, MiB, mem.hva)
    assert (layout(vm), vm.generation(0), vm.generation(1)) == before
    assert vm.get_dirty_log(0)[0] == 0b1000


def test_lookups_answer_for_their_own_set(mem: kvmem.HostMemory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmem import slots as slots_mod
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    old = vm.slot_set()
    assert vm.lookup(5) is not None and vm.read(0x5000, 1) == b"\0"  # remembered by `old`
    vm.set_memory_region(0, 0, 0, 0, 0)  # what the old set remembered cannot answer for the new
    assert vm.lookup(5) is None and old.search(5) is not None
    with pytest.raises(kvmem.GuestAccessError):
        vm.read(0x5000, 1)
    vm.set_memory_region(0, 0, 4 * MiB, 2 * MiB, mem.hva)
    monkeypatch.setattr(slots_mod, "MEMO_MAX", 8)  # a tiny memo is emptied again and again
    s = vm.slot_set()
    for g in list(range(1024, 1044)) + list(range(1024, 1044)):
        found = s.search(g)
        assert found is not None and found.base_gfn == 1024
        assert s.search(g - 1024) is None


def test_translate_memo_never_answers_for_an_invalid_slot(mem: kvmem.HostMemory) -> None:
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    assert vm.translate(0x1234) == mem.hva + 0x1234
    s = vm.slot_set()
    slot = s.by_id(0)
    assert slot is not None
    inv = s.replacing(slot, slot.with_flags(slot.flags | kvmem.KVM_MEMSLOT_INVALID))
    assert inv.hva_delta(1) is None  # what readers see mid-DELETE
    vcpu = vm.create_vcpu(0)
    vm.set_memory_region(0, 0, 4 * MiB, 2 * MiB, mem.hva)  # MOVE: old gpa gone at once
    with pytest.raises(kvmem.GuestAccessError):
        vm.translate(0x1234)
    with pytest.raises(kvmem.GuestAccessError):
        vcpu.translate(0x1234)
    assert vcpu.translate(4 * MiB + 0x1234) == mem.hva + 0x1234
