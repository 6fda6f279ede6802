"""The one vCPU object and guest virtual memory, on every engine (None, unicorn, kvm).

- `vm.create_vcpu(i)` is the only way to a vCPU: the same object is kvmem's memory view
  and, with an engine, the CPU that runs guest code; without an engine running raises
  `EngineError(ENODEV)` while the state is still held (and walked);
- `vcpu.translate_gva` gives what kvmem's page walker gives — on the KVM engine it is
  KVM_TRANSLATE's answer, so the two are compared on the same tables;
- `read_virt` / `write_virt` copy through the page tables across pages (also into a page
  mapped elsewhere), and a page not present, read-only (CR0.WP) or supervisor-only (for a
  CPL-3 access) raises `PageFault` with the gva and KVM's error-code bits, with nothing
  written; `write_virt` marks the pages it writes dirty.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest

import kvmem
from kvmem.cpu import PageFault, VcpuState, modes, translate_gva
from kvmem.cpu.paging import PFERR_PRESENT, PFERR_USER, PFERR_WRITE
from kvmem.engines import EngineError, ExitKind, Regs

RAM = 8 << 20
CODE = 0x1000
PML4 = 0x10_0000  # long_mode's tables: PML4, PDPT, PD (2 MiB pages), then the GDT
PD = PML4 + 0x2000
PT = 0x10_5000  # our own page table for [2 MiB, 4 MiB)
A, B, C, D = 0x30_0000, 0x30_1000, 0x30_2000, 0x30_3000
D_GPA = 0x38_0000
P, RW, US, AD = 1, 2, 4, 0x60
CR0_WP = 1 << 16


def paged_vcpu(vm: kvmem.Vm) -> kvmem.Vcpu:
    """vCPU 0 in 64-bit mode over identity-mapped tables, except for [2 MiB, 4 MiB), mapped
    by 4 KiB pages: A supervisor read/write, B read-only, C not present, D user read/write
    at D_GPA (the page after it: user read/write, identity again)."""
    state = modes.long_mode(CODE, vm.write, PML4)
    ptes = [g | P | RW | AD for g in range(2 << 20, 4 << 20, 4096)]
    ptes[(B >> 12) - 512] &= ~RW
    ptes[(C >> 12) - 512] &= ~P
    ptes[(D >> 12) - 512] = D_GPA | P | RW | US | AD
    ptes[(D >> 12) - 511] |= US
    vm.write(PT, struct.pack("<512Q", *ptes))
    vm.write(PD + 8, struct.pack("<Q", PT | P | RW | US | 0x20))
    vcpu = vm.create_vcpu(0)
    vcpu.set_state(state)
    return vcpu


def new_vm(make_vm: Callable[..., kvmem.Vm], flags: int = 0) -> tuple[kvmem.Vm,
                                                                      kvmem.HostMemory]:
    mem = kvmem.HostMemory.anonymous(RAM)
    vm = make_vm()
    vm.set_memory_region(0, flags, 0, RAM, mem.hva)
    return vm, mem


def test_one_vcpu_object_per_id(engine: str | None,
                                make_vm: Callable[..., kvmem.Vm]) -> None:
    vm, mem = new_vm(make_vm)
    vcpu = vm.create_vcpu(0)
    assert vm.vcpus == [vcpu]
    with pytest.raises(kvmem.KvmError) as e:
        vm.create_vcpu(0)
    assert e.value.errno == errno.EEXIST and vm.vcpus == [vcpu]
    if engine is None:
        assert vcpu.backend is None
        for call in (vcpu.run, vcpu.kick, vcpu.get_regs, lambda: vcpu.start(CODE),
                     lambda: vcpu.complete(b""), lambda: vcpu.set_regs(Regs())):
            with pytest.raises(EngineError, match="no engine") as no:
                call()
            assert no.value.errno == errno.ENODEV
        assert vcpu.get_state() == VcpuState()  # the reset state, held until set
        state = modes.protected_mode(CODE, vm.write, 0x8000)
        vcpu.set_state(state)
        assert vcpu.get_state() == state
    else:
        assert vm.engine is not None and not hasattr(vm.engine, "create_vcpu")
        vm.write(CODE, bytes.fromhex("e6 42 f4"))  # out 0x42, al; hlt
        vcpu.start(CODE, Regs(eax=7))
        assert (vcpu.run().kind, vcpu.run().kind) == (ExitKind.IO, ExitKind.HLT)
        vcpu.smm = False  # the memory view and the CPU are one object
        assert vcpu.guest_read(CODE, 1) == b"\xe6"
    mem.close()


GVAS = [0x1234, CODE, A + 8, B + 0xFFF, C, C + 5, D, D + 0x800, D + 0x1000, (1 << 30) - 8,
        1 << 30, (1 << 39) + A, 0xFFFF_8000_0000_0000]


def test_translate_gva_agrees_with_kvmems_walker(engine: str | None,
                                                make_vm: Callable[..., kvmem.Vm]) -> None:
    """On the KVM engine `translate_gva` is KVM_TRANSLATE: it must give the walker's gpa
    wherever the walker finds one, and fail wherever the walker faults."""
    vm, mem = new_vm(make_vm)
    vcpu = paged_vcpu(vm)
    sregs = vcpu.get_state().sregs
    for gva in GVAS:
        try:
            want: int | PageFault = translate_gva(vm.read, sregs, gva)
        except PageFault as pf:
            want = pf
        if isinstance(want, int):
            assert vcpu.translate_gva(gva) == want, hex(gva)
        else:
            with pytest.raises(PageFault) as got:
                vcpu.translate_gva(gva)
            assert (got.value.gva, got.value.error_code) == (gva, want.error_code)
    assert vcpu.translate_gva(D + 0x10) == D_GPA + 0x10
    assert vcpu.translate_gva(A) == A
    mem.close()


def test_read_and_write_virt_cross_pages(engine: str | None,
                                         make_vm: Callable[..., kvmem.Vm]) -> None:
    vm, mem = new_vm(make_vm)
    vcpu = paged_vcpu(vm)
    vm.write(B - 4, b"1234")
    vm.write(B, b"abcd")
    assert vcpu.read_virt(B - 4, 8) == b"1234abcd"
    vcpu.write_virt(D + 0xFFE, b"wxyz", user=True)  # D → D_GPA, the next page identity
    assert vm.read(D_GPA + 0xFFE, 2) == b"wx" and vm.read(D + 0x1000, 2) == b"yz"
    assert vm.read(D + 0xFFE, 2) == bytes(2)  # not the identity page behind D
    assert vcpu.read_virt(D + 0xFFE, 4, user=True) == b"wxyz"
    assert vcpu.read_virt(A, 0) == b""
    mem.close()


def fault(call: Callable[[], object]) -> tuple[int, int]:
    with pytest.raises(PageFault) as e:
        call()
    return e.value.gva, e.value.error_code


def test_page_faults_carry_kvms_error_code(engine: str | None,
                                          make_vm: Callable[..., kvmem.Vm]) -> None:
    vm, mem = new_vm(make_vm)
    vcpu = paged_vcpu(vm)
    vm.write(A + 0xFF0, b"kept" * 4)
    assert fault(lambda: vcpu.read_virt(C + 8, 4)) == (C + 8, 0)
    assert fault(lambda: vcpu.write_virt(C, b"x")) == (C, PFERR_WRITE)
    # A is writable, B is not (CR0.WP): the fault is at B's first byte and A is untouched
    assert fault(lambda: vcpu.write_virt(A + 0xFF8, b"overflow" * 2)) == (
        B, PFERR_PRESENT | PFERR_WRITE)
    assert vm.read(A + 0xFF0, 16) == b"kept" * 4
    # a read running into the not-present page C faults at C
    assert fault(lambda: vcpu.read_virt(B + 0xFFC, 8)) == (C, 0)
    # CPL 3: only D is a user page
    assert fault(lambda: vcpu.read_virt(A, 4, user=True)) == (A, PFERR_PRESENT | PFERR_USER)
    assert fault(lambda: vcpu.write_virt(B, b"u", user=True)) == (
        B, PFERR_PRESENT | PFERR_WRITE | PFERR_USER)
    assert vcpu.read_virt(D, 4, user=True) == vm.read(D_GPA, 4)
    # with CR0.WP clear a supervisor write ignores the read-only bit, as on a CPU
    state = vcpu.get_state()
    vcpu.set_state(state.with_sregs(cr0=state.sregs.cr0 & ~CR0_WP))
    vcpu.write_virt(B, b"wp=0")
    assert vm.read(B, 4) == b"wp=0"
    mem.close()


def test_write_virt_marks_what_it_writes_dirty(engine: str | None,
                                               make_vm: Callable[..., kvmem.Vm]) -> None:
    vm, mem = new_vm(make_vm, kvmem.KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = paged_vcpu(vm)
    vm.get_dirty_log(0)  # the tables written above are not the point
    vcpu.write_virt(D + 0xFFF, b"ab")
    bitmap = vm.get_dirty_log(0)
    dirty = [i for i in range(RAM >> 12) if bitmap[i >> 3] >> (i & 7) & 1]
    assert dirty == sorted([D_GPA >> 12, (D >> 12) + 1])
    mem.close()
