"""`vm.hva_cache` — KVM's gfn_to_hva_cache (kvm-semantics §3.1).

What a user of the cache relies on: init refuses an empty range (EINVAL) and a range that is
not writable guest memory everywhere (EFAULT); reads/writes inside the cached range work
whether it spans one page or several slots; an access beyond the cached length is EINVAL;
a slot change (generation bump) is noticed at the next access, which re-resolves the stored
gpa — failing with EFAULT if nothing is there any more, following the new mapping if
something is; writes are dirty-logged. The cache always works on address space 0.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator

import pytest
from expect import refused

from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import GuestAccessError, HostMemory, Vm
from kvmem.host import PROT_NONE, PROT_READ, PROT_RW

PAGE = 4096
AS1 = 1 << 16


@pytest.fixture
def host() -> Iterator[Callable[[int], HostMemory]]:
    made: list[HostMemory] = []

    def make(npages: int, seed: int = 0) -> HostMemory:
        m = HostMemory.anonymous(npages * PAGE)
        m.view()[:] = random.Random(seed).randbytes(m.size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def dirty_pages(vm: Vm, slot: int) -> set[int]:
    bitmap = vm.get_dirty_log(slot)
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


@pytest.fixture
def vm_mem(host: Callable[..., HostMemory], make_vm: Callable[..., Vm]) -> tuple[Vm, HostMemory]:
    return make_vm_mem(host, make_vm)


def make_vm_mem(host: Callable[..., HostMemory], make_vm: Callable[..., Vm],
                **vm_kwargs: int) -> tuple[Vm, HostMemory]:
    mem = host(8)
    vm = make_vm(**vm_kwargs)
    vm.set_memory_region(0, LOG, 0x10000, 8 * PAGE, mem.hva)
    return vm, mem


# ------------------------------------------------------------------------------------------
# init


def test_empty_range_at_aligned_gpa_is_einval(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, _ = vm_mem
    e = refused(errno.EINVAL, vm.hva_cache, 0x11000, 0)
    assert not isinstance(e, GuestAccessError)


def test_empty_range_at_unaligned_gpa_is_one_page(vm_mem: tuple[Vm, HostMemory]) -> None:
    # KVM's arithmetic: end_gfn = (gpa + len - 1) >> 12 == start_gfn, so the page is checked
    vm, _ = vm_mem
    cache = vm.hva_cache(0x11001, 0)
    assert cache.read(0, 0) == b""
    refused(errno.EFAULT, vm.hva_cache, 0x40001, 0)


def test_bad_arguments(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, _ = vm_mem
    refused(errno.EINVAL, vm.hva_cache, 0x10000, -1)
    refused(errno.EINVAL, vm.hva_cache, 1 << 64, 8)
    with pytest.raises(TypeError):
        vm.hva_cache(65536.0, 8)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vm.hva_cache(0x10000, "8")  # type: ignore[arg-type]


@pytest.mark.parametrize(("gpa", "length", "bad_gpa"), [
    (0x40000, 8, 0x40000),  # entirely in a hole
    (0x17ff8, 16, 0x18000),  # runs off the end of the slot
    (0xfff8, 16, 0xf000),  # starts in the hole before it
])
def test_init_over_a_hole_is_efault(vm_mem: tuple[Vm, HostMemory], gpa: int, length: int,
                                    bad_gpa: int) -> None:
    vm, _ = vm_mem
    e = refused(errno.EFAULT, vm.hva_cache, gpa, length)
    if isinstance(e, GuestAccessError):
        assert e.gpa & ~(PAGE - 1) == bad_gpa


def test_init_over_a_readonly_slot_is_efault(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(2), host(2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, a.hva)
    vm.set_memory_region(1, RO, 2 * PAGE, 2 * PAGE, b.hva)
    refused(errno.EFAULT, vm.hva_cache, 2 * PAGE + 8, 8)
    refused(errno.EFAULT, vm.hva_cache, 2 * PAGE - 8, 16)  # writable, then read-only
    vm.hva_cache(2 * PAGE - 8, 8)  # the writable part alone is fine


def test_cache_uses_address_space_0_only(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    smram = host(4)
    vm = make_vm(address_spaces=2)
    vm.set_memory_region(AS1 | 0, 0, 0x30000, 4 * PAGE, smram.hva)
    refused(errno.EFAULT, vm.hva_cache, 0x30000, 8)


def test_generation_recorded_at_init(vm_mem: tuple[Vm, HostMemory],
                                     host: Callable[..., HostMemory]) -> None:
    vm, _ = vm_mem
    cache = vm.hva_cache(0x10000, 8)
    assert cache.generation == vm.generation(0)
    vm.set_memory_region(1, 0, 0x80000, PAGE, host(1).hva)
    assert vm.generation(0) != cache.generation
    cache.read(0, 8)  # re-initialised
    assert cache.generation == vm.generation(0)


# ------------------------------------------------------------------------------------------
# access


def test_single_page_read_write(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, mem = vm_mem
    cache = vm.hva_cache(0x12010, 64)
    view = mem.view()
    assert cache.read(0, 64) == bytes(view[2 * PAGE + 0x10:2 * PAGE + 0x50])
    cache.write(8, b"cached!")
    assert bytes(view[2 * PAGE + 0x18:2 * PAGE + 0x1f]) == b"cached!"
    assert vm.read(0x12018, 7) == b"cached!"
    view[2 * PAGE + 0x4f] = 0x5A  # host writes are seen (same memory, no copy)
    assert cache.read(63, 1) == b"\x5a"
    assert cache.read(64, 0) == b""


def test_cross_page_cache_spanning_two_slots(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(2, seed=1), host(2, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0x10000, 2 * PAGE, a.hva)
    vm.set_memory_region(1, 0, 0x12000, 2 * PAGE, b.hva)
    cache = vm.hva_cache(0x11ff0, 0x20)
    assert cache.read(0, 0x20) == bytes(a.view()[-16:]) + bytes(b.view()[:16])
    cache.write(0, bytes(range(0x20)))
    assert bytes(a.view()[-16:]) == bytes(range(16))
    assert bytes(b.view()[:16]) == bytes(range(16, 32))
    assert cache.read(12, 8) == bytes(range(12, 20))
    assert vm.read(0x11ff0, 0x20) == bytes(range(0x20))


BYTES_LIKE = [
    bytearray(b"ab"),
    memoryview(b"cd"),
    memoryview(bytearray(b"ef")),
    memoryview(b"\x01\x00\x02\x00").cast("H"),
    memoryview(b"wxyz")[::2],
]


@pytest.mark.parametrize("gpa", [0x10000, 0x10ffe], ids=["one-page", "cross-page"])
@pytest.mark.parametrize("data", BYTES_LIKE, ids=["bytearray", "ro-view", "rw-view", "u16-view",
                                                  "strided-view"])
def test_cached_write_takes_what_vm_write_takes(vm_mem: tuple[Vm, HostMemory], gpa: int,
                                                data: bytes | bytearray | memoryview) -> None:
    vm, _ = vm_mem
    expect = memoryview(data).tobytes()
    cache = vm.hva_cache(gpa, 16)
    cache.write(0, data)
    assert cache.read(0, len(expect)) == expect
    vm.write(gpa + 8, data)
    assert vm.read(gpa + 8, len(expect)) == expect


@pytest.mark.parametrize(("offset", "n"), [(0, 65), (60, 5), (64, 1), (-1, 1), (0, -1)])
def test_access_beyond_the_cached_range_is_einval(vm_mem: tuple[Vm, HostMemory], offset: int,
                                                  n: int) -> None:
    vm, mem = vm_mem
    before = bytes(mem.view())
    cache = vm.hva_cache(0x11000, 64)
    refused(errno.EINVAL, cache.read, offset, n)
    if n >= 0:
        refused(errno.EINVAL, cache.write, offset, b"w" * n)
    assert bytes(mem.view()) == before
    assert dirty_pages(vm, 0) == set()


def test_cross_page_access_beyond_the_cached_range_is_einval(
        vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, _ = vm_mem
    cache = vm.hva_cache(0x10ff0, 0x20)
    refused(errno.EINVAL, cache.read, 0x10, 0x11)
    refused(errno.EINVAL, cache.write, 0x1f, b"ab")


# ------------------------------------------------------------------------------------------
# slot changes: the next access re-resolves


def test_move_away_then_access_is_efault(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, _ = vm_mem
    cache = vm.hva_cache(0x11000, 16)
    vm.set_memory_region(0, LOG, 0x80000, 8 * PAGE, vm_mem[1].hva)  # MOVE
    with pytest.raises(GuestAccessError) as info:
        cache.read(0, 16)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(GuestAccessError):
        cache.write(0, b"x")
    assert vm.read(0x81000, 16) == bytes(vm_mem[1].view()[PAGE:PAGE + 16])


def test_delete_then_access_is_efault_and_recreate_is_followed(
        vm_mem: tuple[Vm, HostMemory], host: Callable[..., HostMemory]) -> None:
    vm, _ = vm_mem
    cache = vm.hva_cache(0x11000, 16)
    vm.set_memory_region(0, 0, 0, 0, 0)
    with pytest.raises(GuestAccessError) as info:
        cache.write(0, b"lost")
    assert info.value.errno == errno.EFAULT
    other = host(8, seed=9)
    vm.set_memory_region(5, 0, 0x10000, 8 * PAGE, other.hva)
    assert cache.read(0, 16) == bytes(other.view()[PAGE:PAGE + 16])
    cache.write(0, b"found")
    assert bytes(other.view()[PAGE:PAGE + 5]) == b"found"


def test_slot_moved_and_another_put_in_its_place(vm_mem: tuple[Vm, HostMemory],
                                                 host: Callable[..., HostMemory]) -> None:
    vm, mem = vm_mem
    cache = vm.hva_cache(0x10000, 8)
    assert cache.read(0, 8) == bytes(mem.view()[:8])
    other = host(1, seed=7)
    with vm.transaction() as tx:  # no INVALID window, one generation step
        tx.set_memory_region(0, LOG, 0x80000, 8 * PAGE, mem.hva)
        tx.set_memory_region(1, 0, 0x10000, PAGE, other.hva)
    assert cache.read(0, 8) == bytes(other.view()[:8])
    cache.write(0, b"newslot!")
    assert bytes(other.view()[:8]) == b"newslot!"
    assert bytes(mem.view()[:8]) != b"newslot!"


def test_slot_made_readonly_refuses_cached_writes(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, mem = vm_mem
    cache = vm.hva_cache(0x10000, 8)
    with vm.transaction() as tx:
        tx.set_readonly(0, True)
    before = bytes(mem.view())
    with pytest.raises(GuestAccessError):
        cache.write(0, b"no")
    assert bytes(mem.view()) == before


def test_cross_page_cache_follows_slot_changes(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    a, b = host(2, seed=1), host(2, seed=2)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 2 * PAGE, a.hva)
    cache = vm.hva_cache(PAGE - 4, 8)
    vm.set_memory_region(0, 0, 0, 0, 0)
    with pytest.raises(GuestAccessError):
        cache.read(0, 8)
    vm.set_memory_region(0, 0, 0, 2 * PAGE, b.hva)
    assert cache.read(0, 8) == bytes(b.view()[PAGE - 4:PAGE + 4])


def test_changes_in_address_space_1_do_not_disturb(host: Callable[..., HostMemory],
                                                   make_vm: Callable[..., Vm]) -> None:
    vm, mem = make_vm_mem(host, make_vm, address_spaces=2)
    cache = vm.hva_cache(0x10000, 8)
    vm.set_memory_region(AS1 | 0, 0, 0x10000, PAGE, host(1).hva)
    assert cache.generation == vm.generation(0)
    assert cache.read(0, 8) == bytes(mem.view()[:8])


# ------------------------------------------------------------------------------------------
# dirty logging and host memory


def test_cached_writes_are_dirty_logged(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, _ = vm_mem
    vm.hva_cache(0x13000, 16).write(4, b"abc")  # single page: page 3 of the slot
    vm.hva_cache(0x15ffc, 8).write(0, b"12345678")  # cross-page: pages 5 and 6
    vm.hva_cache(0x17000, 16).read(0, 16)  # reads mark nothing
    assert dirty_pages(vm, 0) == {3, 5, 6}


def test_logging_turned_on_after_init_is_honoured(host: Callable[..., HostMemory],
        make_vm: Callable[..., Vm]) -> None:
    mem = host(4)
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 4 * PAGE, mem.hva)
    cache = vm.hva_cache(2 * PAGE, 8)
    vm.set_memory_region(0, LOG, 0, 4 * PAGE, mem.hva)  # FLAGS_ONLY
    cache.write(0, b"x")
    assert dirty_pages(vm, 0) == {2}
    vm.set_memory_region(0, LOG, 0x100000, 4 * PAGE, mem.hva)  # MOVE: the gpa is gone
    with pytest.raises(GuestAccessError):
        cache.write(0, b"y")
    assert dirty_pages(vm, 0) == set()


def test_protected_host_memory_faults_without_crashing(vm_mem: tuple[Vm, HostMemory]) -> None:
    vm, mem = vm_mem
    cache = vm.hva_cache(0x12000, 16)
    mem.protect(2 * PAGE, PAGE, PROT_READ)
    assert cache.read(0, 16) == bytes(mem.view()[2 * PAGE:2 * PAGE + 16])
    with pytest.raises(GuestAccessError) as info:
        cache.write(0, b"ro")
    assert info.value.errno == errno.EFAULT
    mem.protect(2 * PAGE, PAGE, PROT_NONE)
    with pytest.raises(GuestAccessError):
        cache.read(0, 16)
    mem.protect(2 * PAGE, PAGE, PROT_RW)
    cache.write(0, b"rw")
    assert dirty_pages(vm, 0) == {2}


def test_host_remap_is_seen_without_reinit(vm_mem: tuple[Vm, HostMemory]) -> None:
    """Only slot changes re-resolve a cache; a host remap keeps the hva, which now reads
    the fresh (zero) anonymous pages."""
    vm, mem = vm_mem
    cache = vm.hva_cache(0x10000, 16)
    gen = cache.generation
    mem.remap(0, PAGE)
    assert cache.read(0, 16) == bytes(16)
    assert cache.generation == gen
