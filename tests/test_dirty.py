"""Dirty-log ioctls (kvm-semantics §7.1, §7.2, §1.4) as a live-migration loop uses them.

`get_dirty_log` returns the slot's bitmap (ALIGN(npages, 64)/8 bytes, little-endian bit i =
page i of the slot); without manual protect it also clears what it returned. With manual
protect GET only reads and `clear_dirty_log` clears, in whole 64-page words. The bitmap's
life follows the change kinds of §1.4, and a transaction carries unharvested bits over to
the slots that map the same gfn→hva pages, so a migration never misses a page.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterator

import pytest
from expect import refused

from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import HostMemory, Vm

PAGE = 4096
AS1 = 1 << 16
GiB = 1 << 30
UNMAPPED_HVA = 0x100_0000_0000


def bits(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


def mask(pages: set[int], npages: int) -> bytes:
    out = bytearray((npages + 63) // 64 * 8)
    for p in pages:
        out[p >> 3] |= 1 << (p & 7)
    return bytes(out)


def touch(vm: Vm, gpa: int, pages: set[int]) -> None:
    for p in pages:
        vm.write(gpa + p * PAGE + 17, b"\x01")


@pytest.fixture
def logged(host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> tuple[Vm, HostMemory]:
    return make_logged(host, make_vm)


def make_logged(host: Callable[..., HostMemory], make_vm: Callable[..., Vm],
                **vm_kwargs: int) -> tuple[Vm, HostMemory]:
    """A 128-page logging slot 0 at gpa 0x100000, and a non-logging slot 1 after it."""
    mem = host(160)
    vm = make_vm(**vm_kwargs)
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)
    vm.set_memory_region(1, 0, 0x180000, 32 * PAGE, mem.hva + 128 * PAGE)
    return vm, mem


# ------------------------------------------------------------------------------------------
# GET


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 70, 128, 1000])
def test_bitmap_is_align64_bytes(host: Callable[..., HostMemory], npages: int,
        make_vm: Callable[..., Vm]) -> None:
    mem = host(npages)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    out = vm.get_dirty_log(0)
    assert isinstance(out, bytes)
    assert len(out) == (npages + 63) // 64 * 8
    assert bits(out) == set()
    vm.write((npages - 1) * PAGE, b"x")
    assert bits(vm.get_dirty_log(0)) == {npages - 1}


def test_get_without_manual_protect_returns_then_clears(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {2, 5, 64, 127})
    assert bits(vm.get_dirty_log(0)) == {2, 5, 64, 127}
    assert bits(vm.get_dirty_log(0)) == set()
    touch(vm, 0x100000, {5})
    assert bits(vm.get_dirty_log(0)) == {5}


def test_get_with_manual_protect_does_not_clear(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {2, 5})
    assert bits(vm.get_dirty_log(0)) == {2, 5}
    assert bits(vm.get_dirty_log(0)) == {2, 5}
    vm.clear_dirty_log(0, 0, 128, mask({2}, 128))
    assert bits(vm.get_dirty_log(0)) == {5}
    vm.clear_dirty_log(0, 0, 128, mask({5, 6, 100}, 128))  # clearing clean bits is harmless
    assert bits(vm.get_dirty_log(0)) == set()


def test_manual_protect_can_be_turned_off(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {9})
    vm.disable_manual_dirty_log_protect()
    assert bits(vm.get_dirty_log(0)) == {9}
    assert bits(vm.get_dirty_log(0)) == set()


def test_get_refusals(host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    vm, _ = make_logged(host, make_vm, address_spaces=2)
    refused(errno.ENOENT, vm.get_dirty_log, 1)  # exists, not logging
    refused(errno.ENOENT, vm.get_dirty_log, 7)  # does not exist
    refused(errno.ENOENT, vm.get_dirty_log, AS1 | 0)  # exists in AS0 only
    refused(errno.EINVAL, vm.get_dirty_log, 32764)  # not a user slot id
    refused(errno.EINVAL, vm.get_dirty_log, 2 << 16)  # no third address space
    with pytest.raises(TypeError):
        vm.get_dirty_log("0")  # type: ignore[arg-type]


def test_get_refusals_follow_the_vm_limits(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(1)
    vm = make_vm(address_spaces=1, max_slots=8)
    vm.set_memory_region(7, LOG, 0, PAGE, mem.hva)
    assert bits(vm.get_dirty_log(7)) == set()
    refused(errno.EINVAL, vm.get_dirty_log, 8)
    refused(errno.EINVAL, vm.get_dirty_log, AS1 | 7)
    refused(errno.EINVAL, vm.clear_dirty_log, 8, 0, 0, b"")
    refused(errno.EINVAL, vm.clear_dirty_log, AS1 | 7, 0, 1, bytes(8))


def test_address_space_1_has_its_own_bitmaps(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(4), host(4)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(0, LOG, 0, 4 * PAGE, a.hva)
    vm.set_memory_region(AS1 | 0, LOG, 0, 4 * PAGE, b.hva)
    vcpu = vm.create_vcpu(0)
    vcpu.smm = True
    vcpu.write(PAGE, b"s")
    vm.write(2 * PAGE, b"n")
    assert bits(vm.get_dirty_log(AS1 | 0)) == {1}
    assert bits(vm.get_dirty_log(0)) == {2}


# ------------------------------------------------------------------------------------------
# CLEAR


def test_clear_works_without_manual_protect(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {1, 70})
    vm.clear_dirty_log(0, 64, 64, mask({70 - 64}, 64))
    assert bits(vm.get_dirty_log(0)) == {1}


def test_clear_only_touches_its_window(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {0, 63, 64, 127})
    vm.clear_dirty_log(0, 0, 64, b"\xff" * 16)  # mask bits past num_pages are ignored
    assert bits(vm.get_dirty_log(0)) == {64, 127}
    vm.clear_dirty_log(0, 64, 64, mask({127 - 64}, 64))
    assert bits(vm.get_dirty_log(0)) == {64}
    vm.clear_dirty_log(0, 0, 0, b"")  # nothing
    vm.clear_dirty_log(0, 128, 0, b"")  # first_page == npages: empty, allowed
    assert bits(vm.get_dirty_log(0)) == {64}


@pytest.mark.parametrize(("first", "num"), [
    (1, 64), (32, 32), (63, 1),  # first_page not a multiple of 64
    (0, 32), (0, 65), (64, 1),  # not whole words short of the end
    (0, 129), (64, 65), (128, 1),  # beyond the slot
    (192, 0), (1 << 40, 0),  # first_page > npages
])
def test_clear_window_rules_128_pages(logged: tuple[Vm, HostMemory], first: int,
                                      num: int) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {0, 64})
    vm.enable_manual_dirty_log_protect()
    refused(errno.EINVAL, vm.clear_dirty_log, 0, first, num, b"\xff" * 32)
    assert bits(vm.get_dirty_log(0)) == {0, 64}


def test_clear_window_rules_70_pages(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(70)
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    refused(errno.EINVAL, vm.clear_dirty_log, 0, 0, 69, b"\xff" * 16)  # not to the end
    refused(errno.EINVAL, vm.clear_dirty_log, 0, 64, 7, b"\xff" * 8)
    refused(errno.EINVAL, vm.clear_dirty_log, 0, 128, 0, b"")
    vm.clear_dirty_log(0, 64, 6, mask({0, 5}, 6))  # the tail word, reaching the end
    assert bits(vm.get_dirty_log(0)) == set(range(70)) - {64, 69}
    vm.clear_dirty_log(0, 0, 64, mask(set(range(0, 64, 2)), 64))
    assert bits(vm.get_dirty_log(0)) == set(range(1, 64, 2)) | {65, 66, 67, 68}
    vm.clear_dirty_log(0, 0, 70, b"\xff" * 16)
    assert bits(vm.get_dirty_log(0)) == set()


def test_clear_refusals_in_order(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    vm, _ = make_logged(host, make_vm, address_spaces=2)
    # slot id / address space first, then first_page alignment, then existence
    refused(errno.EINVAL, vm.clear_dirty_log, 32764, 1, 64, bytes(8))
    refused(errno.EINVAL, vm.clear_dirty_log, 2 << 16, 1, 64, bytes(8))
    refused(errno.EINVAL, vm.clear_dirty_log, 7, 1, 64, bytes(8))
    refused(errno.ENOENT, vm.clear_dirty_log, 7, 0, 64, bytes(8))
    refused(errno.ENOENT, vm.clear_dirty_log, 1, 0, 32, bytes(8))  # not logging, bad num
    refused(errno.ENOENT, vm.clear_dirty_log, AS1 | 0, 0, 64, bytes(8))
    with pytest.raises(TypeError):
        vm.clear_dirty_log(0, 0, 64, "bits")  # type: ignore[arg-type]
    refused(errno.EINVAL, vm.clear_dirty_log, 0, -64, 64, bytes(8))
    refused(errno.EINVAL, vm.clear_dirty_log, 0, 0, 1 << 32, bytes(8))


@pytest.mark.parametrize(("num", "size"), [(64, 7), (64, 0), (128, 8), (128, 15)])
def test_clear_with_short_bitmap_is_efault_and_clears_nothing(
        logged: tuple[Vm, HostMemory], num: int, size: int) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {0, 1, 100})
    refused(errno.EFAULT, vm.clear_dirty_log, 0, 0, num, b"\xff" * size)
    assert bits(vm.get_dirty_log(0)) == {0, 1, 100}


def test_clear_accepts_bytes_like(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {3, 4})
    vm.clear_dirty_log(0, 0, 64, bytearray(mask({3}, 64)))
    vm.clear_dirty_log(0, 0, 64, memoryview(mask({4}, 64)))
    assert bits(vm.get_dirty_log(0)) == set()


def test_manual_protect_capability_arguments(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    for good in (0, 1, 3):
        vm.enable_cap_manual_dirty_log_protect(good)
        assert vm.manual_dirty_log_protect == good
    for bad in (2, 4, 7, 1 << 63):
        refused(errno.EINVAL, vm.enable_cap_manual_dirty_log_protect, bad)
    refused(errno.EINVAL, vm.enable_cap_manual_dirty_log_protect, 1, 1)
    assert vm.manual_dirty_log_protect == 3


# ------------------------------------------------------------------------------------------
# INITIALLY_SET and the life of a bitmap (§1.4)


def test_initially_set_sets_exactly_the_slot_pages(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(70)
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    assert vm.get_dirty_log(0) == b"\xff" * 8 + b"\x3f" + bytes(7)
    vm.clear_dirty_log(0, 0, 70, b"\xff" * 16)
    assert bits(vm.get_dirty_log(0)) == set()


def test_initially_set_applies_to_new_bitmaps_only(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(16), host(16)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, a.size, a.hva)
    vm.enable_manual_dirty_log_protect(initially_set=True)
    assert bits(vm.get_dirty_log(0)) == set()
    vm.set_memory_region(1, 0, 0x100000, b.size, b.hva)
    refused(errno.ENOENT, vm.get_dirty_log, 1)
    vm.set_memory_region(1, LOG, 0x100000, b.size, b.hva)  # FLAGS_ONLY off -> on
    assert bits(vm.get_dirty_log(1)) == set(range(16))


def test_without_initially_set_new_bitmaps_are_empty(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(16)
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=False)
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    assert bits(vm.get_dirty_log(0)) == set()


def test_logging_on_off_on_with_initially_set(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(70)
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    vm.clear_dirty_log(0, 0, 70, b"\xff" * 16)
    vm.set_memory_region(0, 0, 0, mem.size, mem.hva)
    refused(errno.ENOENT, vm.get_dirty_log, 0)
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    assert bits(vm.get_dirty_log(0)) == set(range(70))


def test_logging_off_drops_unharvested_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {3})
    vm.set_memory_region(0, 0, 0x100000, 128 * PAGE, mem.hva)
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)
    assert bits(vm.get_dirty_log(0)) == set()


def test_bitmap_survives_move_with_slot_relative_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {3, 77})
    vm.set_memory_region(0, LOG, 0x400000, 128 * PAGE, mem.hva)  # MOVE, logging on -> on
    touch(vm, 0x400000, {5})
    assert bits(vm.get_dirty_log(0)) == {3, 5, 77}


def test_bitmap_survives_move_in_a_transaction(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {8})
    with vm.transaction() as tx:
        tx.set_memory_region(0, LOG, 0x400000, 128 * PAGE, mem.hva)
    assert bits(vm.get_dirty_log(0)) == {8}


def test_move_turning_logging_off_or_on(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {8})
    vm.set_memory_region(0, 0, 0x400000, 128 * PAGE, mem.hva)  # MOVE + logging off
    refused(errno.ENOENT, vm.get_dirty_log, 0)
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)  # MOVE + logging on
    assert bits(vm.get_dirty_log(0)) == set()


def test_identical_request_keeps_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {11})
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)  # no-op
    assert bits(vm.get_dirty_log(0)) == {11}


def test_delete_then_create_gives_an_empty_bitmap(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {1, 2, 3})
    vm.set_memory_region(0, 0, 0, 0, 0)
    refused(errno.ENOENT, vm.get_dirty_log, 0)
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)
    assert bits(vm.get_dirty_log(0)) == set()


def test_readonly_logging_slot_has_a_bitmap(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(64)
    vm = make_vm()
    vm.set_memory_region(0, RO | LOG, 0, mem.size, mem.hva)
    assert vm.get_dirty_log(0) == bytes(8)


# ------------------------------------------------------------------------------------------
# transactions carry unharvested bits to the same gfn->hva pages


def test_split_carries_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {2, 63, 64, 100})
    with vm.transaction() as tx:
        first, second = tx.split(0, [0x100000 + 64 * PAGE])
    assert bits(vm.get_dirty_log(first)) == {2, 63}
    assert bits(vm.get_dirty_log(second)) == {0, 36}


def test_split_at_unaligned_page_carries_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {0, 6, 7, 126, 127})
    with vm.transaction() as tx:
        pieces = tx.split(0, [0x100000 + 7 * PAGE, 0x100000 + 100 * PAGE])
    assert [bits(vm.get_dirty_log(p)) for p in pieces] == [{0, 6}, {0}, {26, 27}]
    assert [len(vm.get_dirty_log(p)) for p in pieces] == [8, 16, 8]


def test_merge_carries_bits(host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> None:
    mem = host(100)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 30 * PAGE, mem.hva)
    vm.set_memory_region(1, LOG, 30 * PAGE, 70 * PAGE, mem.hva + 30 * PAGE)
    touch(vm, 0, {0, 29, 30, 99})
    with vm.transaction() as tx:
        merged = tx.merge([0, 1])
    assert bits(vm.get_dirty_log(merged)) == {0, 29, 30, 99}


def test_resize_carries_bits_of_the_remaining_pages(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {1, 60, 90})
    with vm.transaction() as tx:
        tx.resize(0, 64 * PAGE)
    assert bits(vm.get_dirty_log(0)) == {1, 60}
    touch(vm, 0x100000, {2})
    with vm.transaction() as tx:
        tx.resize(0, 100 * PAGE)
    assert bits(vm.get_dirty_log(0)) == {2}


def test_set_readonly_carries_bits(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {4, 120})
    with vm.transaction() as tx:
        tx.set_readonly(0, True)
    assert bits(vm.get_dirty_log(0)) == {4, 120}


def test_carry_keeps_bits_under_manual_protect(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    vm.enable_manual_dirty_log_protect()
    touch(vm, 0x100000, {5, 70})
    with vm.transaction() as tx:
        first, second = tx.split(0, [0x100000 + 64 * PAGE])
    assert bits(vm.get_dirty_log(first)) == {5}
    assert bits(vm.get_dirty_log(second)) == {6}
    assert bits(vm.get_dirty_log(second)) == {6}


def test_harvested_bits_are_not_resurrected(logged: tuple[Vm, HostMemory]) -> None:
    vm, _ = logged
    touch(vm, 0x100000, {5, 70})
    vm.get_dirty_log(0)
    with vm.transaction() as tx:
        first, second = tx.split(0, [0x100000 + 64 * PAGE])
    assert bits(vm.get_dirty_log(first)) == set()
    assert bits(vm.get_dirty_log(second)) == set()


def test_no_carry_to_other_hva(logged: tuple[Vm, HostMemory],
                               host: Callable[..., HostMemory]) -> None:
    vm, _ = logged
    other = host(128)
    touch(vm, 0x100000, {5})
    with vm.transaction() as tx:  # same gpa, different host pages: not the same page
        tx.delete(0)
        tx.set_memory_region(0, LOG, 0x100000, 128 * PAGE, other.hva)
    assert bits(vm.get_dirty_log(0)) == set()


def test_no_carry_across_separate_updates(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {5})
    vm.set_memory_region(0, 0, 0, 0, 0)
    vm.set_memory_region(0, LOG, 0x100000, 128 * PAGE, mem.hva)
    assert bits(vm.get_dirty_log(0)) == set()


def test_no_carry_to_a_non_logging_piece(logged: tuple[Vm, HostMemory]) -> None:
    vm, mem = logged
    touch(vm, 0x100000, {5, 70})
    with vm.transaction() as tx:
        tx.delete(0)
        tx.set_memory_region(0, LOG, 0x100000, 64 * PAGE, mem.hva)
        tx.set_memory_region(2, 0, 0x100000 + 64 * PAGE, 64 * PAGE, mem.hva + 64 * PAGE)
    assert bits(vm.get_dirty_log(0)) == {5}
    refused(errno.ENOENT, vm.get_dirty_log, 2)


# ------------------------------------------------------------------------------------------
# big slots: bitmaps are bytes, operations are word-wide


@pytest.fixture(scope="module")
def big_mem() -> Iterator[HostMemory]:
    m = HostMemory.anonymous(4 * GiB)  # MAP_NORESERVE: untouched pages cost nothing
    yield m
    m.close()


def test_4gib_slot_bitmap_is_128kib(big_mem: HostMemory, make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 4 * GiB, big_mem.size, big_mem.hva)
    out = vm.get_dirty_log(0)
    assert isinstance(out, bytes)
    assert len(out) == 128 << 10
    pages = {0, 1, 4095, 123457, (1 << 20) - 1}
    touch(vm, 4 * GiB, pages)
    assert bits(vm.get_dirty_log(0)) == pages
    big_mem.discard(0, big_mem.size)


def test_4gib_slot_mark_get_clear_are_fast(big_mem: HostMemory, make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    t0 = time.perf_counter()
    vm.set_memory_region(0, LOG, 4 * GiB, big_mem.size, big_mem.hva)  # 2^20 bits set
    full = vm.get_dirty_log(0)
    vm.clear_dirty_log(0, 0, 1 << 20, full)
    empty = vm.get_dirty_log(0)
    vm.clear(4 * GiB + 8 * PAGE, 4096 * PAGE)  # 16 MiB: 4096 pages marked
    marked = vm.get_dirty_log(0)
    vm.disable_manual_dirty_log_protect()
    harvested = vm.get_dirty_log(0)
    again = vm.get_dirty_log(0)
    elapsed = time.perf_counter() - t0
    assert full == b"\xff" * (128 << 10)
    assert empty == bytes(128 << 10)
    assert marked == harvested
    assert marked == bytes(1) + b"\xff" * 512 + bytes((128 << 10) - 513)
    assert again == empty
    assert elapsed < 0.5, f"4 GiB slot dirty-log round took {elapsed:.2f}s"
    big_mem.discard(0, big_mem.size)


def test_4gib_slot_over_an_unmapped_hva(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, 4 * GiB, UNMAPPED_HVA)
    assert vm.get_dirty_log(0) == b"\xff" * (128 << 10)


def test_4gib_split_carries_bits_quickly(make_vm: Callable[..., Vm]) -> None:
    """Carrying the bits of a fully dirty 4 GiB slot over a split must be word-wide work
    (like GET), not a Python loop over a million pages."""
    vm = make_vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 4 * GiB, 4 * GiB, UNMAPPED_HVA)
    vm.disable_manual_dirty_log_protect()  # new pieces start empty...
    t0 = time.perf_counter()
    with vm.transaction() as tx:
        first, second = tx.split(0, [6 * GiB + 64 * PAGE])
    elapsed = time.perf_counter() - t0
    # ...so every set bit below came from the carry
    assert vm.get_dirty_log(first) == b"\xff" * (2 * GiB // PAGE // 8 + 8)
    assert vm.get_dirty_log(second) == b"\xff" * (2 * GiB // PAGE // 8 - 8)
    assert elapsed < 0.25, f"split of a 4 GiB dirty slot took {elapsed:.2f}s"


@pytest.mark.parametrize("seed", range(3))
def test_random_marks_round_trip(host: Callable[..., HostMemory], seed: int,
        make_vm: Callable[..., Vm]) -> None:
    rng = random.Random(seed)
    npages = rng.randrange(1, 300)
    mem = host(npages)
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, mem.size, mem.hva)
    vm.enable_manual_dirty_log_protect()
    pages = {rng.randrange(npages) for _ in range(rng.randrange(1, 40))}
    touch(vm, 0, pages)
    assert bits(vm.get_dirty_log(0)) == pages
    keep = {p for p in pages if rng.random() < 0.5}
    vm.clear_dirty_log(0, 0, npages, mask(pages - keep, npages))
    assert bits(vm.get_dirty_log(0)) == keep


# ------------------------------------------------------------------------------------------
# a running guest's writes: on an engine the guest's own stores (the walker), on kvmem alone
# the same stores through vcpu.guest_write; the log must not tell the two apart

GuestWrites = Callable[[Vm, int, int], list[tuple[int, bytes]]]


def test_guest_writes_are_logged_and_harvested(host: Callable[..., HostMemory],
                                               make_vm: Callable[..., Vm],
                                               guest_writes: GuestWrites) -> None:
    code, data = host(16), host(64)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, code.size, code.hva)  # the guest's code: not logged
    vm.set_memory_region(1, LOG, 0x100000, data.size, data.hva)
    stores = guest_writes(vm, 0x100000 + 3 * PAGE, 8)
    assert [vm.read(gpa, len(d)) for gpa, d in stores] == [d for _gpa, d in stores]
    assert bits(vm.get_dirty_log(1)) == set(range(3, 11))
    assert bits(vm.get_dirty_log(1)) == set()  # GET took the bits and write-protected again
    guest_writes(vm, 0x100000 + 5 * PAGE, 2)  # so a new write to a harvested page is logged
    assert bits(vm.get_dirty_log(1)) == {5, 6}


def test_guest_writes_with_manual_protect_stay_until_cleared(
        host: Callable[..., HostMemory], make_vm: Callable[..., Vm],
        guest_writes: GuestWrites) -> None:
    code, data = host(16), host(64)
    vm = make_vm()
    vm.enable_manual_dirty_log_protect()
    vm.set_memory_region(0, 0, 0, code.size, code.hva)
    vm.set_memory_region(1, LOG, 0x100000, data.size, data.hva)
    guest_writes(vm, 0x100000, 4)
    assert bits(vm.get_dirty_log(1)) == {0, 1, 2, 3}
    assert bits(vm.get_dirty_log(1)) == {0, 1, 2, 3}  # GET leaves them
    vm.clear_dirty_log(1, 0, 64, mask({1, 2}, 64))
    assert bits(vm.get_dirty_log(1)) == {0, 3}
    guest_writes(vm, 0x100000 + PAGE, 1)  # CLEAR write-protected page 1 again
    assert bits(vm.get_dirty_log(1)) == {0, 1, 3}
