"""Differential test of the dirty ring (kvm-semantics §7.3): `kvmem.Vm` against the real KVM.

Each case goes to a raw KVM VM (`kvmem.kvmapi`: KVM_ENABLE_CAP, the ring mmap'd from the vCPU
fd, KVM_RESET_DIRTY_RINGS) and to a `kvmem.Vm` alone (engine None: kvmem's rings filled by
kvmem's marks). Both must accept or refuse with the same errno — enabling (every size rule,
args[0] taken as a u32, once only, before any vCPU), the reset ioctl, GET/CLEAR_DIRTY_LOG
while rings are on — and produce the same entries: the kernel's guest runs real-mode code
that KVM here emulates (an emulated write logs on every write, §12), kvmem's vCPU makes the
same writes through its accessor (which logs on every call, as KVM's does). The soft limit
is compared against a guest run on kvmem's Unicorn engine: both keep the vCPU out with
KVM_EXIT_DIRTY_RING_FULL, on every run, until a reset makes room.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable, Iterator
from functools import partial

import pytest

import kvmem
import kvmem.engines
from kvmem import kvmapi
from kvmem.dirty import RingReader
from kvmem.engines import ExitKind, Regs
from kvmem.guests import program
from kvmem.kvmapi import (
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_HLT,
    KVM_MEM_LOG_DIRTY_PAGES,
    Kvm,
    KvmRegs,
    KvmVm,
)

_REASON = kvmapi.kvm_available()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

pytestmark = pytest.mark.kvm

PAGE = 4096
LOG = KVM_MEM_LOG_DIRTY_PAGES
ROM_GPA = 0xFFFF_F000


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        if k.caps().dirty_ring_max_bytes == 0:
            pytest.skip("this KVM has no KVM_CAP_DIRTY_LOG_RING")
        yield k


@pytest.fixture
def anon() -> Iterator[Callable[[int], int]]:
    """`anon(npages)`: the hva of fresh anonymous memory kvmem knows (`HostMemory`), kept
    until the test ends."""
    maps: list[kvmem.HostMemory] = []

    def make(npages: int) -> int:
        m = kvmem.HostMemory.anonymous(npages * PAGE)
        maps.append(m)
        return m.hva

    yield make
    for m in maps:
        m.close()


def outcome(fn: Callable[[], object]) -> int | str:
    """0 for success, else the errno's name."""
    try:
        fn()
    except OSError as e:  # KvmError is an OSError
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return 0


def both(kvm: Kvm) -> tuple[KvmVm, kvmem.Vm]:
    return kvm.create_vm(), kvmem.Vm()


SIZES = [0, 1, 1024, 2048, 4095, PAGE, 3 * PAGE, 12288, 2 * PAGE, 64 * 1024, 1 << 20,
         (1 << 20) + PAGE, 2 << 20, 1 << 31, 1 << 32, (1 << 32) + PAGE, (1 << 32) + 3,
         (1 << 32) + (2 << 20), 1 << 63, (1 << 64) - 1]


@pytest.mark.parametrize("acq_rel", [False, True])
def test_enable_agrees_for_every_size(kvm: Kvm, acq_rel: bool) -> None:
    for size in SIZES:
        kvm_vm, vm = both(kvm)
        with kvm_vm:
            want = outcome(partial(kvm_vm.enable_dirty_ring, size, acq_rel))
            got = outcome(partial(vm.enable_dirty_ring, size, acq_rel=acq_rel))
        assert got == want, f"enable_dirty_ring({size:#x}): KVM {want}, kvmem {got}"


def test_enable_once_and_before_any_vcpu_agree(kvm: Kvm) -> None:
    kvm_vm, vm = both(kvm)
    with kvm_vm:
        steps = [(lambda: kvm_vm.enable_dirty_ring(PAGE), lambda: vm.enable_dirty_ring(PAGE)),
                 (lambda: kvm_vm.enable_dirty_ring(PAGE), lambda: vm.enable_dirty_ring(PAGE)),
                 (lambda: kvm_vm.enable_dirty_ring(2 * PAGE, True),
                  lambda: vm.enable_dirty_ring(2 * PAGE, acq_rel=True))]
        assert [outcome(k) for k, _ in steps] == [outcome(m) for _, m in steps] == [
            0, "EINVAL", "EINVAL"]
    kvm_vm, vm = both(kvm)
    with kvm_vm, kvm_vm.create_vcpu(0):
        vm.create_vcpu(0)
        assert outcome(lambda: kvm_vm.enable_dirty_ring(PAGE)) == "EINVAL"
        assert outcome(lambda: vm.enable_dirty_ring(PAGE)) == "EINVAL"


def test_reset_and_bitmap_ioctls_agree(kvm: Kvm, anon: Callable[[int], int]) -> None:
    kvm_vm, vm = both(kvm)
    with kvm_vm:
        assert outcome(kvm_vm.reset_dirty_rings) == outcome(vm.reset_dirty_rings) == "EINVAL"
        kvm_vm.enable_dirty_ring(PAGE)
        vm.enable_dirty_ring(PAGE)
        hva = anon(64)
        kvm_vm.set_user_memory_region(1, LOG, 0, 64 * PAGE, hva)
        vm.set_memory_region(1, LOG, 0, 64 * PAGE, hva)
        for slot in (1, 2, 40000, 1 << 16):  # logging, missing, past the ids, address space 1
            assert outcome(partial(kvm_vm.get_dirty_log, slot, 64)) == \
                outcome(partial(vm.get_dirty_log, slot)) == "ENXIO"
            for first in (0, 1):
                assert outcome(partial(kvm_vm.clear_dirty_log, slot, first, 64, bytes(8))) == \
                    outcome(partial(vm.clear_dirty_log, slot, first, 64, bytes(8))) == "ENXIO"
        assert kvm_vm.reset_dirty_rings() == vm.reset_dirty_rings() == 0
        # x86 builds no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (check-extension 0): enabling it
        # is EINVAL and GET stays ENXIO — so kvmem, modelling x86, does not offer it
        assert kvm_vm.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0
        assert outcome(partial(kvm_vm.enable_cap, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)) == \
            "EINVAL"
        assert outcome(partial(kvm_vm.get_dirty_log, 1, 64)) == "ENXIO"


def real_mode_stores(rom: int, gfns: list[int]) -> None:
    """Code at the reset vector (CS.base 0xffff0000, IP 0xfff0, DS.base 0) storing one byte
    at the start of each of `gfns`, in order, then halting for good; IP 0xfff0 jumps back to
    0xf000."""
    code = bytearray()
    for g in gfns:
        code += bytes([0xB8]) + (g << 8).to_bytes(2, "little")  # mov ax, g * 0x100
        code += bytes([0x8E, 0xD8])  # mov ds, ax
        code += bytes([0xC6, 0x06, 0x00, 0x00, 0x55])  # mov byte [0], 0x55
    code += bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp back to the hlt
    assert len(code) < 0xFF0
    ctypes.memmove(rom, bytes(code), len(code))
    rel = (0xF000 - (0xFFF0 + 3)) & 0xFFFF
    ctypes.memmove(rom + 0xFF0, bytes([0xE9]) + rel.to_bytes(2, "little"), 3)  # jmp 0xf000


def test_harvest_and_reset_agree(kvm: Kvm, anon: Callable[[int], int]) -> None:
    kvm_vm, vm = both(kvm)
    with kvm_vm:
        kvm_vm.enable_dirty_ring(PAGE)
        vm.enable_dirty_ring(PAGE)
        rom, ram, vm_ram = anon(1), anon(16), anon(16)
        kvm_vm.set_user_memory_region(0, 0, ROM_GPA, PAGE, rom)
        kvm_vm.set_user_memory_region(1, LOG, 0, 16 * PAGE, ram)
        vm.set_memory_region(1, LOG, 0, 16 * PAGE, vm_ram)
        vcpu = vm.create_vcpu(0)
        with kvm_vm.create_vcpu(0) as kvcpu:
            reader = RingReader(kvcpu.map_dirty_ring(PAGE))
            rounds = [[2, 5, 2], [7], [3, 3, 3, 9]]
            for gfns in rounds:
                real_mode_stores(rom, gfns)
                kvcpu.set_regs(KvmRegs(rip=0xFFF0, rflags=2))
                assert kvcpu.run() == KVM_EXIT_HLT
                for g in gfns:
                    vcpu.write(g * PAGE, b"\x55")
                want = reader.harvest()
                assert want == [(1, g) for g in gfns]  # emulated: one entry per write
                assert vcpu.dirty_ring.harvest() == want
                assert reader.harvest() == vcpu.dirty_ring.harvest() == []
                assert kvm_vm.reset_dirty_rings() == vm.reset_dirty_rings() == len(gfns)
                assert kvm_vm.reset_dirty_rings() == vm.reset_dirty_rings() == 0


def test_a_vcpus_ring_mmap_rules(kvm: Kvm) -> None:
    """The ring is shared memory of the vCPU fd: a private mapping is refused (EINVAL)."""
    with kvm.create_vm() as kvm_vm:
        kvm_vm.enable_dirty_ring(PAGE)
        with kvm_vm.create_vcpu(0) as kvcpu:
            with pytest.raises(OSError) as info:
                kvcpu.map_dirty_ring(PAGE, flags=mmap.MAP_PRIVATE)
            assert info.value.errno == errno.EINVAL
            assert bytes(kvcpu.map_dirty_ring(PAGE)) == bytes(PAGE)  # a zeroed ring


def test_full_ring_exit_agrees(kvm: Kvm, anon: Callable[[int], int]) -> None:
    """A 4 KiB ring (soft limit 192) and a guest writing 224 pages: KVM and kvmem's Unicorn
    engine both exit with DIRTY_RING_FULL at the first entry after at least 192 entries are
    in (Unicorn's at the next instruction; KVM's emulator here only at the halt), again on
    every run while nothing is reset, and go on after harvest and reset; the harvests hold
    every page."""
    npages = 224

    def kernel() -> tuple[list[str], set[int]]:
        with kvm.create_vm() as kvm_vm:
            kvm_vm.enable_dirty_ring(PAGE)
            rom, ram = anon(1), anon(256)
            kvm_vm.set_user_memory_region(0, 0, ROM_GPA, PAGE, rom)
            kvm_vm.set_user_memory_region(1, LOG, 0, 256 * PAGE, ram)
            real_mode_stores(rom, list(range(npages)))
            with kvm_vm.create_vcpu(0) as kvcpu:
                reader = RingReader(kvcpu.map_dirty_ring(PAGE))
                return drive(lambda: "full" if kvcpu.run() == KVM_EXIT_DIRTY_RING_FULL
                             else "hlt", reader.harvest, kvm_vm.reset_dirty_rings)

    def unicorn() -> tuple[list[str], set[int]]:
        vm = kvmem.Vm(engine="unicorn")
        try:
            vm.enable_dirty_ring(PAGE)
            vm.set_memory_region(0, 0, 0, 16 * PAGE, anon(16))
            vm.set_memory_region(1, LOG, 1 << 20, 256 * PAGE, anon(256))
            vm.write(0x1000, program("walker"))
            assert vm.engine is not None
            cpu = vm.create_vcpu(0)
            cpu.start(0x1000, Regs(esi=1 << 20, ecx=npages * PAGE, edi=PAGE, ebx=1, ebp=1))

            def run() -> str:
                while True:
                    kind = cpu.run().kind
                    if kind is not ExitKind.IO:  # the walker's checksum
                        return "full" if kind is ExitKind.DIRTY_RING_FULL else kind.value

            return drive(run, cpu.dirty_ring.harvest, vm.reset_dirty_rings)
        finally:
            if vm.engine is not None:
                vm.engine.close()

    def drive(run: Callable[[], str], harvest: Callable[[], list[tuple[int, int]]],
              reset: Callable[[], int]) -> tuple[list[str], set[int]]:
        exits: list[str] = []
        seen: set[int] = set()
        while True:
            exits.append(run())
            if exits[-1] != "full":
                if "full" in exits:
                    break
                # halted before any full exit: KVM here emulates the real-mode stores
                # without a guest entry between them, so it sees the request only at the
                # next entry — which must not happen while the ring is soft-full
                assert len(exits) == 1
                continue
            if exits.count("full") == 1:  # without a reset the vCPU stays out
                exits += [run(), run()]
            got = harvest()
            assert len(got) >= 192 and {s for s, _ in got} == {1}
            seen.update(o for _, o in got)
            assert reset() == len(got)
        seen.update(o for _, o in harvest())
        return exits, seen

    k_exits, k_pages = kernel()
    u_exits, u_pages = unicorn()
    assert k_pages == u_pages == set(range(npages))
    assert k_exits[-4:-1] == u_exits[:3] == ["full"] * 3
    assert k_exits[-1] == u_exits[-1] == "hlt"
