"""Engines, differentially: each bundled guest program runs on KVM and on Unicorn, and the
two must agree — exit sequence, memory contents, dirty pages, tracked writes — and agree
with what the program is specified to do. Plus what only one side can show (SMM on
Unicorn; kicks, dirty-log folding and read-only splits on KVM).

The KVM side runs wherever /dev/kvm works and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import pytest

import kvmem
from kvmem.engines import Exit, ExitKind, Regs, kvm_usable
from kvmem.engines import atomic as atomic_demo
from kvmem.guests import PORT_RESULT, build, program
from kvmem.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE

if TYPE_CHECKING:
    from kvmem.engines.kvm import KvmEngineVcpu

KVM_REASON = kvm_usable()
ENGINES = [
    pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
        KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")]),
    "unicorn",
]
RAM = 4 << 20
CODE = 0x1000
MMIO = 0x1000_0000


@dataclass
class Run:
    exits: list[Exit] = field(default_factory=list)
    memory: str = ""
    dirty: list[int] = field(default_factory=list)
    tracked: list[tuple[int, bytes]] = field(default_factory=list)


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def track_write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))

    def track_remove_region(self, gfn: int, npages: int) -> None:
        pass


@pytest.fixture
def make_vm() -> Iterator[Callable[..., kvmem.Vm]]:
    made: list[tuple[kvmem.Vm, kvmem.HostMemory]] = []

    def make(engine: str, flags: int = KVM_MEM_LOG_DIRTY_PAGES) -> kvmem.Vm:
        mem = kvmem.HostMemory.anonymous(RAM)
        vm = kvmem.Vm(engine=engine)
        vm.set_memory_region(0, flags, 0, RAM, mem.hva)
        made.append((vm, mem))
        return vm

    yield make
    for vm, mem in made:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


def bits(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def drive(vm: kvmem.Vm, name: str, regs: Regs, answer: Callable[[int, Exit], bytes],
          max_exits: int = 64) -> Run:
    """Load `name` at CODE, run it to its halt, answer reads; everything observable."""
    assert vm.engine is not None
    vm.write(CODE, program(name))
    vm.get_dirty_log(0)  # the load itself is not the guest's doing
    cpu = vm.create_vcpu(0)
    cpu.start(CODE, regs)
    run = Run()
    for i in range(max_exits):
        e = cpu.run()
        run.exits.append(e)
        if e.reads:
            cpu.complete(answer(i, e))
        if e.kind is not ExitKind.IO and e.kind is not ExitKind.MMIO:
            break
    run.memory = hashlib.sha256(vm.read(0, RAM)).hexdigest()
    run.dirty = bits(vm.get_dirty_log(0))
    return run


def walker_checksum(start: int, length: int, stride: int, seed: int, passes: int) -> int:
    words = {}
    for p in range(passes, 0, -1):
        for a in range(start, start + length, stride):
            words[a] = a ^ seed ^ p
        s = 0
        for a in range(start, start + length, stride):
            s = ((s << 1) | (s >> 31)) & 0xFFFF_FFFF
            s ^= words[a]
    return s


def run_walker(vm: kvmem.Vm) -> Run:
    return drive(vm, "walker", Regs(esi=0x10000, ecx=0x3F0000, edi=PAGE_SIZE, ebx=0xC0FFEE,
                                    ebp=2), lambda i, e: b"")


def run_poker(vm: kvmem.Vm) -> Run:
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(0x3)
    run = drive(vm, "poker", Regs(esi=MMIO, edi=0x3000, edx=0x40),
                lambda i, e: bytes((0xA0 + i + k) & 0xFF for k in range(e.answer_size)))
    run.tracked = rec.writes
    return run


def run_loop(vm: kvmem.Vm) -> Run:
    return drive(vm, "loop", Regs(esi=0x200000, ecx=1000, ebx=41), lambda i, e: b"")


PROGRAMS = {"walker": run_walker, "poker": run_poker, "loop": run_loop}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_programs_agree_across_engines(name: str, make_vm: Callable[..., kvmem.Vm]) -> None:
    if KVM_REASON is not None:
        pytest.skip(f"differential needs KVM: {KVM_REASON}")
    runs = {engine: PROGRAMS[name](make_vm(engine)) for engine in ("kvm", "unicorn")}
    kvm, uc = runs["kvm"], runs["unicorn"]
    print(f"\n{name}: exits {[str(e) for e in kvm.exits]}; dirty pages {len(kvm.dirty)}; "
          f"tracked writes {len(kvm.tracked)}")
    assert [str(e) for e in kvm.exits] == [str(e) for e in uc.exits]
    assert kvm.exits == uc.exits
    assert kvm.memory == uc.memory
    assert kvm.dirty == uc.dirty
    assert kvm.tracked == uc.tracked


@pytest.mark.parametrize("engine", ENGINES)
def test_walker_checksum_and_dirty_pages(engine: str, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    run = run_walker(vm)
    want = walker_checksum(0x10000, 0x3F0000, PAGE_SIZE, 0xC0FFEE, 2)
    assert run.exits == [Exit(ExitKind.IO, PORT_RESULT, 4, True, want.to_bytes(4, "little")),
                         Exit(ExitKind.HLT)]
    assert run.dirty == list(range(0x10, RAM // PAGE_SIZE))
    assert int.from_bytes(vm.read(0x20000, 4), "little") == 0x20000 ^ 0xC0FFEE ^ 1
    assert bits(vm.get_dirty_log(0)) == []  # harvested: the next round starts empty


@pytest.mark.parametrize("engine", ENGINES)
def test_poker_exits_and_tracked_writes(engine: str, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    run = run_poker(vm)
    assert [str(e) for e in run.exits] == [
        "mmio 0x10000000/4 write 44332211", "mmio 0x10000004/4 read",
        "io 0x40/4 out a1a2a3a4", "io 0x41/1 in", "mmio 0x10000008/1 write a3",
        "mmio 0x10000010/2 read", "io 0x42/2 out a5a6", "io 0x42/4 in",
        "mmio 0x10000018/1 read", "hlt"]
    expect = bytes.fromhex("a1a2a3a4" "a5a6" "0000" "a7a8a9aa" "a8" "5a" "efbe")
    assert vm.read(0x3000, 16) == expect
    assert run.tracked == [(0x3000, expect[0:4]), (0x3004, expect[4:6]),
                           (0x3008, expect[8:12]), (0x300C, expect[12:13]),
                           (0x300D, expect[13:14]), (0x300E, expect[14:16])]
    assert 3 in run.dirty  # tracked writes are dirty-logged


@pytest.mark.parametrize("engine", ENGINES)
def test_untracking_makes_the_page_plain_ram(engine: str,
                                             make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    rec = Recorder()
    vm.page_track.register(rec)
    vm.page_track.add_gfn(0x200)
    vm.page_track.remove_gfn(0x200)
    run = run_loop(vm)
    assert rec.writes == []
    assert run.exits[0] == Exit(ExitKind.IO, PORT_RESULT, 4, True, (1041).to_bytes(4, "little"))
    assert vm.read(0x200000, 4) == (1041).to_bytes(4, "little")
    if engine == "kvm":
        assert vm.engine is not None
        assert not vm.engine.split_covers(0, 0x200)  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ENGINES)
def test_read_only_slot_write_is_an_mmio_exit(engine: str,
                                              make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    rom = kvmem.HostMemory.anonymous(PAGE_SIZE)
    try:
        rom.view()[:4] = b"\x07\x00\x00\x00"
        vm.set_memory_region(1, KVM_MEM_READONLY, 0x800000, PAGE_SIZE, rom.hva)
        run = drive(vm, "loop", Regs(esi=0x800000, ecx=1, ebx=0), lambda i, e: b"")
        assert [str(e) for e in run.exits] == [
            "mmio 0x800000/4 write 01000000", "io 0x11/4 out 07000000",
            "io 0x10/4 out 01000000", "hlt"]
    finally:
        assert vm.engine is not None
        vm.engine.close()
        rom.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_undeliverable_exception_is_shutdown(engine: str,
                                             make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    assert vm.engine is not None
    vm.write(CODE, b"\x0f\x0b")  # ud2 with no IDT: triple fault
    cpu = vm.create_vcpu(0)
    cpu.start(CODE)
    assert cpu.run().kind is ExitKind.SHUTDOWN


@pytest.mark.parametrize("engine", ENGINES)
def test_kick_stops_a_running_guest(engine: str, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm(engine)
    assert vm.engine is not None
    vm.write(CODE, program("loop"))
    cpu = vm.create_vcpu(0)
    cpu.start(CODE, Regs(esi=0x200000, ecx=0, ebx=0))
    got: list[Exit] = []
    t = threading.Thread(target=lambda: got.append(cpu.run()))
    t.start()
    time.sleep(0.05)
    cpu.kick()
    t.join(timeout=10)
    assert got == [Exit(ExitKind.KICKED)]
    count = cpu.get_regs().ebx
    assert count > 0
    assert int.from_bytes(vm.read(0x200000, 4), "little") in (count, count - 1)
    cpu.kick()  # a kick before run makes the next run return at once
    assert cpu.run().kind is ExitKind.KICKED


def test_smm_vcpu_sees_address_space_1() -> None:
    mem = kvmem.HostMemory.anonymous(RAM)
    smram = kvmem.HostMemory.anonymous(16 * PAGE_SIZE)
    vm = kvmem.Vm(engine="unicorn")
    assert vm.engine is not None
    try:
        vm.set_memory_region(0, 0, 0, RAM, mem.hva)
        # SMM sees the code below 2 MiB and SMRAM at 2 MiB, where normal memory is RAM
        vm.set_memory_region(1 << 16, 0, 0, 0x200000, mem.hva)
        vm.set_memory_region((1 << 16) | 1, 0, 0x200000, smram.size, smram.hva)
        vm.write(CODE, program("loop"))
        smram.view()[:4] = b"\x00\x10\x00\x00"
        cpu = vm.create_vcpu(0)
        cpu.start(CODE, Regs(esi=0x200000, ecx=1, ebx=0x99))
        cpu.smm = True
        assert str(cpu.run()) == "io 0x10/4 out 9a000000"
        assert bytes(smram.view()[:4]) == b"\x9a\x00\x00\x00"
        assert vm.read(0x200000, 4) == bytes(4)  # address space 0 untouched
    finally:
        vm.engine.close()
        mem.close()
        smram.close()


def _uc_regions(vm: kvmem.Vm) -> list[tuple[int, int, int]]:
    """Unicorn's own regions (begin, end, perms) under vCPU 0 of a Unicorn Vm."""
    return sorted(vm.vcpus[0]._backend._uc.mem_regions())  # type: ignore[union-attr]


def _walker_words(base: int, size: int, stride: int, seed: int) -> dict[int, int]:
    """What one pass of `walker` leaves in memory: gpa → word."""
    return {a: (a ^ seed ^ 1) & 0xFFFF_FFFF for a in range(base, base + size, stride)}


@contextlib.contextmanager
def _walker_vm(pages: int) -> Iterator[tuple[kvmem.Vm, kvmem.HostMemory, kvmem.Vcpu]]:
    """A Unicorn Vm: `walker` in 16 pages of code at 0, `pages` of a logging slot (1) at
    0x100000; vCPU 0."""
    data = kvmem.HostMemory.anonymous(pages * PAGE_SIZE)
    code = kvmem.HostMemory.anonymous(16 * PAGE_SIZE)
    vm = kvmem.Vm(engine="unicorn")
    assert vm.engine is not None
    try:
        vm.set_memory_region(0, 0, 0, code.size, code.hva)
        vm.set_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x100000, data.size, data.hva)
        vm.write(CODE, program("walker"))
        yield vm, data, vm.create_vcpu(0)
    finally:
        vm.engine.close()
        data.close()
        code.close()


def test_unicorn_maps_contiguous_pages_as_few_regions() -> None:
    """Once it maps 128 pages, the mirror maps consecutive pages over consecutive host
    pages with one protection as one region per chunk (Unicorn's map/protect/unmap cost
    grows with its region count): walks over 256 pages of a logging slot leave a region
    per chunk after each harvest write-protects them and every page takes its write fault
    again — and every write lands and is logged."""
    with _walker_vm(256) as (vm, data, cpu):
        for seed in (7, 8, 9):
            cpu.start(CODE, Regs(esi=0x100000, ecx=data.size, edi=PAGE_SIZE, ebx=seed, ebp=1))
            assert cpu.run().kind is ExitKind.IO
            assert cpu.run().kind is ExitKind.HLT
            for gpa, word in _walker_words(0x100000, data.size, PAGE_SIZE, seed).items():
                assert int.from_bytes(vm.read(gpa, 4), "little") == word, (seed, hex(gpa))
            regions = [r for r in _uc_regions(vm) if r[0] >= 0x100000]
            if seed != 7:  # (the first 128 pages faulted in before merging began)
                assert len(regions) == 256 // 64, regions  # a region per 64-page chunk
            assert bits(vm.get_dirty_log(1)) == list(range(256)), seed


def test_unicorn_merges_no_pages_over_distant_host_memory() -> None:
    """Two slots side by side in guest memory (the edge inside a chunk) over host pages that
    are not side by side: no region spans the edge, and each page's writes reach its own
    host page — also once the mirror merges (after a harvest, over 200 pages)."""
    mem = kvmem.HostMemory.anonymous(300 * PAGE_SIZE)
    code = kvmem.HostMemory.anonymous(16 * PAGE_SIZE)
    vm = kvmem.Vm(engine="unicorn")
    assert vm.engine is not None
    edge = 0x100000 + 100 * PAGE_SIZE
    try:
        vm.set_memory_region(0, 0, 0, code.size, code.hva)
        vm.set_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x100000, 100 * PAGE_SIZE,
                             mem.hva)  # host pages 0-99
        vm.set_memory_region(2, KVM_MEM_LOG_DIRTY_PAGES, edge, 100 * PAGE_SIZE,
                             mem.hva + 200 * PAGE_SIZE)  # host pages 200-299
        vm.write(CODE, program("walker"))
        cpu = vm.create_vcpu(0)
        view = mem.view()
        for seed in (5, 6):
            cpu.start(CODE, Regs(esi=0x100000, ecx=200 * PAGE_SIZE, edi=PAGE_SIZE, ebx=seed,
                                 ebp=1))
            assert cpu.run().kind is ExitKind.IO
            for gpa, word in _walker_words(0x100000, 200 * PAGE_SIZE, PAGE_SIZE, seed).items():
                page = (gpa - 0x100000) // PAGE_SIZE
                at = (page if page < 100 else page + 100) * PAGE_SIZE
                assert int.from_bytes(view[at:at + 4], "little") == word, (seed, hex(gpa))
            assert bytes(view[100 * PAGE_SIZE:200 * PAGE_SIZE]) == bytes(100 * PAGE_SIZE)
            assert not [r for r in _uc_regions(vm) if r[0] < edge <= r[1]]
            vm.get_dirty_log(1)
            vm.get_dirty_log(2)
    finally:
        vm.engine.close()
        mem.close()
        code.close()


def test_unicorn_zap_between_a_fault_and_its_mapping_is_not_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A harvest that write-protects a page after the fault path gave the mirror its spte,
    before the mirror mapped it (the spte is not in the mirror yet), still reaches the
    mirror: the store runs again after it, faults, and is logged."""
    with _walker_vm(4) as (vm, data, cpu):
        real = cpu.fault_in
        inner: list[list[int]] = []

        def fault_then_harvest(gpa: int, write: bool, private: bool | None = None
                               ) -> object:
            spte = real(gpa, write, private)
            if write and gpa >> 12 == 0x102 and not inner:
                inner.append(bits(vm.get_dirty_log(1)))  # write-protects page 2 again
            return spte

        monkeypatch.setattr(cpu, "fault_in", fault_then_harvest)
        # pages 0 and 2: the harvest protects each alone, page 2 not mapped yet
        cpu.start(CODE, Regs(esi=0x100000, ecx=data.size, edi=2 * PAGE_SIZE, ebx=3, ebp=1))
        assert cpu.run().kind is ExitKind.IO
        assert cpu.run().kind is ExitKind.HLT
        assert inner == [[0, 2]]
        assert bits(vm.get_dirty_log(1)) == [2]  # the store landed after the inner harvest
        for gpa, word in _walker_words(0x100000, data.size, 2 * PAGE_SIZE, 3).items():
            assert int.from_bytes(vm.read(gpa, 4), "little") == word, hex(gpa)


# mov dword [0x300000 + 0x1000 * i], i for i in 0..3 (absolute, in 32- and 64-bit code);
# mov eax, [0x400000]; mov [0x400010], eax (no slot there: MMIO); out 0x10, al; hlt
_STORES = (b"".join(bytes([0xC7, 0x04, 0x25]) + (0x300000 + 0x1000 * i).to_bytes(4, "little")
                    + i.to_bytes(4, "little") for i in range(4))
           + bytes([0x8B, 0x04, 0x25, 0x00, 0x00, 0x40, 0x00])
           + bytes([0x89, 0x04, 0x25, 0x10, 0x00, 0x40, 0x00]) + bytes([0xE6, 0x10, 0xF4]))


@pytest.mark.parametrize("paging", [False, True], ids=["flat", "long64"])
def test_unicorn_hooks_take_no_lock_inside_the_guest(paging: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The Unicorn engine's rule "hooks never hold `_inside` while they wait for a lock": a
    zapper holds the MMU lock while it waits for the guest to stop, so a hook that takes it
    inside the guest deadlocks — a harvest racing a store to a page not mapped yet did, at
    the store gate (benchmarks/diag_hot_pages.py hung). Every kvmem lock the vCPU's worker
    takes while inside the guest is recorded, but the vCPU's own mapping lock (held briefly,
    never while waiting); the stores go to pages not mapped yet, one of them tracked, and a
    load and a store to no memory exit."""
    from kvmem import sync
    from kvmem.cpu import modes
    from kvmem.engines.unicorn import UnicornVcpu

    mem = kvmem.HostMemory.anonymous(4 << 20)
    vm = kvmem.Vm(engine="unicorn")
    assert vm.engine is not None
    taken: list[str] = []
    real_enter, real_acquire = sync.Mutex.__enter__, sync.Mutex.acquire

    def note(lock: sync.Mutex) -> None:
        backend = vm.vcpus[0]._backend if vm.vcpus else None
        if isinstance(backend, UnicornVcpu) and backend._inside and \
                lock is not backend._lock and \
                threading.current_thread() is getattr(backend, "_worker", None):
            taken.append(lock.name)

    def enter(self: sync.Mutex) -> sync.Mutex:
        note(self)
        return real_enter(self)

    def acquire(self: sync.Mutex) -> None:
        note(self)
        real_acquire(self)

    try:
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, mem.size, mem.hva)
        vm.page_track.register(Recorder())
        vm.page_track.add_gfn(0x302)
        cpu = vm.create_vcpu(0)
        if paging:
            state = modes.long_mode(CODE, vm.write, 0x20000)
            vm.write(CODE, _STORES)
            cpu.set_state(state)
        else:
            vm.write(CODE, _STORES)
            cpu.start(CODE)
        monkeypatch.setattr(sync.Mutex, "__enter__", enter)
        monkeypatch.setattr(sync.Mutex, "acquire", acquire)
        exits = []
        while (e := cpu.run()).kind is not ExitKind.HLT:
            exits.append(e)
            if e.kind is ExitKind.MMIO and not e.is_write:
                cpu.complete(b"\x5a" * e.size)
        monkeypatch.undo()
        assert taken == []
        assert [(e.kind, e.addr, e.data) for e in exits] == [
            (ExitKind.MMIO, 0x400000, b""), (ExitKind.MMIO, 0x400010, b"\x5a" * 4),
            (ExitKind.IO, 0x10, b"\x5a")]
        for i in range(4):
            assert vm.read(0x300000 + 0x1000 * i, 4) == i.to_bytes(4, "little")
    finally:
        monkeypatch.undo()
        vm.engine.close()
        mem.close()


@pytest.mark.kvm
@pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")
def test_kvm_dirty_log_survives_a_failed_harvest(make_vm: Callable[..., kvmem.Vm],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    vm = make_vm("kvm")
    run_loop(vm)  # harvests once: pages 0x200 (data) were dirty
    engine = vm.engine
    assert engine is not None
    cpu = vm.vcpus[0]
    cpu.start(CODE, Regs(esi=0x200000, ecx=10, ebx=0))
    assert cpu.run().kind is ExitKind.IO
    fd = engine._fd  # type: ignore[attr-defined]

    def refuse(*args: object) -> None:
        raise OSError(5, "injected failure")

    # the step that gives KVM's pages back to it fails: bitmaps clear KVM's bits, the
    # engine's own rings reset KVM's entries (owed until it succeeds)
    own = engine._own_ring  # type: ignore[attr-defined]
    monkeypatch.setattr(fd, "reset_dirty_rings" if own else "clear_dirty_log", refuse)
    with pytest.raises(OSError):
        vm.get_dirty_log(0)
    monkeypatch.undo()
    assert bits(vm.get_dirty_log(0)) == [0x200]
    assert bits(vm.get_dirty_log(0)) == []
    # and the page is protected again: the next write is logged
    cpu.start(CODE, Regs(esi=0x200000, ecx=1, ebx=0))
    assert cpu.run().kind is ExitKind.IO
    assert bits(vm.get_dirty_log(0)) == [0x200]


@pytest.mark.kvm
@pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")
def test_kvm_tracking_splits_and_merges_back(make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm("kvm")
    engine = vm.engine
    assert engine is not None
    vm.page_track.add_gfn(0x200)
    vm.page_track.add_gfn(0x201)
    covers = engine.split_covers  # type: ignore[attr-defined]
    # exactly the tracked gfns are mirrored read-only, the rest of the slot stays writable
    assert [g for g in range(0x1F0, 0x210) if covers(0, g)] == [0x200, 0x201]
    vm.page_track.remove_gfn(0x200)
    assert [g for g in range(0x1F0, 0x210) if covers(0, g)] == [0x201]
    vm.page_track.remove_gfn(0x201)
    assert [g for g in range(0, RAM // PAGE_SIZE) if covers(0, g)] == []


@pytest.mark.kvm
@pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")
def test_kvm_write_exit_of_a_split_merged_back_meanwhile_is_not_lost(
        make_vm: Callable[..., kvmem.Vm], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's write exited on the read-only split; before the exit is decoded the
    last tracker goes and the split merges back. The write is still the guest's: kvmem
    performs it instead of handing it out as an MMIO exit."""
    from kvmem.kvmapi import KVM_EXIT_MMIO, KvmMmio
    vm = make_vm("kvm")
    assert vm.engine is not None and vm.engine.name == "kvm"
    cpu = cast("KvmEngineVcpu", vm.create_vcpu(0).backend)  # reaches into its exit decoding
    vm.page_track.add_gfn(0x200)
    vm.page_track.remove_gfn(0x200)  # merged back before the exit is looked at
    assert not vm.engine.split_covers(0, 0x200)  # type: ignore[attr-defined]
    monkeypatch.setattr(cpu._fd, "mmio", lambda: KvmMmio(0x200008, b"late", 4, True))
    assert cpu._decode(KVM_EXIT_MMIO) is None  # resumed, not an exit
    assert vm.read(0x200008, 4) == b"late"
    monkeypatch.setattr(cpu._fd, "mmio", lambda: KvmMmio(RAM + 0x10, b"mmio", 4, True))
    e = cpu._decode(KVM_EXIT_MMIO)  # a real hole stays an MMIO exit
    assert e is not None and e.kind is ExitKind.MMIO and e.data == b"mmio"


@pytest.mark.parametrize("engine", ENGINES)
def test_atomic_updates_are_invisible_to_the_guest(engine: str) -> None:
    """Issue 4 point 6: thousands of splits and merges under a running guest — with
    transactions no exit and no torn access; the naive sequence is counted, not asserted."""
    tx = atomic_demo.run(engine, rounds=1000)
    naive = atomic_demo.run(engine, rounds=300, surgery=atomic_demo.NAIVE)
    print(f"\n{engine}: transactions: {tx.rounds * 2} updates, {tx.unexpected_mmio} MMIO "
          f"exits, {tx.torn} torn, {tx.internal_errors} internal errors, guest "
          f"{tx.iterations} iterations | naive delete+create: {naive.rounds * 2} updates, "
          f"{naive.unexpected_mmio} MMIO exits, {naive.torn} torn, {naive.internal_errors} "
          f"internal errors")
    assert tx.rounds == 1000
    assert tx.iterations > 0
    assert tx.clean, tx


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_bundled_binaries_match_their_sources() -> None:
    assert build.main(["--check"]) == 0


def test_auto_picks_kvm_where_it_works_and_honours_its_address_spaces() -> None:
    vm = kvmem.Vm(engine="auto")
    assert vm.engine is not None
    try:
        assert vm.engine.name == ("kvm" if KVM_REASON is None else "unicorn")
        assert vm.address_spaces == vm.engine.capabilities.address_spaces
    finally:
        vm.engine.close()
    if KVM_REASON is None and vm.engine.capabilities.address_spaces == 1:
        with pytest.raises(kvmem.KvmError, match="offers 1 address space"):
            kvmem.Vm(engine="kvm", address_spaces=2)
    with pytest.raises(ValueError, match="unknown engine"):
        kvmem.Vm(engine="qemu")


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_offer_their_guest_physical_width(engine: str) -> None:
    """A Vm takes the engine's width where it is below the default, and refuses more than
    the engine offers (as it refuses more address spaces), opening nothing it keeps."""
    probe = kvmem.Vm(engine=engine)
    assert probe.engine is not None
    offered = probe.engine.capabilities.phys_bits
    probe.engine.close()
    assert probe.limits.phys_bits == min(52, offered)
    if offered < 64:
        with pytest.raises(kvmem.KvmError) as info:
            kvmem.Vm(engine=engine, phys_bits=offered + 1)
        assert info.value.errno == errno.EINVAL and f"offers {offered}-bit" in str(info.value)
    vm = kvmem.Vm(engine=engine, phys_bits=offered)
    assert vm.engine is not None
    vm.engine.close()
