"""Guest-memory accessors (kvm-semantics §3, §7.1): what a VMM sees through `vm.read/write/
clear` and a vCPU's accessors.

The rules under test are KVM's: an access walks the guest range page by page; the first page
that cannot be reached (no slot, read-only slot for a write, host memory unmapped or
protected) stops it with EFAULT, `gpa` names that first byte, `done` the bytes moved before
it; earlier pages stay written and later ones stay untouched. Written pages of dirty-logging
slots are marked, host writes never are. A vCPU in SMM sees address space 1 only.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import GuestAccessError, HostMemory, KvmError, Vm
from kvmem.host import PROT_NONE, PROT_READ, PROT_RW

PAGE = 4096
AS1 = 1 << 16
UNMAPPED_HVA = 0x100_0000_0000  # a user address no HostMemory maps; KVM accepts it


@pytest.fixture
def host() -> Iterator[Callable[[int], HostMemory]]:
    """Factory of anonymous host memories filled with a recognisable pattern."""
    made: list[HostMemory] = []

    def make(npages: int, seed: int = 0) -> HostMemory:
        m = HostMemory.anonymous(npages * PAGE)
        m.view()[:] = random.Random(seed).randbytes(m.size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def fault(fn: Callable[..., object], *args: object) -> GuestAccessError:
    with pytest.raises(GuestAccessError) as info:
        fn(*args)
    assert info.value.errno == errno.EFAULT, str(info.value)
    return info.value


def refused(err: int, fn: Callable[..., object], *args: object) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args)
    assert not isinstance(info.value, GuestAccessError)
    assert info.value.errno == err, str(info.value)
    return info.value


def dirty_pages(vm: Vm, slot: int) -> set[int]:
    bitmap = vm.get_dirty_log(slot)
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


# ------------------------------------------------------------------------------------------
# within a slot, across pages and slots


def test_gpa_maps_to_the_slot_hva_offset(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(16)
    vm = make_vm()
    # slot backed by pages 4..12 of the mapping, at gpa 0x100000
    vm.set_memory_region(0, 0, 0x100000, 8 * PAGE, mem.hva + 4 * PAGE)
    view = mem.view()
    assert vm.read(0x100000, 8 * PAGE) == bytes(view[4 * PAGE:12 * PAGE])
    vm.write(0x100010, b"hello")
    assert bytes(view[4 * PAGE + 0x10:4 * PAGE + 0x15]) == b"hello"
    view[5 * PAGE + 7:5 * PAGE + 10] = b"xyz"
    assert vm.read(0x101007, 3) == b"xyz"
    assert isinstance(vm.read(0x100000, 1), bytes)


def test_write_read_clear_across_page_boundaries(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(8)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, mem.size, mem.hva)
    before = bytes(mem.view())
    data = pattern(3 * PAGE + 10)
    vm.write(PAGE - 5, data)
    expect = bytearray(before)
    expect[PAGE - 5:PAGE - 5 + len(data)] = data
    assert bytes(mem.view()) == bytes(expect)
    assert vm.read(PAGE - 5, len(data)) == data
    vm.clear(2 * PAGE - 3, PAGE + 6)
    expect[2 * PAGE - 3:3 * PAGE + 3] = bytes(PAGE + 6)
    assert bytes(mem.view()) == bytes(expect)
    assert vm.read(0, mem.size) == bytes(expect)


def test_access_spans_adjacent_slots_backed_by_different_memory(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    a, b = host(4, seed=1), host(4, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0x10000, 4 * PAGE, a.hva)
    vm.set_memory_region(1, 0, 0x14000, 4 * PAGE, b.hva)
    assert vm.read(0x10000, 8 * PAGE) == bytes(a.view()) + bytes(b.view())
    data = pattern(2 * PAGE, seed=3)
    vm.write(0x13000, data)  # last page of a, first page of b
    assert bytes(a.view()[3 * PAGE:]) == data[:PAGE]
    assert bytes(b.view()[:PAGE]) == data[PAGE:]
    assert vm.read(0x13000, 2 * PAGE) == data
    vm.clear(0x13ffe, 4)
    assert bytes(a.view()[-2:]) == b"\0\0"
    assert bytes(b.view()[:2]) == b"\0\0"
    assert bytes(b.view()[2:PAGE]) == data[PAGE + 2:]


def test_adjacent_slots_aliasing_one_hva_page(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(1)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, PAGE, mem.hva)
    vm.set_memory_region(1, 0, PAGE, PAGE, mem.hva)
    vm.write(PAGE - 2, b"abcd")  # "ab" at the end, "cd" at the start of the same page
    assert bytes(mem.view()[:2]) == b"cd"
    assert bytes(mem.view()[-2:]) == b"ab"
    assert vm.read(0, 2) == b"cd"


# ------------------------------------------------------------------------------------------
# holes


@pytest.fixture
def holed(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> tuple[Vm, HostMemory, HostMemory]:
    """Slot 0 at [0, 4 pages), a 2-page hole, slot 1 at [6, 10 pages)."""
    a, c = host(4, seed=1), host(4, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, a.hva)
    vm.set_memory_region(1, 0, 6 * PAGE, 4 * PAGE, c.hva)
    return vm, a, c


def test_read_across_hole_reports_first_failing_gpa_and_partial(
        holed: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, a, _c = holed
    e = fault(vm.read, 3 * PAGE + 100, 8 * PAGE)
    assert e.gpa == 4 * PAGE
    assert e.done == PAGE - 100
    assert e.partial == bytes(a.view()[3 * PAGE + 100:])


def test_read_starting_in_hole(holed: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, _a, _c = holed
    e = fault(vm.read, 5 * PAGE + 7, 2 * PAGE)
    assert (e.gpa, e.done, e.partial) == (5 * PAGE + 7, 0, b"")


def test_write_across_hole_keeps_earlier_pages_and_leaves_later_untouched(
        holed: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, a, c = holed
    a_before, c_before = bytes(a.view()), bytes(c.view())
    data = pattern(8 * PAGE)
    e = fault(vm.write, 2 * PAGE + 1, data)
    assert e.gpa == 4 * PAGE
    assert e.done == 2 * PAGE - 1
    assert bytes(a.view()) == a_before[:2 * PAGE + 1] + data[:2 * PAGE - 1]
    assert bytes(c.view()) == c_before  # beyond the hole: untouched


def test_clear_across_hole(holed: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, a, c = holed
    a_before, c_before = bytes(a.view()), bytes(c.view())
    e = fault(vm.clear, 3 * PAGE, 6 * PAGE)
    assert (e.gpa, e.done) == (4 * PAGE, PAGE)
    assert bytes(a.view()) == a_before[:3 * PAGE] + bytes(PAGE)
    assert bytes(c.view()) == c_before


def test_access_past_the_last_slot(holed: tuple[Vm, HostMemory, HostMemory]) -> None:
    vm, _a, c = holed
    e = fault(vm.read, 9 * PAGE, 2 * PAGE)
    assert (e.gpa, e.done, e.partial) == (10 * PAGE, PAGE, bytes(c.view()[3 * PAGE:]))


# ------------------------------------------------------------------------------------------
# read-only slots


def test_readonly_slot_reads_but_refuses_writes(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(4)
    vm = make_vm()
    vm.set_memory_region(0, RO, 0, mem.size, mem.hva)
    before = bytes(mem.view())
    assert vm.read(0, mem.size) == before
    e = fault(vm.write, 0x10, b"x" * 10)
    assert (e.gpa, e.done) == (0x10, 0)
    e = fault(vm.clear, PAGE, 2 * PAGE)
    assert (e.gpa, e.done) == (PAGE, 0)
    assert bytes(mem.view()) == before


def test_write_from_writable_into_readonly_slot(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    rw, ro = host(2, seed=1), host(2, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, rw.hva)
    vm.set_memory_region(1, RO | LOG, 2 * PAGE, 2 * PAGE, ro.hva)
    rw_before, ro_before = bytes(rw.view()), bytes(ro.view())
    data = pattern(3 * PAGE)
    e = fault(vm.write, PAGE, data)
    assert (e.gpa, e.done) == (2 * PAGE, PAGE)
    assert bytes(rw.view()) == rw_before[:PAGE] + data[:PAGE]
    assert bytes(ro.view()) == ro_before
    e = fault(vm.clear, PAGE + 5, 2 * PAGE)
    assert (e.gpa, e.done) == (2 * PAGE, PAGE - 5)
    assert bytes(ro.view()) == ro_before
    assert dirty_pages(vm, 1) == set()  # refused writes mark nothing


def test_write_from_readonly_into_writable_writes_nothing(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    ro, rw = host(2, seed=1), host(2, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, RO, 0, 2 * PAGE, ro.hva)
    vm.set_memory_region(1, 0, 2 * PAGE, 2 * PAGE, rw.hva)
    ro_before, rw_before = bytes(ro.view()), bytes(rw.view())
    e = fault(vm.write, PAGE, pattern(2 * PAGE))
    assert (e.gpa, e.done) == (PAGE, 0)
    assert bytes(ro.view()) == ro_before
    assert bytes(rw.view()) == rw_before


# ------------------------------------------------------------------------------------------
# dirty logging by accessors


def test_writes_mark_exactly_the_written_pages(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(16)
    vm = make_vm()
    vm.set_memory_region(3, LOG, 0x40000, 16 * PAGE, mem.hva)  # base gfn 64: bits are relative
    assert dirty_pages(vm, 3) == set()
    vm.write(0x40000 + 2 * PAGE + 5, b"x")
    vm.write(0x40000 + 6 * PAGE - 1, b"yz")  # last byte of page 5, first of page 6
    vm.clear(0x40000 + 9 * PAGE, PAGE + 1)  # pages 9 and 10
    vm.write(0x40000 + 12 * PAGE, b"")  # nothing written, nothing marked
    vm.clear(0x40000 + 13 * PAGE, 0)
    vm.read(0x40000, 16 * PAGE)  # reads never mark
    assert dirty_pages(vm, 3) == {2, 5, 6, 9, 10}


def test_only_logging_slots_are_marked(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(4, seed=1), host(4, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, a.hva)
    vm.set_memory_region(1, LOG, 4 * PAGE, 4 * PAGE, b.hva)
    vm.write(2 * PAGE, pattern(4 * PAGE))  # pages 2,3 of slot 0 and 0,1 of slot 1
    assert dirty_pages(vm, 1) == {0, 1}
    refused(errno.ENOENT, vm.get_dirty_log, 0)


def test_partial_write_marks_only_pages_written_before_the_hole(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    mem = host(4)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 4 * PAGE, mem.hva)
    fault(vm.write, 2 * PAGE, pattern(4 * PAGE))
    assert dirty_pages(vm, 0) == {2, 3}


def test_host_writes_are_never_logged(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(4)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 4 * PAGE, mem.hva)
    mem.view()[:] = bytes(mem.size)
    mem.view()[PAGE + 1] = 7
    assert vm.read(PAGE + 1, 1) == b"\x07"
    assert dirty_pages(vm, 0) == set()


# ------------------------------------------------------------------------------------------
# vCPU accessors and address spaces


def test_vcpu_outside_smm_uses_address_space_0(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(2, seed=1), host(2, seed=2)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 2 * PAGE, a.hva)
    vm.set_memory_region(AS1 | 0, 0, 0, 2 * PAGE, b.hva)
    vcpu = vm.create_vcpu(0)
    assert vcpu.smm is False
    assert vcpu.read(0, 2 * PAGE) == bytes(a.view())
    vcpu.write(10, b"as0")
    assert bytes(a.view()[10:13]) == b"as0"
    assert bytes(b.view()[10:13]) != b"as0"


def test_same_gpa_is_different_memory_in_each_address_space(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    a, b = host(2, seed=1), host(2, seed=2)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 2 * PAGE, a.hva)
    vm.set_memory_region(AS1 | 0, 0, 0, 2 * PAGE, b.hva)
    vcpu = vm.create_vcpu(0)
    vm.write(0x100, b"normal")
    vcpu.smm = True
    vcpu.write(0x100, b"smram!")
    assert vm.read(0x100, 6) == b"normal"  # vm accessors always use AS0, even now
    assert vcpu.read(0x100, 6) == b"smram!"
    assert bytes(b.view()[0x100:0x106]) == b"smram!"
    vcpu.smm = False
    assert vcpu.read(0x100, 6) == b"normal"


def test_smram_is_visible_only_in_smm(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    ram, smram = host(4, seed=1), host(16, seed=2)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 4 * PAGE, ram.hva)
    vm.set_memory_region(AS1 | 1, 0, 0x1000000, 16 * PAGE, smram.hva)
    vcpu, other = vm.create_vcpu(0), vm.create_vcpu(1)
    fault(vcpu.read, 0x1008000, 4)
    fault(vm.read, 0x1008000, 4)
    vcpu.smm = True
    assert vcpu.read(0x1008000, 16) == bytes(smram.view()[0x8000:0x8010])
    # no fall-through: AS0 RAM is not visible to an SMM vCPU unless registered in AS1
    e = fault(vcpu.read, 0x100, 4)
    assert e.gpa == 0x100
    # other vCPUs and the VM keep their own view
    fault(other.read, 0x1008000, 4)
    fault(vm.read, 0x1008000, 4)
    assert other.read(0x100, 4) == bytes(ram.view()[0x100:0x104])


def test_smm_writes_mark_the_address_space_1_bitmap(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(4, seed=1), host(4, seed=2)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(2, LOG, 0, 4 * PAGE, a.hva)
    vm.set_memory_region(AS1 | 2, LOG, 0, 4 * PAGE, b.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.smm = True
    vcpu.write(3 * PAGE, b"s")
    vcpu.smm = False
    vcpu.write(PAGE, b"n")
    assert dirty_pages(vm, AS1 | 2) == {3}
    assert dirty_pages(vm, 2) == {1}


def test_smm_needs_a_second_address_space(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm(address_spaces=1)
    vcpu = vm.create_vcpu(0)
    refused(errno.EINVAL, setattr, vcpu, "smm", True)


def test_vcpu_slot_cache_follows_a_move(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(4, seed=1), host(4, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0x10000, 4 * PAGE, a.hva)
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(0x10000, 8) == bytes(a.view()[:8])  # slot 0 now cached
    vm.set_memory_region(0, 0, 0x40000, 4 * PAGE, a.hva)  # MOVE
    fault(vcpu.read, 0x10000, 8)
    vm.set_memory_region(1, 0, 0x10000, 4 * PAGE, b.hva)
    assert vcpu.read(0x10000, 8) == bytes(b.view()[:8])
    assert vcpu.read(0x40000, 8) == bytes(a.view()[:8])


def test_vcpu_slot_cache_follows_a_delete(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a = host(4)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, a.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(PAGE, b"x")
    vm.set_memory_region(0, 0, 0, 0, 0)
    fault(vcpu.read, PAGE, 1)
    fault(vcpu.write, PAGE, b"y")


def test_vcpu_slot_cache_follows_a_transaction_resize(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a = host(8)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 8 * PAGE, a.hva)
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(6 * PAGE, 4) == bytes(a.view()[6 * PAGE:6 * PAGE + 4])
    with vm.transaction() as tx:
        tx.resize(0, 4 * PAGE)
    e = fault(vcpu.read, 6 * PAGE, 4)  # a stale cached slot would still cover page 6
    assert e.gpa == 6 * PAGE
    with vm.transaction() as tx:
        tx.set_readonly(0, True)
    fault(vcpu.write, 0, b"z")


def test_vcpu_slot_cache_is_per_address_space(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(2, seed=1), host(2, seed=2)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, 0, 0, 2 * PAGE, a.hva)
    vm.set_memory_region(AS1, 0, 0, 2 * PAGE, b.hva)
    vcpu = vm.create_vcpu(0)
    for _ in range(3):
        assert vcpu.read(0, 4) == bytes(a.view()[:4])
        vcpu.smm = True
        assert vcpu.read(0, 4) == bytes(b.view()[:4])
        vcpu.smm = False


# ------------------------------------------------------------------------------------------
# gpa / length edge cases


@pytest.fixture
def one_slot(host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> tuple[Vm, HostMemory]:
    mem = host(16)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, mem.size, mem.hva)
    return vm, mem


def test_zero_length_accesses_do_nothing_even_in_a_hole(
        one_slot: tuple[Vm, HostMemory]) -> None:
    vm, mem = one_slot
    before = bytes(mem.view())
    assert vm.read(5, 0) == b""
    assert vm.read(1 << 40, 0) == b""
    vm.write(1 << 40, b"")
    vm.clear(1 << 40, 0)
    vm.clear(5, 0)
    assert bytes(mem.view()) == before


@pytest.mark.parametrize("op", ["read", "clear"])
def test_negative_length_is_einval(one_slot: tuple[Vm, HostMemory], op: str) -> None:
    vm, _ = one_slot
    refused(errno.EINVAL, getattr(vm, op), 0, -1)


@pytest.mark.parametrize("gpa", [1 << 64, (1 << 64) + 4096, -1, -4096])
def test_gpa_outside_64_bits_is_einval(one_slot: tuple[Vm, HostMemory], gpa: int) -> None:
    vm, _ = one_slot
    refused(errno.EINVAL, vm.read, gpa, 1)
    refused(errno.EINVAL, vm.write, gpa, b"x")
    refused(errno.EINVAL, vm.clear, gpa, 1)
    refused(errno.EINVAL, vm.create_vcpu(0).read, gpa, 1)


@pytest.mark.parametrize("bad", [1.0, "0", None, True, b"\0"])
def test_non_int_gpa_or_length_is_type_error(one_slot: tuple[Vm, HostMemory],
                                              bad: object) -> None:
    vm, _ = one_slot
    with pytest.raises(TypeError):
        vm.read(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vm.read(0, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vm.write(bad, b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vm.clear(0, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", ["text", [1, 2], 7, None])
def test_write_of_non_bytes_is_type_error(one_slot: tuple[Vm, HostMemory],
                                          data: object) -> None:
    vm, mem = one_slot
    before = bytes(mem.view())
    with pytest.raises(TypeError):
        vm.write(0, data)  # type: ignore[arg-type]
    assert bytes(mem.view()) == before


def test_write_accepts_any_bytes_like(one_slot: tuple[Vm, HostMemory]) -> None:
    vm, _ = one_slot
    vm.write(0, bytearray(b"ab"))
    vm.write(2, memoryview(b"cd"))
    vm.write(4, memoryview(bytearray(b"..ef"))[2:])
    vm.write(6, memoryview(b"\x01\x00\x02\x00").cast("H"))
    assert vm.read(0, 10) == b"abcdef\x01\x00\x02\x00"


def test_access_crossing_2_pow_64(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(2)
    vm = make_vm(phys_bits=64)
    # KVM refuses a slot whose range ends exactly at 2^64 (gpa + size wraps to 0)
    e = refused_slot(vm, 0, LOG, (1 << 64) - 2 * PAGE, 2 * PAGE, mem.hva)
    assert e.errno == errno.EINVAL
    top = (1 << 64) - 3 * PAGE  # the highest slot possible: ends one page below 2^64
    vm.set_memory_region(0, LOG, top, 2 * PAGE, mem.hva)
    assert vm.read(top, 2 * PAGE) == bytes(mem.view())
    e = fault(vm.read, top + PAGE, 3 * PAGE)  # runs through the last page and past 2^64
    assert e.done == PAGE
    assert e.gpa == top + 2 * PAGE
    assert e.partial == bytes(mem.view()[PAGE:])
    e = fault(vm.write, top + 2 * PAGE - 3, b"abcdef")
    assert e.done == 3
    assert bytes(mem.view()[-3:]) == b"abc"
    e = fault(vm.write, (1 << 64) - 3, b"abcdef")  # wraps: nothing written anywhere
    assert e.done == 0 and e.gpa == (1 << 64) - 3


def refused_slot(vm: Vm, *args: int) -> KvmError:
    with pytest.raises(KvmError) as info:
        vm.set_memory_region(*args)
    return info.value


@pytest.mark.parametrize("n", [1 << 40, 1 << 50, (1 << 64) - 1])
def test_huge_read_faults_without_allocating_its_length(
        one_slot: tuple[Vm, HostMemory], n: int) -> None:
    vm, mem = one_slot
    e = fault(vm.read, PAGE, n)
    assert (e.gpa, e.done) == (mem.size, mem.size - PAGE)
    assert e.partial == bytes(mem.view()[PAGE:])


def test_read_running_into_a_hole_allocates_only_what_it_read(
        one_slot: tuple[Vm, HostMemory]) -> None:
    vm, mem = one_slot
    tracemalloc.start()
    try:
        fault(vm.read, 0, 256 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * mem.size, f"a read that stopped after {mem.size} bytes allocated {peak}"


def test_huge_clear_and_write_stop_at_the_slot_end(one_slot: tuple[Vm, HostMemory]) -> None:
    vm, mem = one_slot
    e = fault(vm.clear, 15 * PAGE, 1 << 60)
    assert (e.gpa, e.done) == (mem.size, PAGE)
    assert bytes(mem.view()[15 * PAGE:]) == bytes(PAGE)


# ------------------------------------------------------------------------------------------
# host memory that cannot be reached


@pytest.mark.parametrize("prot", [PROT_NONE, PROT_READ])
def test_protected_host_page_stops_writes_at_that_page(
        host: Callable[..., HostMemory], prot: int, make_vm: Callable[..., Vm]) -> None:
    mem = host(8)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0x20000, 8 * PAGE, mem.hva)
    before = bytes(mem.view())
    mem.protect(3 * PAGE, PAGE, prot)
    data = pattern(6 * PAGE)
    e = fault(vm.write, 0x20000 + PAGE + 10, data)
    assert (e.gpa, e.done) == (0x20000 + 3 * PAGE, 2 * PAGE - 10)
    e = fault(vm.clear, 0x20000 + 3 * PAGE + 1, 10)
    assert (e.gpa, e.done) == (0x20000 + 3 * PAGE + 1, 0)
    vm.write(0x20000 + 4 * PAGE, b"after")  # the next page is reachable again
    mem.protect(3 * PAGE, PAGE, PROT_RW)
    expect = bytearray(before)
    expect[PAGE + 10:3 * PAGE] = data[:2 * PAGE - 10]
    expect[4 * PAGE:4 * PAGE + 5] = b"after"
    assert bytes(mem.view()) == bytes(expect)
    assert dirty_pages(vm, 0) == {1, 2, 4}


def test_small_accesses_after_a_host_change_use_no_remembered_page(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    """The small-access paths remember page views (the slot set's memos); every host
    change empties them, so an 8-byte write after a protect faults like the general path
    instead of storing through the old view (which would kill the process)."""
    mem = host(4)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, mem.hva)
    vm.write(PAGE + 8, b"12345678")
    assert vm.read(PAGE + 8, 8) == b"12345678"
    slots = vm.memslots.active.value[0]
    assert slots.read_views and slots.write_views  # remembered
    mem.protect(PAGE, PAGE, PROT_READ)
    assert not slots.read_views and not slots.write_views  # the change emptied them
    assert vm.read(PAGE + 8, 8) == b"12345678"
    e = fault(vm.write, PAGE + 8, b"x")
    assert (e.gpa, e.done) == (PAGE + 8, 0)
    mem.protect(PAGE, PAGE, PROT_RW)
    vm.write(PAGE + 8, b"y")
    assert vm.read(PAGE + 8, 2) == b"y2"


def test_unreadable_host_page_stops_reads_at_that_page(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(8)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 8 * PAGE, mem.hva)
    before = bytes(mem.view())
    mem.protect(5 * PAGE, 2 * PAGE, PROT_NONE)
    e = fault(vm.read, PAGE + 100, 7 * PAGE - 100)
    assert (e.gpa, e.done) == (5 * PAGE, 4 * PAGE - 100)
    assert e.partial == before[PAGE + 100:5 * PAGE]
    e = fault(vm.read, 6 * PAGE, 1)  # short, single-slot read
    assert (e.gpa, e.done, e.partial) == (6 * PAGE, 0, b"")
    assert vm.read(7 * PAGE, PAGE) == before[7 * PAGE:]
    mem.protect(5 * PAGE, 2 * PAGE, PROT_READ)
    assert vm.read(0, mem.size) == before
    mem.protect(5 * PAGE, 2 * PAGE, PROT_RW)
    assert vm.read(0, mem.size) == before


def test_closed_host_memory_faults(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = HostMemory.anonymous(4 * PAGE)
    keep = host(1)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, mem.hva)
    vm.set_memory_region(1, LOG, 4 * PAGE, PAGE, keep.hva)
    vm.write(0, b"x")
    mem.close()
    e = fault(vm.read, 2 * PAGE, 2 * PAGE + 1)
    assert (e.gpa, e.done) == (2 * PAGE, 0)
    e = fault(vm.write, 3 * PAGE, b"y" * (PAGE + 1))
    assert (e.gpa, e.done) == (3 * PAGE, 0)
    fault(vm.clear, 0, 1)
    assert dirty_pages(vm, 1) == set()
    assert vm.read(4 * PAGE, 4) == bytes(keep.view()[:4])


def test_slot_over_never_mapped_hva_faults(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 4 * PAGE, UNMAPPED_HVA)
    for fn, args in ((vm.read, (PAGE, 8)), (vm.write, (PAGE, b"x")), (vm.clear, (0, PAGE))):
        e = fault(fn, *args)
        assert e.done == 0
        assert e.gpa == args[0]
    assert dirty_pages(vm, 0) == set()


_RACE = textwrap.dedent("""
    import sys, threading, time
    from kvmem import GuestAccessError, HostMemory, Vm
    from kvmem.host import PROT_NONE, PROT_READ, PROT_RW
    mode = sys.argv[1]
    mem = HostMemory.anonymous(4 * 4096)
    vm = Vm()
    vm.set_memory_region(0, 1, 0, mem.size, mem.hva)
    cache = vm.hva_cache(4096, 64)
    stop = False
    def reader():
        while not stop:
            for op in (lambda: vm.read(0, 8192), lambda: vm.write(0, b"w" * 8192),
                       lambda: vm.clear(4096, 100), lambda: cache.read(0, 64),
                       lambda: cache.write(0, b"c" * 64)):
                try:
                    op()
                except GuestAccessError:
                    pass
    t = threading.Thread(target=reader)
    t.start()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        if mode == "remap":
            mem.remap(0, 8192)
        elif mode == "discard":
            mem.discard(0, 8192)
        else:
            a, b = (int(x) for x in mode.split("-"))
            mem.protect(0, 8192, a)
            mem.protect(0, 8192, b)
    stop = True
    t.join()
    print("survived")
""")


@pytest.mark.parametrize("mode", [f"{PROT_NONE}-{PROT_READ}", f"{PROT_NONE}-{PROT_RW}",
                                  f"{PROT_READ}-{PROT_RW}", "remap", "discard"],
                         ids=["none-read", "none-rw", "read-rw", "remap", "discard"])
def test_accessors_racing_host_changes_never_crash(mode: str) -> None:
    """A host change while another thread copies must end in EFAULT or success, never in
    a SIGSEGV of the VMM (run in a child, so a crash is a failure, not an abort)."""
    src = os.path.dirname(os.path.dirname(kvmem.__file__))  # the kvmem under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _RACE, mode], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"child died with {proc.returncode}: {proc.stderr[-500:]}")


# ------------------------------------------------------------------------------------------
# model-based: random layouts and accesses against a bytearray model

HOST_PAGES = 12
GUEST_PAGES = 40


@st.composite
def slot_layouts(draw: st.DrawFn) -> list[tuple[int, int, int, int, int, int]]:
    """(as_id, id, base_gfn, npages, host_page, flags), non-overlapping per AS; adjacent
    slots and aliasing host pages happen."""
    out = []
    for as_id in (0, 1):
        gfn = draw(st.integers(0, 3))
        for sid in range(draw(st.integers(0 if as_id else 1, 4))):
            npages = draw(st.integers(1, 6))
            if gfn + npages > GUEST_PAGES:
                break
            host_page = draw(st.integers(0, HOST_PAGES - npages))
            flags = draw(st.sampled_from([0, LOG, LOG, RO, RO | LOG]))
            out.append((as_id, sid, gfn, npages, host_page, flags))
            gfn += npages + draw(st.sampled_from([0, 0, 1, 2, 5]))
    return out


_offsets = st.one_of(st.sampled_from([0, 1, PAGE - 1]), st.integers(0, PAGE - 1))
_lengths = st.one_of(st.integers(0, 3 * PAGE), st.sampled_from([0, 1, PAGE, 2 * PAGE]))


def _access_steps(top_page: int) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(st.sampled_from(["read", "write", "clear"]),
                     st.sampled_from(["vm", "vcpu", "vcpu-smm"]),
                     st.integers(0, top_page), _offsets, _lengths, st.integers(0, 1 << 30))


def _change_steps(keys: list[tuple[int, int]], top_page: int
                  ) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(st.sampled_from(["move", "delete"]), st.sampled_from(keys),
                     st.integers(0, top_page))


class _Model:
    def __init__(self, layout: list[tuple[int, int, int, int, int, int]], host: bytes) -> None:
        self.host = bytearray(host)
        # (as_id, id) -> [base_gfn, npages, host_page, flags]
        self.slots = {(a, i): [g, n, h, f] for a, i, g, n, h, f in layout}
        self.dirty: dict[tuple[int, int], set[int]] = {
            k: set() for k, v in self.slots.items() if v[3] & LOG}

    def find(self, as_id: int, gfn: int) -> tuple[tuple[int, int], list[int]] | None:
        for k, v in self.slots.items():
            if k[0] == as_id and v[0] <= gfn < v[0] + v[1]:
                return k, v
        return None

    def access(self, as_id: int, op: str, gpa: int, data: bytes) -> tuple[bytes, int | None]:
        """KVM's page-by-page walk. Returns (bytes read, failing gpa or None)."""
        write = op != "read"
        out = bytearray()
        done = 0
        while done < len(data):
            cur = gpa + done
            hit = self.find(as_id, cur >> 12)
            if hit is None or (write and hit[1][3] & RO):
                return bytes(out), cur
            key, (base, _n, hpage, flags) = hit
            seg = min(len(data) - done, PAGE - (cur & (PAGE - 1)))
            off = (hpage + (cur >> 12) - base) * PAGE + (cur & (PAGE - 1))
            if write:
                self.host[off:off + seg] = data[done:done + seg]
                if flags & LOG:
                    self.dirty[key].add((cur >> 12) - base)
            else:
                out += self.host[off:off + seg]
            done += seg
        return bytes(out), None


# make_vm is function-scoped on purpose: every example makes its own VM with it (and closes
# that VM's engine), so nothing is shared between examples
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_accessors_match_a_page_by_page_model(data: st.DataObject,
        make_vm: Callable[..., Vm]) -> None:
    layout = data.draw(slot_layouts(), label="layout")
    top_page = max((g + n for _a, _i, g, n, _h, _f in layout), default=0) + 1
    mem = HostMemory.anonymous(HOST_PAGES * PAGE)
    vm: Vm | None = None
    try:
        initial = random.Random(len(layout)).randbytes(mem.size)
        mem.view()[:] = initial
        vm = make_vm(address_spaces=2)
        vm.enable_manual_dirty_log_protect()  # GET does not clear: compare after every step
        vcpu = vm.create_vcpu(0)
        for a, i, g, n, h, f in layout:
            vm.set_memory_region((a << 16) | i, f, g * PAGE, n * PAGE, mem.hva + h * PAGE)
        model = _Model(layout, initial)
        for _ in range(data.draw(st.integers(1, 30), label="steps")):
            accesses = _access_steps(top_page)
            choice = (st.one_of(accesses, accesses, accesses,
                                _change_steps(sorted(model.slots), top_page))
                      if model.slots else accesses)
            step = data.draw(choice)
            if step[0] in ("move", "delete"):
                _apply_change(vm, model, step)
            else:
                _check_access(vm, vcpu, model, step)
            assert bytes(mem.view()) == bytes(model.host)
            for (a, i), pages in model.dirty.items():
                assert dirty_pages(vm, (a << 16) | i) == pages, f"slot {a}:{i}"
    finally:
        if vm is not None and vm.engine is not None:
            vm.engine.close()
        mem.close()


def _apply_change(vm: Vm, model: _Model, step: tuple[object, ...]) -> None:
    kind, key, new_gfn = step
    assert isinstance(key, tuple) and isinstance(new_gfn, int)
    as_id, sid = key
    slot = (as_id << 16) | sid
    _base, npages, _hpage, flags = model.slots[key]
    hva = vm.slot_set(as_id).by_id(sid).hva  # type: ignore[union-attr]
    if kind == "delete":
        vm.set_memory_region(slot, flags, 0, 0, 0)
        del model.slots[key]
        model.dirty.pop(key, None)
        return
    clash = any(k[0] == as_id and k != key and v[0] < new_gfn + npages and new_gfn < v[0] + v[1]
                for k, v in model.slots.items())
    if clash:
        refused(errno.EEXIST, vm.set_memory_region, slot, flags, new_gfn * PAGE,
                npages * PAGE, hva)
        return
    vm.set_memory_region(slot, flags, new_gfn * PAGE, npages * PAGE, hva)
    model.slots[key][0] = new_gfn  # the bitmap moves with the slot: relative bits unchanged


def _check_access(vm: Vm, vcpu: kvmem.Vcpu, model: _Model, step: tuple[object, ...]) -> None:
    op, who, page, off, n, seed = step
    assert isinstance(page, int) and isinstance(off, int) and isinstance(n, int)
    assert isinstance(seed, int)
    gpa = page * PAGE + off
    data = random.Random(seed).randbytes(n) if op == "write" else bytes(n)
    if who == "vm":
        target: Vm | kvmem.Vcpu = vm
        as_id = 0
    else:
        vcpu.smm = who == "vcpu-smm"
        target, as_id = vcpu, vcpu.as_id
    expect, bad = model.access(as_id, str(op), gpa, data)
    try:
        if op == "read":
            got = target.read(gpa, n)
        elif op == "write":
            target.write(gpa, data)
        else:
            target.clear(gpa, n)
    except GuestAccessError as e:
        assert bad is not None, f"{op} {gpa:#x}+{n:#x}: unexpected {e}"
        assert (e.errno, e.gpa, e.done) == (errno.EFAULT, bad, bad - gpa)
        if op == "read":
            assert e.partial == expect
        return
    assert bad is None, f"{op} {gpa:#x}+{n:#x} should fail at {bad:#x}"
    if op == "read":
        assert got == expect
