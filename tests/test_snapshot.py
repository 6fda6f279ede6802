"""Snapshots of a whole VM and restore (issue 11, points 2 and 3), on every engine.

What a user relies on: after `vm.restore(snap)` the VM is the snapshot — memory, layout,
vCPU state, dirty logs — whatever happened since (guest writes, kvmem's own writes, host
discards, layout changes, writes through raw views reported with `mark_dirty`); a restore
copies back only the pages that changed; the user's own dirty log is never robbed by it;
snapshot files round-trip and bad files are refused before anything is built."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from expect import GUEST_ENGINES

import kvmem
from kvmem import HostMemory, KvmError, Snapshot, SnapshotFormatError, host
from kvmem.dirty import RestoreLog
from kvmem.engines import ExitKind, Regs
from kvmem.guests import program
from kvmem.uapi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE

GuestWrites = Callable[[kvmem.Vm, int, int], list[tuple[int, bytes]]]
WALKER_CODE = 0x1000  # where conftest's `guest_writes` loads the walker

MiB = 1 << 20
DATA = 0x10000  # where the tests' guests write


@pytest.fixture
def mems() -> Iterator[Callable[[int], HostMemory]]:
    made: list[HostMemory] = []

    def make(size: int) -> HostMemory:
        m = HostMemory.anonymous(size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _vm(make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory],
        flags: int = 0, size: int = 1 * MiB) -> tuple[kvmem.Vm, HostMemory]:
    vm = make_vm(address_spaces=1)
    mem = mems(size)
    vm.set_memory_region(0, flags, 0, size, mem.hva)
    return vm, mem


def _fill(vm: kvmem.Vm, gpa: int, npages: int, tag: int) -> None:
    for i in range(npages):
        vm.write(gpa + i * PAGE_SIZE, bytes([tag, i]) * 8)


def test_restore_undoes_guest_and_kvmem_writes(make_vm: Callable[..., kvmem.Vm],
                                              mems: Callable[[int], HostMemory],
                                              guest_writes: GuestWrites) -> None:
    vm, _ = _vm(make_vm, mems)
    _fill(vm, DATA, 8, 1)
    guest_writes(vm, DATA + 16 * PAGE_SIZE, 1)  # loads the walker's code once before
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB)
    guest_writes(vm, DATA, 4)
    vm.write(DATA + 32 * PAGE_SIZE, b"kvmem's own write")
    vm.clear(DATA + 40 * PAGE_SIZE, 2 * PAGE_SIZE + 10)
    assert vm.read(0, 1 * MiB) != image
    copied = vm.restore(snap)
    assert vm.read(0, 1 * MiB) == image
    # only what changed: 4 guest pages, 1 + 3 written by kvmem (the walker's code page is
    # written again by guest_writes before every run)
    assert 8 <= copied <= 9, copied
    assert vm.restore(snap) == 0  # nothing changed since


def test_restore_does_not_steal_the_users_dirty_log(make_vm: Callable[..., kvmem.Vm],
                                                   mems: Callable[[int], HostMemory],
                                                   guest_writes: GuestWrites) -> None:
    vm, _ = _vm(make_vm, mems, KVM_MEM_LOG_DIRTY_PAGES)
    guest_writes(vm, DATA, 1)
    vm.get_dirty_log(0)
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB)
    guest_writes(vm, DATA + PAGE_SIZE, 3)
    log = vm.get_dirty_log(0)  # the user harvests first: the restore must still see them
    bits = int.from_bytes(log, "little")
    for i in range(3):
        assert bits >> ((DATA >> 12) + 1 + i) & 1
    assert vm.restore(snap) >= 3
    assert vm.read(0, 1 * MiB) == image
    # and the user's log is the snapshot's again (empty: it was harvested before it)
    assert vm.get_dirty_log(0) == snap.dirty[(0, 0)]


def test_dirty_log_is_restored(make_vm: Callable[..., kvmem.Vm],
                               mems: Callable[[int], HostMemory],
                               guest_writes: GuestWrites) -> None:
    vm, _ = _vm(make_vm, mems, KVM_MEM_LOG_DIRTY_PAGES)
    vm.enable_manual_dirty_log_protect()
    guest_writes(vm, DATA, 2)
    snap = vm.snapshot()
    want = vm.get_dirty_log(0)  # manual protect: reading does not clear
    vm.clear_dirty_log(0, 0, 256, b"\xff" * 32)
    guest_writes(vm, DATA + 8 * PAGE_SIZE, 1)
    vm.disable_manual_dirty_log_protect()
    vm.restore(snap)
    assert vm.manual_dirty_log_protect == snap.manual_dirty_log_protect != 0
    assert vm.get_dirty_log(0) == want


def test_dirty_log_is_restored_into_the_bitmaps_standing_now(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory],
        guest_writes: GuestWrites) -> None:
    """A restore remembers which bitmaps it loads (per slot generations): a slot deleted
    and made again since has a new bitmap, and that one gets the snapshot's bits."""
    vm, mem = _vm(make_vm, mems, KVM_MEM_LOG_DIRTY_PAGES)
    vm.enable_manual_dirty_log_protect()
    guest_writes(vm, DATA, 2)
    snap = vm.snapshot()
    want = vm.get_dirty_log(0)
    assert want != bytes(len(want))
    vm.restore(snap)
    assert vm.get_dirty_log(0) == want
    vm.set_memory_region(0, 0, 0, 0, 0)  # the same slot again: the layout is the snapshot's
    vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 1 * MiB, mem.hva)
    assert vm.get_dirty_log(0) == bytes(len(want))
    vm.restore(snap)
    assert vm.get_dirty_log(0) == want


def test_bulk_marks_of_the_restore_log_are_made_inside_a_guard_section(
        engine: str | None, make_vm: Callable[..., kvmem.Vm],
        mems: Callable[[int], HostMemory], guest_writes: GuestWrites,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`RestoreLog.mark_pages` (an engine's ring entries, in bulk) takes no lock: it is
    called inside a `host.guard` read section, which the grace period after a take
    waits for — a mark that found the old set is in it before it is read."""
    seen: list[bool] = []
    mark_pages = RestoreLog.mark_pages

    def spy(self: RestoreLog, pages: list[int]) -> None:
        seen.append(len(host.guard.current) > 0)
        mark_pages(self, pages)

    monkeypatch.setattr(RestoreLog, "mark_pages", spy)
    vm, _ = _vm(make_vm, mems)
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB)
    guest_writes(vm, DATA, 4)
    vm.restore(snap)
    assert vm.read(0, 1 * MiB) == image
    assert all(seen)
    if engine == "kvm":  # the KVM engine routes its rings' entries this way
        assert seen


def test_guest_writes_in_several_slots_are_all_restored(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory],
        guest_writes: GuestWrites) -> None:
    """Writes in two slots between two restores (on KVM: one drain of the ring with the
    entries of two KVM slots, the first slot's taken in one pass, the rest grouped)."""
    vm, _ = _vm(make_vm, mems)
    other = mems(1 * MiB)
    vm.set_memory_region(1, 0, 4 * MiB, 1 * MiB, other.hva)
    guest_writes(vm, DATA, 1)  # the walker's code, loaded once before
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB) + vm.read(4 * MiB, 1 * MiB)
    guest_writes(vm, DATA, 3)
    guest_writes(vm, 4 * MiB + DATA, 2)
    guest_writes(vm, DATA + 8 * PAGE_SIZE, 1)
    assert vm.read(0, 1 * MiB) + vm.read(4 * MiB, 1 * MiB) != image
    assert 6 <= vm.restore(snap) <= 7  # (the walker's code page, written again each run)
    assert vm.read(0, 1 * MiB) + vm.read(4 * MiB, 1 * MiB) == image


def test_tracking_added_since_the_snapshot_is_undone(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory]) -> None:
    """A snapshot taken before any gfn was ever tracked: tracking added since is taken
    away by the restore (a restore looks at tracking once some gfn was tracked)."""
    vm, _ = _vm(make_vm, mems)
    snap = vm.snapshot()
    assert vm.restore(snap) == 0
    vm.page_track.add_gfn(DATA >> 12)
    vm.page_track.add_gfn(DATA >> 12)
    vm.restore(snap)
    assert vm.page_track.tracked_gfns() == []


def test_host_changes_and_reported_raw_writes_are_restored(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory]) -> None:
    vm, mem = _vm(make_vm, mems)
    _fill(vm, 0, 256, 7)
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB)
    mem.discard(64 * PAGE_SIZE, 8 * PAGE_SIZE)
    mem.remap(128 * PAGE_SIZE, 4 * PAGE_SIZE)
    raw = mem.view()
    raw[200 * PAGE_SIZE:200 * PAGE_SIZE + 4] = b"raw!"
    vm.mark_dirty(200 * PAGE_SIZE + 1, 2)
    raw[210 * PAGE_SIZE] = 0xEE  # not reported: documented to stay
    assert vm.restore(snap) == 8 + 4 + 1
    now = bytearray(vm.read(0, 1 * MiB))
    assert now[210 * PAGE_SIZE] == 0xEE
    now[210 * PAGE_SIZE] = image[210 * PAGE_SIZE]
    assert bytes(now) == image


def test_a_run_of_pages_past_the_snapshots_memory_copies_only_its_own(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory]) -> None:
    """Changed pages adjacent in host memory are copied back as one run, but only what an
    image of the snapshot holds: here the run crosses from the snapshot's memory into
    memory a slot made since maps (one copy of one page, not of the run)."""
    vm = make_vm(address_spaces=1)
    mem = mems(2 * MiB)
    vm.set_memory_region(0, 0, 0, 1 * MiB, mem.hva)
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB)
    vm.set_memory_region(1, 0, 1 * MiB, 1 * MiB, mem.hva + 1 * MiB)
    vm.write(1 * MiB - 8, b"across the end of the image")  # the last page and the next
    assert vm.restore(snap) == 1
    assert vm.read(0, 1 * MiB) == image
    assert [s.id for s in vm.slots()] == [0]


def test_layout_changes_are_undone_in_one_transaction(make_vm: Callable[..., kvmem.Vm],
                                                     mems: Callable[[int], HostMemory],
                                                     guest_writes: GuestWrites) -> None:
    vm, _ = _vm(make_vm, mems)
    other = mems(1 * MiB)
    vm.set_memory_region(1, 0, 4 * MiB, 1 * MiB, other.hva)
    _fill(vm, 4 * MiB, 4, 3)
    snap = vm.snapshot()
    image = vm.read(0, 1 * MiB) + vm.read(4 * MiB, 1 * MiB)
    layout = [(s.id, s.flags, s.gpa, s.size, s.hva) for s in vm.slots()]
    vm.set_memory_region(1, 0, 0, 0, 0)  # delete
    vm.set_memory_region(1, 0, 8 * MiB, 1 * MiB, other.hva)  # made again elsewhere
    vm.write(8 * MiB, b"through the moved slot")
    extra = mems(1 * MiB)
    vm.set_memory_region(2, KVM_MEM_LOG_DIRTY_PAGES, 16 * MiB, 1 * MiB, extra.hva)
    vm.write(16 * MiB, b"new slot")
    guest_writes(vm, DATA, 2)
    changes: list[list[kvmem.Change]] = []

    class Spy(kvmem.SlotsListener):
        def slots_committed(self, vm: kvmem.Vm, c: object) -> None:
            changes.append(list(c))  # type: ignore[call-overload]

    vm.add_listener(Spy())
    vm.restore(snap)
    assert [(s.id, s.flags, s.gpa, s.size, s.hva) for s in vm.slots()] == layout
    assert len(changes) == 1  # one transaction
    assert vm.read(0, 1 * MiB) + vm.read(4 * MiB, 1 * MiB) == image


def test_vcpu_state_is_restored(engine: str | None, make_vm: Callable[..., kvmem.Vm],
                                mems: Callable[[int], HostMemory]) -> None:
    vm, _ = _vm(make_vm, mems)
    vm.write(WALKER_CODE, program("walker"))
    cpu = vm.create_vcpu(0)
    if engine is None:  # kvmem alone holds the state its page walks read
        cpu.set_state(cpu.get_state().with_regs(rip=WALKER_CODE, rsi=DATA, rbx=9))
        held = cpu.get_state()
        snap = vm.snapshot()
        cpu.set_state(held.with_regs(rip=0x2000, rsi=0, rbx=0))
        vm.restore(snap)
        assert cpu.get_state() == held
        return
    cpu.start(WALKER_CODE, Regs(esi=DATA, ecx=4 * PAGE_SIZE, edi=PAGE_SIZE, ebx=9, ebp=1))
    snap = vm.snapshot()
    first = cpu.run()
    assert first.kind is ExitKind.IO
    assert cpu.run().kind is ExitKind.HLT
    vm.restore(snap)
    assert cpu.get_state().regs.rip == WALKER_CODE
    again = cpu.run()  # the same run again, from the same memory: the same checksum
    assert (again.kind, again.data) == (first.kind, first.data)


def test_restore_sets_back_control_registers_changed_since(
        engine: str | None, make_vm: Callable[..., kvmem.Vm],
        mems: Callable[[int], HostMemory]) -> None:
    """Segment and control registers changed since the snapshot come back, whether the
    change was loaded and never ran, or ran (a restore may skip loading registers only
    where the vCPU provably holds them already)."""
    vm, _ = _vm(make_vm, mems)
    vm.write(WALKER_CODE, program("walker"))
    cpu = vm.create_vcpu(0)
    regs = {"esi": DATA, "ecx": PAGE_SIZE, "edi": PAGE_SIZE, "ebx": 9, "ebp": 1}
    if engine is None:
        cpu.set_state(cpu.get_state().with_regs(rip=WALKER_CODE, rsi=DATA, rbx=9))
    else:
        cpu.start(WALKER_CODE, Regs(**regs))
    held = cpu.get_state()
    snap = vm.snapshot()
    other = held.with_sregs(cr2=0x5000).with_segment("gs", base=0x7000)

    def to_halt() -> None:
        if engine is not None:
            assert cpu.run().kind is ExitKind.IO
            assert cpu.run().kind is ExitKind.HLT

    for ran in (False, True):
        to_halt()
        vm.restore(snap)  # the registers held are the snapshot's, as seen at the last exit
        to_halt()
        cpu.set_state(other)
        if ran:
            cpu.set_state(other.with_regs(rip=WALKER_CODE, rsi=DATA, rcx=PAGE_SIZE,
                                          rdi=PAGE_SIZE, rbx=9, rbp=1))
            to_halt()  # the vCPU ran with them: KVM reports them at its exits
        vm.restore(snap)
        assert cpu.get_state().sregs == held.sregs, f"ran={ran}"


def test_restore_to_any_of_several_snapshots(make_vm: Callable[..., kvmem.Vm],
                                            mems: Callable[[int], HostMemory],
                                            guest_writes: GuestWrites) -> None:
    vm, _ = _vm(make_vm, mems)
    s1 = vm.snapshot()
    i1 = vm.read(0, 1 * MiB)
    guest_writes(vm, DATA, 2)
    s2 = vm.snapshot()
    i2 = vm.read(0, 1 * MiB)
    vm.write(DATA + 5 * PAGE_SIZE, b"after s2")
    vm.restore(s1)
    assert vm.read(0, 1 * MiB) == i1
    vm.restore(s2)
    assert vm.read(0, 1 * MiB) == i2
    vm.restore(s1)
    assert vm.read(0, 1 * MiB) == i1


def test_refused_restores_change_nothing(make_vm: Callable[..., kvmem.Vm],
                                         mems: Callable[[int], HostMemory]) -> None:
    vm, _ = _vm(make_vm, mems)
    other, _ = _vm(make_vm, mems)
    snap = other.snapshot()
    with pytest.raises(KvmError) as e:
        vm.restore(snap)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        vm.restore("snap")  # type: ignore[arg-type]
    extra = HostMemory.anonymous(1 * MiB)
    vm.set_memory_region(1, 0, 4 * MiB, 1 * MiB, extra.hva)
    mine = vm.snapshot()
    vm.write(0, b"changed")
    vm.restore(mine)  # a restore keeps views of the snapshot's memory until a host change
    vm.write(0, b"changed")
    vm.set_memory_region(1, 0, 0, 0, 0)
    extra.close()  # the snapshot's memory is gone: refused before anything changes
    with pytest.raises(KvmError) as e:
        vm.restore(mine)
    assert e.value.errno == errno.EFAULT
    assert vm.read(0, 7) == b"changed"
    assert [s.id for s in vm.slots()] == [0]


def _save_load(snap: Snapshot, path: Path, parent: Snapshot | None = None) -> Snapshot:
    snap.save(path, parent)
    return Snapshot.load(path, parent)


def test_files_round_trip_sparse_and_diff(make_vm: Callable[..., kvmem.Vm],
                                          mems: Callable[[int], HostMemory],
                                          tmp_path: Path) -> None:
    vm, _ = _vm(make_vm, mems, size=4 * MiB)
    _fill(vm, 0, 3, 5)
    base = vm.snapshot()
    full = tmp_path / "base.snap"
    loaded = _save_load(base, full)
    assert os.path.getsize(full) < 5 * PAGE_SIZE  # zero pages are not written
    assert loaded.id == base.id and loaded.layout == base.layout
    assert loaded.read(0, 4 * MiB) == base.read(0, 4 * MiB) == vm.read(0, 4 * MiB)
    assert loaded.vcpus == base.vcpus and loaded.dirty == base.dirty
    vm.write(2 * MiB, b"one more page")
    child = vm.snapshot()
    diff = tmp_path / "child.diff"
    child.save(diff, parent=base)
    assert os.path.getsize(diff) < 2 * PAGE_SIZE  # one page
    back = Snapshot.load(diff, parent=loaded)
    assert back.parent_id == base.id
    assert back.read(0, 4 * MiB) == vm.read(0, 4 * MiB)
    with pytest.raises(SnapshotFormatError, match="parent"):
        Snapshot.load(diff)
    with pytest.raises(SnapshotFormatError, match="not over the parent"):
        Snapshot.load(diff, parent=child)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:200] + bytes([b[200] ^ 1]) + b[201:], "CRC"),
    (lambda b: b"XXXXXXXX" + b[8:], "magic"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version 2"),
    (lambda b: b + b"\0", "trailing"),
])
def test_bad_files_are_refused(tmp_path: Path, damage: Callable[[bytes], bytes],
                               message: str) -> None:
    mem = HostMemory.anonymous(1 * MiB)
    try:
        vm = kvmem.Vm()
        vm.set_memory_region(0, 0, 0, 1 * MiB, mem.hva)
        vm.write(0, b"x" * 5000)
        path = tmp_path / "s.snap"
        vm.snapshot().save(path)
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(SnapshotFormatError, match=message):
            Snapshot.load(path)
    finally:
        mem.close()


def test_from_snapshot_on_every_engine(engine: str | None, tmp_path: Path) -> None:
    """A snapshot taken on Unicorn, saved, loaded and run on this run's engine gives the
    guest's result there."""
    mem = HostMemory.anonymous(1 * MiB)
    src = kvmem.Vm(engine="unicorn", address_spaces=1)
    try:
        src.set_memory_region(0, 0, 0, 1 * MiB, mem.hva)
        src.write(WALKER_CODE, program("walker"))
        assert src.engine is not None
        cpu = src.create_vcpu(0)
        cpu.start(WALKER_CODE, Regs(esi=DATA, ecx=4 * PAGE_SIZE, edi=PAGE_SIZE, ebx=3,
                                    ebp=1))
        snap = src.snapshot()
        want = cpu.run()
        snap.save(tmp_path / "u.snap")
    finally:
        src.engine.close() if src.engine is not None else None
    loaded = Snapshot.load(tmp_path / "u.snap")
    vm = kvmem.Vm.from_snapshot(loaded, engine=engine)
    try:
        assert vm.read(0, 1 * MiB) == loaded.read(0, 1 * MiB)
        assert [s.gpa for s in vm.slots()] == [0]
        if vm.engine is None:
            return
        run = vm.vcpus[0]
        got = run.run()
        assert (got.kind, got.addr, got.data) == (want.kind, want.addr, want.data)
        assert run.run().kind is ExitKind.HLT
        vm.restore(loaded)  # the VM made from a snapshot restores to it
        assert vm.read(0, 1 * MiB) == loaded.read(0, 1 * MiB)
        assert run.get_state().regs.rip == WALKER_CODE
    finally:
        if vm.engine is not None:
            vm.engine.close()
        for m in vm.host_memory:
            m.close()
        mem.close()


# -- page tables put back behind the CPU's back ------------------------------------------------
SYS, UCODE, KCODE, STACK, X, A, B = (0x20_0000, 0x40_0000, 0x41_0000, 0x60_0000, 0x50_0000,
                                     0x50_0000, 0x51_0000)


def _user_vm(make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory]
             ) -> tuple[kvmem.Vm, kvmem.cpu.VcpuState, int]:
    """A VM whose vCPU 0 holds CPL 3 code reading gva X (mapped to A) into RBX, then INT3;
    and the gpa of X's page-table entry."""
    from kvmem.cpu import modes

    vm, _ = _vm(make_vm, mems, size=8 * MiB)
    state = modes.user_mode(UCODE, vm.write, SYS, rsp=STACK, identity_size=8 * MiB)
    vm.write(A, (0x11).to_bytes(8, "little"))
    vm.write(B, (0x22).to_bytes(8, "little"))
    vm.write(UCODE, bytes([0x48, 0x8B, 0x1C, 0x25]) + X.to_bytes(4, "little") + b"\xcc")
    table = state.sregs.cr3
    for level in (4, 3, 2):
        entry = vm.read(table + 8 * ((X >> (12 + 9 * (level - 1))) & 511), 8)
        table = int.from_bytes(entry, "little") & 0x000F_FFFF_FFFF_F000
    return vm, state, table + 8 * ((X >> 12) & 511)


def test_a_restore_that_puts_page_tables_back_tells_the_listeners(
        make_vm: Callable[..., kvmem.Vm], mems: Callable[[int], HostMemory]) -> None:
    """Listeners hear `guest_tables_restored` when a restore copied back a page holding a
    page table of a snapshot vCPU (reachable from its CR3), and only then."""
    vm, state, pte = _user_vm(make_vm, mems)
    cpu = vm.create_vcpu(0)
    cpu.set_state(state)
    heard: list[kvmem.Vm] = []

    class Listener(kvmem.SlotsListener):
        def guest_tables_restored(self, vm: kvmem.Vm) -> None:
            heard.append(vm)

    vm.add_listener(Listener())
    snap = vm.snapshot()
    vm.write(B, b"data")  # not a table
    vm.restore(snap)
    assert heard == []
    vm.write(pte, (A | 7).to_bytes(8, "little"))  # X's page table
    vm.restore(snap)
    assert heard == [vm]
    vm.restore(snap)  # nothing copied: nothing to hear
    assert heard == [vm]


@pytest.mark.parametrize("engine", GUEST_ENGINES)
def test_no_translation_survives_a_restore(engine: str, make_vm: Callable[..., kvmem.Vm],
                                           mems: Callable[[int], HostMemory]) -> None:
    """The guest remaps X from A to B (CPL 0 code writing its page table) after the
    snapshot and reads B through it; after the restore the table maps A again and the guest
    reads A — no translation made from the table as it was since lives on (KVM's shadow
    pages and TLB do not see a host copy into a table: the engine drops them)."""
    from kvmem.cpu import modes

    vm, state, pte = _user_vm(make_vm, mems)
    kernel = modes.long_mode(KCODE, lambda gpa, data: None, 0x7F_0000).sregs
    ring0 = state.with_sregs(cs=kernel.cs, ss=kernel.ss, ds=kernel.ds,
                             es=kernel.es).with_regs(rip=KCODE)
    entry = int.from_bytes(vm.read(pte, 8), "little")
    remap = (entry & ~0x000F_FFFF_FFFF_F000) | B
    # mov $remap, %rax; mov %rax, (pte); hlt
    vm.write(KCODE, bytes([0x48, 0xB8]) + remap.to_bytes(8, "little")
             + bytes([0x48, 0x89, 0x04, 0x25]) + pte.to_bytes(4, "little") + b"\xf4")
    cpu = vm.create_vcpu(0)

    def read_x() -> int:
        cpu.set_state(state)
        assert cpu.run().kind is ExitKind.IO  # the INT3, at the stub
        return cpu.get_state().regs.rbx

    assert read_x() == 0x11
    snap = vm.snapshot()
    cpu.set_state(ring0)
    assert cpu.run().kind is ExitKind.HLT
    assert read_x() == 0x22
    vm.restore(snap)
    assert vm.read(pte, 8) == entry.to_bytes(8, "little")
    assert read_x() == 0x11, "a translation made from the remapped table survived the restore"
