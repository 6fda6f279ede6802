"""`kvmem.kvmapi` against the real kernel: ioctl numbers, capabilities, and the errno facts of
kvm-semantics.md §12 (memslot validation, dirty log, dirty ring, guest_memfd, vCPU basics).

Every refusal is checked by its exact errno, so a wrapper that packed a field wrongly (and got
a different refusal, or none) fails here. Host-specific values (32764 slots, no SMM) are only
asserted where the capability read back says the host has them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
from collections.abc import Callable, Iterator

import pytest

from kvmem import kvmapi
from kvmem.kvmapi import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_EXIT_HLT,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Kvm,
    KvmCaps,
    KvmVm,
    dirty_bitmap_bytes,
    kvm_available,
)

_REASON = kvm_available()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

pytestmark = pytest.mark.kvm

PAGE = 4096
GiB = 1 << 30
KERNEL_HVA = 0xFFFF_8000_0000_0000
KVM_CAP_VM_TYPES = 235

Alloc = Callable[[int], int]


def expect_errno(err: int, call: Callable[..., object], *args: object, **kwargs: object) -> None:
    with pytest.raises(OSError) as info:
        call(*args, **kwargs)
    assert info.value.errno == err, (
        f"expected {errno.errorcode[err]}, got {errno.errorcode.get(info.value.errno or 0)}: "
        f"{info.value}"
    )


def set_bits(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def caps(kvm: Kvm) -> KvmCaps:
    return kvm.caps()


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[KvmVm]:
    with kvm.create_vm() as v:
        yield v


@pytest.fixture
def alloc() -> Iterator[Alloc]:
    """Anonymous host memory: `alloc(npages)` returns the hva of a fresh zeroed mapping that
    stays mapped until the test ends."""
    maps: list[mmap.mmap] = []

    def _alloc(npages: int) -> int:
        m = mmap.mmap(-1, npages * PAGE)
        maps.append(m)
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    yield _alloc
    for m in maps:
        m.close()


# ---------------------------------------------------------------------------------------------
# numbers


def test_ioctl_numbers_match_the_c_headers() -> None:
    # printed by a C program compiled against linux/kvm.h (6.1 headers; the two newer ioctls
    # with _IOW/_IOWR over 160- and 64-byte structs as in the upstream uapi)
    expected = {
        "KVM_GET_API_VERSION": 0xAE00,
        "KVM_CREATE_VM": 0xAE01,
        "KVM_CHECK_EXTENSION": 0xAE03,
        "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
        "KVM_CREATE_VCPU": 0xAE41,
        "KVM_GET_DIRTY_LOG": 0x4010AE42,
        "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
        "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
        "KVM_ENABLE_CAP": 0x4068AEA3,
        "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
        "KVM_RESET_DIRTY_RINGS": 0xAEC7,
        "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
        "KVM_RUN": 0xAE80,
        "KVM_GET_REGS": 0x8090AE81,
        "KVM_SET_REGS": 0x4090AE82,
        "KVM_GET_SREGS": 0x8138AE83,
        "KVM_SET_SREGS": 0x4138AE84,
    }
    actual = {name: getattr(kvmapi, name) for name in expected}
    assert {k: hex(v) for k, v in actual.items()} == {k: hex(v) for k, v in expected.items()}


def test_dirty_bitmap_bytes_rounds_to_whole_words() -> None:
    assert [dirty_bitmap_bytes(n) for n in (0, 1, 64, 65, 70, 128)] == [0, 8, 8, 16, 16, 16]


# ---------------------------------------------------------------------------------------------
# /dev/kvm and capabilities


def test_available_and_api_version(kvm: Kvm) -> None:
    assert kvm_available() is None
    assert kvm.api_version() == 12
    size = kvm.vcpu_mmap_size()
    assert size >= PAGE and size % PAGE == 0


def test_unavailable_path_gives_a_reason() -> None:
    reason = kvm_available("/nonexistent/kvm")
    assert reason is not None and "/nonexistent/kvm" in reason and "No such file" in reason


def test_caps_are_consistent(kvm: Kvm, caps: KvmCaps) -> None:
    assert caps.nr_memslots > 0
    assert caps.address_spaces == (2 if caps.smm else 1)
    assert caps.manual_dirty_log_protect in (0, 3)
    max_bytes = caps.dirty_ring_max_bytes
    assert max_bytes == 0 or (max_bytes & (max_bytes - 1) == 0 and max_bytes >= PAGE)
    # the system fd agrees with the VM fd on VM-independent caps
    assert caps.manual_dirty_log_protect == kvm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)


def test_nr_memslots_is_the_first_refused_id(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    hva = alloc(1)
    last = caps.nr_memslots - 1
    vm.set_user_memory_region(last, 0, 0, PAGE, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, last + 1, 0, PAGE, PAGE, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0xFFFF, 0, PAGE, PAGE, hva)


def test_unsupported_vm_types_are_refused(kvm: Kvm) -> None:
    types = kvm.check_extension(KVM_CAP_VM_TYPES)
    refused = [t for t in (1, 2, 3) if not types >> t & 1]
    for t in refused:
        expect_errno(errno.EINVAL, kvm.create_vm, t)


# ---------------------------------------------------------------------------------------------
# KVM_SET_USER_MEMORY_REGION(2): validation (kvm-semantics.md §1.3, §12)


def test_misaligned_or_out_of_range_requests_are_einval(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(4)
    for slot, gpa, size, addr in [
        (0, 0, PAGE + 1, hva),  # size not page aligned
        (0, 0x800, PAGE, hva),  # gpa not page aligned
        (0, 0, PAGE, hva + 1),  # hva not page aligned
        (0, 0, PAGE, KERNEL_HVA),  # hva in the kernel half
        (0, 0, 1 << 47, hva),  # hva + size beyond user VA
        (0, (1 << 64) - PAGE, 2 * PAGE, hva),  # gpa + size wraps
        (0, 4 * GiB, (1 << 31) * PAGE, hva),  # 2^31 pages
    ]:
        expect_errno(errno.EINVAL, vm.set_user_memory_region, slot, 0, gpa, size, addr)


def test_flags_outside_v1_are_einval(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(1)
    for flags in (KVM_MEM_GUEST_MEMFD, 1 << 3, 1 << 16):
        expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, flags, 0, PAGE, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region2, 0, 1 << 3, 0, PAGE, hva)


def test_unmapped_user_hva_is_accepted(vm: KvmVm) -> None:
    m = mmap.mmap(-1, PAGE)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m.close()
    vm.set_user_memory_region(0, 0, 0, PAGE, hva)


def test_delete(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(1)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 0, hva)
    vm.set_user_memory_region(0, 0, 0, PAGE, hva)
    # the request's gpa/hva are still validated for a delete...
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0x800, 0, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 0, KERNEL_HVA)
    # ...but its flags are not compared with the slot's
    vm.set_user_memory_region(0, KVM_MEM_READONLY, 0, 0, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 0, hva)


def test_overlap_is_eexist_adjacent_and_alias_are_fine(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(4)
    vm.set_user_memory_region(0, 0, 4 * PAGE, 2 * PAGE, hva)
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 1, 0, 4 * PAGE, PAGE, hva)
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 1, 0, 3 * PAGE, 2 * PAGE, hva)
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 1, 0, 5 * PAGE, 2 * PAGE, hva)
    vm.set_user_memory_region(1, 0, 6 * PAGE, PAGE, hva + 2 * PAGE)  # adjacent above
    vm.set_user_memory_region(2, 0, 3 * PAGE, PAGE, hva)  # adjacent below, aliases slot 0's hva


def test_existing_slot_changes(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    hva = alloc(4)
    vm.set_user_memory_region(0, 0, 0, 2 * PAGE, hva)
    vm.set_user_memory_region(1, 0, 16 * PAGE, PAGE, hva)
    vm.set_user_memory_region(0, 0, 0, 2 * PAGE, hva)  # identical: no-op
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 3 * PAGE, hva)  # resize
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 2 * PAGE, hva + PAGE)
    if caps.readonly_mem:
        expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, KVM_MEM_READONLY, 0, 2 * PAGE, hva)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * PAGE, hva)  # logging on
    vm.set_user_memory_region(0, 0, 0, 2 * PAGE, hva)  # logging off
    expect_errno(errno.EEXIST, vm.set_user_memory_region, 0, 0, 15 * PAGE, 2 * PAGE, hva)
    vm.set_user_memory_region(0, 0, PAGE, 2 * PAGE, hva)  # move over its own old range
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 64 * PAGE, 2 * PAGE, hva)  # move+log


def test_readonly_cannot_be_turned_off(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    if not caps.readonly_mem:
        pytest.skip("no KVM_CAP_READONLY_MEM")
    hva = alloc(1)
    vm.set_user_memory_region(0, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, PAGE, hva)
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE, hva)


def test_address_space_beyond_the_vm_is_einval(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    hva = alloc(1)
    as_id = caps.address_spaces
    expect_errno(errno.EINVAL, vm.set_user_memory_region, as_id << 16, 0, 0, PAGE, hva)
    vm.set_user_memory_region((as_id - 1) << 16, 0, 0, PAGE, hva)


def test_only_the_creating_process_may_change_slots(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(1)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            vm.set_user_memory_region(0, 0, 0, PAGE, hva)
        except OSError as e:
            code = e.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == errno.EIO
    vm.set_user_memory_region(0, 0, 0, PAGE, hva)


def test_v2_ignores_guest_memfd_fields_without_the_flag(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(1)
    vm.set_user_memory_region2(0, 0, 0, PAGE, hva, guest_memfd_offset=123, guest_memfd=999)
    vm.set_user_memory_region(0, 0, 0, 0, hva)  # V1 deletes what V2 made


def test_values_that_do_not_fit_are_refused_before_the_kernel(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(1)
    for kwargs in [
        {"slot": 1 << 32},  # would truncate to slot 0
        {"slot": -1},
        {"flags": 1 << 32},
        {"gpa": 1 << 64},
        {"size": -PAGE},
        {"hva": hva + (1 << 64)},
    ]:
        args = {"slot": 0, "flags": 0, "gpa": 0, "size": PAGE, "hva": hva, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            vm.set_user_memory_region(**args)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            vm.set_user_memory_region2(**args)
    with pytest.raises(ValueError, match="guest_memfd"):
        vm.set_user_memory_region2(0, 0, 0, PAGE, hva, guest_memfd=1 << 32)
    # nothing reached the kernel: slot 0 still does not exist
    expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 0, hva)


# ---------------------------------------------------------------------------------------------
# guest_memfd


def test_guest_memfd(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    if not (caps.guest_memfd and caps.user_memory2):
        pytest.skip("no KVM_CAP_GUEST_MEMFD / KVM_CAP_USER_MEMORY2")
    hva = alloc(4)
    expect_errno(errno.EINVAL, vm.create_guest_memfd, 0)
    expect_errno(errno.EINVAL, vm.create_guest_memfd, PAGE + 1)
    expect_errno(errno.EINVAL, vm.create_guest_memfd, PAGE, 1 << 63)
    gmem = vm.create_guest_memfd(4 * PAGE)
    try:
        set2 = vm.set_user_memory_region2
        gm = KVM_MEM_GUEST_MEMFD
        expect_errno(errno.EINVAL, set2, 0, gm | KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE, hva, 0, gmem)
        expect_errno(errno.EINVAL, set2, 0, gm, 0, PAGE, hva, 0x800, gmem)  # offset unaligned
        expect_errno(errno.EINVAL, set2, 0, gm, 0, 2 * PAGE, hva, 3 * PAGE, gmem)  # past the end
        closed = os.open("/dev/null", os.O_RDONLY)
        os.close(closed)
        expect_errno(errno.EBADF, set2, 0, gm, 0, PAGE, hva, 0, closed)
        set2(0, gm, 0, 2 * PAGE, hva, 0, gmem)
        # GPA-disjoint but the file range overlaps slot 0's binding
        expect_errno(errno.EINVAL, set2, 1, gm, 8 * PAGE, PAGE, hva, PAGE, gmem)
        set2(1, gm, 8 * PAGE, PAGE, hva, 2 * PAGE, gmem)
        expect_errno(errno.EINVAL, set2, 0, gm, 16 * PAGE, 2 * PAGE, hva, 0, gmem)  # move
        expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, 0, 0, 2 * PAGE, hva)
        vm.set_user_memory_region(0, 0, 0, 0, hva)  # delete via V1
    finally:
        os.close(gmem)


# ---------------------------------------------------------------------------------------------
# dirty log (§7.2, §12)


def test_get_dirty_log_refusals(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    hva = alloc(16)
    vm.set_user_memory_region(0, 0, 0, 16 * PAGE, hva)
    expect_errno(errno.ENOENT, vm.get_dirty_log, 0, 16)  # no LOG_DIRTY
    expect_errno(errno.ENOENT, vm.get_dirty_log, 1, 16)  # no slot
    expect_errno(errno.EINVAL, vm.get_dirty_log, caps.nr_memslots, 16)
    expect_errno(errno.EINVAL, vm.get_dirty_log, caps.address_spaces << 16, 16)


def test_get_dirty_log_of_a_fresh_slot_is_empty(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(70)
    vm.set_user_memory_region(3, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 * PAGE, hva)
    assert vm.get_dirty_log(3, 70) == bytes(16)


def test_get_dirty_log_refuses_a_bitmap_of_the_wrong_size(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(70)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 * PAGE, hva)
    with pytest.raises(ValueError, match="70 pages"):
        vm.get_dirty_log(0, 64)
    vm.set_user_memory_region(0, 0, 0, 0, hva)
    expect_errno(errno.ENOENT, vm.get_dirty_log, 0, 64)  # deleted: the kernel answers


def test_clear_dirty_log_alignment(vm: KvmVm, alloc: Alloc) -> None:
    hva = alloc(70)
    log = KVM_MEM_LOG_DIRTY_PAGES
    vm.set_user_memory_region(0, log, 0, 64 * PAGE, hva)
    vm.set_user_memory_region(1, log, 64 * PAGE, 70 * PAGE, hva)
    vm.set_user_memory_region(2, 0, 256 * PAGE, PAGE, hva)
    ones = b"\xff" * 16
    vm.clear_dirty_log(0, 0, 64, ones)  # allowed without manual protect
    expect_errno(errno.EINVAL, vm.clear_dirty_log, 0, 1, 63, ones)
    expect_errno(errno.EINVAL, vm.clear_dirty_log, 0, 0, 32, ones)
    expect_errno(errno.EINVAL, vm.clear_dirty_log, 0, 0, 65, ones)
    vm.clear_dirty_log(0, 64, 0, ones)
    expect_errno(errno.EINVAL, vm.clear_dirty_log, 0, 128, 0, ones)
    vm.clear_dirty_log(1, 64, 6, ones)  # the tail of a 70-page slot
    expect_errno(errno.ENOENT, vm.clear_dirty_log, 2, 0, 1, ones)  # slot without bitmap
    with pytest.raises(ValueError, match="reads 16"):
        vm.clear_dirty_log(1, 0, 70, bytes(8))


def test_manual_protect_argument_checks(vm: KvmVm, caps: KvmCaps) -> None:
    if caps.manual_dirty_log_protect != 3:
        pytest.skip("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 != 3")
    cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    expect_errno(errno.EINVAL, vm.enable_cap, cap, 4)
    expect_errno(errno.EINVAL, vm.enable_cap, cap, 2)  # INITIALLY_SET needs ENABLE
    expect_errno(errno.EINVAL, vm.enable_cap, cap, 1, flags=1)
    with pytest.raises(ValueError, match="4 args"):
        vm.enable_cap(cap, 1, 0, 0, 0, 0)


def test_initially_set_marks_exactly_the_slot(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    if caps.manual_dirty_log_protect != 3:
        pytest.skip("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 != 3")
    hva = alloc(70)
    vm.set_user_memory_region(1, 0, 0, 70 * PAGE, hva)  # present before enabling: allowed
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 128 * PAGE, 70 * PAGE, hva)
    assert set_bits(vm.get_dirty_log(0, 70)) == list(range(70))
    assert set_bits(vm.get_dirty_log(0, 70)) == list(range(70))  # GET does not clear now
    vm.clear_dirty_log(0, 0, 70, b"\xff" * 16)
    assert vm.get_dirty_log(0, 70) == bytes(16)
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 * PAGE, hva)  # FLAGS_ONLY on
    assert set_bits(vm.get_dirty_log(1, 70)) == list(range(70))


def test_guest_writes_are_logged(vm: KvmVm, alloc: Alloc) -> None:
    # Real mode at reset: CS.base 0xffff0000, IP 0xfff0, DS.base 0. The code stores to gpa
    # 0x2000 and 0x5000 (gfns 2 and 5) and halts.
    code = bytes.fromhex("c6 06 00 20 55  c6 06 00 50 66  f4")
    rom = alloc(1)
    ctypes.memmove(rom + 0xFF0, code, len(code))
    ram = alloc(16)
    vm.set_user_memory_region(0, 0, 0xFFFF_F000, PAGE, rom)
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 * PAGE, ram)
    ctypes.memmove(ram + 7 * PAGE, b"host", 4)  # host writes through the hva: never logged
    with vm.create_vcpu(0) as vcpu:
        assert vcpu.run() == KVM_EXIT_HLT
    assert ctypes.string_at(ram + 0x2000, 1) == b"\x55"
    assert ctypes.string_at(ram + 0x5000, 1) == b"\x66"
    assert set_bits(vm.get_dirty_log(1, 16)) == [2, 5]
    assert vm.get_dirty_log(1, 16) == bytes(8)  # without manual protect, GET cleared it


# ---------------------------------------------------------------------------------------------
# dirty ring (§7.3)


def test_dirty_ring(vm: KvmVm, caps: KvmCaps, alloc: Alloc) -> None:
    if caps.dirty_ring_max_bytes == 0:
        pytest.skip("no KVM_CAP_DIRTY_LOG_RING")
    expect_errno(errno.EINVAL, vm.reset_dirty_rings)  # no ring yet
    expect_errno(errno.EINVAL, vm.enable_dirty_ring, 3 * PAGE)  # not a power of two
    expect_errno(errno.EINVAL, vm.enable_dirty_ring, 2048)  # below a page
    expect_errno(errno.E2BIG, vm.enable_dirty_ring, 2 * caps.dirty_ring_max_bytes)
    vm.enable_dirty_ring(4 * PAGE)
    expect_errno(errno.EINVAL, vm.enable_dirty_ring, 4 * PAGE)  # already enabled
    assert vm.reset_dirty_rings() == 0
    hva = alloc(64)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * PAGE, hva)
    expect_errno(errno.ENXIO, vm.get_dirty_log, 0, 64)
    expect_errno(errno.ENXIO, vm.clear_dirty_log, 0, 0, 64, bytes(8))


def test_dirty_ring_after_a_vcpu_is_einval(vm: KvmVm, caps: KvmCaps) -> None:
    if caps.dirty_ring_max_bytes == 0:
        pytest.skip("no KVM_CAP_DIRTY_LOG_RING")
    with vm.create_vcpu(0):
        expect_errno(errno.EINVAL, vm.enable_dirty_ring, 4 * PAGE)


# ---------------------------------------------------------------------------------------------
# vCPU and fd ownership


def test_vcpu_basics(kvm: Kvm, vm: KvmVm) -> None:
    with vm.create_vcpu(0) as vcpu:
        assert len(vcpu.kvm_run) == kvm.vcpu_mmap_size()
        expect_errno(errno.EEXIST, vm.create_vcpu, 0)
        with pytest.raises(ValueError, match="id"):
            vm.create_vcpu(-1)
    assert vcpu.closed
    with pytest.raises(ValueError, match="closed"):
        vcpu.run()
    vcpu.close()  # idempotent


def test_closed_vm_refuses_calls(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    fd = vm.fd
    vm.close()
    with pytest.raises(ValueError, match="closed"):
        vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    expect_errno(errno.EBADF, os.fstat, fd)


# ---------------------------------------------------------------------------------------------
# registers staged in kvm_run (KVM_CAP_SYNC_REGS)


@pytest.mark.parametrize("by", ["KVM_RUN", "another ioctl"])
def test_staged_registers_are_what_kvm_loads(vm: KvmVm, by: str) -> None:
    """`stage` writes kvm_regs and kvm_vcpu_events where KVM_RUN reads them (the kernel
    takes them and clears their kvm_dirty_regs bits, even when it then returns EINTR for
    immediate_exit), and any other ioctl of the vCPU loads them first."""
    with vm.create_vcpu(0) as vcpu:
        if vcpu.sync_regs & 5 != 5:
            pytest.skip("this KVM has no KVM_CAP_SYNC_REGS for regs and events")
        regs = dataclasses.replace(vcpu.get_regs(), rbx=0x1234_5678_9ABC, rsi=7,
                                   r15=0xFEED, rip=0xFFF3, rflags=0x202)
        events = dataclasses.replace(vcpu.get_vcpu_events(), nmi_masked=1)
        assert vcpu.get_regs() != regs and vcpu.get_vcpu_events() != events
        assert vcpu.stage(regs.pack(), events.pack())
        assert vcpu.staged == 5
        if by == "KVM_RUN":
            vcpu.immediate_exit = True
            expect_errno(errno.EINTR, vcpu.run)
            vcpu.immediate_exit = False
            assert vcpu.staged == 0  # the kernel took both
        assert vcpu.get_regs() == regs
        assert vcpu.staged == 0
        assert vcpu.get_vcpu_events() == events
