"""Private and shared memory on a VM with private memory (kvm-semantics §8.1, §8.6, §8.7).

A VMM relies on: `Vm(vm_type="sw_protected")` has one address space and refuses INIT_SHARED
files; KVM_SET_MEMORY_ATTRIBUTES is ENOTTY on a default VM (as on this host) and has KVM's
checks in KVM's order on a private one; a change runs the invalidation bracket over every
slot it touches (so no spte of the old kind survives and a racing fault retries), and none
when nothing changes or no slot is there; guest accesses to PRIVATE gfns come from the slot's
guest_memfd and shared ones from the hva; an access whose kind is not the gfn's attribute is
a `MemoryFault` with KVM_EXIT_MEMORY_FAULT's fields; a private access with no slot or to a
slot without a file is a memory fault, not MMIO; host accessors stay on the hva (attribute
blind, as KVM's are); attributes belong to gfns, not slots.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from kvmem import HostMemory, KvmError, MemoryFault, MmioExit, TrackedWrite, Vm
from kvmem.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd
from kvmem.memattrs import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    AttributeMap,
)
from kvmem.mmu import Mmu
from kvmem.uapi import KVM_MEM_GUEST_MEMFD

PAGE = 4096
MiB = 1 << 20
GMEM = KVM_MEM_GUEST_MEMFD
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
GPA = 1 << 30


@pytest.fixture
def vm() -> Vm:
    return Vm(vm_type="sw_protected")


@pytest.fixture
def mem() -> Iterator[HostMemory]:
    m = HostMemory.anonymous(4 * MiB)
    yield m
    m.close()


@pytest.fixture
def gmem(vm: Vm) -> Iterator[Callable[..., GuestMemfd]]:
    made: list[GuestMemfd] = []

    def make(size: int = 4 * MiB, flags: int = 0) -> GuestMemfd:
        f = vm.create_guest_memfd(size, flags)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def state(mmu: Mmu) -> tuple[int, int]:
    return mmu.seq.load(), mmu.in_progress.load()


# -- VM types ---------------------------------------------------------------------------------
def test_vm_types() -> None:
    plain = Vm()
    assert (plain.vm_type, plain.private_memory, plain.supported_memory_attributes) == \
        ("default", False, 0)
    pvm = Vm(vm_type="sw_protected")
    assert (pvm.private_memory, pvm.supported_memory_attributes, pvm.address_spaces) == \
        (True, PRIVATE, 1)
    for kwargs in ({"vm_type": "snp"}, {"vm_type": "sw_protected", "address_spaces": 2},
                   {"vm_type": "sw_protected", "engine": "unicorn"}):
        with pytest.raises(KvmError) as info:
            Vm(**kwargs)
        assert info.value.errno == errno.EINVAL


def test_private_memory_vm_refuses_init_shared_files(vm: Vm) -> None:
    """KVM_CAP_GUEST_MEMFD_FLAGS is MMAP alone on a private-memory VM."""
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(MiB, MMAP | SHARED)
    assert info.value.errno == errno.EINVAL
    vm.create_guest_memfd(MiB, MMAP).close()
    Vm().create_guest_memfd(MiB, MMAP | SHARED).close()


def test_default_vm_has_no_attribute_ioctl_whatever_the_input() -> None:
    """As on this host (no KVM_CAP_MEMORY_ATTRIBUTES): ENOTTY for good and bad input."""
    plain = Vm()
    for args in ((0, PAGE, PRIVATE), (0, PAGE, 0), (0, 0, 1, 1), (1, 3, 0xFF, 5)):
        with pytest.raises(KvmError) as info:
            plain.set_memory_attributes(*args)
        assert info.value.errno == errno.ENOTTY
    assert plain.get_memory_attributes(0) == 0 and plain.mmu.seq.load() == 0


# -- KVM_SET_MEMORY_ATTRIBUTES's checks --------------------------------------------------------
@pytest.mark.parametrize(("args", "words"), [
    ((0, PAGE, PRIVATE, 1), "flags"),
    ((0, 0, 1 << 40, 2), "flags"),  # flags first, before the attributes and the range
    ((0, PAGE, 1), "attributes"),
    ((0, PAGE, PRIVATE | 1), "attributes"),
    ((0, 0, 1 << 0), "attributes"),  # attributes before the range
    ((0, 0, PRIVATE), "empty"),
    (((1 << 64) - PAGE, 2 * PAGE, PRIVATE), "wraps"),
    ((PAGE, 1, PRIVATE), "aligned"),
    ((1, PAGE, PRIVATE), "aligned"),
], ids=str)
def test_attribute_checks_in_kvm_order(vm: Vm, mem: HostMemory, args: tuple[int, ...],
                                       words: str) -> None:
    vm.set_memory_region(0, 0, 0, MiB, mem.hva)
    vm.create_vcpu(0).guest_read(0, 8)
    before = (state(vm.mmu), vm.mmu.attributes.load(), vm.mmu.mapped(0))
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(*args)
    assert info.value.errno == errno.EINVAL and words in info.value.message
    assert (state(vm.mmu), vm.mmu.attributes.load(), vm.mmu.mapped(0)) == before


def test_bad_argument_types(vm: Vm) -> None:
    for args in (("0", PAGE, 0), (0, 1.0, 0), (0, PAGE, None), (0, PAGE, 0, True)):
        with pytest.raises(TypeError):
            vm.set_memory_attributes(*args)
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(-PAGE, PAGE, 0)
    assert info.value.errno == errno.EINVAL and "gpa" in info.value.message
    assert vm.mmu.attributes.load() == AttributeMap()


# -- the invalidation it triggers --------------------------------------------------------------
def test_a_change_invalidates_the_slots_it_touches(vm: Vm, mem: HostMemory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slots, 16 pages each; the conversion of gfns [12, 20) adds the clipped range of
    each to the in-progress range (begin once, end once) and zaps exactly those sptes."""
    vm.set_memory_region(0, 0, 0, 16 * PAGE, mem.hva)
    vm.set_memory_region(1, 0, 16 * PAGE, 16 * PAGE, mem.hva + MiB)
    vcpu = vm.create_vcpu(0)
    for g in range(32):
        vcpu.guest_read(g * PAGE, 1)
    added: list[tuple[int, int, int]] = []
    real = Mmu.range_add

    def range_add(self: Mmu, start: int, end: int) -> None:
        added.append((self.in_progress.load(), start, end))
        real(self, start, end)

    monkeypatch.setattr(Mmu, "range_add", range_add)
    seq, _ = state(vm.mmu)
    vm.set_memory_attributes(12 * PAGE, 8 * PAGE, PRIVATE)
    assert added == [(1, 12, 16), (1, 16, 20)]
    assert state(vm.mmu) == (seq + 1, 0)
    assert sorted(g for g in range(32) if vm.mmu.spte(0, g) is None) == list(range(12, 20))
    assert vm.get_memory_attributes(12 * PAGE) == PRIVATE
    assert vm.get_memory_attributes(20 * PAGE) == 0
    # the same value again: nothing to do, seq unchanged, no range
    added.clear()
    vm.set_memory_attributes(12 * PAGE, 8 * PAGE, PRIVATE)
    vm.set_memory_attributes(64 * PAGE, PAGE, 0)
    assert added == [] and state(vm.mmu) == (seq + 1, 0)


def test_attributes_belong_to_gfns_not_slots(vm: Vm, mem: HostMemory,
                                             gmem: Callable[..., GuestMemfd]) -> None:
    """Set where no slot is: stored, no bracket. Kept across DELETE and a new slot."""
    seq, _ = state(vm.mmu)
    vm.set_memory_attributes(GPA, 2 * PAGE, PRIVATE)
    assert state(vm.mmu) == (seq, 0) and vm.get_memory_attributes(GPA + PAGE) == PRIVATE
    f = gmem()
    mem.view()[:5] = b"hva!!"
    vm.set_memory_region2(0, GMEM, GPA, MiB, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"file")
    vm.set_memory_region(0, 0, 0, 0, 0)
    vm.set_memory_region2(0, GMEM, GPA, MiB, mem.hva, f, 0)
    assert vm.get_memory_attributes(GPA) == PRIVATE
    assert vcpu.guest_read(GPA, 4) == b"file"  # the data stayed in the file, too


def test_a_straddling_huge_page_is_added_whole(vm: Vm, mem: HostMemory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """x86's pre step: converting one gfn inside a 2 MiB page that lies wholly in the slot
    and is not mixed adds the whole 2 MiB to the range; the 2 MiB mapping goes, and from
    then on the block is mixed: shared faults there map 4 KiB."""
    vm.set_memory_region(0, 0, 0, 4 * MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_read(0, 1)
    huge = vm.mmu.spte(0, 0)
    if huge is None or huge.npages != 512:
        pytest.skip("the host gave no 2 MiB-aligned backing for a huge mapping")
    added: list[tuple[int, int]] = []
    real = Mmu.range_add

    def range_add(self: Mmu, start: int, end: int) -> None:
        added.append((start, end))
        real(self, start, end)

    monkeypatch.setattr(Mmu, "range_add", range_add)
    vm.set_memory_attributes(5 * PAGE, PAGE, PRIVATE)
    assert (5, 6) in added and (0, 512) in added
    assert vm.mmu.spte(0, 0) is None
    spte = vcpu.fault_in(0, False)
    assert spte.npages == 1 and not spte.private


# -- the fault path ---------------------------------------------------------------------------
def test_private_gfns_come_from_the_file_shared_ones_from_the_hva(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, 2 * PAGE, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    mem.view()[:6] = b"shared"
    assert vcpu.guest_read(GPA, 6) == b"shared"
    vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert vm.mmu.spte(0, GPA >> 12) is None  # the shared mapping went with the conversion
    assert vcpu.guest_read(GPA, 6) == bytes(6)  # a hole in the file
    vcpu.guest_write(GPA, b"secret")
    assert bytes(f.page_view(0)[:6]) == b"secret" and bytes(mem.view()[:6]) == b"shared"
    spte = vm.mmu.spte(0, GPA >> 12)
    assert spte is not None and spte.private and spte.writable
    # host accessors are attribute-blind: they see the shared copy at the hva (§8.7)
    assert vm.read(GPA, 6) == b"shared"
    vm.write(GPA, b"HOST..")
    assert bytes(f.page_view(0)[:6]) == b"secret" and vcpu.guest_read(GPA, 6) == b"secret"
    cache = vm.hva_cache(GPA, 8)
    assert cache.read(0, 6) == b"HOST.."
    # back to shared: the hva again; a punch while private reads zero when private again
    vm.set_memory_attributes(GPA, PAGE, 0)
    assert vcpu.guest_read(GPA, 6) == b"HOST.."
    f.punch_hole(0, PAGE)
    vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert vcpu.guest_read(GPA, 6) == bytes(6)
    assert vm.mmu.stale_sptes() == []


def test_a_gmem_only_slot_serves_both_kinds_from_the_file(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(MiB, MMAP)
    vm.set_memory_region2(0, GMEM, GPA, MiB, mem.hva, f, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.guest_write(GPA, b"one file")
    vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert vcpu.guest_read(GPA, 8) == b"one file"
    spte = vm.mmu.spte(0, GPA >> 12)
    assert spte is not None and spte.private


def expect_memory_fault(call: Callable[[], object], gpa: int, private: bool) -> MemoryFault:
    with pytest.raises(MemoryFault) as info:
        call()
    e = info.value
    assert (e.errno, e.gpa, e.size) == (errno.EFAULT, gpa, PAGE)
    assert e.flags == (KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0) and e.private == private
    return e


def test_an_access_of_the_wrong_kind_is_a_memory_fault(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    """KVM_EXIT_MEMORY_FAULT: page-aligned gpa, size 4096, PRIVATE iff the access was."""
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, 2 * PAGE, mem.hva, f, 0)
    vm.set_memory_attributes(GPA + PAGE, PAGE, PRIVATE)
    vcpu = vm.create_vcpu(0)
    expect_memory_fault(lambda: vcpu.fault_in(GPA + 0x10, False, private=True), GPA, True)
    expect_memory_fault(lambda: vcpu.fault_in(GPA + PAGE + 0x123, True, private=False),
                        GPA + PAGE, False)
    # with a mapping in place, an access of the other kind still faults
    vcpu.guest_read(GPA, 1)
    expect_memory_fault(lambda: vcpu.fault_in(GPA, False, private=True), GPA, True)
    assert vcpu.fault_in(GPA + PAGE, True, private=True).private
    # a default VM never has private memory: a private access is always of the wrong kind
    plain = Vm()
    plain.set_memory_region(0, 0, 0, PAGE, mem.hva)
    expect_memory_fault(lambda: plain.create_vcpu(0).fault_in(0, False, private=True), 0,
                        True)


def test_private_accesses_without_a_file_or_a_slot_are_memory_faults(
        vm: Vm, mem: HostMemory) -> None:
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vm.set_memory_attributes(0, 2 * PAGE, PRIVATE)
    vm.set_memory_attributes(4 * PAGE, PAGE, 0)
    vcpu = vm.create_vcpu(0)
    expect_memory_fault(lambda: vcpu.guest_read(0, 4), 0, True)  # slot without guest_memfd
    expect_memory_fault(lambda: vcpu.guest_write(PAGE, b"x"), PAGE, True)  # no slot
    with pytest.raises(MmioExit):
        vcpu.guest_read(4 * PAGE, 4)  # a shared gfn without a slot is MMIO, as before


def test_a_private_write_to_a_tracked_gfn_cannot_be_emulated(
        vm: Vm, mem: HostMemory, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(0, GMEM, GPA, 2 * PAGE, mem.hva, f, 0)
    vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    vm.page_track.add_gfn(GPA >> 12)
    vm.page_track.add_gfn((GPA >> 12) + 1)
    vcpu = vm.create_vcpu(0)
    assert vcpu.guest_read(GPA, 4) == bytes(4)  # reads map, read-only
    expect_memory_fault(lambda: vcpu.guest_write(GPA, b"x"), GPA, True)
    with pytest.raises(TrackedWrite):
        vcpu.fault_in(GPA + PAGE, True)  # shared: page tracking performs it
