"""The dirty ring (kvm-semantics §7.3), on every engine.

`vm.enable_dirty_ring(bytes)` switches a VM from dirty bitmaps to per-vCPU rings of
`(slot, offset)` entries (`slot = as_id << 16 | id`, `offset = gfn - base_gfn`), with KVM's
checks and errnos. A guest's write fault logs its page once per reset cycle; kvmem's own
accessor writes log on every call, to the ring of the vCPU doing them (or loaded on the
thread), and are lost with no vCPU loaded, as on x86 KVM. `vcpu.dirty_ring.harvest()`
collects entries and flags them harvested; `vm.reset_dirty_rings()` frees harvested entries
and write-protects their pages again. A ring that reaches its soft limit keeps its vCPU out
of the guest: `run` returns DIRTY_RING_FULL until a reset makes room.

The same tests run with engine None (kvmem's MMU fills kvmem's rings), Unicorn (kvmem's MMU
is the stage-2) and KVM (the kernel's rings, mapped from the vCPU fds).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from conftest import WALKER_CODE, WALKER_SEED, GuestWrites
from expect import refused

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import HostMemory, Vm, dirty
from kvmem.dirty import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, DirtyRing
from kvmem.engines import ExitKind, Regs
from kvmem.guests import PORT_RESULT, program

PAGE = 4096
MiB = 1 << 20
DATA = 1 << 20  # the logging slot's gpa (slot 1); code lives in slot 0, which does not log


def ring_vm(make_vm: Callable[..., Vm], host: Callable[[int], HostMemory], npages: int = 256,
            ring: int = 4 * PAGE) -> Vm:
    """A VM with rings of `ring` bytes: slot 0 (64 KiB at 0, code, not logging) and slot 1
    (`npages` at DATA, logging)."""
    vm = make_vm()
    vm.enable_dirty_ring(ring)
    vm.set_memory_region(0, 0, 0, 16 * PAGE, host(16).hva)
    vm.set_memory_region(1, LOG, DATA, npages * PAGE, host(npages).hva)
    return vm


def vcpu0(vm: Vm) -> kvmem.Vcpu:
    """vCPU 0 of `vm` (run by the engine where there is one)."""
    return vm.create_vcpu(0)


def pages(entries: list[tuple[int, int]], slot: int = 1) -> list[int]:
    assert all(s == slot for s, _ in entries), entries
    return [o for _, o in entries]


# ---------------------------------------------------------------------------------------------
# enabling


@pytest.mark.parametrize(("size", "err"), [
    (0, errno.EINVAL), (3 * PAGE, errno.EINVAL), (12288, errno.EINVAL), (2048, errno.EINVAL),
    (1024, errno.EINVAL), (2 * MiB, errno.E2BIG), (1 << 31, errno.E2BIG),
    ((1 << 32) + 3, errno.EINVAL),  # KVM takes args[0] as a u32: 3
])
def test_enable_refusals(make_vm: Callable[..., Vm], size: int, err: int) -> None:
    vm = make_vm()
    refused(err, vm.enable_dirty_ring, size)
    assert vm.dirty_ring_size == 0
    vm.enable_dirty_ring(PAGE)  # a refusal enabled nothing
    assert vm.dirty_ring_size == PAGE


@pytest.mark.parametrize("size", [PAGE, 64 * 1024, MiB])
def test_enable_sizes_and_entries(make_vm: Callable[..., Vm], size: int) -> None:
    vm = make_vm()
    vm.enable_dirty_ring(size)
    ring = vcpu0(vm).dirty_ring
    assert (vm.dirty_ring_size, ring.entries, ring.soft_limit) == (size, size // 16,
                                                                   size // 16 - 64)


def test_enable_takes_args0_as_u32(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.enable_dirty_ring((1 << 32) + PAGE)
    assert vm.dirty_ring_size == PAGE


def test_enable_only_once_and_before_any_vcpu(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.enable_dirty_ring(PAGE, acq_rel=True)
    refused(errno.EINVAL, vm.enable_dirty_ring, PAGE)
    refused(errno.EINVAL, vm.enable_dirty_ring, 2 * PAGE)
    late = make_vm()
    vcpu0(late)
    refused(errno.EINVAL, late.enable_dirty_ring, PAGE)
    assert late.dirty_ring_size == 0
    refused(errno.EINVAL, late.vcpus[0].dirty_ring.harvest)  # a vCPU without a ring


def test_enable_bad_arguments(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    for bad in (1.0, "4096", None, b"x"):
        with pytest.raises(TypeError, match="size"):
            vm.enable_dirty_ring(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="acq_rel"):
        vm.enable_dirty_ring(PAGE, acq_rel=1)  # type: ignore[arg-type]
    refused(errno.EINVAL, vm.enable_dirty_ring, -PAGE)
    assert vm.dirty_ring_size == 0


def test_bitmap_ioctls_are_enxio_and_reset_needs_rings(make_vm: Callable[..., Vm],
                                                       host: Callable[[int], HostMemory]
                                                       ) -> None:
    plain = make_vm()
    refused(errno.EINVAL, plain.reset_dirty_rings)
    vm = ring_vm(make_vm, host, 64)
    assert vm.slots()[1].dirty_bitmap is None  # a ring-only VM's logging slots have none
    refused(errno.ENXIO, vm.get_dirty_log, 1)
    refused(errno.ENXIO, vm.get_dirty_log, 7)  # before the slot is looked at
    refused(errno.ENXIO, vm.clear_dirty_log, 1, 0, 64, bytes(8))
    refused(errno.ENXIO, vm.clear_dirty_log, 1, 1, 64, bytes(8))
    assert vm.reset_dirty_rings() == 0  # nothing harvested


# ---------------------------------------------------------------------------------------------
# what is logged, and where


def test_accessor_writes_log_on_every_call(make_vm: Callable[..., Vm],
                                           host: Callable[[int], HostMemory]) -> None:
    vm = ring_vm(make_vm, host)
    vcpu = vcpu0(vm)
    vcpu.write(DATA + 2 * PAGE, b"a")
    vcpu.write(DATA + 5 * PAGE + 7, b"b")
    vcpu.write(DATA + 2 * PAGE, b"c")
    vcpu.write(DATA + 9 * PAGE - 1, b"xy")  # two pages, in order
    vcpu.clear(DATA + 20 * PAGE, 2 * PAGE)
    vcpu.write(0x100, b"code slot: not logging")
    assert vcpu.dirty_ring.harvest() == [(1, 2), (1, 5), (1, 2), (1, 8), (1, 9), (1, 20), (1, 21)]
    assert vcpu.dirty_ring.harvest() == []
    assert vm.reset_dirty_rings() == 7
    assert vm.reset_dirty_rings() == 0


def test_guest_writes_log_each_page(make_vm: Callable[..., Vm], host: Callable[[int], HostMemory],
                                    guest_writes: GuestWrites) -> None:
    vm = ring_vm(make_vm, host)
    guest_writes(vm, DATA + 3 * PAGE, 10)
    ring = vm.vcpus[0].dirty_ring
    got = ring.harvest()
    assert sorted(set(pages(got))) == list(range(3, 13))
    assert vm.reset_dirty_rings() == len(got)
    assert ring.harvest() == []
    # reset write-protected them again: the same writes log again
    guest_writes(vm, DATA + 3 * PAGE, 10)
    assert sorted(set(pages(ring.harvest()))) == list(range(3, 13))


def test_guest_entries_name_kvmems_slots(make_vm: Callable[..., Vm],
                                         host: Callable[[int], HostMemory],
                                         guest_writes: GuestWrites) -> None:
    """Entries name the slot as the VM knows it, and pages relative to its base — also when
    an engine mirrors it in pieces of its own (the KVM engine splits a slot around a
    write-tracked gfn, whose guest write kvmem then performs and logs)."""
    vm = make_vm()
    vm.enable_dirty_ring(4 * PAGE)
    vm.set_memory_region(9, LOG, DATA, 32 * PAGE, host(32).hva)
    vm.set_memory_region(0, 0, 0, 16 * PAGE, host(16).hva)
    vm.page_track.add_gfn((DATA >> 12) + 20)
    guest_writes(vm, DATA + 16 * PAGE, 8)
    got = vm.vcpus[0].dirty_ring.harvest()
    assert {s for s, _ in got} == {9}
    assert sorted(set(o for _, o in got)) == list(range(16, 24))


def test_guest_fault_logs_once_per_reset_cycle(make_vm: Callable[..., Vm], engine: str | None,
                                               host: Callable[[int], HostMemory],
                                               guest_writes: GuestWrites) -> None:
    """A write fault makes the page writable and logs it; more writes log nothing until a
    reset write-protects it again. (KVM here emulates the walker's writes, and an emulated
    write logs on every write, like an accessor: §12.)"""
    if engine == "kvm":
        pytest.skip("the KVM engine here emulates guest writes: each one is logged (§12)")
    vm = ring_vm(make_vm, host)
    guest_writes(vm, DATA, 4)
    guest_writes(vm, DATA, 4)
    ring = vm.vcpus[0].dirty_ring
    assert pages(ring.harvest()) == [0, 1, 2, 3]
    guest_writes(vm, DATA, 4)
    assert ring.harvest() == []  # harvested, not reset: still writable
    assert vm.reset_dirty_rings() == 4
    guest_writes(vm, DATA, 2)
    assert pages(ring.harvest()) == [0, 1]


def test_vm_writes_need_a_loaded_vcpu(make_vm: Callable[..., Vm],
                                      host: Callable[[int], HostMemory]) -> None:
    """kvm_write_guest with no vCPU loaded: a ring-only VM has no bitmap to mark, so x86
    KVM loses the mark (and WARNs). With a vCPU loaded on the thread it goes to its ring."""
    vm = ring_vm(make_vm, host)
    vcpu = vcpu0(vm)
    vm.write(DATA, b"lost")
    vm.clear(DATA + PAGE, 2 * PAGE)
    assert vm.dirty_marks_dropped == 3
    with vcpu.loaded():
        vm.write(DATA + 4 * PAGE, b"kept")
        cache = vm.hva_cache(DATA + 6 * PAGE, 8)
        cache.write(0, b"hva")
    assert vcpu.dirty_ring.harvest() == [(1, 4), (1, 6)]
    assert vm.dirty_marks_dropped == 3


def test_pfn_cache_marks_the_loaded_vcpu(make_vm: Callable[..., Vm],
                                         host: Callable[[int], HostMemory]) -> None:
    vm = ring_vm(make_vm, host)
    vcpu = vcpu0(vm)
    gpc = vm.pfn_cache()
    gpc.activate(DATA + 7 * PAGE, 8)
    with gpc.lock(8, dirty=True) as view:
        view[:] = b"no vcpu!"
    assert vm.dirty_marks_dropped == 1
    with vcpu.loaded(), gpc.lock(8, dirty=True) as view:
        view[:] = b"vcpu 0.."
    assert vcpu.dirty_ring.harvest() == [(1, 7)]


def test_a_slot_made_before_the_ring_keeps_its_bitmap(make_vm: Callable[..., Vm],
                                                      host: Callable[[int], HostMemory]) -> None:
    """KVM allocates a bitmap when a logging slot is created while bitmaps are in use, and
    keeps it: marks with no vCPU loaded still set its bits (unreadable: GET is ENXIO)."""
    vm = make_vm()
    vm.set_memory_region(1, LOG, DATA, 16 * PAGE, host(16).hva)
    vm.enable_dirty_ring(PAGE)
    vm.set_memory_region(2, LOG, 2 * DATA, 16 * PAGE, host(16).hva)
    old, new = vm.slots()
    assert old.dirty_bitmap is not None and new.dirty_bitmap is None
    vm.write(DATA + PAGE, b"x")
    vm.write(2 * DATA + PAGE, b"x")
    assert old.dirty_bitmap.snapshot()[0] == 0b10
    assert vm.dirty_marks_dropped == 1
    # moving and deleting it asks nobody for a bitmap: GET is ENXIO on a ring VM
    vm.set_memory_region(1, LOG, 3 * DATA, 16 * PAGE, old.hva)
    with vm.transaction() as tx:
        tx.delete(1)
    assert [s.id for s in vm.slots()] == [2]


def test_each_vcpu_logs_to_its_own_ring(make_vm: Callable[..., Vm],
                                        host: Callable[[int], HostMemory]) -> None:
    vm = ring_vm(make_vm, host)
    cpus = [vm.create_vcpu(i) for i in (0, 5)]
    cpus[0].write(DATA, b"0")
    cpus[1].write(DATA + PAGE, b"1")
    cpus[1].write(DATA + 2 * PAGE, b"2")
    with cpus[1].loaded(), cpus[0].loaded():
        vm.write(DATA + 3 * PAGE, b"3")  # the innermost vCPU is the loaded one
    assert [c.dirty_ring.harvest() for c in cpus] == [[(1, 0), (1, 3)], [(1, 1), (1, 2)]]
    assert vm.reset_dirty_rings() == 4


def test_a_vcpu_of_another_vm_logs_nothing_here(make_vm: Callable[..., Vm],
                                                host: Callable[[int], HostMemory]) -> None:
    vm, other = ring_vm(make_vm, host), ring_vm(make_vm, host)
    stranger = vcpu0(other)
    vcpu0(vm)
    with stranger.loaded():
        vm.write(DATA, b"x")
    assert vm.dirty_marks_dropped == 1 and stranger.dirty_ring.harvest() == []


def test_entries_name_address_space_and_slot(make_vm: Callable[..., Vm],
                                             host: Callable[[int], HostMemory]) -> None:
    vm = make_vm(address_spaces=2)
    vm.enable_dirty_ring(PAGE)
    vm.set_memory_region(7, LOG, DATA, 4 * PAGE, host(4).hva)
    vm.set_memory_region((1 << 16) | 3, LOG, 8 * DATA, 4 * PAGE, host(4).hva)
    vcpu = vcpu0(vm)
    vcpu.write(DATA + 3 * PAGE, b"as0")
    vcpu.smm = True
    vcpu.write(8 * DATA + 2 * PAGE, b"as1")
    assert vcpu.dirty_ring.harvest() == [(7, 3), ((1 << 16) | 3, 2)]


def test_entries_survive_move_and_delete(make_vm: Callable[..., Vm],
                                         host: Callable[[int], HostMemory]) -> None:
    """Offsets are slot-relative: a MOVE leaves entries valid. A deleted slot's entries are
    still harvested and counted by a reset, which skips their pages."""
    vm = ring_vm(make_vm, host, 16)
    mem = host(16)
    vm.set_memory_region(2, LOG, 4 * DATA, 16 * PAGE, mem.hva)
    vcpu = vcpu0(vm)
    vcpu.write(4 * DATA + 5 * PAGE, b"x")
    vm.set_memory_region(2, LOG, 8 * DATA, 16 * PAGE, mem.hva)  # MOVE
    vcpu.write(8 * DATA + 6 * PAGE, b"y")
    vcpu.write(DATA + PAGE, b"z")
    vm.set_memory_region(1, 0, 0, 0, 0)  # DELETE slot 1
    assert vcpu.dirty_ring.harvest() == [(2, 5), (2, 6), (1, 1)]
    assert vm.reset_dirty_rings() == 3


# ---------------------------------------------------------------------------------------------
# the soft limit


def run_walker(cpu: kvmem.Vcpu, gpa: int, npages: int) -> None:
    cpu.start(WALKER_CODE, Regs(esi=gpa, ecx=npages * PAGE, edi=PAGE, ebx=WALKER_SEED, ebp=1))


def test_full_ring_keeps_the_vcpu_out_until_reset(make_vm: Callable[..., Vm],
                                                  host: Callable[[int], HostMemory]) -> None:
    """A 4 KiB ring: 256 entries, soft limit 192. A guest dirtying 224 pages stops with
    DIRTY_RING_FULL — again and again while nothing is reset —, goes on after harvest and
    reset, and every page it dirtied is in some harvest."""
    vm = ring_vm(make_vm, host, 256, PAGE)
    vm.write(WALKER_CODE, program("walker"))
    if vm.engine is None:  # no run loop: the request is what an engine checks before entry
        vcpu = vm.create_vcpu(0)
        for p in range(224):
            vcpu.guest_write(DATA + p * PAGE, b"w")
        assert vcpu.dirty_ring.soft_full and vcpu.dirty_ring.check_request()
        assert len(vcpu.dirty_ring.harvest()) == 224
        assert vm.reset_dirty_rings() == 224
        assert not vcpu.dirty_ring.check_request() and not vcpu.dirty_ring.request
        return
    cpu = vm.create_vcpu(0)
    ring = cpu.dirty_ring
    run_walker(cpu, DATA, 224)
    exits = []
    seen: set[int] = set()
    while True:
        exit_ = cpu.run()
        exits.append(exit_.kind)
        if exit_.kind is ExitKind.DIRTY_RING_FULL:
            if exits.count(ExitKind.DIRTY_RING_FULL) == 1:
                assert cpu.run().kind is ExitKind.DIRTY_RING_FULL  # still full: not entered
                assert cpu.run().kind is ExitKind.DIRTY_RING_FULL
            got = ring.harvest()
            assert len(got) >= ring.soft_limit
            seen.update(pages(got))
            assert vm.reset_dirty_rings() == len(got)
            continue
        if exit_.kind is ExitKind.IO:
            assert (exit_.addr, exit_.is_write) == (PORT_RESULT, True)
            continue
        assert exit_.kind is ExitKind.HLT, exit_
        break
    seen.update(pages(ring.harvest()))
    assert ExitKind.DIRTY_RING_FULL in exits
    assert seen == set(range(224))
    assert ring.overflows == 0


# ---------------------------------------------------------------------------------------------
# the ring itself (KVM's side and userspace's)


def entry_flags(ring: DirtyRing, i: int) -> int:
    return int.from_bytes(ring._buf[16 * i:16 * i + 4], "little")


def test_ring_protocol_states() -> None:
    ring = DirtyRing(PAGE, 0, None)
    ring.push(3, 10, 2)
    assert [entry_flags(ring, i) for i in range(3)] == [KVM_DIRTY_GFN_F_DIRTY] * 2 + [0]
    assert ring.used == 2
    assert ring.harvest() == [(3, 10), (3, 11)]
    assert [entry_flags(ring, i) for i in range(2)] == [KVM_DIRTY_GFN_F_RESET] * 2
    assert ring.reset() == (2, [(3, 10, 0b11)])
    assert (ring.used, entry_flags(ring, 0)) == (0, 0)
    assert ring.reset() == (0, [])


def test_reset_batches_like_kvm() -> None:
    """Consecutive entries of one slot share a 64-bit mask around a base: forward while the
    offset is within 64 pages of it, backward while the mask still fits; anything else
    starts a new batch."""
    ring = DirtyRing(PAGE, 0, None)
    for slot, offset in [(1, 100), (1, 163), (1, 164), (1, 160), (1, 101), (2, 5), (1, 0),
                         (1, 70)]:
        ring.push(slot, offset)
    ring.harvest()
    count, batches = ring.reset()
    assert count == 8
    assert batches == [(1, 100, 1 | 1 << 63), (1, 101, 1 << 63 | 1 << 59 | 1),
                       (2, 5, 1), (1, 0, 1), (1, 70, 1)]
    for offset in (100, 163, 99):  # backward, but bit 63 would fall off the mask
        ring.push(1, offset)
    ring.harvest()
    assert ring.reset() == (3, [(1, 100, 1 | 1 << 63), (1, 99, 1)])


def test_reset_stops_at_the_first_unharvested_entry() -> None:
    ring = DirtyRing(PAGE, 0, None)
    ring.push(1, 0, 3)
    ring.harvest()
    ring.push(1, 3, 2)
    assert ring.reset() == (3, [(1, 0, 0b111)])
    assert ring.used == 2
    assert ring.harvest() == [(1, 3), (1, 4)]


def test_the_store_that_fills_the_ring_is_not_done_at_the_exit(
        make_vm: Callable[..., Vm], engine: str | None,
        host: Callable[[int], HostMemory]) -> None:
    """The store whose mark fills the ring to its soft limit (the 192nd of a 4 KiB ring),
    to a page not yet mapped, leaves the guest with DIRTY_RING_FULL before it is done —
    EIP at it, the page unchanged — as KVM re-enters a faulting instruction only after its
    requests; after the reset it runs once. (KVM here emulates the guest's ring-0 writes
    and looks at the ring only at its next exit, the OUT.)"""
    vm = ring_vm(make_vm, host, 256, PAGE)
    if vm.engine is None:
        pytest.skip("no engine: no guest instruction to run")
    guest = bytes.fromhex("c7 06 01 00 00 00"  # L: mov dword [esi], 1
                          "81 c6 00 10 00 00"  #    add esi, 4096
                          "e2 f2"              #    loop L
                          "c7 06 07 00 00 00"  #    mov dword [esi], 7  (the 192nd page)
                          "ff 06"              #    inc dword [esi]
                          "e6 80"              #    out 0x80, al
                          "f4")                #    hlt
    vm.write(WALKER_CODE, guest)
    last = DATA + 191 * PAGE
    vm.write(last, (41).to_bytes(4, "little"))
    cpu = vcpu0(vm)
    ring = cpu.dirty_ring
    cpu.start(WALKER_CODE, Regs(esi=DATA, ecx=191))
    full = []
    while (exit_ := cpu.run()).kind is ExitKind.DIRTY_RING_FULL:
        full.append((cpu.get_regs().eip, vm.read(last, 4)))
        ring.harvest()
        vm.reset_dirty_rings()
    assert exit_.kind is ExitKind.IO, (full, exit_)
    if engine == "unicorn":
        assert full == [(WALKER_CODE + 14, (41).to_bytes(4, "little"))]
    assert vm.read(last, 4) == (8).to_bytes(4, "little")


def test_soft_limit_request_and_hard_full_overwrite() -> None:
    ring = DirtyRing(PAGE, 0, None)  # 256 entries, soft limit 192
    ring.push(1, 0, 191)
    assert not ring.request and not ring.check_request()
    ring.push(1, 191)
    assert ring.request and ring.soft_full and ring.check_request()
    assert ring.check_request()  # stays armed while full
    ring.push(1, 192, 65)  # past the 256 entries: KVM writes over the oldest and WARNs
    assert ring.overflows == 1
    got = ring.harvest()
    assert got[0] == (1, 256) and len(got) == 256
    ring.reset()
    assert ring.request and not ring.check_request() and not ring.request


def test_harvest_reads_only_what_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A harvest reads the entries pushed since the last one and the first free entry after
    them, nothing more: of a 1 MiB ring (65,536 entries) holding 3, it reads 4."""
    ring = DirtyRing(MiB, 0, None)
    ring.push(1, 1, 3)
    reads: list[int] = []
    real = dirty._GFN

    class Spy:
        @staticmethod
        def unpack_from(buf: bytearray, at: int = 0) -> tuple[int, ...]:
            reads.append(at)
            return real.unpack_from(buf, at)

    monkeypatch.setattr(dirty, "_GFN", Spy)
    assert ring.harvest() == [(1, 1), (1, 2), (1, 3)]
    assert reads == [0, 16, 32, 48]
